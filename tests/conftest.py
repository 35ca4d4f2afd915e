"""Shared helpers: the repo's real conf/ composed by Hydra, and train.py run as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = ["dataset.loader.n_bytes=200000"]


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


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
