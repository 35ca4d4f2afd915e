"""Common-sense reasoning evaluations (``lm_eval.json``, written by ``mswa.hf.evaluate``) -> a table of
headline accuracies per variant, its markdown section and a bar chart.

A folder may hold ``lm_eval.json`` next to a run's ``results.json`` or alone (``python -m mswa.hf.evaluate
--out DIR``): ``load_lm_eval`` -> ``lm_eval_table`` (seeds of a variant aggregated as the runs' table does)
-> ``lm_eval_markdown`` / ``plot_lm_eval``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mswa.report.markdown import fmt, markdown_table
from mswa.report.plots import add_legend, finish_axes, new_figure
from mswa.report.runs import (
    LM_EVAL_FILE,
    RESULTS_FILE,
    ReportError,
    by_variant_and_seed,
    outermost_folders,
    read_results,
    schedule_of,
)

HEADLINE_METRICS = ("acc_norm", "acc")  # papers report acc_norm where lm_eval has it (hellaswag, arc, piqa...)
# an evaluation's identity; "<task>/<metric>" accuracies and "average" follow, each with "<column>_stderr"
EVAL_COLUMNS = ("path", "run_name", "variant", "seed", "model", "schedule", "num_fewshot", "limit")
EVAL_SHARED_COLUMNS = ("variant", "model", "schedule", "num_fewshot", "limit")
LM_EVAL_NOTE = (
    "Accuracy in % per task, as `task/metric` (lm_eval's `acc_norm` where the task reports it, else `acc`), "
    "and their unweighted average. ±: lm_eval's standard error for a single evaluation (for the average, "
    "the tasks' combined as independent); the sample std (n-1) over seeds where a variant has several."
)


def load_lm_eval(dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per lm_eval.json below ``dirs``: ``EVAL_COLUMNS``, then per task its headline accuracy
    ``<task>/<metric>`` and ``<task>/<metric>_stderr`` (fractions), then ``average`` and ``average_stderr``.

    Name, seed, model and schedule come from the folder's results.json when it has one; an evaluation on its
    own is named by its folder (its path below the DIR it was found in) and takes model and schedule from
    what ``mswa.hf.evaluate`` recorded. No rows when there is no lm_eval.json."""
    folders = outermost_folders(dirs, LM_EVAL_FILE)
    return evals_frame([eval_row(folder, _eval_name(folder, dirs)) for folder in folders])


def _eval_name(folder: Path, dirs: Sequence[str | Path]) -> str:
    for root in (Path(d).resolve() for d in dirs):
        if folder != root and folder.is_relative_to(root):
            return folder.relative_to(root).as_posix()  # "llama/mswa" tells apart two folders named "mswa"
    return folder.name


def eval_row(folder: Path, name: str) -> dict:
    """One evaluation's row: its identity (``EVAL_COLUMNS``) and headline accuracies."""
    record = read_lm_eval(folder / LM_EVAL_FILE)
    results = read_results(folder) if (folder / RESULTS_FILE).is_file() else {}
    row = {
        "path": str(folder),
        "run_name": results.get("run_name") or name,
        "variant": results.get("variant") or name,
        "seed": results.get("seed"),
        "model": results.get("model") or record.get("model"),
        "schedule": schedule_of(results)[0] or record.get("schedule"),
        "num_fewshot": record.get("num_fewshot"),
        "limit": record.get("limit"),
    }
    return row | headline_accuracies(record["summary"])


def read_lm_eval(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON ({err}); rerun its evaluation or delete the file") from err
    if not isinstance(record, dict) or not isinstance(record.get("summary"), dict):
        raise ReportError(f"{path} has no 'summary' {{task: {{metric: value}}}}; write it with mswa.hf.evaluate")
    return record


def headline_accuracies(summary: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per task its ``acc_norm`` if reported, else its ``acc`` (tasks with neither, e.g. generation tasks, are
    left out), with stderrs; ``average``: their unweighted mean, its stderr taking the tasks as independent."""
    row = {}
    for task, metrics in summary.items():
        metric = next((m for m in HEADLINE_METRICS if m in metrics), None)
        if metric:
            row[f"{task}/{metric}"] = metrics[metric]
            row[f"{task}/{metric}_stderr"] = metrics.get(f"{metric}_stderr", np.nan)  # "N/A" was dropped
    accuracies = [c for c in row if not c.endswith("_stderr")]
    if accuracies:
        errors = np.array([row[f"{c}_stderr"] for c in accuracies])
        row["average"] = float(np.mean([row[c] for c in accuracies]))
        row["average_stderr"] = float(np.sqrt(np.sum(errors**2)) / len(errors))
    return row


def evals_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows of ``eval_row`` as a frame; task columns in the order they first appear, ``average`` last."""
    frame = pd.DataFrame(rows)
    average = ["average", "average_stderr"]
    tasks = [c for c in frame.columns if c not in EVAL_COLUMNS and c not in average]
    frame = frame.reindex(columns=[*EVAL_COLUMNS, *tasks, *average])
    frame["seed"] = pd.to_numeric(frame.seed).astype("Int64")
    return by_variant_and_seed(frame)


def accuracy_columns(frame: pd.DataFrame) -> list[str]:
    """The ``<task>/<metric>`` columns, then ``average``."""
    return [c for c in frame.columns if "/" in c and not c.endswith(("_std", "_stderr"))] + ["average"]


def lm_eval_table(evals: pd.DataFrame) -> pd.DataFrame:
    """One row per variant and shot count: each accuracy column is the mean over the seeds, ``<column>_std``
    their sample std (n - 1; NaN for one seed), ``<column>_stderr`` lm_eval's stderr (mean over the seeds).
    An evaluation without a seed (no results.json) is never averaged with another."""
    alone = evals.path.where(evals.seed.isna(), "")
    keys = pd.Series(list(zip(evals.variant, evals.num_fewshot.astype(object), alone)), index=evals.index)
    return pd.DataFrame([_eval_variant_row(group) for _, group in evals.groupby(keys, sort=False)])


def _eval_variant_row(group: pd.DataFrame) -> dict:
    first = group.iloc[0]
    row = {key: first[key] for key in EVAL_SHARED_COLUMNS}
    row.update(n_seeds=len(group), seeds=",".join(str(s) for s in sorted(group.seed.dropna().astype(int))))
    for column in accuracy_columns(group):
        row[column] = group[column].mean(skipna=False)
        row[f"{column}_std"] = group[column].std(ddof=1, skipna=False)
        row[f"{column}_stderr"] = group[f"{column}_stderr"].mean(skipna=False)
    return row


def _spread(table: pd.DataFrame, column: str) -> pd.Series:
    """The ± of a cell: the std over seeds where a variant has several, else lm_eval's stderr."""
    return table[f"{column}_std"].where(table.n_seeds > 1, table[f"{column}_stderr"])


def _percent(value, spread) -> str:
    if pd.isna(value):
        return ""
    return f"{100 * value:.1f}" + (f" ±{100 * spread:.1f}" if pd.notna(spread) else "")


def lm_eval_markdown_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The table in %, one decimal, with its ±; columns empty in every row are left out."""
    shown = pd.DataFrame(
        {
            "variant": table.variant,
            "model": table.model.fillna(""),
            "schedule": table.schedule.fillna(""),
            "shots": [fmt(v, "g") for v in table.num_fewshot],
            "seeds": table.seeds,
            "limit": [fmt(v, "g") for v in table.limit],
            **{c: [_percent(v, e) for v, e in zip(table[c], _spread(table, c))] for c in accuracy_columns(table)},
        }
    )
    return shown.loc[:, (shown != "").any(axis=0)]


def lm_eval_markdown(table: pd.DataFrame) -> str:
    """The report's common-sense reasoning section: notes, the table in % and the bar chart."""
    notes = [LM_EVAL_NOTE]
    if table[accuracy_columns(table)].isna().any(axis=None):
        notes.append("Not every row has every task: an average covers only the tasks of its row.")
    if table.limit.notna().any():
        notes.append("limit: examples per task (a smoke evaluation, not comparable with full ones).")
    table_markdown = markdown_table(lm_eval_markdown_frame(table))
    return "\n\n".join(["## Common-sense reasoning (lm_eval)", *notes, table_markdown, "![lm_eval accuracy](lm_eval.png)"])


def plot_lm_eval(table: pd.DataFrame) -> Figure:
    """Grouped bars: one group per task and the average, one bar per row of ``lm_eval_table``; error bars are
    the table's ± (stderr, or std over seeds)."""
    columns = accuracy_columns(table)
    fig, (ax,) = new_figure(1, (max(6.0, 0.25 * len(columns) * len(table) + 2.0), 4.5), legend_rows=len(table))
    width, x = 0.8 / len(table), np.arange(len(columns))
    several_shots = table.num_fewshot.nunique() > 1
    for i, (_, row) in enumerate(table.iterrows()):
        label = row.variant + (f" ({row.num_fewshot}-shot)" if several_shots else "")
        spread = [_spread(table, c).iloc[i] for c in columns]
        ax.bar(
            x + (i - (len(table) - 1) / 2) * width,
            100 * row[columns].astype(float),
            width,
            yerr=100 * np.nan_to_num(np.array(spread, dtype=float)),
            capsize=2,
            label=label,
        )
    ax.set_xticks(x, [c.replace("/", "\n") for c in columns], fontsize=8)
    finish_axes(ax, "lm_eval accuracy (error bars: stderr, or std over seeds)", "task", "accuracy (%)")
    return add_legend(fig)
