"""Comparison report: run folders (or a W&B project) -> one table row per variant, plus plots.

    python -m mswa.report DIR [DIR ...] [--out OUT]
    python -m mswa.report --wandb ENTITY/PROJECT [--out OUT]

Data flows one way through the modules:

- ``runs``: run folders -> one row per run (``load_runs``); ``wandb``: the same rows from a W&B project;
- ``references``: each variant's SWA references (at w, at its budget), from the stored configs;
- ``tables``: rows -> one row per variant, mean ± std over seeds and paired differences against the references
  (``summary_table``, ``paired_table``, ``failed_runs``), and the evaluation tables (``distance_table``,
  ``kind_table``, ``load_evaluations``, ``length_table``);
- ``markdown``: tables -> the text of summary.md; ``plots``: curves, budget, windows, distance, kinds;
- ``lm_eval``: ``lm_eval.json`` evaluations -> their table, section and plot;
- ``cli``: ``write_report`` writes them all into one folder; ``main`` is the command.

Seeds of one variant (one resolved config, ``mswa.sweeps.variant_id``) are aggregated; only finished runs
enter the averages, every other run is listed with its status and error. A report of evaluations only is
fine; one with neither runs nor evaluations is an error. The same functions serve ``notebooks/analysis.ipynb``.
"""

from mswa.report.cli import main, write_report
from mswa.report.lm_eval import headline_accuracies, lm_eval_table, load_lm_eval, plot_lm_eval
from mswa.report.markdown import evaluation_markdown, split_overrides, summary_markdown
from mswa.report.plots import plot_budget, plot_curves, plot_distance, plot_kinds, plot_lengths, plot_windows
from mswa.report.references import paired_references
from mswa.report.runs import (
    DUPLICATE,
    NO_RESULTS,
    STOPPED,
    ReportError,
    attempts,
    load_runs,
    read_history,
    refused_attempts,
    row_from_results,
    runs_frame,
    schedule_of,
    variant_name,
    why_stopped,
)
from mswa.report.tables import distance_table, failed_runs, kind_table, length_table, load_evaluations, paired_table, summary_table
from mswa.report.wandb import load_wandb_runs

__all__ = [
    "DUPLICATE",
    "NO_RESULTS",
    "STOPPED",
    "ReportError",
    "attempts",
    "distance_table",
    "evaluation_markdown",
    "failed_runs",
    "headline_accuracies",
    "kind_table",
    "length_table",
    "lm_eval_table",
    "load_evaluations",
    "load_lm_eval",
    "load_runs",
    "load_wandb_runs",
    "main",
    "paired_references",
    "paired_table",
    "plot_budget",
    "plot_curves",
    "plot_distance",
    "plot_kinds",
    "plot_lengths",
    "plot_lm_eval",
    "plot_windows",
    "read_history",
    "refused_attempts",
    "row_from_results",
    "runs_frame",
    "schedule_of",
    "split_overrides",
    "summary_markdown",
    "summary_table",
    "variant_name",
    "why_stopped",
    "write_report",
]
