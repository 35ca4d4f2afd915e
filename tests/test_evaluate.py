"""python -m mswa.evaluate on a run trained here: files beside results.json, W&B, refusals before any work."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers.runs import REPO, TINY_DATA, compose_config
from mswa.evaluate import check_overrides, evaluate, load_run, main
from mswa.run import RunInfo, train

RUN_NAME = "model=mswa,seed=0"  # a folder named by overrides, as train.py names them


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A smoke run with an offline W&B run, trained once for the module."""
    tmp = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        results = train(compose_config(["debug=smoke", *TINY_DATA, "logger.mode=offline"], tmp), RunInfo(str(tmp / RUN_NAME)))
    assert results["status"] == "finished", results["error"]
    return tmp / RUN_NAME


def options(run_dir, **eval_settings) -> dict:
    settings = {"seq_len": None, "stride": None, **eval_settings}
    return {"run_dir": str(run_dir), "ckpt": "best", "eval": settings, "batch_size": None, "torch_threads": None}


def offline_runs(run_dir) -> list[str]:
    run_id = (run_dir / "wandb_id").read_text().strip()
    return sorted(p.name for p in (run_dir / "wandb").glob(f"offline-run-*-{run_id}"))


def evaluate_command(args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mswa.evaluate", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_multirun_over_lengths_writes_one_file_each_and_reproduces_the_training_numbers(run_dir):
    trained = (run_dir / "results.json").read_bytes()
    before = offline_runs(run_dir)
    proc = evaluate_command(["-m", f"run_dir={run_dir}", "eval.seq_len=64,128"], {"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Tip:" not in proc.stdout + proc.stderr and "is deprecated" not in proc.stderr  # Lightning's notes left out
    records = {p.name: json.loads(p.read_text()) for p in run_dir.glob("evaluation_*.json")}
    assert sorted(records) == ["evaluation_L128_stride128_best.json", "evaluation_L64_stride64_best.json"]
    same = records["evaluation_L64_stride64_best.json"]
    metrics = json.loads(trained)["metrics"]
    for key in ("val/loss", "val/bpc", "test/loss", "test/bpc"):
        assert same["metrics"][key] == metrics[key], key  # the training run's own evaluation, to the last bit
    longer = records["evaluation_L128_stride128_best.json"]["evaluation"]
    assert (longer["seq_len"], longer["stride"], longer["val"]["by_distance"][-1]["context"]) == (128, 128, [128, 128])
    assert (run_dir / "results.json").read_bytes() == trained  # training numbers untouched
    assert len(offline_runs(run_dir)) == len(before) + 2  # each setting resumed the run's W&B run
    assert not list(run_dir.glob("*.part-*"))


def test_a_sliding_evaluation_records_its_cost_and_scores_every_target(run_dir):
    record = evaluate(options(run_dir, seq_len=64, stride=16))
    evaluation = record["evaluation"]
    assert (evaluation["seq_len"], evaluation["stride"]) == (64, 16)
    assert evaluation["test"]["forward_tokens_per_target"] == pytest.approx(4.0, rel=0.02)
    assert evaluation["test"]["targets"] == json.loads((run_dir / "results.json").read_text())["evaluation"]["test"]["targets"]
    rows = evaluation["test"]["by_distance"]  # later chunks offer >= 49 tokens: contexts 1..31 are chunk 0's alone
    assert sum(row["targets"] for row in rows if row["context"][1] < 32) == 31
    assert json.loads((run_dir / "evaluation_L64_stride16_best.json").read_text())["metrics"] == record["metrics"]


def test_load_run_gives_the_checkpoint_weights_config_and_corpus(run_dir):
    cfg, task, corpus = load_run(run_dir, "last")
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(value, saved[name]) for name, value in task.state_dict().items())
    assert cfg["seq_len"] == 64 and corpus.name == "synthetic" and not task.training
    assert task.model.token_nll(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)).shape == (1, 8)


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"ckpt": "nowhere.ckpt"}, "ckpt=nowhere.ckpt is not a file"),
        ({"eval": {"seq_len": None, "stride": 0}}, "eval.stride=0 must be an integer from 1 to eval.seq_len=64"),
        ({"eval": {"seq_len": 32, "stride": 64}}, "eval.stride=64 must be an integer from 1 to eval.seq_len=32"),
    ],
)
def test_bad_settings_stop_before_any_work(run_dir, settings, words):
    with pytest.raises(ValueError, match=words):
        evaluate({**options(run_dir), **settings})
    assert not list(run_dir.glob("evaluation_*ckpt*")) and not list(run_dir.glob("*stride0*"))


def test_missing_folder_checkpoint_and_learned_positions_are_refused(run_dir, tmp_path):
    with pytest.raises(ValueError, match="run_dir=.*missing is not a folder"):
        evaluate(options(tmp_path / "missing"))
    with pytest.raises(ValueError, match="run_dir is not given"):
        check_overrides(["eval.seq_len=128"])
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb", "evaluation_*"))
    (copy / "checkpoints" / "best.ckpt").unlink()
    with pytest.raises(ValueError, match="ckpt=best but .*best.ckpt does not exist; pass ckpt=last"):
        evaluate(options(copy))
    results = json.loads((copy / "results.json").read_text())
    results["config"]["model"]["positions"] = "learned"
    (copy / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="eval.seq_len=128 is longer than the training seq_len=64"):
        evaluate({**options(copy, seq_len=128), "ckpt": "last"})
    assert not list(copy.glob("evaluation_*"))


@pytest.mark.parametrize("key", ["model.n_layer=2", "+dataset.loader.n_bytes=100", "seq_len=32", "window=8"])
def test_a_key_that_would_change_the_model_or_data_is_refused_in_one_sentence(run_dir, monkeypatch, key):
    monkeypatch.setattr(sys, "argv", ["mswa.evaluate", f"run_dir={run_dir}", key])
    with pytest.raises(SystemExit) as stop:  # the command's own exit, before Hydra composes anything
        main()
    name = key.split("=")[0].lstrip("+")
    assert str(stop.value.code).startswith(f"error: {name} is not an evaluation setting: the model and data come from")


def test_a_file_that_is_not_a_checkpoint_or_of_another_shape_is_refused(run_dir, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"ckpt={garbage} is not a checkpoint that torch can read"):
        load_run(run_dir, str(garbage))
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb", "evaluation_*"))
    results = json.loads((copy / "results.json").read_text())
    results["config"]["model"]["d_model"] = 48
    (copy / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="ckpt=best belongs to another model: model.d_model 32 there, 48 here; pass a checkpoint"):
        load_run(copy)


def test_a_run_written_before_schedules_had_a_kind_still_evaluates_and_samples(run_dir, tmp_path):
    """Older results.json hold only window_schedule.name (then the rule): evaluate and sample read it as the rule."""
    from mswa.sample import sample

    old = tmp_path / RUN_NAME
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("wandb", "wandb_id", "evaluation_*.json"))
    results = json.loads((old / "results.json").read_text())
    assert results["config"]["window_schedule"].pop("kind") == "mswa"
    (old / "results.json").write_text(json.dumps(results))
    record = evaluate(options(old))
    for key in ("val/bpc", "test/bpc"):
        assert record["metrics"][key] == results["metrics"][key], key
    assert sample(old, "ab", 4, temperature=0).startswith("ab")
