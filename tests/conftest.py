"""Shared helpers: the repo's real conf/ composed by Hydra, and train.py run as a user runs it."""

import json
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


CHOICE_TASK = "mswa_tiny_choice"
CHOICE_DOCS = [
    ("Where does milk stay cold?", ["in the fridge", "in the oven", "on the roof"], 0),
    ("What does the quick fox jump over?", ["the moon", "the lazy dog"], 1),
    ("How do you open a jar?", ["paint it blue", "twist the lid", "sing to it"], 1),
    ("What happens to ice when it is warm?", ["it melts", "it boils"], 0),
    ("Where did the cat sit?", ["in the sea", "on a cloud", "on the mat"], 2),
    ("When does water boil?", ["when it is heated", "when it is dark"], 0),
]


def write_choice_task(folder: Path) -> Path:
    """A local lm_eval multiple-choice task (CHOICE_TASK): its YAML and its data, written into folder."""
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        rows = [{"question": q, "choices": c, "label": label} for q, c, label in CHOICE_DOCS]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (folder / f"{CHOICE_TASK}.yaml").write_text(
        f"""task: {CHOICE_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {folder / "train.jsonl"}
    test: {folder / "test.jsonl"}
training_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )
    return folder
