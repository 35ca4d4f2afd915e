"""Finished and failed run folders as train.py writes them (results.json from the real composed conf/,
metrics.csv, Hydra overrides), for the report's tests."""

import copy
import csv
import functools
import json
import math
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from helpers.runs import REPO
from mswa.run import STEP_CONVENTION
from mswa.windows import make_schedule

SEQ_LEN, W, N_LAYER, N_HEAD = 64, 16, 4, 4

# (overrides, final val bpc, final test bpc) of the finished runs
FINISHED = [
    (["model=swa", "seed=1"], 2.10, 2.15),
    (["model=swa", "seed=2"], 2.20, 2.22),
    (["model=mswa", "seed=1"], 2.00, 2.04),
    (["model=mswa", "seed=2"], 2.05, 2.11),
]
SIZE = (f"window={W}", f"seq_len={SEQ_LEN}", f"model.n_layer={N_LAYER}", f"model.n_head={N_HEAD}")


@functools.cache
def compose_run(overrides: tuple[str, ...]) -> tuple[dict, dict]:
    """The real conf/ composed with a run's overrides: (the resolved config, Hydra's own config, unresolved).
    Cached: copy before changing either."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.data_dir=/nonexistent", *SIZE, *overrides], return_hydra_config=True)
    hydra = OmegaConf.to_container(cfg.hydra, resolve=False)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True), hydra


def run_results(overrides: list[str], status: str, val: float | None, test: float | None, error=None) -> dict:
    """results.json (schema 1) of a run as train.py writes it, from the real composed config of its overrides."""
    seed = int(overrides[-1].split("=")[1])
    config, hydra = compose_run(tuple(overrides[:-1]))
    config, choice = {**copy.deepcopy(config), "seed": seed}, hydra["runtime"]["choices"]["window_schedule"]
    ws = config["window_schedule"]
    w = None if ws.get("kind", ws["name"]) == "full" else W  # a config holds the rule in kind, or (older) in name
    schedule = make_schedule(
        ws.get("kind", ws["name"]), w=w, n_layer=N_LAYER, n_head=N_HEAD, head_ratios=ws["head_ratios"], layer_ratios=ws["layer_ratios"]
    )
    return {
        "schema": 1,
        "status": status,
        "error": error,
        "run_name": ",".join(overrides),
        "variant": ",".join(overrides[:-1]),
        "seed": seed,
        "overrides": overrides,
        "config": config,
        "dataset": config["dataset"]["name"],
        "unit": "byte",
        "metric": "bpc",
        "model": config["model"]["name"],
        "schedule": choice,
        "window": w,
        "windows": schedule.as_lists(),
        "budget": schedule.budget(SEQ_LEN),
        "n_params": 12345,
        "metrics": {}
        if val is None
        else {"val/loss": val * math.log(2), "val/bpc": val, "test/loss": test * math.log(2), "test/bpc": test},
        "entropy_floor_bpb": 1.5,
        "tokens_per_s": 1000.0 + val * 100 if val else None,
        "mfu": val / 10 if val else None,
        "steps": 100,
        "wall_time_s": 12.0,
        "git_commit": "abc123",
        "wandb": {"id": "x", "mode": "disabled", "group": "g", "project": "p"},
        "step_convention": STEP_CONVENTION,
    }


def write_run(job_dir: Path, overrides: list[str], status: str, val: float | None, test: float | None, error=None):
    """A Hydra job folder holding results.json and a sparse Lightning metrics.csv."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    results = run_results(overrides, status, val, test, error) | {"run_dir": str(job_dir)}
    (job_dir / "results.json").write_text(json.dumps(results))
    with open(job_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/loss", "val/bpc", "perf/tokens_per_s"])
        for step in (10, 20, 30):
            writer.writerow([0, step, 3.0 - step / 100, "", "", 1000])
            final = (val or 3.0) + (30 - step) / 100
            writer.writerow([0, step, "", final * math.log(2), final, ""])
