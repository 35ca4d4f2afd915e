"""lm-evaluation-harness end to end on a window-patched tiny model and a multiple-choice task
(tests/helpers/lm_eval_task.py: YAML + JSONL in tmp_path): offline, results land in the run folder."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")
from helpers.lm_eval_task import CHOICE_DOCS as DOCS  # noqa: E402
from helpers.lm_eval_task import CHOICE_TASK as TASK
from helpers.lm_eval_task import write_choice_task
from mswa.hf import apply_window_attention  # noqa: E402
from mswa.hf.evaluate import evaluate_commonsense, main, summarize  # noqa: E402
from mswa.hf.tiny import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402

WINDOWS = [[2, 4, 1, 8], [3, 3, 6, None]]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def task_dir(tmp_path):
    return write_choice_task(tmp_path / "tasks")


def own_loglikelihoods(model, tokenizer):
    """Per document, per choice: the summed log-probability of the choice's tokens after the prompt."""
    scores = []
    for question, choices, _ in DOCS:
        context = f"Question: {question}\nAnswer:"
        n_context = len(tokenizer.encode(context))
        row = []
        for choice in choices:
            ids = torch.tensor([tokenizer.encode(f"{context} {choice}")])
            with torch.no_grad():
                logprobs = model(ids).logits[0, :-1].log_softmax(-1)
            row.append(logprobs.gather(1, ids[0, 1:, None])[n_context - 1 :].sum().item())
        scores.append(row)
    return scores


def flat(rows):
    return [value for row in rows for value in row]


class RecordingLogger:
    def __init__(self):
        self.logged = {}

    def log(self, metrics):
        self.logged.update(metrics)


def test_lm_eval_scores_the_patched_model_and_writes_the_run_folder(task_dir, tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    unpatched = own_loglikelihoods(model, tokenizer)
    apply_window_attention(model, WINDOWS)
    expected = own_loglikelihoods(model, tokenizer)
    logger, run_dir = RecordingLogger(), tmp_path / "run"
    summary = evaluate_commonsense(
        model,
        tokenizer,
        run_dir,
        tasks=[TASK],
        include_path=task_dir,
        include_defaults=False,
        batch_size=2,
        logger=logger,
        save_samples=True,
        extra={"schedule": "custom"},
    )
    lines = (run_dir / "lm_eval_samples.jsonl").read_text().splitlines()
    samples = sorted((json.loads(line) for line in lines), key=lambda row: row["doc_id"])
    scored = [response[0] for row in samples for response in row["responses"]]
    assert scored == pytest.approx(flat(expected), abs=1e-4)  # lm_eval ran the patched model...
    assert scored != pytest.approx(flat(unpatched), abs=1e-2)  # ...which the windows really changed
    accuracy = sum(max(range(len(row)), key=row.__getitem__) == label for row, (_, _, label) in zip(expected, DOCS)) / len(DOCS)
    assert summary[TASK]["acc"] == pytest.approx(accuracy)
    record = json.loads((run_dir / "lm_eval.json").read_text())
    assert record["summary"] == summary and record["schedule"] == "custom"
    assert record["windows"] == WINDOWS and record["num_fewshot"] == 0
    assert record["n_samples"][TASK]["effective"] == len(DOCS)
    assert logger.logged[f"lm_eval/{TASK}/acc"] == summary[TASK]["acc"]


def test_cli_patches_a_saved_model_with_a_schedule(task_dir, tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "model")
    out = tmp_path / "cli_run"
    argv = [
        "--model",
        str(model_dir),
        "--schedule",
        "uniform",
        "--window-fraction",
        "0.25",
        "--seq-len",
        "32",
        "--tasks",
        TASK,
        "--include-path",
        str(task_dir),
        "--no-default-tasks",
        "--num-fewshot",
        "1",
        "--limit",
        "3",
        "--out",
        str(out),
    ]
    summary = main(argv)
    record = json.loads((out / "lm_eval.json").read_text())
    assert record["windows"] == [[8] * 4] * 2  # 0.25 x 32 tokens, every head of both layers
    assert record["n_shot"][TASK] == 1 and record["n_samples"][TASK]["effective"] == 3
    assert 0.0 <= summary[TASK]["acc"] <= 1.0
    assert TASK in capsys.readouterr().out


def test_cli_merges_a_fine_tuned_adapter(task_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model_dir = save_tiny(tmp_path / "model")
    tokenizer = tiny_tokenizer()
    tuned = get_peft_model(tiny_model("llama", vocab_size=len(tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): make it change the model
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    tuned.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "cli_run"
    main(
        [
            "--model",
            str(model_dir),
            "--adapter",
            str(tmp_path / "adapter"),
            "--tasks",
            TASK,
            "--include-path",
            str(task_dir),
            "--no-default-tasks",
            "--save-samples",
            "--out",
            str(out),
        ]
    )
    samples = sorted((json.loads(line) for line in (out / "lm_eval_samples.jsonl").read_text().splitlines()), key=lambda row: row["doc_id"])
    scored = [[choice[0] for choice in row["responses"]] for row in samples]
    assert flat(scored) == pytest.approx(flat(own_loglikelihoods(tuned.eval(), tokenizer)), abs=1e-4)
    with tuned.disable_adapter():  # the adapter mattered: without it the scores differ
        assert flat(scored) != pytest.approx(flat(own_loglikelihoods(tuned, tokenizer)), abs=1e-2)


def test_bad_requests_fail_before_evaluating(task_dir, tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match=r"\['no_such_task'\] are unknown"):
        evaluate_commonsense(model, tokenizer, tmp_path / "r", tasks=["no_such_task"], include_path=task_dir, include_defaults=False)
    with pytest.raises(ValueError, match="num_fewshot=-1"):
        evaluate_commonsense(model, tokenizer, tmp_path / "r", tasks=[TASK], num_fewshot=-1)
    assert not (tmp_path / "r").exists()


def test_summary_keeps_metrics_and_drops_bookkeeping():
    results = {
        "piqa": {
            "alias": "piqa",
            "sample_len": 10,
            "acc,none": 0.7,
            "acc_stderr,none": 0.01,
            "acc_norm,none": 0.72,
            "acc_norm_stderr,none": "N/A",
            "exact_match,strict": 0.5,
        }
    }
    assert summarize(results) == {"piqa": {"acc": 0.7, "acc_stderr": 0.01, "acc_norm": 0.72, "exact_match/strict": 0.5}}
