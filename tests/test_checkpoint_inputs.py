"""Checkpoints named on the command line: a crafted one is refused unread on every load path, evaluate refuses
another model's, paths copied from our output work as typed, and a resume with nothing left to train still
evaluates and checkpoints the run in its new folder."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from torch.utils.data import DataLoader

from helpers.runs import REPO, compose_config
from mswa.config import parse_config
from mswa.evaluate import PATH_KEYS, evaluate, load_run
from mswa.factory import build_schedule
from mswa.lit import AtomicCheckpointIO, UnsafeCheckpointError, read_checkpoint
from mswa.run import TRAIN_PATH_KEYS, RunInfo, checkpoint_dataset, quote_paths, train
from mswa.sample import main as sample_main

SMOKE = ["debug=smoke", "logger=none"]
RUN_NAME = "model=mswa,seed=0"  # named by its overrides, as train.py names run folders: `=` and `,` in every path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """A finished smoke run (its data cache beside it) and what it printed."""
    root = tmp_path_factory.mktemp("finished")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(compose_config(SMOKE, root), RunInfo(str(root / "outputs" / RUN_NAME)))
    return {"root": root, "run": root / "outputs" / RUN_NAME, "printed": printed.getvalue()}


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command line run as a user pasting it into a shell."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def train_command(finished: dict, out: Path, *overrides: str) -> str:
    paths = [f"paths.log_dir={out}", f"paths.data_dir={finished['root'] / 'data'}"]
    return " ".join([sys.executable, str(REPO / "train.py"), *SMOKE, *paths, *overrides])


def last_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- a crafted checkpoint


class TouchOnUnpickling:
    """What a crafted checkpoint holds: unpickling it calls Path.touch, a stand-in for any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def crafted_checkpoint(finished: dict, folder: Path) -> tuple[Path, Path]:
    """A real checkpoint of the run with a payload beside its weights, and the file the payload would create."""
    marker, path = folder / "payload-ran", folder / "crafted.ckpt"
    torch.save({"payload": TouchOnUnpickling(marker), **read_checkpoint(finished["run"] / "checkpoints" / "last.ckpt")}, path)
    return path, marker


def test_a_crafted_checkpoint_is_refused_unread_on_every_load_path(finished, tmp_path):
    crafted, marker = crafted_checkpoint(finished, tmp_path)
    refusal = f"{crafted} holds objects that could run code on loading (builtins.getattr, pathlib.Path, pathlib.PosixPath)"

    with pytest.raises(UnsafeCheckpointError) as direct:
        read_checkpoint(crafted)
    assert str(direct.value).startswith(refusal) and "\n" not in str(direct.value)

    _, task, _ = load_run(finished["run"])  # Lightning's own ckpt_path= load, through our checkpoint plugin
    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = DataLoader([(torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))], batch_size=1)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(refusal)):
        trainer.validate(task, batches, ckpt_path=crafted, weights_only=False)

    resumed = shell(train_command(finished, tmp_path / "outputs", f"ckpt_path={crafted}"), tmp_path)
    assert resumed.returncode == 1 and last_line(resumed).startswith(f"error: {refusal}")
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))

    evaluated = shell(f"{sys.executable} -m mswa.evaluate run_dir={finished['run']} ckpt={crafted}", REPO)
    assert evaluated.returncode == 1 and last_line(evaluated).startswith(f"error: {refusal}")

    with pytest.raises(SystemExit) as sampled:
        sample_main([str(finished["run"]), "--prompt", "ab", "--checkpoint", str(crafted)])
    assert str(sampled.value.code).startswith(f"error: {refusal}")

    assert not marker.exists()
    torch.load(crafted, weights_only=False)  # what every path did before: the payload runs
    assert marker.exists()


# ---------------------------------------------------------------- another model's checkpoint


def test_evaluate_refuses_the_checkpoint_of_another_model(finished, tmp_path):
    """An SWA run's checkpoint has the MSWA run's parameters, shape for shape: only its windows tell them apart."""
    swa = compose_config([*SMOKE, "model=swa"], finished["root"])
    checkpoint = read_checkpoint(finished["run"] / "checkpoints" / "best.ckpt")
    checkpoint["hyper_parameters"]["model"]["windows"] = build_schedule(parse_config(swa)).as_lists()
    other = tmp_path / "swa-best.ckpt"
    torch.save(checkpoint, other)
    settings = {"run_dir": str(finished["run"]), "ckpt": str(other), "eval": {"seq_len": None, "stride": None}}
    with pytest.raises(ValueError, match=rf"^ckpt={other} belongs to another model: windows \(from window and window_schedule\) "):
        evaluate({**settings, "batch_size": None, "torch_threads": None})
    assert not list(finished["run"].glob("evaluation_*"))


# ---------------------------------------------------------------- paths with `=` and `,`


def test_the_printed_checkpoint_pasted_into_a_shell_trains_further(finished, tmp_path):
    (line,) = [line for line in finished["printed"].splitlines() if line.startswith("train further")]
    (pasted,) = re.findall(r"'ckpt_path=\"[^\"]+\"'", line)
    proc = shell(train_command(finished, tmp_path / "outputs", "trainer.max_steps=7", pasted), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (tmp_path / "outputs").rglob("results.json")
    assert json.loads(results.read_text())["steps"] == 7


@pytest.mark.parametrize("key", ["ckpt_path", "hydra.run.dir", "ckpt", "run_dir"])  # train.py's, then mswa.evaluate's
def test_a_path_with_equals_and_commas_reaches_hydra_as_typed(finished, key):
    checkpoint = finished["run"] / "checkpoints" / "last.ckpt"
    path = checkpoint if key.startswith("ckpt") else finished["run"]
    typed = f"{key}={path}"
    with pytest.raises(OverrideParseException):
        OverridesParser.create().parse_overrides([typed])  # what Hydra made of it before
    (override,) = OverridesParser.create().parse_overrides(quote_paths([typed], (*TRAIN_PATH_KEYS, *PATH_KEYS)))
    assert override.value() == str(path)


# ---------------------------------------------------------------- nothing left to train


def test_a_resume_already_at_max_steps_into_a_new_folder_evaluates_and_checkpoints_it(finished, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("a corpus of another dataset, in plain words. " * 1500)
    source = finished["run"] / "checkpoints" / "last.ckpt"
    proc = shell(train_command(finished, tmp_path / "outputs", "dataset=bytes", f"dataset.path={text}", f"ckpt_path={source}"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert f"warning: ckpt_path={source} was trained on dataset 'synthetic'; this run trains and evaluates on 'bytes'" in said
    assert f"ckpt_path={source} is already at step 6, trainer.max_steps=6: nothing to train" in said
    (folder,) = (tmp_path / "outputs").glob("train/runs/*")
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "finished" and results["steps"] == 6 and results["data_source"]["name"] == "corpus.txt"
    saved, resumed = read_checkpoint(folder / "checkpoints" / "last.ckpt"), read_checkpoint(source)
    assert saved["global_step"] == 6
    assert all(torch.equal(value, resumed["state_dict"][name]) for name, value in saved["state_dict"].items())


def test_a_checkpoint_written_before_checkpoints_named_their_dataset_is_placed_by_its_run_folder(tmp_path):
    older = {"hyper_parameters": {"model": {}}}  # no "dataset": how checkpoints were written before
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "results.json").write_text(json.dumps({"dataset": "enwik8"}))
    assert checkpoint_dataset(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), older) == "enwik8"
    assert checkpoint_dataset(str(tmp_path / "copied.ckpt"), older) is None  # no run folder around it: nothing to say
