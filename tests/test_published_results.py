"""The README's figures are what the committed runs give: each is recomputed here from the runs'
results.json or evaluation files (test bpc paired by seed, a t-interval written out with scipy), then checked against the report's
paired table and against the README's row, so a published number cannot drift from its data."""

import hashlib
import json
import re

import numpy as np
import pytest
from scipy import stats

from helpers.runs import REPO
from mswa import report

RESULTS = REPO / "sweep" / "results"
TEXT_FOLDERS = ["text_main", "text_main_more", "text_main_more2", "text_budget", "text_budget_more"]


def bpc_by_seed(pattern: str, folders: list[str] = TEXT_FOLDERS, setting: str | None = None) -> dict[int, float]:
    """Test bpc of the finished runs whose folder name matches `pattern`, by seed: their own (results.json) or, given
    an mswa.evaluate `setting`, that evaluation's."""
    found = {}
    for folder in folders:
        for path in (RESULTS / folder).glob("*/results.json"):
            if re.search(pattern, path.parent.name):
                results = json.loads(path.read_text())
                assert results["status"] == "finished"
                scored = json.loads((path.parent / f"evaluation_{setting}.json").read_text()) if setting else results
                found[results["seed"]] = scored["metrics"]["test/bpc"]
    return found


def paired_interval(variant: dict[int, float], reference: dict[int, float]) -> tuple[int, float, float, float]:
    seeds = sorted(variant.keys() & reference.keys())
    diff = np.array([variant[s] - reference[s] for s in seeds])
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return len(diff), diff.mean(), diff.mean() - half, diff.mean() + half


def readme_cells(comparison: str, corpus: str = "kernel-docs") -> str:
    rows = [
        line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(f"| {corpus}") and f"| {comparison} |" in line
    ]
    assert len(rows) == 1, comparison
    return rows[0]


@pytest.fixture(scope="module")
def paired_table():
    return report.paired_table(report.load_runs([RESULTS / folder for folder in TEXT_FOLDERS]))


def signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """A README cell: ``−0.037 [−0.049, −0.026]``."""
    return f"{signed(mean, digits)} [{signed(low, digits)}, {signed(high, digits)}]"


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
    assert f"| {n} | {interval(mean, low, high)} | better |" in readme_cells(comparison)


def test_the_readme_scale_row_is_what_the_committed_runs_give():
    """The scale point: MSWA - SWA at ~4x compute (experiment=cpu_text_4x), and its change from experiment=cpu_text
    on the same seeds (each seed's gap at 4x minus its gap at 1x: a difference of paired differences)."""
    mswa, swa = r"model=mswa,seed=\d+$", r"model=swa,seed=\d+$"
    swa_4x, swa_1x = bpc_by_seed(swa, ["text_4x"]), bpc_by_seed(swa)
    gap_4x = {s: m - swa_4x[s] for s, m in bpc_by_seed(mswa, ["text_4x"]).items()}
    gap_1x = {s: m - swa_1x[s] for s, m in bpc_by_seed(mswa).items()}
    n, mean, low, high = paired_interval(gap_4x, {s: 0.0 for s in gap_4x})
    _, change, change_low, change_high = paired_interval(gap_4x, gap_1x)
    assert n == 3
    cells = f"{interval(mean, low, high)} / {interval(change, change_low, change_high)}"
    assert f"| {n} | {cells} |" in readme_cells("MSWA − SWA at ~4× compute; its change from 1×")


def test_the_readme_synthetic_4x_row_is_what_the_committed_evaluations_give():
    """The main sweep's synthetic models at 4x their training length, from their evaluation_*.json files."""
    by_model = {m: bpc_by_seed(rf"model={m},seed=\d+$", ["synth_lengths"], "L4096_stride2048_best") for m in ("swa", "mswa", "full")}
    (n, *mswa), (n_full, *full) = (paired_interval(by_model[m], by_model["swa"]) for m in ("mswa", "full"))
    assert (n, n_full) == (3, 3)
    cells = f"{interval(*mswa)} / {interval(*full, digits=2)}"
    row = readme_cells("MSWA − SWA / full − SWA", corpus="synthetic, at 4× the training length")
    assert row == f"| synthetic, at 4× the training length | MSWA − SWA / full − SWA | 3 / 3 | {cells} | better / worse |"


ALLOCATION_RUNS = {  # corpus -> (the README row's corpus cell, the searched schedule, the folders of its runs)
    "kernel-docs": ("kernel-docs, windows chosen from data at mswa's budget", "searched_kernel_docs", ["alloc_text", "text_main"]),
    "synthetic": (
        "synthetic, windows chosen from data at mswa's budget",
        "searched_synthetic",
        ["alloc_synthetic", "alloc_synthetic_more", "cpu_main", "cpu_main_more"],
    ),
}


@pytest.mark.parametrize("corpus", ALLOCATION_RUNS)
def test_the_readme_allocation_row_is_what_the_committed_runs_give(corpus):
    """Windows chosen from data, seeds 0-4: searched - mswa and learned - mswa, each seed's own pair."""
    row_corpus, searched, folders = ALLOCATION_RUNS[corpus]
    mswa = bpc_by_seed(r"model=mswa,seed=\d+$", folders)
    pairs = [paired_interval(bpc_by_seed(rf"window_schedule={chosen}$", folders), mswa) for chosen in (searched, "learned")]
    assert [n for n, *_ in pairs] == [5, 5]
    verdicts = ["better" if high < 0 else "worse" if low > 0 else "not distinguishable" for _, _, low, high in pairs]
    cells = f"| 5 | {interval(*pairs[0][1:])} / {interval(*pairs[1][1:])} | {verdicts[0]} / {verdicts[1]} |"
    assert readme_cells("searched − MSWA / learned − MSWA", corpus=row_corpus).endswith(cells)


@pytest.fixture(scope="module")
def committed_results_sha256() -> set[str]:
    return {hashlib.sha256(path.read_bytes()).hexdigest() for path in RESULTS.rglob("results.json")}


@pytest.mark.parametrize("schedule", sorted((REPO / "conf" / "window_schedule").glob("searched_*.yaml")), ids=lambda p: p.stem)
def test_a_committed_searched_schedule_names_a_committed_source_run(schedule, committed_results_sha256):
    """Its header's sha256 is that of a results.json committed under sweep/results: the run it was profiled on can be read."""
    (recorded,) = re.findall(r"^# source results.json sha256: ([0-9a-f]{64})$", schedule.read_text(), flags=re.M)
    assert recorded in committed_results_sha256
