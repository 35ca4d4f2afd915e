"""The repo's real conf/ composed by Hydra, train.py run as a user runs it, and what its runs leave behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = ["dataset.loader.n_bytes=200000"]
SCHEDULES = sorted(p.stem for p in (REPO / "conf" / "window_schedule").glob("*.yaml") if p.stem not in ("full", "custom"))


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
