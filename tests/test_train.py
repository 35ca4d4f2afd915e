"""End to end: the real conf/, the real Lightning trainer, train.py as a user runs it."""

import json
import math
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from helpers.runs import REPO, SCHEDULES, TINY_DATA, compose_config, results_under, run_train
from mswa.config import parse_config
from mswa.data.synthetic import load as load_synthetic
from mswa.factory import build_model, build_schedule, model_spec
from mswa.flops import training_flops_per_token
from mswa.lit import CorpusDataModule, LanguageModelTask, NonFiniteLossError
from mswa.model import LanguageModel, ModelConfig
from mswa.run import ConfigError, RunInfo, train
from mswa.windows import ScheduleError

SMOKE = ["debug=smoke", *TINY_DATA]


def test_every_model_schedule_and_cpu_hardware_composes_and_builds(tmp_path):
    corpus = load_synthetic(str(tmp_path / "data"), n_bytes=20000)
    combos = [("full", "full")] + [(m, s) for m in ("swa", "mswa") for s in SCHEDULES]
    combos.append(("mswa", "custom"))
    for model, schedule in combos:
        extra = ["window_schedule.windows=[[1,2,3,null,5,6,7,8]]", "model.n_layer=1"] if schedule == "custom" else []
        overrides = [
            f"model={model}",
            f"window_schedule={schedule}",
            "hardware=cpu",
            "model.n_layer=8",
            "model.d_model=32",
            "seq_len=32",
            *extra,
        ]
        cfg = compose_config(overrides if schedule != "full" else overrides[:1] + overrides[2:], tmp_path)
        assert cfg["window_schedule"]["name"] == schedule  # a schedule is named by its file
        settings = parse_config(cfg)
        lm = build_model(settings.model, model_spec(settings, corpus.vocab_size, build_schedule(settings)))
        assert isinstance(lm, LanguageModel)
        logits = lm(torch.randint(0, 256, (2, 32)))
        assert logits.shape == (2, 32, 256) and torch.isfinite(logits).all(), (model, schedule)


def test_model_names_pick_their_schedules(tmp_path):
    assert compose_config(["model=swa"], tmp_path)["window_schedule"]["name"] == "uniform"
    assert compose_config(["model=mswa"], tmp_path)["window_schedule"]["name"] == "mswa"
    assert compose_config(["model=full"], tmp_path)["window_schedule"]["name"] == "full"
    switched = compose_config(["model=mswa", "window_schedule=mswa_official", "window=64"], tmp_path)
    assert build_schedule(parse_config(switched)).windows[0][0] == 64  # 64 * layer 1/2 * head 2


def pairs(windows: list[list[int]], n: int) -> int:
    """Attended query-key pairs of causal windowed heads: query i sees min(i + 1, W) keys."""
    return sum(min(i + 1, w) for layer in windows for w in layer for i in range(n))


def test_schedule_files_are_named_by_their_file_and_apply_their_kind(tmp_path):
    rules = {
        "mswa_g2": "mswa",
        "mswa_g8": "mswa",
        "mswa_l_shrinking": "mswa_l",
        "uniform_mswa_budget": "uniform",
        "uniform_mswa_l_budget": "uniform",
        "full": "full",
        "custom": "custom",
    }
    mswa_windows = build_schedule(parse_config(compose_config(["model=mswa", "experiment=cpu"], tmp_path))).windows
    for path in sorted((REPO / "conf" / "window_schedule").glob("*.yaml")):
        ws = compose_config([f"window_schedule={path.stem}"], tmp_path)["window_schedule"]
        searched = path.stem.startswith("searched_")  # written by python -m mswa.allocate: an explicit table
        assert ws["name"] == path.stem and ws["kind"] == rules.get(path.stem, "custom" if searched else path.stem), ws
        if searched:  # it builds at the shape it was searched at, within mswa's budget (its header says it is met)
            cfg = parse_config(compose_config(["model=swa", f"window_schedule={path.stem}", "experiment=cpu"], tmp_path))
            searched_windows = build_schedule(cfg).windows
            assert pairs(searched_windows, cfg.seq_len) <= pairs(mswa_windows, cfg.seq_len)
    budget = build_schedule(parse_config(compose_config(["model=swa", "window_schedule=uniform_mswa_budget", "window=64"], tmp_path)))
    assert budget.name == "uniform_mswa_budget" and set(budget.windows[0]) == {56}  # round(0.8789 * 64), the uniform rule


def test_smoke_multirun_of_full_swa_mswa_writes_results(tmp_path):
    run_train(["-m", "model=full,swa,mswa", *SMOKE], tmp_path)
    runs = {r["model"]: r for r in results_under(tmp_path / "outputs")}
    assert sorted(runs) == ["full", "mswa", "swa"]
    for name, r in runs.items():
        assert r["status"] == "finished", r["error"]
        for key in ("val/loss", "val/bpc", "test/loss", "test/bpc"):
            assert math.isfinite(r["metrics"][key]), (name, key)
        assert r["steps"] == 6 and r["n_params"] > 0 and r["tokens_per_s"] > 0
        # MFU: the model's FLOPs per token (tests/test_flops.py checks the count) at the run's tokens/s
        cfg = parse_config(r["config"])
        spec = ModelConfig(**model_spec(cfg, 256, build_schedule(cfg)))  # synthetic bytes: 256 tokens
        assert r["model_flops_per_token"] == training_flops_per_token(spec, cfg.seq_len)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["model_flops_per_token"] / r["matmul_flops_per_s"], rel=1e-9)
        assert 0 < r["entropy_floor_bpb"] < 8
        assert (r["found_in"] / "metrics.csv").exists() and r["evaluated_checkpoint"] == "checkpoints/best.ckpt"
    assert runs["full"]["windows"] == [[None] * 4] * 4 and runs["full"]["budget"]["pairs_vs_full"] == 1.0
    assert runs["swa"]["windows"] == [[16] * 4] * 4 and runs["swa"]["budget"]["pairs_vs_swa"] == 1.0
    assert runs["mswa"]["windows"][0] == [1, 2, 4, 8] and runs["mswa"]["budget"]["mean_window_over_w"] == pytest.approx(0.8789, abs=1e-4)


def test_tiny_overfit_loss_falls_well_below_start(tmp_path):
    overrides = [
        "debug=smoke",
        "dataset.loader.n_bytes=20000",
        "+dataset.loader.n_words=16",
        "trainer.max_steps=100",
        "trainer.val_check_interval=100",
        "optim.lr=3e-3",
        "optim.warmup_steps=10",
        "model.d_model=64",
        "data.batch_size=8",
        "logger=none",
    ]
    results = train(compose_config(overrides, tmp_path), RunInfo(str(tmp_path / "run")))
    log = pd.read_csv(tmp_path / "run" / "metrics.csv")
    losses = log["train/loss"].dropna().to_numpy()
    assert results["status"] == "finished"
    assert losses[-10:].mean() < 0.5 * losses[:3].mean(), losses


def test_uniform_predictor_scores_exactly_8_bpc(tmp_path):
    cfg = compose_config(["debug=smoke", *TINY_DATA], tmp_path)
    corpus = load_synthetic(**{k: v for k, v in cfg["dataset"]["loader"].items() if k != "_target_"})
    settings = parse_config(cfg)
    spec = model_spec(settings, corpus.vocab_size, build_schedule(settings))
    task = LanguageModelTask(build_model(settings.model, spec), settings.optim, corpus.unit, spec=spec)
    for p in task.parameters():
        torch.nn.init.zeros_(p)  # zero embeddings -> zero logits -> uniform over 256 bytes
    data = CorpusDataModule(corpus, cfg["seq_len"], 4, 16, seed=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.validate(task, datamodule=data, verbose=False)
    assert task.eval_results["val/bpc"] == pytest.approx(8.0, abs=1e-6)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint_before_it(tmp_path):
    overrides = [
        "debug=smoke",
        *TINY_DATA,
        "optim.lr=1e6",
        "optim.warmup_steps=1",
        "trainer.gradient_clip_val=null",
        "trainer.max_steps=40",
        "checkpoint.every_n_train_steps=1",
        "logger=none",
    ]
    with pytest.raises(NonFiniteLossError, match=r"at step \d+; lower optim.lr .* or continue from step \d+ with 'ckpt_path="):
        train(compose_config(overrides, tmp_path), RunInfo(str(tmp_path / "run")))
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


RESUME = ["debug=smoke", *TINY_DATA, "trainer.max_steps=60", "trainer.val_check_interval=20", "checkpoint.every_n_train_steps=5"]


def test_interrupted_run_resumes_to_the_same_final_metric(tmp_path):
    straight = run_train([*RESUME, "task_name=straight"], tmp_path)
    assert straight.returncode == 0
    reference = results_under(tmp_path / "outputs" / "straight")[0]

    args = [*RESUME, "task_name=resumed", "logger.mode=offline"]
    cmd = [sys.executable, str(REPO / "train.py"), f"paths.log_dir={tmp_path}/outputs", *args]
    env = {"MSWA_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env={**__import__("os").environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    run_dir = next_run_dir(tmp_path / "outputs" / "resumed", proc)
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = proc.communicate(timeout=120)
    interrupted = json.loads((run_dir / "results.json").read_text())
    assert interrupted["status"] == "interrupted", interrupted
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped_at < 60
    message = stderr.strip().splitlines()[-1]
    command = shlex.join(["python", "train.py", f"paths.log_dir={tmp_path}/outputs", *args, "ckpt_path=last"])
    assert message == f"interrupted: stopped by Ctrl-C; resume from step {stopped_at} with: {command}"
    assert "Traceback" not in stderr and interrupted["error"] == message.removeprefix("interrupted: ")

    proc = run_train([*args, "ckpt_path=last"], tmp_path, env_extra={"WANDB_MODE": "offline"})  # the command it printed
    output = proc.stdout + proc.stderr
    for noise in ("litlogger", "exists and is not empty", "LeafSpec", "FLOPs", "Epoch 0/-2"):
        assert noise not in output, noise
    assert f"training from step {stopped_at} to 60" in output and "it/s" not in output  # no terminal: lines, not bars
    resumed = json.loads((run_dir / "results.json").read_text())
    metric = resumed["metrics"]["val/bpc"]
    assert f"finished 60 steps: val/bpc {metric:.6f}, test/bpc" in proc.stdout
    assert f"from checkpoints/best.ckpt (step 60, lowest val/loss)\nresults: {run_dir / 'results.json'}" in proc.stdout
    assert resumed["status"] == "finished" and resumed["steps"] == 60
    difference = resumed["metrics"]["val/bpc"] - reference["metrics"]["val/bpc"]
    print(f"Ctrl-C then resume: val/bpc difference {difference:.3e}")
    assert abs(difference) <= 1e-9
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({name.rsplit("-", 1)[1] for name in wandb_runs}) == 1  # one W&B run id


def next_run_dir(root: Path, proc) -> Path:
    while not list(root.glob("runs/*")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    return next(root.glob("runs/*"))


def test_bad_config_stops_before_training_with_one_sentence(tmp_path):
    proc = run_train(["model=mswa", "model.n_head=6", "model.d_model=48", *SMOKE], tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: window_schedule.head_ratios has 4 groups but 6 heads")
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (["model.n_head=6", "model.d_model=48"], ScheduleError, "6 heads"),
        (["window=0"], ScheduleError, "window=0"),
        (["window_schedule.kind=swirly"], ScheduleError, "'swirly'"),  # the rule; name only labels
        (["seq_len=300000"], ConfigError, "seq_len=300000"),
        (["model=full", "window_schedule=mswa"], ConfigError, "model=full cannot use window_schedule=mswa"),
        (["model=swa", "window_schedule=full"], ConfigError, "model=swa cannot use window_schedule=full"),
        pytest.param(
            ["hardware=gpu"],
            ConfigError,
            "no CUDA GPU; add hardware=cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_bad_configs_raise_named_errors_before_any_checkpoint(tmp_path, overrides, error, words):
    with pytest.raises(error, match=words):
        train(compose_config([*SMOKE, "logger=none", *overrides], tmp_path), RunInfo(str(tmp_path / "run")))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_unknown_schedule_choice_lists_the_options(tmp_path):
    proc = run_train(["window_schedule=swirly", *SMOKE], tmp_path, check=False)
    assert proc.returncode == 1 and "mswa_official" in proc.stderr


def test_rerunning_a_finished_run_without_ckpt_path_is_refused(tmp_path):
    cfg = compose_config([*SMOKE, "logger=none"], tmp_path)
    train(cfg, RunInfo(str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="ckpt_path=last"):
        train(cfg, RunInfo(str(tmp_path / "run")))
