"""The README's kernel-docs figures are what the committed runs give: each is recomputed here from the runs'
results.json (test bpc paired by seed, a t-interval written out with scipy), then checked against the report's
paired table and against the README's row, so a published number cannot drift from its data."""

import json
import re

import numpy as np
import pytest
from scipy import stats

from helpers.runs import REPO
from mswa import report

RESULTS = REPO / "sweep" / "results"
TEXT_FOLDERS = ["text_main", "text_main_more", "text_main_more2", "text_budget", "text_budget_more"]


def bpc_by_seed(pattern: str, folders: list[str] = TEXT_FOLDERS) -> dict[int, float]:
    """Test bpc of the finished kernel-docs runs whose folder name matches `pattern`, by seed."""
    found = {}
    for folder in folders:
        for path in (RESULTS / folder).glob("*/results.json"):
            if re.search(pattern, path.parent.name):
                results = json.loads(path.read_text())
                assert results["status"] == "finished"
                found[results["seed"]] = results["metrics"]["test/bpc"]
    return found


def paired_interval(variant: dict[int, float], reference: dict[int, float]) -> tuple[int, float, float, float]:
    seeds = sorted(variant.keys() & reference.keys())
    diff = np.array([variant[s] - reference[s] for s in seeds])
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return len(diff), diff.mean(), diff.mean() - half, diff.mean() + half


def readme_cells(comparison: str) -> str:
    rows = [
        line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| kernel-docs") and f"| {comparison} |" in line
    ]
    assert len(rows) == 1, comparison
    return rows[0]


@pytest.fixture(scope="module")
def paired_table():
    return report.paired_table(report.load_runs([RESULTS / folder for folder in TEXT_FOLDERS]))


def signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


@pytest.mark.parametrize(
    "comparison, variant, reference, against",
    [
        ("MSWA − SWA", r"model=mswa,seed=\d+$", r"model=swa,seed=\d+$", "SWA at w"),
        ("MSWA − SWA at MSWA's budget (SWA at 56)", r"model=mswa,seed=\d+$", r"uniform_mswa_budget$", "SWA at budget"),
    ],
)
def test_the_readme_kernel_docs_rows_are_what_the_committed_runs_give(comparison, variant, reference, against, paired_table):
    n, mean, low, high = paired_interval(bpc_by_seed(variant), bpc_by_seed(reference))
    assert n == 11
    table = paired_table
    (row,) = table[(table.against == against) & (table.measure == "test") & table.variant.str.contains("model=mswa")].itertuples()
    assert (row.n_pairs, row.verdict) == (n, "better")
    assert (row.diff, row.low, row.high) == pytest.approx((mean, low, high), abs=1e-9)
    assert f"| {n} | {signed(mean)} [{signed(low)}, {signed(high)}] | better |" in readme_cells(comparison)


def test_the_readme_scale_row_is_what_the_committed_runs_give():
    """The scale point: MSWA - SWA at ~4x compute (experiment=cpu_text_4x), and its change from experiment=cpu_text
    on the same seeds (each seed's gap at 4x minus its gap at 1x: a difference of paired differences)."""
    mswa, swa = r"model=mswa,seed=\d+$", r"model=swa,seed=\d+$"
    gap_4x = {s: m - bpc_by_seed(swa, ["text_4x"])[s] for s, m in bpc_by_seed(mswa, ["text_4x"]).items()}
    gap_1x = {s: m - bpc_by_seed(swa)[s] for s, m in bpc_by_seed(mswa).items()}
    n, mean, low, high = paired_interval(gap_4x, {s: 0.0 for s in gap_4x})
    _, change, change_low, change_high = paired_interval(gap_4x, gap_1x)
    assert n == 3
    cells = f"{signed(mean)} [{signed(low)}, {signed(high)}] / {signed(change)} [{signed(change_low)}, {signed(change_high)}]"
    assert f"| {n} | {cells} |" in readme_cells("MSWA − SWA at ~4× compute; its change from 1×")


def test_the_readme_synthetic_4x_row_is_what_the_committed_evaluations_give():
    """The main sweep's synthetic models at 4x their training length, from their evaluation_*.json files."""
    by_model: dict[str, dict[int, float]] = {}
    for path in (RESULTS / "synth_lengths").glob("*/evaluation_L4096_stride2048_best.json"):
        seed = json.loads((path.parent / "results.json").read_text())["seed"]
        model = re.search(r"model=(\w+)", path.parent.name).group(1)
        by_model.setdefault(model, {})[seed] = json.loads(path.read_text())["metrics"]["test/bpc"]
    (n, *mswa), (n_full, *full) = (paired_interval(by_model[m], by_model["swa"]) for m in ("mswa", "full"))
    assert (n, n_full) == (3, 3)
    row = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| synthetic, at 4×")]
    mswa_cells = f"{signed(mswa[0])} [{signed(mswa[1])}, {signed(mswa[2])}]"
    full_cells = f"{full[0]:+.2f} [{full[1]:+.2f}, {full[2]:+.2f}]".replace("-", "−")
    comparison = "| synthetic, at 4× the training length | MSWA − SWA / full − SWA | 3 / 3 |"
    assert row == [f"{comparison} {mswa_cells} / {full_cells} | better / worse |"]
