"""Run rows -> tables: one row per variant (mean ± std over seeds, Δ and paired differences against its SWA
references), the failed runs, and the evaluation tables (loss by distance, bpc by byte kind, settings).

Seeds of one variant are aggregated: mean and sample standard deviation (n - 1) of the final val/test metric.
Only finished runs enter the averages; every other run is listed with its status and error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mswa.report.references import PAIRED_AGAINST, PAIRED_KINDS, paired_references, swa_reference
from mswa.report.runs import CONFIG_COLUMNS, natural_key
from mswa.stats import PairedDifference, paired_difference

# per variant: values shared by its seeds, then aggregates, then the comparison with its SWA references
SHARED_COLUMNS = (
    "variant",
    "model",
    "schedule",
    "window",
    "dataset",
    "metric",
    "n_params",
    "pairs_vs_swa",
    "pairs_vs_full",
    "mean_window_over_w",
    "entropy_floor_bpb",
    *CONFIG_COLUMNS,
)
# paired differences over seeds (mswa.stats) against SWA at w and SWA at the variant's mean window ("budget")
PAIRED_FIELDS = ("reference", "n_pairs", "diff", "low", "high", "verdict")
PAIRED_COLUMNS = tuple(f"{kind}_{field}" for kind in PAIRED_KINDS for field in PAIRED_FIELDS)
SUMMARY_COLUMNS = (
    *SHARED_COLUMNS,
    "n_seeds",
    "seeds",
    "n_unfinished",
    "val",
    "val_std",
    "test",
    "test_std",
    "reference",
    "delta_val",
    "delta_test",
    *PAIRED_COLUMNS,
    "tokens_per_s",
    "mfu",
    "steps",
    "wall_time_s",
)
PAIRED_SPLIT = "test"  # the summary's paired columns; the checkpoint was chosen on val
PAIRED_TABLE_COLUMNS = ["variant", "reference", "against", "measure", "n_pairs", "diff", "low", "high", "verdict"]
FAILED_COLUMNS = ("variant", "seed", "status", "error", "run_name", "path")
EVALUATION_FILES = "evaluation_*.json"  # written beside results.json by `python -m mswa.evaluate`
EVALUATION_COLUMNS = ["variant", "metric", "train_seq_len", "seq_len", "stride", "checkpoint", "val", "test", "n_seeds"]


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs.status == "finished"]


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per variant with at least one finished run (columns ``SUMMARY_COLUMNS``)."""
    finished = finished_runs(runs)
    unfinished = runs[runs.status != "finished"].variant.value_counts()
    rows = [variant_row(group, unfinished.get(name, 0)) for name, group in finished.groupby("variant", sort=False)]
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).astype(
        {"window": "Int64", "n_params": "Int64", "n_seeds": "Int64", "n_unfinished": "Int64"}
    )
    table["reference"] = [swa_reference(row, table) for row in table.itertuples()]
    means = table.set_index("variant")
    for split in ("val", "test"):
        table[f"delta_{split}"] = [
            value - means.loc[ref, split] if ref in means.index else np.nan for value, ref in zip(table[split], table.reference)
        ]
    paired = pd.DataFrame([paired_cells(row, table, finished) for row in table.itertuples()], index=table.index)
    table[list(PAIRED_COLUMNS)] = paired.reindex(columns=list(PAIRED_COLUMNS))
    return table


def variant_row(group: pd.DataFrame, n_unfinished: int) -> dict:
    """A variant's summary row from the rows of its finished runs."""
    first = group.iloc[0]
    row = {key: first[key] for key in SHARED_COLUMNS}
    for split in ("val", "test"):
        row[split] = group[split].mean(skipna=False)
        row[f"{split}_std"] = group[split].std(ddof=1, skipna=False)  # NaN for a single seed
    row.update(
        n_seeds=len(group),
        seeds=",".join(str(s) for s in sorted(group.seed.dropna().astype(int))),
        n_unfinished=int(n_unfinished),
        tokens_per_s=group.tokens_per_s.mean(),
        mfu=group.mfu.mean(),
        steps=group.steps.mean(),
        wall_time_s=group.wall_time_s.mean(),
    )
    return row


def seed_values(values: pd.DataFrame, variant: str, column: str) -> dict[int, float]:
    """{seed: value} of ``variant``'s rows in a frame with columns variant, seed and ``column``."""
    runs = values[values.variant == variant]
    pairs = zip(runs.seed, runs[column])
    return {int(seed): float(value) for seed, value in pairs if pd.notna(seed) and pd.notna(value)}


def paired_comparison(values: pd.DataFrame, variant: str, reference: str, column: str) -> PairedDifference | None:
    return paired_difference(seed_values(values, variant, column), seed_values(values, reference, column))


def paired_cells(row, table: pd.DataFrame, finished: pd.DataFrame) -> dict:
    """The row's ``PAIRED_COLUMNS``: each reference with its paired difference in ``PAIRED_SPLIT``."""
    cells = {}
    for kind, reference in paired_references(row, table).items():
        if reference is None:
            continue
        cells[f"{kind}_reference"] = reference
        if (diff := paired_comparison(finished, row.variant, reference, PAIRED_SPLIT)) is not None:
            cells |= {
                f"{kind}_n_pairs": diff.n_pairs,
                f"{kind}_diff": diff.mean,
                f"{kind}_low": diff.low,
                f"{kind}_high": diff.high,
                f"{kind}_verdict": diff.verdict,
            }
    return cells


def kind_values(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per finished run: variant, seed and its ``split`` bpc per byte kind (a column per kind)."""
    rows = [
        {
            "variant": run.variant,
            "seed": run.seed,
            **{r["kind"]: r["bpc"] for r in ((run.evaluation or {}).get(split) or {}).get("by_kind", [])},
        }
        for run in finished_runs(runs).itertuples()
    ]
    return pd.DataFrame(rows, columns=["variant", "seed"]) if not rows else pd.DataFrame(rows)


def paired_table(runs: pd.DataFrame, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (variant, reference kind, measure) with a reference: the paired difference and its verdict.
    Measures: the val and test metric, then (synthetic corpus) the test bpc of each byte kind."""
    table = summary_table(runs) if table is None else table
    finished, kinds = finished_runs(runs), kind_values(runs)
    measures = [("val", finished, "val"), ("test", finished, "test")]
    measures += [(f"test {kind}", kinds, kind) for kind in kinds.columns[2:]]
    rows = []
    for row in table.itertuples():
        for kind, reference in paired_references(row, table).items():
            for measure, values, column in measures:
                diff = paired_comparison(values, row.variant, reference, column) if reference else None
                if diff is not None:
                    rows.append(
                        {
                            "variant": row.variant,
                            "reference": reference,
                            "against": PAIRED_AGAINST[kind],
                            "measure": measure,
                            "n_pairs": diff.n_pairs,
                            "diff": diff.mean,
                            "low": diff.low,
                            "high": diff.high,
                            "verdict": diff.verdict,
                        }
                    )
    return pd.DataFrame(rows, columns=PAIRED_TABLE_COLUMNS)


def failed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run that did not finish, with its status and error."""
    return runs.loc[runs.status != "finished", list(FAILED_COLUMNS)].reset_index(drop=True)


def evaluation_rows(runs: pd.DataFrame, split: str, part: str) -> list[dict]:
    """The ``part`` rows (by_distance, by_kind) of ``split`` in each finished run's results, with its variant."""
    rows = []
    for run in finished_runs(runs).itertuples():
        for row in ((run.evaluation or {}).get(split) or {}).get(part, []):
            rows.append({"variant": run.variant, "metric": run.metric, **row})
    return rows


def distance_table(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per (variant, context bucket): ``context_lo``/``context_hi``, the metric (bpc or ppl) in the
    bucket, mean over the variant's finished seeds, and ``n_seeds``."""
    columns = ["variant", "metric", "context_lo", "context_hi", "value", "n_seeds"]
    rows = [
        {
            "variant": r["variant"],
            "metric": r["metric"],
            "context_lo": r["context"][0],
            "context_hi": r["context"][1],
            "value": r[r["metric"]],
        }
        for r in evaluation_rows(runs, split, "by_distance")
    ]
    if not rows:
        return pd.DataFrame(columns=columns)
    grouped = pd.DataFrame(rows).groupby(["variant", "metric", "context_lo", "context_hi"], sort=False).value
    return grouped.agg(value="mean", n_seeds="count").reset_index()[columns]


def kind_table(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per (variant, byte kind) of synthetic-corpus runs: ``bpc`` (mean over seeds) and ``floor_bpc``."""
    columns = ["variant", "kind", "bpc", "floor_bpc", "n_seeds"]
    rows = evaluation_rows(runs, split, "by_kind")
    if not rows:
        return pd.DataFrame(columns=columns)
    grouped = pd.DataFrame(rows).groupby(["variant", "kind"], sort=False)
    return grouped.agg(bpc=("bpc", "mean"), floor_bpc=("floor_bpc", "mean"), n_seeds=("bpc", "count")).reset_index()[columns]


def load_evaluations(runs: pd.DataFrame) -> pd.DataFrame:
    """Every ``evaluation_*.json`` beside a finished run's results.json: one row per variant and setting
    (seq_len, stride, checkpoint) with the val and test metric, mean over seeds (``EVALUATION_COLUMNS``)."""
    rows = [
        evaluation_setting(run.variant, path)
        for run in finished_runs(runs).itertuples()
        for path in sorted(Path(str(run.path)).glob(EVALUATION_FILES))
    ]
    if not rows:
        return pd.DataFrame(columns=EVALUATION_COLUMNS)
    rows.sort(key=lambda row: (natural_key(str(row["variant"])), row["seq_len"], row["stride"]))
    grouped = pd.DataFrame(rows).groupby(EVALUATION_COLUMNS[:6], sort=False)
    return grouped.agg(val=("val", "mean"), test=("test", "mean"), n_seeds=("val", "count")).reset_index()[EVALUATION_COLUMNS]


def length_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Test metric by evaluation length, mean over seeds: each run's own final evaluation at its length, and its
    ``python -m mswa.evaluate`` files of the best checkpoint at other lengths; empty when no run has such a file."""
    rows = [row for run in finished_runs(runs).itertuples() for row in _lengths_of(run)]
    if not any(row["evaluated"] for row in rows):
        return pd.DataFrame(columns=["variant", "metric", "seq_len", "test", "n_seeds"])
    rows.sort(key=lambda row: (natural_key(str(row["variant"])), row["seq_len"]))
    grouped = pd.DataFrame(rows).groupby(["variant", "metric", "seq_len"], sort=False)
    return grouped.agg(test=("test", "mean"), n_seeds=("test", "count")).reset_index()


def _lengths_of(run) -> list[dict]:
    """A run's test metric at its own evaluation length, then at each other length it was evaluated at."""
    own_length = run.evaluation["seq_len"] if isinstance(run.evaluation, dict) else None
    rows = [{"variant": run.variant, "metric": run.metric, "seq_len": own_length, "test": run.test, "evaluated": False}]
    for path in sorted(Path(str(run.path)).glob(EVALUATION_FILES)):
        row = evaluation_setting(run.variant, path)
        if row["checkpoint"] == "best" and row["seq_len"] != own_length:
            rows.append({key: row[key] for key in ("variant", "metric", "seq_len", "test")} | {"evaluated": True})
    return rows if own_length is not None else rows[1:]


def evaluation_setting(variant: str, path: Path) -> dict:
    """One evaluation file as a row: its setting and its val and test metric."""
    record = json.loads(path.read_text())
    metric, evaluation = record["metric"], record["evaluation"]
    return {
        "variant": variant,
        "metric": metric,
        "train_seq_len": record["train_seq_len"],
        "seq_len": evaluation["seq_len"],
        "stride": evaluation["stride"],
        "checkpoint": record["checkpoint"],
        "val": record["metrics"][f"val/{metric}"],
        "test": record["metrics"][f"test/{metric}"],
    }
