"""The repo's real conf/ composed by Hydra, train.py run as a user runs it, and what its runs leave behind."""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = ["dataset.loader.n_bytes=200000"]
# the rules, at any shape (searched_<corpus> tables are of the shape they were searched at: tests/test_train.py builds them)
SCHEDULES = sorted(
    p.stem
    for p in (REPO / "conf" / "window_schedule").glob("*.yaml")
    if p.stem not in ("full", "custom") and not p.stem.startswith("searched_")
)


def compose_config(overrides, tmp_path) -> dict:
    """The real conf/ composed with overrides, paths pointed into tmp_path, as a plain dict."""
    paths = [f"paths.data_dir={tmp_path}/data", f"paths.log_dir={tmp_path}/outputs"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*paths, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def run_train(args, tmp_path, check=True, timeout=600, env_extra=None):
    """`python train.py ARGS` in a subprocess, with data and outputs under tmp_path."""
    env = {**os.environ, "WANDB_MODE": "disabled", "MSWA_DATA_DIR": str(tmp_path / "data"), **(env_extra or {})}
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, str(REPO / "train.py"), *flags, f"paths.log_dir={tmp_path}/outputs", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def results_under(folder: Path) -> list[dict]:
    """Each run's results.json, with the folder it was found in."""
    return [json.loads(p.read_text()) | {"found_in": p.parent} for p in sorted(folder.rglob("results.json"))]


def run_bench(command: str, out: Path, *args: str) -> tuple[list[dict], str]:
    """(rows written, stdout) of ``python -m mswa.bench <command> --tiny <args> --output <out>`` run from
    the repo; fails the test if it does not exit 0."""
    argv = [sys.executable, "-m", "mswa.bench", command, "--tiny", *args, "--output", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())["rows"], proc.stdout


class Train:
    """`python train.py` in the background, its stderr collected line by line (``env_extra`` added to its environment)."""

    def __init__(self, args: list[str], tmp_path: Path, log_dir: Path | None = None, env_extra: dict | None = None):
        cmd = [sys.executable, str(REPO / "train.py"), f"paths.log_dir={log_dir or tmp_path / 'outputs'}", *args]
        env = {**os.environ, "WANDB_MODE": "disabled", "MSWA_DATA_DIR": str(tmp_path / "data"), **(env_extra or {})}
        self.proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True)
        self.reader.start()

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, f"train.py ended before {what}:\n" + "".join(self.lines[-30:])
            assert time.time() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.02)

    def finish(self) -> str:
        self.proc.wait(timeout=300)
        self.reader.join(timeout=10)
        return "".join(self.lines)


def run_printed_command(stderr: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the resume command the stopped run printed, as a user would paste it."""
    command = stderr.strip().splitlines()[-1].split(" with: ", 1)[1]
    args = shlex.split(command)
    assert args[:2] == ["python", "train.py"], command
    env = {**os.environ, "WANDB_MODE": "disabled", "MSWA_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args[2:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def only_run_dir(root: Path) -> Path:
    (run_dir,) = root.glob("train/runs/*")
    return run_dir


def checkpoint_at_step(run_dir: Path, least: int):
    def ready() -> bool:
        try:
            return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] >= least
        except Exception:  # noqa: BLE001 - not there yet
            return False

    return ready


def killed_after(
    args: list[str], tmp_path: Path, step: int, signum: int = signal.SIGKILL, env_extra: dict | None = None
) -> tuple[Train, Path]:
    """`python train.py ARGS` sent ``signum`` once it has a checkpoint at ``step`` or later, then waited for; the job
    (its stderr in ``job.output``) and its run folder."""
    job = Train(args, tmp_path, env_extra=env_extra)
    job.wait_for(lambda: list((tmp_path / "outputs").glob("train/runs/*/checkpoints")), "a run folder")
    run_dir = only_run_dir(tmp_path / "outputs")
    job.wait_for(checkpoint_at_step(run_dir, step), f"a checkpoint at step {step}")
    job.proc.send_signal(signum)
    job.output = job.finish()
    return job, run_dir


def fake_slurm(tmp_path: Path, job: str = "4242") -> tuple[dict, Path]:
    """The environment of a SLURM batch job with one task (what Lightning's SLURM environment reads), and a stub
    ``scontrol`` first on PATH that appends its arguments to the returned file."""
    stub_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    stub_dir.mkdir()
    stub = stub_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NAME": "mswa",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{stub_dir}:{os.environ['PATH']}",
        "WANDB_MODE": "offline",
    }
    return env, calls
