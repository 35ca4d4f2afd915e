"""The report's common-sense reasoning section, read from lm_eval.json files in the format mswa.hf.evaluate
writes: the summary comes from its own ``summarize`` applied to lm_eval-style per-task results."""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from helpers.report_runs import write_run
from helpers.runs import TINY_DATA, run_train
from mswa import report

pytest.importorskip("transformers")  # mswa.hf.evaluate imports mswa.hf.patch, which needs it
from mswa.hf.evaluate import summarize

SECTION = "## Common-sense reasoning (lm_eval)"
RUN_FILES = {"summary.md", "summary.csv", "curves.png", "budget.png", "windows.png", "distance.png", "kinds.png"}
# stderrs shared by every evaluation: (piqa acc_norm, hellaswag acc_norm, winogrande acc)
STDERRS = (0.011, 0.004, 0.014)
# (variant overrides, seed) of a training run -> (piqa acc_norm, hellaswag acc_norm, winogrande acc)
SWEEP = {
    ("model=swa", 1): (0.62, 0.30, 0.51),
    ("model=mswa", 1): (0.64, 0.33, 0.52),
    ("model=mswa", 2): (0.66, 0.35, 0.55),
}
LLAMA = (0.70, 0.50, 0.60)  # an evaluation on its own, in evals/llama/mswa


def lm_eval_results(piqa: float, hellaswag: float, winogrande: float) -> dict:
    """lm_eval's per-task ``results``: piqa and hellaswag report acc and acc_norm (acc lower, so a table
    showing acc is caught), winogrande only acc."""
    return {
        "piqa": {
            "alias": "piqa",
            "acc,none": piqa - 0.02,
            "acc_stderr,none": 0.010,
            "acc_norm,none": piqa,
            "acc_norm_stderr,none": STDERRS[0],
        },
        "hellaswag": {
            "alias": "hellaswag",
            "acc,none": hellaswag - 0.05,
            "acc_stderr,none": 0.005,
            "acc_norm,none": hellaswag,
            "acc_norm_stderr,none": STDERRS[1],
        },
        "winogrande": {"alias": "winogrande", "acc,none": winogrande, "acc_stderr,none": STDERRS[2]},
    }


def write_lm_eval(folder: Path, accuracies: tuple[float, float, float], **extra) -> None:
    """lm_eval.json with the keys evaluate_commonsense writes (its lm_eval bookkeeping left out)."""
    results = lm_eval_results(*accuracies)
    record = {
        "tasks": list(results),
        "num_fewshot": 0,
        "limit": None,
        "windows": None,
        "summary": summarize(results),
        "results": results,
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lm_eval.json").write_text(json.dumps(record))


def expected_cells(per_seed: list[tuple[float, float, float]]) -> list[str]:
    """The table's cells (three tasks, then the average) computed here: one evaluation shows its stderr
    (the average's combines the tasks' as independent), several seeds their mean ± sample std."""
    columns = [*zip(*per_seed), [statistics.mean(accuracies) for accuracies in per_seed]]
    if len(per_seed) > 1:
        return [f"{100 * statistics.mean(c):.1f} ±{100 * statistics.stdev(c):.1f}" for c in columns]
    average_stderr = math.sqrt(sum(e * e for e in STDERRS)) / len(STDERRS)
    return [f"{100 * c[0]:.1f} ±{100 * e:.1f}" for c, e in zip(columns, [*STDERRS, average_stderr])]


def section_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The lm_eval table of summary.md as {variant: {header: cell}}."""
    lines = itertools.dropwhile(lambda line: not line.startswith("|"), markdown.split(SECTION, 1)[1].splitlines())
    header, _, *rows = (
        [cell.strip() for cell in line.strip("|").split("|")] for line in itertools.takewhile(lambda line: line.startswith("|"), lines)
    )
    return {row[0]: dict(zip(header, row)) for row in rows}


@pytest.fixture
def sweep_with_evals(tmp_path: Path) -> tuple[Path, Path]:
    """Three training runs, each evaluated in its folder, and a folder holding an evaluation only."""
    sweep = tmp_path / "multirun"
    for job, ((variant, seed), accuracies) in enumerate(SWEEP.items()):
        write_run(sweep / str(job), [variant, f"seed={seed}"], "finished", 2.0, 2.1)
        write_lm_eval(sweep / str(job), accuracies, schedule="overridden by results.json")
    evals = tmp_path / "evals"
    write_lm_eval(evals / "llama" / "mswa", LLAMA, model="llama", schedule="mswa")
    return sweep, evals


def test_table_shows_headline_accuracy_per_variant_and_evaluation(sweep_with_evals, tmp_path: Path):
    out = tmp_path / "report"
    assert report.main([*map(str, sweep_with_evals), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == RUN_FILES | {"lm_eval.csv", "lm_eval.png"}
    markdown = (out / "summary.md").read_text()
    assert "| model=mswa | bpc | 2 |" in markdown  # the runs' own table is still there

    rows = section_rows(markdown)
    assert set(rows) == {"model=swa", "model=mswa", "llama/mswa"}  # named by variant, else by folder
    tasks = ["piqa/acc_norm", "hellaswag/acc_norm", "winogrande/acc", "average"]
    assert list(rows["model=swa"])[-4:] == tasks
    assert [rows["model=swa"][t] for t in tasks] == expected_cells([SWEEP["model=swa", 1]])
    assert rows["model=swa"]["piqa/acc_norm"] == "62.0 ±1.1"
    assert [rows["model=mswa"][t] for t in tasks] == expected_cells([SWEEP["model=mswa", s] for s in (1, 2)])
    assert [rows["llama/mswa"][t] for t in tasks] == expected_cells([LLAMA])
    assert (rows["model=mswa"]["seeds"], rows["model=swa"]["schedule"]) == ("1,2", "uniform")  # from results.json
    assert (rows["llama/mswa"]["model"], rows["llama/mswa"]["schedule"]) == ("llama", "mswa")  # from lm_eval.json

    with open(out / "lm_eval.csv", newline="") as f:
        table = {row["variant"]: row for row in csv.DictReader(f)}
    assert set(table) == set(rows)
    mswa = table["model=mswa"]
    assert int(mswa["n_seeds"]) == 2
    assert float(mswa["piqa/acc_norm"]) == pytest.approx(statistics.mean([0.64, 0.66]))
    assert float(mswa["piqa/acc_norm_std"]) == pytest.approx(statistics.stdev([0.64, 0.66]))
    assert float(table["llama/mswa"]["average"]) == pytest.approx(statistics.mean(LLAMA))

    with Image.open(out / "lm_eval.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert min(pixels.shape[:2]) >= 200
    colours = [np.array(matplotlib.colors.to_rgb(f"C{i}")) * 255 for i in range(4)]
    bar_pixels = [int((np.abs(pixels - c.round()) <= 1).all(axis=-1).sum()) for c in colours]
    assert min(bar_pixels[:3]) > 1000 and bar_pixels[3] == 0, bar_pixels  # one bar colour per table row


def test_evaluations_alone_make_a_report(tmp_path: Path, capsys):
    folder = tmp_path / "eval_llama"
    write_lm_eval(folder, LLAMA, model="llama", schedule=None)
    out = tmp_path / "report"
    assert report.main([str(folder), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"summary.md", "lm_eval.csv", "lm_eval.png"}
    markdown = (out / "summary.md").read_text()
    assert "No training runs" in markdown and "## Failed or unfinished runs" not in markdown
    assert [section_rows(markdown)["eval_llama"][t] for t in ("piqa/acc_norm", "average")] == [
        "70.0 ±1.1",
        expected_cells([LLAMA])[-1],
    ]
    assert "1 lm_eval evaluations" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty), "--out", str(tmp_path / "none")]) == 2
    assert "no lm_eval.json either" in capsys.readouterr().err


def test_without_lm_eval_json_nothing_is_added(tmp_path: Path):
    sweep = tmp_path / "multirun"
    write_run(sweep / "0", ["model=swa", "seed=1"], "finished", 2.0, 2.1)
    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == RUN_FILES
    markdown = (out / "summary.md").read_text()
    assert SECTION not in markdown and "lm_eval.png" not in markdown


def test_headline_metric_is_acc_norm_where_reported_else_acc():
    summary = summarize(
        {
            "arc_easy": {"acc,none": 0.7, "acc_stderr,none": 0.01, "acc_norm,none": 0.6, "acc_norm_stderr,none": "N/A"},
            "boolq": {"acc,none": 0.8, "acc_stderr,none": 0.02},
            "gsm8k": {"exact_match,strict-match": 0.1},  # no accuracy: not a column
        }
    )
    row = report.headline_accuracies(summary)
    assert set(row) == {
        "arc_easy/acc_norm",
        "arc_easy/acc_norm_stderr",
        "boolq/acc",
        "boolq/acc_stderr",
        "average",
        "average_stderr",
    }
    assert (row["arc_easy/acc_norm"], row["boolq/acc"]) == (0.6, 0.8)
    assert row["average"] == pytest.approx(0.7)
    assert math.isnan(row["arc_easy/acc_norm_stderr"]) and math.isnan(row["average_stderr"])  # N/A stays unknown


def test_a_real_training_run_gets_its_evaluation_row(tmp_path: Path):
    run_train(["debug=smoke", *TINY_DATA, "logger=none", "seed=3"], tmp_path)
    (results_path,) = (tmp_path / "outputs").rglob("results.json")
    results = json.loads(results_path.read_text())
    write_lm_eval(results_path.parent, LLAMA, schedule="ignored: results.json says")
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "outputs"), "--out", str(out)]) == 0
    row = section_rows((out / "summary.md").read_text())[results["variant"]]
    assert (row["seeds"], row["schedule"], row["model"]) == ("3", results["schedule"], results["model"])
    assert row["average"] == expected_cells([LLAMA])[-1]
