"""Sweeps as a protocol: a rerun sweep skips finished jobs and resumes interrupted ones; the report pairs
seeds across sweep folders by config (not by folder or spelling) and shows paired intervals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers.runs import REPO, TINY_DATA, run_train
from mswa import report
from mswa.stats import BETTER, UNDECIDED, WORSE

TINY = ["debug=smoke", *TINY_DATA, "logger=none"]


def sweep(tmp_path: Path, folder: str, *overrides: str) -> subprocess.CompletedProcess:
    return run_train(["-m", *TINY, f"hydra.sweep.dir={tmp_path / folder}", *overrides], tmp_path)


def results_of(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/results.json")}


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, exit_status", [(signal.SIGINT, "interrupted", 1), (signal.SIGTERM, "preempted", 75)])
def test_rerun_sweep_resumes_the_stopped_job(tmp_path, signum, status, exit_status):
    args = [
        *TINY,
        "trainer.max_steps=60",
        "trainer.val_check_interval=20",
        "checkpoint.every_n_train_steps=5",
        "model=swa",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    cmd = [sys.executable, str(REPO / "train.py"), "-m", f"paths.log_dir={tmp_path}/outputs", *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "MSWA_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not list((tmp_path / "sweep").glob("*/checkpoints/last.ckpt")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signum)  # Ctrl-C or a scheduler's SIGTERM: checkpoint at the step boundary, recorded
    assert proc.wait(timeout=120) == exit_status
    ((job, stopped),) = results_of(tmp_path / "sweep").items()
    assert stopped["status"] == status
    rows_before = pd.read_csv(tmp_path / "sweep" / job / "metrics.csv")
    assert 0 < rows_before.step.max() < 59

    resumed = run_train(["-m", *args], tmp_path)  # the same command, no ckpt_path
    assert f"resuming: {tmp_path / 'sweep' / job} from checkpoints/last.ckpt" in resumed.stdout
    finished = results_of(tmp_path / "sweep")[job]
    assert finished["status"] == "finished" and finished["steps"] == 60
    rows = pd.read_csv(tmp_path / "sweep" / job / "metrics.csv")
    assert set(rows_before.step) <= set(rows.step) and rows.step.max() >= 59  # the earlier rows were kept


def test_rerun_sweep_skips_a_finished_job_in_one_line_and_refuses_one_of_another_config(tmp_path):
    first = sweep(tmp_path, "s", "model=swa")
    assert "warning: training reads" not in first.stderr  # 1,536 tokens from a 180,000-token split
    (job,) = results_of(tmp_path / "s")
    results_path = tmp_path / "s" / job / "results.json"
    stamp = results_path.stat().st_mtime_ns
    again = sweep(tmp_path, "s", "model=swa")
    assert again.stdout.count("skipped: ") == 1 and f"skipped: {tmp_path / 's' / job} already finished" in again.stdout
    assert results_path.stat().st_mtime_ns == stamp  # nothing touched

    results = json.loads(results_path.read_text())
    results["config"]["window"] = 999  # as if the experiment file had changed since
    results_path.write_text(json.dumps(results))
    proc = run_train(["-m", *TINY, f"hydra.sweep.dir={tmp_path / 's'}", "model=swa"], tmp_path, check=False)
    assert proc.returncode != 0 and "holds a finished run of another config" in proc.stderr
    assert json.loads(results_path.read_text())["config"]["window"] == 999  # untouched


@pytest.mark.slow
def test_report_pairs_three_seeds_across_sweep_folders_with_intervals(tmp_path):
    """Three seeds of swa and mswa in one folder; SWA at mswa's budget in another, with a second spelling of
    model=swa (seed 0): one variant per config, the duplicate left out, intervals against both references."""
    sweep(tmp_path, "main", "model=swa,mswa", "seed=0,1,2")
    sweep(tmp_path, "budget", "model=swa", "window_schedule=uniform_mswa_budget,uniform", "seed=0,1,2")
    runs = report.load_runs([tmp_path / "main", tmp_path / "budget"])
    assert (runs.status == report.DUPLICATE).sum() == 3  # window_schedule=uniform = model=swa: already run
    table = report.summary_table(runs).set_index("variant")
    swa, mswa, budget = (_name(table, schedule) for schedule in ("uniform", "mswa", "uniform_mswa_budget"))
    assert len(table) == 3 and (table.n_seeds == 3).all()
    assert table.loc[mswa, "swa_reference"] == swa and table.loc[mswa, "budget_reference"] == budget
    assert table.loc[budget, "swa_reference"] == swa and pd.isna(table.loc[budget, "budget_reference"])

    # the interval, by hand: mean of the three paired differences +- t(0.975, 2) * sd / sqrt(3)
    finished = runs[runs.status == "finished"]
    test = {v: finished[finished.variant == v].set_index("seed").test for v in (swa, mswa)}
    diffs = (test[mswa] - test[swa]).to_numpy()
    half = 4.302652729911275 * diffs.std(ddof=1) / 3**0.5
    row = table.loc[mswa]
    assert row.swa_n_pairs == 3 and row.swa_diff == pytest.approx(diffs.mean(), abs=1e-12)
    assert (row.swa_low, row.swa_high) == pytest.approx((diffs.mean() - half, diffs.mean() + half), abs=1e-9)
    assert row.swa_verdict == (BETTER if row.swa_high < 0 else WORSE if row.swa_low > 0 else UNDECIDED)

    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "mswa.report", str(tmp_path / "main"), str(tmp_path / "budget"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    markdown = (out / "summary.md").read_text()
    assert "test − SWA at w [95%]" in markdown and "test − SWA at budget [95%]" in markdown
    assert "## Paired differences over seeds" in markdown
    assert f"{row.swa_diff:+.4f} [{row.swa_low:+.4f}, {row.swa_high:+.4f}] {row.swa_verdict}" in markdown
    assert markdown.count("same config and seed as") == 3


def _name(table: pd.DataFrame, schedule: str) -> str:
    (name,) = table.index[table.schedule == schedule]
    return name
