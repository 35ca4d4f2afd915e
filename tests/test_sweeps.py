"""Sweeps and launchers compose with the real conf/; a tiny multirun with a failing job feeds the report."""

import itertools
import json
import os
import subprocess
import sys

import matplotlib.image
import nbformat
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from nbclient import NotebookClient
from omegaconf import OmegaConf

from helpers.runs import REPO, run_train
from mswa.config import parse_config
from mswa.factory import build_schedule

SWEEPS = sorted(p.stem for p in (REPO / "sweep").glob("*.yaml"))


def compose_with_hydra(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=["paths.data_dir=/tmp/unused", *overrides], return_hydra_config=True)


def test_every_sweep_is_documented():
    table = (REPO / "sweep" / "README.md").read_text()
    assert SWEEPS == ["allocation", "base_window", "budget_matched", "groups", "head_vs_layer", "linear", "main", "order"]
    for name in SWEEPS:
        assert f"+sweep={name}`" in table, name


@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_every_sweep_composes_and_builds_its_windows(name):
    params = compose_with_hydra([f"+sweep={name}"]).hydra.sweeper.params
    grid = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    jobs = list(itertools.product(*grid))
    assert len(jobs) >= 3
    for job in jobs:
        cfg = OmegaConf.to_container(compose_with_hydra([f"+sweep={name}", *job]), resolve=False)
        del cfg["hydra"]  # its resolvers live only in a Hydra run
        cfg = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
        schedule = build_schedule(parse_config(cfg))  # raises for a job whose windows cannot be built
        assert schedule.is_full == (not cfg["model"]["windowed"]), job


def test_slurm_launcher_composes_instantiates_and_keeps_lightning_consistent(tmp_path):
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    cfg = compose_with_hydra(
        ["launcher=slurm", "slurm.nodes=2", "slurm.gpus_per_node=4", "slurm.partition=gpu", f"hydra.sweep.dir={tmp_path}"]
    )
    HydraConfig.instance().set_config(cfg)
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher_cfg.pop("_target_").endswith("SlurmLauncher")
    launcher = SlurmLauncher(**launcher_cfg)
    assert launcher.params["nodes"] == 2 and launcher.params["gpus_per_node"] == 4
    assert launcher.params["tasks_per_node"] == 4 and launcher.params["partition"] == "gpu"
    assert cfg.hardware.devices == 4 and cfg.hardware.num_nodes == 2 and cfg.hardware.strategy == "ddp"
    # the job script submitit writes: SLURM's warning signal is ours (not submitit's USR2), the job may be requeued
    from submitit.slurm.slurm import _make_sbatch_string

    params = launcher.params
    script = _make_sbatch_string(
        "python job.py", tmp_path, signal_delay_s=params["signal_delay_s"], additional_parameters=params["additional_parameters"]
    )
    assert "#SBATCH --signal=USR1@120" in script.splitlines() and "#SBATCH --requeue" in script.splitlines()


def test_joblib_launcher_composes():
    cfg = compose_with_hydra(["launcher=joblib"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.torch_threads == 1


def test_tiny_multirun_with_a_failing_job_then_report_and_notebook(tmp_path):
    # window=0 is a bad override for that one job: it must fail alone, recorded, without stopping the others
    proc = run_train(["-m", "debug=smoke", "dataset.loader.n_bytes=200000", "model=swa", "window=16,0,8"], tmp_path, check=False)
    assert proc.returncode != 0 and "window=0" in proc.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "train" / "multirun").iterdir()
    statuses = {json.loads(p.read_text())["variant"]: json.loads(p.read_text())["status"] for p in sweep_dir.rglob("results.json")}
    assert sorted(statuses.values()) == ["failed", "finished", "finished"]

    out = tmp_path / "report"
    report = subprocess.run(
        [sys.executable, "-m", "mswa.report", str(sweep_dir), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr
    table = (out / "summary.md").read_text()
    good = [line for line in table.splitlines() if "window=16" in line or "window=8" in line]
    assert len(good) >= 2 and all("±" in line or "nan" not in line for line in good)
    assert "window=0" in table and "failed" in table and "window=0 is not a valid base window" in table
    for png in ("curves.png", "budget.png", "windows.png"):
        image = matplotlib.image.imread(out / png)
        assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0.01, png

    notebook = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["MSWA_SWEEP_DIR"] = str(sweep_dir)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["MSWA_SWEEP_DIR"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert not [o for o in outputs if o.get("output_type") == "error"]
