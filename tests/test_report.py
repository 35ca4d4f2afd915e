"""The comparison report on hand-built run folders in the results.json schema train.py writes."""

from __future__ import annotations

import csv
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from omegaconf import OmegaConf
from PIL import Image

from helpers.report_runs import FINISHED, N_HEAD, N_LAYER, SEQ_LEN, W, compose_run, run_results, write_run
from mswa import report
from mswa.report.runs import UNKNOWN
from mswa.windows import make_schedule

REPO = Path(__file__).resolve().parents[1]
FAILED_ERROR = "FloatingPointError: loss is NaN at step 40"


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 variants x 2 seeds finished, one failed run, one Hydra job that died before results.json."""
    root = tmp_path / "multirun" / "2025-01-31" / "12-00-00"
    for job, (overrides, val, test) in enumerate(FINISHED):
        write_run(root / str(job), overrides, "finished", val, test)
    write_run(root / "4", ["model=mswa", "seed=3"], "failed", None, None, error=FAILED_ERROR)
    crashed = root / "5" / ".hydra"
    crashed.mkdir(parents=True)
    (crashed / "overrides.yaml").write_text("- model=full\n- seed=1\n")
    return root


def run_report(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mswa.report", *args], capture_output=True, text=True, env=env, timeout=120)


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_table_with_independent_means_and_failed_runs(sweep: Path, tmp_path: Path):
    out = tmp_path / "report"
    proc = run_report(str(sweep), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out / 'summary.md'}" in proc.stdout

    rows = {row["variant"]: row for row in read_csv_rows(out / "summary.csv") if row["status"] == "finished"}
    for variant in ("model=swa", "model=mswa"):
        runs = [(val, test) for overrides, val, test in FINISHED if overrides[0] == variant]
        row = rows[variant]
        assert row["status"] == "finished" and int(row["n_seeds"]) == 2 and row["seeds"] == "1,2"
        for i, split in enumerate(("val", "test")):
            values = [run[i] for run in runs]
            assert float(row[split]) == pytest.approx(statistics.mean(values), abs=1e-12)
            assert float(row[f"{split}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert row["reference"] == "model=swa"
        assert float(row["entropy_floor_bpb"]) == 1.5
    swa_test = statistics.mean([2.15, 2.22])
    assert float(rows["model=mswa"]["delta_test"]) == pytest.approx(statistics.mean([2.04, 2.11]) - swa_test)
    assert float(rows["model=swa"]["delta_val"]) == 0.0
    assert int(rows["model=mswa"]["n_unfinished"]) == 1  # the failed seed 3 is counted, not averaged
    mswa_budget = make_schedule("mswa", w=W, n_layer=N_LAYER, n_head=N_HEAD).budget(SEQ_LEN)
    assert float(rows["model=mswa"]["pairs_vs_swa"]) == pytest.approx(mswa_budget["pairs_vs_swa"])

    failed = [row for row in read_csv_rows(out / "summary.csv") if row["status"] != "finished"]
    assert {(row["variant"], row["status"]) for row in failed} == {
        ("model=mswa", "failed"),
        ("model=full", "no results"),
    }
    assert [row["error"] for row in failed if row["status"] == "failed"] == [FAILED_ERROR]

    markdown = (out / "summary.md").read_text()
    failed_section = markdown.split("## Failed or unfinished runs")[1]
    assert FAILED_ERROR in failed_section and "no results.json" in failed_section
    assert f"{statistics.mean([2.00, 2.05]):.4f} ± {statistics.stdev([2.00, 2.05]):.4f}" in markdown
    assert "MFU" in markdown and f"{statistics.mean([0.200, 0.205]):.1%}" in markdown  # that variant's mean MFU

    for name in ("curves.png", "budget.png", "windows.png"):
        with Image.open(out / name) as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert min(pixels.shape) >= 200, name
        assert pixels.std() > 5, f"{name} looks blank"


def test_load_runs_reads_curves_and_skips_nested_copies(sweep: Path):
    copy = sweep / "0" / "wandb" / "files"  # e.g. a W&B copy of results.json inside the run folder
    copy.mkdir(parents=True)
    (copy / "results.json").write_text((sweep / "0" / "results.json").read_text())
    runs = report.load_runs([sweep, sweep / "1"])  # overlapping dirs count each run once
    assert len(runs) == 6
    assert runs.status.value_counts().to_dict() == {"finished": 4, "failed": 1, report.NO_RESULTS: 1}
    history = runs[runs.run_name == "model=swa,seed=1"].history.iloc[0]
    assert history["val/bpc"].dropna().tolist() == pytest.approx([2.30, 2.20, 2.10])


def test_bad_inputs_fail_before_work_with_a_clear_message(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output folder is reports/ below the working directory
    for args, message in [
        ([str(tmp_path / "nope")], "not found"),
        ([str(tmp_path)], "no results.json or Hydra job folder"),
        (["--wandb", "just-a-project"], "is not ENTITY/PROJECT"),
    ]:
        assert report.main(args) == 2
        assert message in capsys.readouterr().err, args
    with pytest.raises(SystemExit):  # argparse: neither DIRs nor --wandb
        report.main([])
    assert "pass either run folders" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def finished_row(overrides: list[str], val: float) -> dict:
    """A finished run's row from the real config of ``overrides`` (val and test metric ``val``)."""
    return report.row_from_results(run_results(overrides, "finished", val, val), path=",".join(overrides), history=None)


def test_reference_is_swa_at_w_of_the_same_config_found_from_the_stored_configs():
    base_window = report.runs_frame(
        [
            finished_row([f"model={model}", f"window={w}", "seed=1"], val)
            for model, w, val in [("swa", 32, 2.0), ("swa", 64, 1.9), ("mswa", 32, 1.8), ("mswa", 64, 1.5)]
        ]
    )
    table = report.summary_table(base_window).set_index("variant")
    assert table.loc["model=mswa,window=64", "reference"] == "model=swa,window=64"
    assert table.loc["model=mswa,window=64", "delta_val"] == pytest.approx(1.5 - 1.9)
    assert table.loc["model=mswa,window=32", "reference"] == "model=swa,window=32"
    assert table.loc["model=swa,window=32", "reference"] == "model=swa,window=32"  # SWA is its own: Δ = 0

    # whatever the model is called, the uniform schedule of the same config is the reference, on the same data only
    schedules = [(["model=mswa", f"window_schedule={schedule}"], val) for schedule, val in [("uniform", 2.0), ("mswa_h", 1.9)]]
    schedules.append((["model=mswa", "window_schedule=uniform", "dataset=enwik8"], 2.1))
    table = report.summary_table(report.runs_frame([finished_row([*o, "seed=1"], val) for o, val in schedules]))
    table = table.set_index("variant")
    assert table.loc["model=mswa,window_schedule=mswa_h", "reference"] == "model=mswa,window_schedule=uniform"
    assert table.loc["model=mswa,window_schedule=mswa_h", "delta_test"] == pytest.approx(1.9 - 2.0)
    on_enwik8 = "model=mswa,window_schedule=uniform,dataset=enwik8"
    assert table.loc[on_enwik8, "reference"] == on_enwik8
    # a second SWA at w of the same config (ratio 1 spelled out): the reference names both and Δ stays empty
    again = ["model=mswa", "window_schedule=uniform", "window_schedule.head_ratios=[1.0]"]
    both = report.runs_frame([finished_row([*o, "seed=1"], val) for o, val in [*schedules, (again, 2.2)]])
    row = report.summary_table(both).set_index("variant").loc["model=mswa,window_schedule=mswa_h"]
    assert row.reference == "ambiguous: model=mswa,window_schedule=uniform | " + ",".join(again)
    assert pd.isna(row.delta_val) and pd.isna(row.swa_diff)
    markdown = report.summary_markdown(both, report.summary_table(both), report.failed_runs(both), "t")
    assert "No paired difference for `window_schedule=mswa_h` against SWA at w (`ambiguous: window_schedule=uniform | " in markdown

    # seeds that do not meet: the reference is named, the pairing says why it has no numbers
    apart = report.runs_frame([finished_row(["model=swa", "seed=1"], 2.0), finished_row(["model=mswa", "seed=2"], 1.9)])
    table = report.summary_table(apart).set_index("variant")
    assert table.loc["model=mswa", "swa_reference"] == "model=swa" and pd.isna(table.loc["model=mswa", "swa_n_pairs"])
    markdown = report.summary_markdown(apart, table.reset_index(), report.failed_runs(apart), "t")
    assert "No paired difference for `model=mswa` against SWA at w (`model=swa`): no seed in common." in markdown

    # hybrids: each layout is compared with the same hybrid under SWA, not with the other layout
    hybrids = report.runs_frame(
        [
            finished_row([f"model={model}", "seed=1"], val)
            for model, val in [("swa_linear", 2.0), ("swa_linear_parallel", 1.9), ("mswa_linear", 1.8), ("mswa_linear_parallel", 1.6)]
        ]
    )
    table = report.summary_table(hybrids).set_index("variant")
    assert table.loc["model=mswa_linear", "reference"] == "model=swa_linear"
    assert table.loc["model=mswa_linear_parallel", "delta_val"] == pytest.approx(1.6 - 1.9)


@pytest.mark.timeout(90)
def test_wandb_without_login_errors_clearly(tmp_path: Path):
    # a home without W&B credentials; matplotlib keeps its font cache so the run stays quick
    env = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path), "WANDB_API_KEY": ""}
    env.update(NETRC=str(tmp_path / "netrc"), MPLCONFIGDIR=matplotlib.get_configdir())
    proc = run_report("--wandb", "some-team/mswa", "--out", str(tmp_path / "out"), env_extra=env)
    assert proc.returncode == 2
    assert "could not read W&B project 'some-team/mswa'" in proc.stderr and "wandb login" in proc.stderr


def test_wandb_runs_convert_to_the_same_rows(sweep: Path):
    """Stand-ins with the public-API attributes the converter reads; no network involved."""
    results = json.loads((sweep / "2" / "results.json").read_text())
    history = pd.read_csv(sweep / "2" / "metrics.csv").rename(columns={"step": "trainer/global_step"})
    finished = SimpleNamespace(
        name=results["run_name"],
        state="finished",
        url="https://wandb.ai/t/p/runs/a",
        summary={"results": results},
        history=lambda samples, pandas: history,
    )
    crashed = SimpleNamespace(
        name="model=full,seed=2",
        state="crashed",
        url="https://wandb.ai/t/p/runs/b",
        summary={},
        history=lambda samples, pandas: history.iloc[:0],
    )
    api = SimpleNamespace(runs=lambda path: [finished, crashed])
    runs = report.load_wandb_runs("t/p", api=api)
    local = report.load_runs([sweep / "2"]).iloc[0]
    remote = runs[runs.status == "finished"].iloc[0]
    for column in ("variant", "seed", "val", "test", "pairs_vs_swa", "windows"):
        assert remote[column] == local[column], column
    assert remote.history["step"].tolist() == local.history["step"].tolist()
    failed = runs[runs.status != "finished"].iloc[0]
    assert (failed.variant, failed.seed, failed.status) == ("model=full", 2, "failed") and "crashed" in failed.error


def test_notebook_runs_top_to_bottom_on_a_sweep(sweep: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MSWA_SWEEP_DIR", str(sweep))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    notebook = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 3  # each plot shown once
    html = "".join(output.get("data", {}).get("text/html", "") for output in outputs)
    assert "model=mswa" in html and FAILED_ERROR in html


def test_a_run_still_marked_running_reads_stopped_once_its_process_is_gone_or_silent(sweep: Path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    here, now = socket.gethostname(), datetime.datetime.now(datetime.UTC)
    minutes_ago = lambda m: (now - datetime.timedelta(minutes=m)).isoformat(timespec="seconds")  # noqa: E731
    cases = [
        ({"pid": dead.pid, "host": here, "heartbeat": minutes_ago(0)}, "its process"),  # killed on this machine
        ({"pid": os.getpid(), "host": here, "heartbeat": minutes_ago(1)}, None),  # alive here
        ({"pid": 1, "host": "another-machine", "heartbeat": minutes_ago(6)}, "no heartbeat"),  # 5 beats missed
        ({"pid": 1, "host": "another-machine", "heartbeat": minutes_ago(4)}, None),
    ]
    for process, words in cases:
        why = report.why_stopped({**process, "heartbeat_every_s": 60.0}, now=now)
        assert (why is None) if words is None else (words in why and "ckpt_path=last" in why), (process, why)

    results = json.loads((sweep / "0" / "results.json").read_text())
    results.update(status="running", process={"pid": dead.pid, "host": here, "heartbeat_every_s": 60.0, "heartbeat": minutes_ago(0)})
    (sweep / "0" / "results.json").write_text(json.dumps(results))
    runs = report.load_runs([sweep])
    assert runs.set_index("path").loc[str((sweep / "0").resolve()), "status"] == report.STOPPED
    assert report.STOPPED in report.failed_runs(runs).status.tolist()


def test_variant_names_leave_out_overrides_common_to_all_runs(sweep: Path):
    shared = ["trainer.max_steps=100", "optim.betas=[0.9,0.99]"]
    rows = [finished_row([f"model={model}", *shared, "seed=1"], val) for model, val in [("swa", 2.0), ("mswa", 1.9)]]
    runs = report.runs_frame(rows)
    markdown = report.summary_markdown(runs, report.summary_table(runs), report.failed_runs(runs), "t")
    assert (
        "Overrides common to all runs (left out of the variant names below): `trainer.max_steps=100`, `optim.betas=[0.9,0.99]`" in markdown
    )
    variants_table = markdown.split("## Paired differences over seeds")[0]
    table_rows = [line for line in variants_table.splitlines() if line.startswith("| model=")]
    assert [row.split(" | ")[0] for row in table_rows] == ["| model=mswa", "| model=swa"]
    assert "| model=swa |" in table_rows[0]  # the SWA reference column, shortened the same way
    assert report.split_overrides('a=1,b=[2,3],c="x,y"') == ["a=1", "b=[2,3]", 'c="x,y"']


def test_refused_attempts_are_listed_and_the_run_kept(sweep: Path):
    attempt = {
        "ended": "2026-01-01T00:00:00+00:00",
        "status": "refused",
        "overrides": ["model=swa", "seed=1"],
        "error": "outputs/x already holds a run (checkpoints/last.ckpt); resume it with ckpt_path=last",
    }
    finished = {**attempt, "status": "finished", "error": None}
    (sweep / "0" / "attempts.jsonl").write_text(json.dumps(finished) + "\n" + json.dumps(attempt) + "\n")
    runs = report.load_runs([sweep])
    markdown = report.summary_markdown(runs, report.summary_table(runs), report.failed_runs(runs), "t")
    refused = markdown.split("## Refused attempts (each left its run folder as it was)")[1]
    assert attempt["error"] in refused and "model=swa,seed=1" in refused
    assert (runs.status == "finished").sum() == 4  # the run the attempt found is still counted as finished


def test_an_attempt_that_never_recorded_its_end_reads_stopped_here_and_unknown_elsewhere(sweep: Path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = socket.gethostname()
    started = {"started": "2026-01-01T00:00:00+00:00", "ended": None, "status": "running", "error": None, "overrides": ["seed=1"]}
    lines = [
        {**started, "attempt": "killed", "pid": dead.pid, "host": here},
        {**started, "attempt": "elsewhere", "pid": 1, "host": "another-machine"},
        {**started, "attempt": "alive", "pid": os.getpid(), "host": here},
    ]
    (sweep / "0" / "attempts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    runs = report.load_runs([sweep])
    assert report.attempts(runs).status.tolist() == [report.STOPPED, UNKNOWN, "running"]
    markdown = report.summary_markdown(runs, report.summary_table(runs), report.failed_runs(runs), "t")
    unended = markdown.split("## Attempts that never recorded their end (killed, or running on another machine)")[1]
    assert f"its process ({dead.pid}) ended without recording an end" in unended and "another-machine" in unended
    assert f"({os.getpid()})" not in unended  # a live attempt is no news


COMMITTED = [REPO / "sweep" / "results" / "cpu_main", REPO / "sweep" / "results" / "cpu_budget"]
VALIDATED = [125, 250, 375, 500, 625, 750]  # the committed runs' validation steps (experiment=cpu)


def test_runs_written_before_the_step_convention_read_at_optimizer_steps_done():
    """The committed runs logged validation during training at 124, 249, ... (the index of the step's batch) and
    the final full pass of the step-750 weights at 750; read at optimizer steps done, the curves have one point
    per validation, the final pass at 750."""
    runs = report.load_runs(COMMITTED[:1])
    for history, val in zip(runs.history, runs.val):
        validation = history[["step", "val/bpc"]].dropna()
        assert validation.step.tolist() == [*VALIDATED, 750]
        assert validation["val/bpc"].iloc[-1] == pytest.approx(val, rel=1e-6)
    (ax,) = report.plot_curves(runs).axes
    val_lines = [line for line in ax.get_lines() if " val (n=" in str(line.get_label())]
    assert len(val_lines) == 3 and all(list(line.get_xdata()) == VALIDATED for line in val_lines)
    for line in val_lines:  # the last point is the mean of the final full passes
        variant = str(line.get_label()).split(" val (n=")[0]
        assert line.get_ydata()[-1] == pytest.approx(runs[runs.variant == variant].val.mean(), rel=1e-6)


def test_both_config_layouts_give_the_same_references_from_the_schedule_rule(tmp_path: Path):
    """The committed runs hold the older layout (window_schedule.name = the rule, Hydra's choice in results'
    `schedule`); copies in today's (name = the file, kind = the rule, no `schedule`) read the same."""
    legacy = report.summary_table(report.load_runs(COMMITTED)).set_index("schedule")
    swa, mswa, budget = (legacy.loc[name, "variant"] for name in ("uniform", "mswa", "uniform_mswa_budget"))
    assert legacy.loc["uniform_mswa_budget", "schedule_rule"] == "uniform"
    assert (legacy.loc["mswa", "swa_reference"], legacy.loc["mswa", "budget_reference"]) == (swa, budget)
    assert legacy.loc["uniform_mswa_budget", "swa_reference"] == swa and legacy.loc["full", "reference"] == swa
    assert legacy.loc["mswa", "swa_n_pairs"] == 3 and pd.isna(legacy.loc["uniform", "swa_reference"])
    for path in (p for folder in COMMITTED for p in folder.rglob("results.json")):
        results = json.loads(path.read_text())
        schedule = results["config"]["window_schedule"]
        schedule.update(name=results.pop("schedule"), kind=schedule["name"])
        copy_dir = tmp_path / path.parent.relative_to(REPO)
        copy_dir.mkdir(parents=True)
        (copy_dir / "results.json").write_text(json.dumps(results))
    current = report.summary_table(report.load_runs([tmp_path])).set_index("schedule")
    # variant ids aside: that both layouts are one variant is mswa.sweeps.variant_id's to say (and test)
    pd.testing.assert_frame_equal(current.drop(columns="variant_id"), legacy.drop(columns="variant_id"))


def test_a_job_that_died_is_named_as_train_py_names_its_variant(tmp_path: Path):
    """Sorted overrides without the seed and the keys Hydra's config leaves out of run names (hardware here)."""
    overrides = ["seed=3", "window=32", "hardware=cpu", "model=mswa"]
    hydra = compose_run(tuple(overrides))[1]
    job = tmp_path / "0" / ".hydra"
    job.mkdir(parents=True)
    (job / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": hydra}))
    (row,) = report.load_runs([tmp_path]).itertuples()
    assert (row.variant, row.seed, row.status) == ("model=mswa,window=32", 3, report.NO_RESULTS)


def test_legends_sit_outside_the_panels_and_colour_bar_labels_apart():
    runs = report.load_runs(COMMITTED)
    for plot in (report.plot_curves, report.plot_budget, report.plot_distance, report.plot_kinds):
        fig = plot(runs)
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert all(box.y1 <= ax.get_window_extent(renderer).y0 for ax in fig.axes), plot.__name__
        assert len(legend.get_texts()) == len({t.get_text() for t in legend.get_texts()}) >= 4, plot.__name__
    colour_bar = report.plot_windows(runs).axes[-1]
    ticks = sorted(float(t.get_text()) for t in colour_bar.get_yticklabels())
    assert ticks[0] == 4 and ticks[-1] == 256 and all(b / a >= 1.25 for a, b in zip(ticks, ticks[1:]))  # 56, not 64
