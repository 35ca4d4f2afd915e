"""Pretrained-model fine-tuning through the real stack: packed text, model=hf_causal_lm, LoRA, train.py.

Everything is built here: a tiny Llama with random weights, a tokenizer trained locally, and text
documents written by the test; nothing comes from a hub."""

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from helpers.lm_eval_task import CHOICE_TASK, write_choice_task  # noqa: E402
from helpers.runs import compose_config, run_train  # noqa: E402
from mswa.config import parse_config  # noqa: E402
from mswa.data.batches import EvalChunks, RandomCrops  # noqa: E402
from mswa.data.corpus import DataError  # noqa: E402
from mswa.data.packed import load as load_packed  # noqa: E402
from mswa.factory import build_schedule  # noqa: E402
from mswa.hf import apply_window_attention  # noqa: E402
from mswa.hf.tiny import SAMPLE_TEXT, save_tiny  # noqa: E402
from mswa.run import RunInfo, train  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("hf") / "tiny_llama")


def write_documents(folder: Path, n: int, sentences: int = 30) -> list[Path]:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"doc{i:03d}.txt"
        path.write_text(" ".join(rng.choice(SAMPLE_TEXT) for _ in range(sentences)))
        paths.append(path)
    return paths


# --- the packed-text dataset ------------------------------------------------------------------


def test_packed_text_joins_documents_by_eos_and_deals_held_out_documents(tiny_dir, tmp_path):
    paths = write_documents(tmp_path / "docs", 10, sentences=3)
    corpus = load_packed(tmp_path / "cache", str(tiny_dir), files=[str(p) for p in paths], eval_every=5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    encoded = [tokenizer(p.read_text())["input_ids"] + [tokenizer.eos_token_id] for p in paths]
    # of every 5 documents the 4th goes to valid, the 5th to test, in order
    expected = {
        "train": [t for i, ids in enumerate(encoded) if i % 5 < 3 for t in ids],
        "valid": [t for i, ids in enumerate(encoded) if i % 5 == 3 for t in ids],
        "test": [t for i, ids in enumerate(encoded) if i % 5 == 4 for t in ids],
    }
    for split, tokens in expected.items():
        assert corpus.splits[split].tolist() == tokens, split
    assert corpus.unit == "token" and corpus.metric == "ppl" and corpus.vocab_size == len(tokenizer)
    # the second load opens the verified cache and gives the same arrays
    again = load_packed(tmp_path / "cache", str(tiny_dir), files=[str(p) for p in paths], eval_every=5)
    assert np.array_equal(again.splits["train"], corpus.splits["train"])


def test_packed_text_reads_a_datasets_folder_and_stops_at_max_tokens(tiny_dir, tmp_path):
    folder = tmp_path / "hf_dataset"
    folder.mkdir()
    rows = [{"text": " ".join(SAMPLE_TEXT[i % 5 :] + SAMPLE_TEXT[: i % 5]), "id": i} for i in range(300)]
    pd.DataFrame(rows).to_parquet(folder / "train-00000.parquet")
    corpus = load_packed(tmp_path / "cache", str(tiny_dir), hf_dataset=str(folder), eval_every=10, max_tokens=2000)
    assert len(corpus.splits["train"]) == 2000
    assert len(corpus.splits["valid"]) > 0 and len(corpus.splits["test"]) > 0
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": r["text"]}) for r in rows[:30]))
    by_field = load_packed(tmp_path / "cache", str(tiny_dir), files=[str(jsonl)], text_field="body", eval_every=10)
    assert len(by_field.splits["test"]) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one source"),
        ({"files": ["missing.txt"]}, "do not exist"),
        ({"files": ["DOCS"], "eval_every": 2}, "eval_every=2"),
        ({"files": ["DOCS"], "eval_every": 50}, "too few to hold out"),
        ({"files": ["DOCS"], "text_field": "body"}, "not 'body'"),
        ({"files": ["DOCS"], "tokenizer": None}, "needs a tokenizer"),
    ],
)
def test_packed_text_bad_requests_name_the_fix(tiny_dir, tmp_path, kwargs, message):
    docs = [str(p) for p in write_documents(tmp_path / "docs", 6, sentences=2)]
    kwargs = {"tokenizer": str(tiny_dir), **kwargs}
    if kwargs.get("files") == ["DOCS"]:
        kwargs["files"] = docs
    with pytest.raises(DataError, match=message):
        load_packed(tmp_path / "cache", **kwargs)


def test_aligned_crops_are_the_fixed_chunks_of_the_stream():
    tokens = np.arange(1000)
    x, y = RandomCrops(tokens, 64, batch_size=32, seed=0, aligned=True).batch(3)
    assert (x[:, 0] % 64 == 0).all()
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("experiment", "schedule"), [("llama2_7b_swa", "uniform"), ("llama2_7b_mswa", "mswa_official")])
def test_llama2_7b_experiments_hold_the_authors_recipe(tmp_path, experiment, schedule):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg["model"]["name"] == "hf_causal_lm" and cfg["model"]["pretrained"] == "meta-llama/Llama-2-7b-hf"
    assert (cfg["seq_len"], cfg["window"], cfg["window_schedule"]["name"]) == (4096, 1024, schedule)
    lora = cfg["model"]["lora"]
    assert (lora["r"], lora["alpha"], lora["target_modules"]) == (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert lora["trainable_modules"] == ["embed_tokens", "norm"]
    optim = cfg["optim"]
    assert (optim["lr"], optim["warmup_steps"], optim["min_lr_ratio"]) == (2e-5, 20, 1.0)
    assert cfg["trainer"]["max_steps"] == 2000
    assert cfg["data"]["batch_size"] * cfg["trainer"]["accumulate_grad_batches"] == 32
    assert cfg["dataset"]["name"] == "packed_text" and cfg["data"]["aligned_chunks"]
    assert cfg["dataset"]["loader"]["hf_dataset"] == "togethercomputer/RedPajama-Data-1T-Sample"
    assert cfg["dataset"]["loader"]["tokenizer"] == cfg["model"]["pretrained"]
    assert cfg["hardware"]["precision"] == "bf16-mixed" and cfg["model"]["gradient_checkpointing"]
    assert "piqa" in cfg["lm_eval"]["tasks"] and len(cfg["lm_eval"]["tasks"]) == 7
    # Llama-2-7B's 32 layers x 32 heads (read from its config at run time)
    cfg["model"].update(n_layer=32, n_head=32)
    windows = build_schedule(parse_config(cfg)).windows
    if schedule == "uniform":
        assert set(w for layer in windows for w in layer) == {1024}
    else:
        groups = lambda *ws: tuple(w for w in ws for _ in range(8))  # noqa: E731 - 4 contiguous groups of 8 heads
        assert windows[0] == groups(1024, 512, 256, 256) and windows[31] == groups(4096, 2048, 1024, 1024)


# --- fine-tuning through train.py ------------------------------------------------------------------


def test_lora_fine_tuning_through_train_py_lowers_the_loss(tiny_dir, tmp_path):
    docs = write_documents(tmp_path / "docs", 40)
    args = [
        "model=hf_causal_lm",
        f"model.pretrained={tiny_dir}",
        "dataset=packed_text",
        f"dataset.loader.files=[{','.join(str(p) for p in docs)}]",
        "dataset.loader.eval_every=10",
        "window_schedule=mswa_h",
        "model.gradient_checkpointing=true",
        "seq_len=64",
        "window=16",
        "data.batch_size=4",
        "optim.lr=1e-2",
        "trainer.max_steps=30",
        "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        # common-sense evaluation after training, on a multiple-choice task defined here
        f"lm_eval={{tasks: [{CHOICE_TASK}], num_fewshot: 0, batch_size: 2, limit: null, "
        f"include_path: {write_choice_task(tmp_path / 'tasks')}, include_defaults: false}}",
    ]
    run_train(args, tmp_path, env_extra={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    (results_path,) = (tmp_path / "outputs").rglob("results.json")
    results = json.loads(results_path.read_text())
    assert results["status"] == "finished" and results["metric"] == "ppl"
    assert results["windows"][0] == [4, 8, 16, 32]  # mswa_h at w=16 on 4 heads
    assert 0 < results["n_trainable"] < results["n_params"]

    evaluation = json.loads((results_path.parent / "lm_eval.json").read_text())
    assert 0 <= evaluation["summary"][CHOICE_TASK]["acc"] <= 1 and evaluation["windows"] == results["windows"]
    assert results["lm_eval"] == evaluation["summary"] and evaluation["schedule"] == "mswa_h"

    history = pd.read_csv(results_path.parent / "metrics.csv")
    first_loss = history["train/loss"].dropna().iloc[0]  # step 0, before any update
    assert results["metrics"]["val/loss"] < first_loss - 1.0

    # checkpoints hold only what trains; the saved adapter reproduces the run's validation loss
    state = torch.load(results_path.parent / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in name or "modules_to_save" in name for name in state)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = PeftModel.from_pretrained(base, results_path.parent / "adapter").eval()
    apply_window_attention(model, results["windows"])
    corpus = load_packed(tmp_path / "data" / "packed", str(tiny_dir), files=[str(p) for p in docs], eval_every=10)
    chunks = EvalChunks(corpus.splits["valid"], 64)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(chunks)):
            x, y = chunks[i]
            logits = model(input_ids=x[None]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item()
            count += int((y != -100).sum())
    assert nll / count == pytest.approx(results["metrics"]["val/loss"], abs=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.pretrained=NOWHERE"], r"model.pretrained=.*nowhere.* cannot be loaded"),
        (["model.pretrained=TINY", "dataset=synthetic", "model.lora.target_modules=[nope]"], "model.lora does not fit"),
        (["model.pretrained=TINY", "dataset=synthetic", "model.dtype=float8"], "model.dtype='float8' is unknown"),
        (["model.pretrained=TINY", "dataset=packed_text"], "packed_text needs exactly one source"),
    ],
)
def test_bad_pretrained_configs_stop_with_one_sentence(tiny_dir, tmp_path, overrides, message):
    overrides = [o.replace("NOWHERE", str(tmp_path / "nowhere")).replace("TINY", str(tiny_dir)) for o in overrides]
    cfg = compose_config(["model=hf_causal_lm", "logger=none", "seq_len=32", *overrides], tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        train(cfg, RunInfo(str(tmp_path / "run")))
    assert "\n" not in str(error.value)


def test_bf16_weights_under_bf16_autocast_train_and_long_run_names_fit_the_file_system(tiny_dir, tmp_path):
    """The GPU recipe's dtype path (bf16 base, fp32 LoRA, bf16-mixed autocast) on CPU; its many
    overrides make a run name longer than a file name may be."""
    docs = write_documents(tmp_path / "docs", 20)
    args = [
        "model=hf_causal_lm",
        f"model.pretrained={tiny_dir}",
        "model.dtype=bfloat16",
        "hardware.precision=bf16-mixed",
        "model.gradient_checkpointing=true",
        "dataset=packed_text",
        f"dataset.loader.files=[{','.join(map(str, docs))}]",
        "dataset.loader.eval_every=10",
        "seq_len=32",
        "window=8",
        "data.batch_size=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
        "logger=csv",
    ]
    run_train(args, tmp_path)
    (results_path,) = (tmp_path / "outputs").rglob("results.json")
    results = json.loads(results_path.read_text())
    assert results["status"] == "finished" and np.isfinite(results["metrics"]["val/loss"])
    name = results_path.parent.name
    assert len(name.encode()) <= 200 and name.startswith("data.batch_size=2,") and len(results["run_name"]) > 200
