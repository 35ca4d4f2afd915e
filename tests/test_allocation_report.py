"""The allocation comparison in the report: learned (and searched) windows paired with mswa and with SWA at mswa's
budget by seed, and their windows drawn beside the others."""

import pytest

from helpers.report_runs import SEQ_LEN, W, run_results
from mswa import report
from mswa.windows import make_schedule

LEARNED = [[2, 4, 8, 16], [3, 6, 12, 20], [4, 8, 14, 24], [5, 10, 16, 28]]  # a hardened table, below mswa's pairs
VARIANTS = {  # overrides -> test bpc of seeds 1-3
    ("model=swa", "window_schedule=uniform"): (2.30, 2.32, 2.31),
    ("model=swa", "window_schedule=uniform_mswa_budget"): (2.40, 2.41, 2.43),
    ("model=swa", "window_schedule=mswa"): (2.20, 2.21, 2.25),
    ("model=swa", "window_schedule=learned"): (2.10, 2.16, 2.17),
}


def row(overrides, seed, value):
    results = run_results([*overrides, f"seed={seed}"], "finished", value, value)
    if "window_schedule=learned" in overrides:  # the run's hardened windows replace its caps
        results |= {"windows": LEARNED, "budget": make_schedule("custom", w=W, n_layer=4, n_head=4, windows=LEARNED).budget(SEQ_LEN)}
    return report.row_from_results(results, path=f"{','.join(overrides)},seed={seed}", history=None)


def test_learned_windows_are_paired_with_mswa_and_with_swa_at_mswas_budget():
    runs = report.runs_frame([row(o, seed, v) for o, values in VARIANTS.items() for seed, v in zip((1, 2, 3), values)])
    table = report.summary_table(runs).set_index("variant")
    learned = table.loc["model=swa,window_schedule=learned"]
    assert learned.pairs_vs_swa <= table.loc["model=swa,window_schedule=mswa", "pairs_vs_swa"]
    assert learned.mswa_reference == "model=swa,window_schedule=mswa"
    assert learned.budget_reference == "model=swa,window_schedule=uniform_mswa_budget"
    assert learned.mswa_n_pairs == 3 and learned.mswa_diff == pytest.approx((-0.10 - 0.05 - 0.08) / 3)
    assert learned.budget_diff == pytest.approx((-0.30 - 0.25 - 0.26) / 3)
    assert pd_isna(table.loc["model=swa,window_schedule=mswa", "mswa_reference"])  # mswa is not paired with itself
    markdown = report.summary_markdown(runs, report.summary_table(runs), report.failed_runs(runs), "t")
    assert "test − mswa [95%]" in markdown
    titles = [ax.get_title().replace("\n", "") for ax in report.plot_windows(runs).axes if ax.get_xlabel() == "head"]
    assert sorted(titles) == sorted(",".join(overrides) for overrides in VARIANTS)  # each schedule's windows side by side


def pd_isna(value) -> bool:
    return value != value or value is None


def test_a_variant_whose_seeds_learned_different_windows_is_drawn_once_per_table_with_its_seeds():
    learned = ("model=swa", "window_schedule=learned")
    runs = [row(learned, seed, 2.1) for seed in (1, 2, 3)] + [row(("model=swa", "window_schedule=mswa"), 1, 2.2)]
    runs[2]["windows"] = [[w + 1 for w in layer] for layer in LEARNED]  # seed 3 learned its own
    titles = [ax.get_title().replace("\n", "") for ax in report.plot_windows(report.runs_frame(runs)).axes if ax.get_xlabel() == "head"]
    assert sorted(titles) == sorted([f"{','.join(learned)},seed=1,2", f"{','.join(learned)},seed=3", "model=swa,window_schedule=mswa"])
