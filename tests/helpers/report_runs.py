"""Finished and failed run folders as train.py writes them (results.json, metrics.csv, Hydra overrides),
for the report's tests."""

import csv
import json
import math
from pathlib import Path

from mswa.windows import make_schedule

SEQ_LEN, W, N_LAYER, N_HEAD = 64, 16, 4, 4

# (overrides, final val bpc, final test bpc) of the finished runs
FINISHED = [
    (["model=swa", "seed=1"], 2.10, 2.15),
    (["model=swa", "seed=2"], 2.20, 2.22),
    (["model=mswa", "seed=1"], 2.00, 2.04),
    (["model=mswa", "seed=2"], 2.05, 2.11),
]


def write_run(job_dir: Path, overrides: list[str], status: str, val: float | None, test: float | None, error=None):
    """A Hydra job folder holding results.json (schema 1) and a sparse Lightning metrics.csv."""
    model = overrides[0].split("=")[1]
    schedule = make_schedule("mswa" if model == "mswa" else "uniform", w=W, n_layer=N_LAYER, n_head=N_HEAD)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    results = {
        "schema": 1,
        "status": status,
        "error": error,
        "run_name": ",".join(overrides),
        "variant": ",".join(overrides[:-1]),
        "seed": int(overrides[-1].split("=")[1]),
        "overrides": overrides,
        "run_dir": str(job_dir),
        "config": {"model": {"name": model}},
        "dataset": "synthetic",
        "unit": "byte",
        "metric": "bpc",
        "model": model,
        "schedule": schedule.name,
        "window": W,
        "windows": schedule.as_lists(),
        "budget": schedule.budget(SEQ_LEN),
        "n_params": 12345,
        "metrics": {}
        if val is None
        else {"val/loss": val * math.log(2), "val/bpc": val, "test/loss": test * math.log(2), "test/bpc": test},
        "entropy_floor_bpb": 1.5,
        "tokens_per_s": 1000.0 + val * 100 if val else None,
        "steps": 100,
        "wall_time_s": 12.0,
        "git_commit": "abc123",
        "wandb": {"id": "x", "mode": "disabled", "group": "g", "project": "p"},
    }
    (job_dir / "results.json").write_text(json.dumps(results))
    with open(job_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/loss", "val/bpc", "perf/tokens_per_s"])
        for step in (10, 20, 30):
            writer.writerow([0, step, 3.0 - step / 100, "", "", 1000])
            final = (val or 3.0) + (30 - step) / 100
            writer.writerow([0, step, "", final * math.log(2), final, ""])
