"""What a run shows and where its messages go: lines or bars, job tags, train.log; W&B's environment variables."""

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from helpers.runs import TINY_DATA, compose_config, run_train
from mswa.config import ConfigError
from mswa.progress import StepProgressBar, ValidationLines, progress
from mswa.run import RunInfo, train

SMOKE = ["debug=smoke", *TINY_DATA]


def test_a_multirun_job_without_a_terminal_prints_tagged_lines_that_its_train_log_holds(tmp_path):
    # 1,200 bytes: the run reads its train split 1.4 times, so it warns (debug=smoke validates at steps 3 and 6)
    proc = run_train(["-m", "debug=smoke", "logger=none", "dataset.loader.n_bytes=1200"], tmp_path)
    tag = "[#0 dataset.loader.n_bytes=1200,debug=smoke]"
    lines = ("training from step 0 to 6", "step 3/6: train/loss ", "step 6/6: ", "full validation pass: val/bpc ", "test pass: test/bpc ")
    for line in lines:
        assert f"{tag} {line}" in proc.stdout, line
    assert f"{tag} warning: training reads 1,536 tokens" in proc.stderr
    for bar in ("it/s", "\r", "Epoch", "Validation DataLoader"):
        assert bar not in proc.stdout + proc.stderr, bar
    (log,) = (tmp_path / "outputs").glob("train/multirun/*/*/train.log")
    text = log.read_text()
    for message in ("step 6/6: ", "test pass: ", "warning: training reads 1,536 tokens", "finished 6 steps: val/bpc", "results: "):
        assert message in text, message


def test_bars_on_a_terminal_lines_elsewhere_and_when_parallel_jobs_share_it(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert isinstance(progress("#1 seed=1", shares_output=False), StepProgressBar)
    assert isinstance(progress("#1 seed=1", shares_output=True), ValidationLines)  # joblib: two jobs, one stream
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert isinstance(progress(None, shares_output=False), ValidationLines)


def test_a_resumed_run_on_a_terminal_draws_one_tagged_bar_counting_up_from_its_step(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    train(compose_config([*SMOKE, "trainer.max_steps=3"], tmp_path), RunInfo(str(folder)))
    capsys.readouterr()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    train(compose_config([*SMOKE, "ckpt_path=last"], tmp_path), RunInfo(str(folder), job="#1 seed=0"))
    draws = re.split(r"[\r\n]", capsys.readouterr().out)
    steps = [draw for draw in draws if draw.startswith("[#1 seed=0] step:")]
    assert steps[0].split("|")[2].startswith(" 3/6 [") and steps[-1].split("|")[2].startswith(" 6/6 [")
    rates = [float(rate) for draw in steps for rate in re.findall(r"(-?[\d.]+)it/s", draw)]
    assert rates and min(rates) >= 0  # this attempt's steps over this attempt's time
    assert not [draw for draw in draws if draw.startswith(("Epoch", "Training"))]  # no stale bars
    assert any(draw.startswith("[#1 seed=0] validation DataLoader 0:") for draw in draws)


def wandb_runs_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("offline-run-*"))


def test_wandb_mode_disabled_in_the_environment_writes_no_wandb_run(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mswa")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    results = train(compose_config([*SMOKE, "logger=wandb", "trainer.max_steps=3"], tmp_path), RunInfo(str(tmp_path / "run")))
    assert results["config"]["logger"]["mode"] == "disabled"
    assert not wandb_runs_under(tmp_path) and not (tmp_path / "run" / "wandb_id").exists()
    assert "finished 3 steps" in caplog.text and "wandb sync" not in caplog.text


def test_wandb_dir_and_project_come_from_the_environment_unless_the_command_line_sets_them(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mswa")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_files"))
    monkeypatch.setenv("WANDB_PROJECT", "from-environment")
    run = RunInfo(str(tmp_path / "run"), overrides=["logger.project=from-command-line"])
    config = compose_config([*SMOKE, "logger=wandb", "trainer.max_steps=3", "logger.project=from-command-line"], tmp_path)
    logger = train(config, run)["config"]["logger"]
    assert (logger["mode"], logger["project"], logger["dir"]) == ("offline", "from-command-line", str(tmp_path / "wandb_files"))
    (offline,) = wandb_runs_under(tmp_path)
    assert offline.parent == tmp_path / "wandb_files" / "wandb"  # not below the run folder
    assert f"upload with wandb sync {tmp_path / 'wandb_files' / 'wandb'}/offline-run-*" in caplog.text
    recorded = json.loads((tmp_path / "run" / "results.json").read_text())["config"]["logger"]
    assert recorded == logger


def test_a_bad_wandb_mode_in_the_environment_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes' in the environment must be one of offline, online, disabled"):
        train(compose_config([*SMOKE, "logger=wandb"], tmp_path), RunInfo(str(tmp_path / "run")))
    assert not (tmp_path / "run" / "checkpoints").exists()
