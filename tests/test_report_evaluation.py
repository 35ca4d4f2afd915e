"""The report's loss by distance, bpc by kind, evaluation settings, and curves in one unit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.report_runs import FINISHED, write_run
from mswa import report

KINDS = ["word", "copy32", "copy1000"]
FLOORS = [1.2, 0.3, 0.4]


def evaluation(shift: float) -> dict:
    """A results.json `evaluation` block whose numbers move with ``shift``."""
    split = {
        "targets": 100,
        "forward_tokens_per_target": 4.0,
        "floor_bpc": 0.9,
        "by_distance": [
            {"context": [1, 1], "targets": 1, "loss": 5.0, "bpc": 5.0 + shift},
            {"context": [2, 3], "targets": 2, "loss": 4.0, "bpc": 4.0 + shift},
            {"context": [64, 64], "targets": 97, "loss": 2.0, "bpc": 2.0 + shift},
        ],
        "by_kind": [{"kind": k, "bytes": 10, "bpc": 2.0 + i + shift, "floor_bpc": f} for i, (k, f) in enumerate(zip(KINDS, FLOORS))],
    }
    return {"seq_len": 64, "stride": 16, "val": split, "test": split}


@pytest.fixture
def runs_with_evaluations(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for job, (overrides, val, test) in enumerate(FINISHED):
        folder = root / str(job)
        write_run(folder, overrides, "finished", val, test)
        results = json.loads((folder / "results.json").read_text())
        results["evaluation"] = evaluation(shift=0.1 * job)
        (folder / "results.json").write_text(json.dumps(results))
        for seq_len in (64, 256):
            record = {
                "metric": "bpc",
                "train_seq_len": 64,
                "checkpoint": "best",
                "evaluation": {"seq_len": seq_len, "stride": seq_len // 4},
                "metrics": {"val/bpc": val + seq_len / 1000, "test/bpc": test + seq_len / 1000},
            }
            (folder / f"evaluation_L{seq_len}_stride{seq_len // 4}_best.json").write_text(json.dumps(record))
    return root


def test_tables_average_the_seeds_of_each_variant(runs_with_evaluations):
    runs = report.load_runs([runs_with_evaluations])
    distance = report.distance_table(runs)
    swa = distance[distance.variant == "model=swa"]  # jobs 0 and 1: shifts 0.0 and 0.1
    assert swa.value.tolist() == pytest.approx([5.05, 4.05, 2.05])
    assert swa[["context_lo", "context_hi"]].values.tolist() == [[1, 1], [2, 3], [64, 64]]
    kinds = report.kind_table(runs)
    mswa = kinds[kinds.variant == "model=mswa"]  # jobs 2 and 3
    assert mswa.kind.tolist() == KINDS and mswa.bpc.tolist() == pytest.approx([2.25, 3.25, 4.25])
    assert mswa.floor_bpc.tolist() == FLOORS and set(mswa.n_seeds) == {2}
    settings = report.load_evaluations(runs)
    assert settings[["variant", "seq_len", "stride"]].values.tolist() == [
        ["model=mswa", 64, 16],
        ["model=mswa", 256, 64],
        ["model=swa", 64, 16],
        ["model=swa", 256, 64],
    ]
    assert settings.test.iloc[1] == pytest.approx((2.04 + 2.11) / 2 + 0.256)


def test_the_report_prints_and_draws_them(runs_with_evaluations, tmp_path):
    runs = report.load_runs([runs_with_evaluations])
    paths = report.write_report(runs, tmp_path / "out", title="t")
    markdown = paths["summary.md"].read_text()
    assert "## test metric by context offered" in markdown and "| model=swa | bpc | 5.0500 | 4.0500 | 2.0500 |" in markdown
    assert "## test bpc by byte kind" in markdown and "| entropy floor | 1.2000 | 0.3000 | 0.4000 |" in markdown
    assert "| model=swa | bpc | 64 | 256 | 64 | best |" in markdown
    bars = report.plot_kinds(runs).axes[0]
    assert len(bars.patches) == len(KINDS) * 2  # one bar per kind and variant
    curves = report.plot_distance(runs).axes[0]
    assert {line.get_label().split(" (")[0] for line in curves.lines} == {"model=swa", "model=mswa"}
    assert paths["distance.png"].stat().st_size > 0 and paths["kinds.png"].stat().st_size > 0
    assert "### Test metric by evaluation length" in markdown and paths["lengths.png"].stat().st_size > 0


def test_length_table_puts_each_runs_own_length_beside_its_longer_evaluations(runs_with_evaluations):
    runs = report.load_runs([runs_with_evaluations])
    lengths = report.length_table(runs)
    swa = lengths[lengths.variant == "model=swa"]
    own_tests = runs[runs.variant == "model=swa"].test
    assert swa.seq_len.tolist() == [64, 256]  # the file at 64 (another stride) gives way to the run's own result
    assert swa.test.tolist() == pytest.approx([own_tests.mean(), own_tests.mean() + 0.256])
    assert report.plot_lengths(runs).axes[0].get_xscale() == "log"


def test_without_evaluation_data_the_sections_are_left_out(tmp_path):
    write_run(tmp_path / "0", ["model=swa", "seed=1"], "finished", 2.0, 2.1)
    runs = report.load_runs([tmp_path])
    assert report.evaluation_markdown(runs) == ""
    assert "no data" in report.plot_kinds(runs).axes[0].texts[0].get_text()


def test_training_curves_are_drawn_in_the_validation_unit(tmp_path):
    write_run(tmp_path / "0", ["model=swa", "seed=1"], "finished", 2.0, 2.1)
    runs = report.load_runs([tmp_path])
    ax = report.plot_curves(runs).axes[0]
    train = next(line for line in ax.lines if " train " in line.get_label())
    logged = pd.read_csv(tmp_path / "0" / "metrics.csv")["train/loss"].dropna().to_numpy()
    np.testing.assert_allclose(train.get_ydata(), logged / math.log(2))
    assert ax.get_ylabel() == "bpc"


def test_runs_compare_at_an_evaluation_setting_and_name_the_missing_file(runs_with_evaluations):
    trained = report.load_runs([runs_with_evaluations])
    at_256 = report.load_runs([runs_with_evaluations], setting="L256_stride64_best")
    assert at_256.test.tolist() == pytest.approx((trained.test + 0.256).tolist())
    assert (at_256.evaluation.map(lambda e: e["seq_len"]) == 256).all()
    missing = report.load_runs([runs_with_evaluations], setting="L512_stride256_best")
    assert set(missing.status) == {"failed"} and all("no evaluation_L512_stride256_best.json" in e for e in missing.error)
    with pytest.raises(report.ReportError, match="must be the name of an evaluation"):
        report.load_runs([runs_with_evaluations], setting="../x")
