"""Comparison report: run folders (or a W&B project) -> one table row per variant, plus plots.

    python -m mswa.report DIR [DIR ...] [--out OUT]
    python -m mswa.report --wandb ENTITY/PROJECT [--out OUT]

A run is a folder holding ``results.json`` (written by ``train.py``) and ``metrics.csv`` (Lightning's
CSVLogger). Run folders are found anywhere below the DIRs, so a Hydra multirun folder works as is. A
Hydra job folder (``.hydra/overrides.yaml``) with no ``results.json`` is a job that died before the
end: it is listed with status ``no results``, never dropped.

Seeds of one variant (``results["variant"]``: the overrides minus ``seed``) are aggregated: mean and
sample standard deviation (n - 1) of the final val/test metric. Only finished runs enter the averages;
every other run is listed with its status and error.

A folder may also hold ``lm_eval.json`` (common-sense reasoning, written by ``mswa.hf.evaluate``), next
to a run's ``results.json`` or alone (``python -m mswa.hf.evaluate --out DIR``): ``load_lm_eval`` ->
``lm_eval_table`` (headline accuracy per task, seeds of a variant aggregated the same way) -> ``plot_lm_eval``.
A report of evaluations only is fine; one with neither runs nor evaluations is an error.

The same functions serve ``notebooks/analysis.ipynb``: ``load_runs`` -> ``summary_table`` /
``failed_runs`` / ``plot_curves`` / ``plot_budget`` / ``plot_windows``; ``write_report`` writes them all.
A run's ``evaluation`` (results.json) gives ``distance_table`` -> ``plot_distance`` (the metric by the
context offered) and, on the synthetic corpus, ``kind_table`` -> ``plot_kinds`` (bpc per byte kind
beside its floor); ``load_evaluations`` lists the ``evaluation_*.json`` that ``python -m mswa.evaluate``
wrote beside results.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from mswa.stats import PairedDifference, paired_difference
from mswa.sweeps import comparison_id, schedule_rule, variant_id

SCHEMA = 1
NO_RESULTS = "no results"  # status of a Hydra job folder that never wrote results.json
SEED_KEYS = ("seed", "+seed", "++seed")

# results.json keys copied as they are into a run's row
RESULT_KEYS = (
    "run_name", "variant", "seed", "status", "error", "dataset", "unit", "metric", "model", "schedule", "window",
    "windows", "n_params", "entropy_floor_bpb", "tokens_per_s", "steps", "wall_time_s", "git_commit", "overrides",
    "evaluation",
)
BUDGET_KEYS = ("seq_len", "mean_window_over_w", "attended_pairs", "pairs_vs_swa", "pairs_vs_full")
# from the stored config (mswa.sweeps): one variant whatever the folder or overrides; the rule of its schedule
CONFIG_COLUMNS = ("variant_id", "comparison_id", "schedule_rule")
RUN_COLUMNS = ("path", *RESULT_KEYS, *BUDGET_KEYS, *CONFIG_COLUMNS, "val", "test", "history")
NUMERIC_RUN_COLUMNS = (
    "seed", "window", "n_params", "entropy_floor_bpb", "tokens_per_s", "steps", "wall_time_s", *BUDGET_KEYS, "val",
    "test",
)
INTEGER_RUN_COLUMNS = ("seed", "window", "n_params", "steps", "seq_len", "attended_pairs")
# per variant: values shared by its seeds, then aggregates, then the comparison with its SWA reference
SHARED_COLUMNS = (
    "variant", "model", "schedule", "window", "dataset", "metric", "n_params", "pairs_vs_swa", "pairs_vs_full",
    "mean_window_over_w", "entropy_floor_bpb", *CONFIG_COLUMNS,
)
# paired differences over seeds (mswa.stats) against SWA at w and SWA at the variant's mean window ("budget")
PAIRED_AGAINST = {"swa": "SWA at w", "budget": "SWA at budget"}
PAIRED_KINDS = tuple(PAIRED_AGAINST)
PAIRED_FIELDS = ("reference", "n_pairs", "diff", "low", "high", "verdict")
PAIRED_COLUMNS = tuple(f"{kind}_{field}" for kind in PAIRED_KINDS for field in PAIRED_FIELDS)
SUMMARY_COLUMNS = (
    *SHARED_COLUMNS, "n_seeds", "seeds", "n_unfinished", "val", "val_std", "test", "test_std", "reference",
    "delta_val", "delta_test", *PAIRED_COLUMNS, "tokens_per_s", "steps", "wall_time_s",
)
FAILED_COLUMNS = ("variant", "seed", "status", "error", "run_name", "path")
ATTEMPT_COLUMNS = ("ended", "path", "error", "overrides")
STOPPED = "stopped"  # results.json says running, but its process is gone or silent
SILENT_HEARTBEATS = 5  # missed heartbeats after which a run on another machine counts as stopped

LM_EVAL_FILE = "lm_eval.json"  # mswa.hf.evaluate.RESULTS_FILE; not imported, that module needs torch
HEADLINE_METRICS = ("acc_norm", "acc")  # papers report acc_norm where lm_eval has it (hellaswag, arc, piqa...)
# an evaluation's identity; "<task>/<metric>" accuracies and "average" follow, each with "<column>_stderr"
EVAL_COLUMNS = ("path", "run_name", "variant", "seed", "model", "schedule", "num_fewshot", "limit")
EVAL_SHARED_COLUMNS = ("variant", "model", "schedule", "num_fewshot", "limit")

REFERENCE_RULE = (
    "Δ = variant mean minus its SWA reference mean (negative = better). The reference is a finished variant "
    "on the same dataset and metric with the `uniform` schedule whose model is the variant's SWA counterpart "
    "(`mswa_linear` -> `swa_linear`; if none, whose model is `swa`; if none, any model `swa`; if none, any "
    "`uniform` schedule), choosing "
    "the one whose overrides differ from the variant's in the fewest places; a tie leaves Δ empty and names "
    "the candidates."
)
BUDGET_NOTE = (
    "pairs / SWA and pairs / full: attended query-key pairs at the run's sequence length, relative to SWA "
    "at the base window and to full causal attention; mean window / w: mean window over all heads and layers."
)


class ReportError(ValueError):
    """Input the report cannot use; the message names the value and the fix."""


# ---------------------------------------------------------------- loading run folders


def load_runs(dirs: Sequence[str | Path], allow_empty: bool = False) -> pd.DataFrame:
    """One row per run found below ``dirs`` (columns ``RUN_COLUMNS``), sorted by variant then seed.
    ``allow_empty``: no rows rather than an error (the dirs hold evaluations, lm_eval.json, only)."""
    missing = [str(d) for d in dirs if not Path(d).is_dir()]
    if not dirs or missing:
        raise ReportError(
            f"run folder(s) {missing or '(none given)'} not found; pass existing sweep output folders, "
            "e.g. multirun/<date>/<time>"
        )
    results_dirs, job_dirs = find_run_folders(dirs)
    if not results_dirs and not job_dirs and not allow_empty:
        raise ReportError(
            f"no results.json or Hydra job folder (.hydra/overrides.yaml) found below {[str(d) for d in dirs]}, "
            f"and no {LM_EVAL_FILE} either; pass the folder a sweep (or `python -m mswa.hf.evaluate --out`) wrote into"
        )
    rows = [row_from_results(read_results(d), str(d), read_history(d)) for d in results_dirs]
    rows += [row_from_hydra_job(d) for d in job_dirs]
    return runs_frame(rows)


def find_run_folders(dirs: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(folders with results.json, Hydra job folders without one); nested copies of a run are skipped."""
    results_dirs = outermost_folders(dirs, "results.json")
    jobs = {
        p.parent.parent.resolve() for d in dirs for p in Path(d).rglob("overrides.yaml") if p.parent.name == ".hydra"
    }
    has_results = set(results_dirs).union(*(r.parents for r in results_dirs))
    return results_dirs, sorted(jobs - has_results)


def outermost_folders(dirs: Iterable[str | Path], filename: str) -> list[Path]:
    """Folders below ``dirs`` holding ``filename``, except those inside another one (e.g. a W&B copy)."""
    found = {p.parent.resolve() for d in dirs for p in Path(d).rglob(filename)}
    return sorted(f for f in found if not any(parent in found for parent in f.parents))


def read_results(run_dir: Path) -> dict:
    """results.json as a dict; an unreadable file becomes a failed run rather than stopping the report."""
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return {"status": "failed", "error": f"results.json is not valid JSON ({err})", "run_name": run_dir.name}
    if results.get("schema") != SCHEMA:
        raise ReportError(
            f"{path} has schema={results.get('schema')!r}, this report reads schema={SCHEMA}; "
            "use the mswa version that wrote the runs"
        )
    return results


def read_history(run_dir: Path) -> pd.DataFrame | None:
    """The run's metrics.csv (sparse: one row per logging step), or None when the run has none."""
    path = run_dir / "metrics.csv"
    return pd.read_csv(path) if path.is_file() else None


def row_from_results(results: Mapping, path: str, history: pd.DataFrame | None) -> dict:
    """A run's row from its results dict; a 'finished' run without its final metrics counts as failed."""
    row = dict.fromkeys(RUN_COLUMNS)
    row.update({key: results.get(key) for key in RESULT_KEYS})
    row.update({key: (results.get("budget") or {}).get(key) for key in BUDGET_KEYS})
    metrics, metric = results.get("metrics") or {}, results.get("metric")
    row.update(path=path, history=history, val=metrics.get(f"val/{metric}"), test=metrics.get(f"test/{metric}"))
    row.update(config_columns(results.get("config")))
    if row["status"] == "finished" and (row["val"] is None or row["test"] is None):
        row.update(status="failed", error=f"status is finished but metrics lack val/{metric} or test/{metric}")
    if row["status"] == "running" and (why := why_stopped(results.get("process") or {})):
        row.update(status=STOPPED, error=why)
    return row


def why_stopped(process: Mapping, now: datetime.datetime | None = None) -> str | None:
    """Why a run whose results.json still says running has in fact stopped without a word (killed, machine
    lost), or None while it may be alive: its process is gone from this machine, or its heartbeat is silent."""
    pid, host, every = process.get("pid"), process.get("host"), process.get("heartbeat_every_s")
    resume = "resume it with ckpt_path=last"
    if pid and host == socket.gethostname() and not _alive(pid):
        return f"its process ({pid} on {host}) ended without recording an end (killed?); {resume}"
    beat = process.get("heartbeat") or process.get("started")
    if beat and every:
        silent = ((now or datetime.datetime.now(datetime.timezone.utc)) - datetime.datetime.fromisoformat(beat)).total_seconds()
        if silent > SILENT_HEARTBEATS * every:
            return f"no heartbeat from process {pid} on {host} for {silent / 60:.0f} min (since {beat}); {resume}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def row_from_hydra_job(job_dir: Path) -> dict:
    """A job that never wrote results.json, named from the overrides Hydra saved for it."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    logs = sorted(p.name for p in job_dir.glob("*.log"))
    row = dict.fromkeys(RUN_COLUMNS)
    row.update(
        path=str(job_dir),
        run_name=",".join(overrides),
        variant=",".join(without_seed(overrides)),
        seed=seed_of(overrides),
        overrides=overrides,
        status=NO_RESULTS,
        error="no results.json: the job stopped before writing it" + (f" (see {', '.join(logs)})" if logs else ""),
    )
    return row


def without_seed(overrides: Iterable[str]) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0] not in SEED_KEYS]


def seed_of(overrides: Iterable[str]) -> int | None:
    seeds = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] in SEED_KEYS]
    return int(seeds[0]) if seeds else None


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    for column in NUMERIC_RUN_COLUMNS:
        runs[column] = pd.to_numeric(runs[column])
    for column in INTEGER_RUN_COLUMNS:
        runs[column] = runs[column].astype("Int64")
    return _by_variant_and_seed(merge_identical_variants(runs))


def _by_variant_and_seed(frame: pd.DataFrame) -> pd.DataFrame:
    order = sorted(range(len(frame)), key=lambda i: (natural_key(str(frame.variant[i])), _seed_key(frame.seed[i])))
    return frame.iloc[order].reset_index(drop=True)


def natural_key(text: str) -> list:
    """Sort key that puts window=64 before window=128."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _seed_key(seed) -> tuple:
    return (pd.isna(seed), 0 if pd.isna(seed) else seed)


DUPLICATE = "duplicate"  # status of a finished run whose variant and seed another run already has


def config_columns(config: Mapping | None) -> dict:
    """``CONFIG_COLUMNS`` of a run's stored resolved config (None for configs too partial to identify)."""
    if not isinstance(config, Mapping) or not {"model", "window_schedule", "dataset"} <= config.keys():
        return dict.fromkeys(CONFIG_COLUMNS)
    return {"variant_id": variant_id(config), "comparison_id": comparison_id(config),
            "schedule_rule": schedule_rule(config)}


def merge_identical_variants(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one resolved config (``variant_id``) share one variant name, the shortest of theirs, so seeds
    pair across sweep folders and spellings (``model=swa`` = ``model=swa window_schedule=uniform``). A second
    finished run of the same variant and seed is marked ``duplicate`` (listed, never averaged twice)."""
    runs = runs.copy()
    known = runs.variant_id.notna()
    names = runs[known].groupby("variant_id").variant.agg(lambda v: min(v.astype(str), key=lambda n: (len(n), n)))
    runs.loc[known, "variant"] = runs.loc[known, "variant_id"].map(names)
    finished = runs[known & (runs.status == "finished")].sort_values("path")
    first = finished.drop_duplicates(["variant_id", "seed"])
    for index in finished.index.difference(first.index):
        kept = first[(first.variant_id == runs.variant_id[index]) & (first.seed == runs.seed[index])].path.iloc[0]
        runs.loc[index, ["status", "error"]] = [DUPLICATE, f"same config and seed as {kept}; left out"]
    return runs


# ---------------------------------------------------------------- loading from W&B

WANDB_STATUS = {
    "finished": "finished",
    "running": "running",
    "failed": "failed",
    "crashed": "failed",
    "killed": "failed",
}


def load_wandb_runs(project_path: str, api=None) -> pd.DataFrame:
    """Runs of a W&B project as the same frame as ``load_runs``.

    Expects train.py to store its results dict in the run summary under ``results``; a run without it
    (crashed early) is listed with its W&B state.
    """
    if len([part for part in project_path.split("/") if part]) != 2:
        raise ReportError(f"--wandb {project_path!r} is not ENTITY/PROJECT; pass e.g. --wandb my-team/mswa")
    try:
        import wandb

        api = api or wandb.Api(timeout=30)
        wandb_runs = list(api.runs(project_path))
    except Exception as err:  # network, login and lookup errors all end here, re-raised with the fix
        raise ReportError(
            f"could not read W&B project {project_path!r} ({type(err).__name__}: {err}); "
            "check the name, network access and `wandb login` (or WANDB_API_KEY)"
        ) from err
    if not wandb_runs:
        raise ReportError(f"W&B project {project_path!r} has no runs; check ENTITY/PROJECT")
    return runs_frame([row_from_wandb(run) for run in wandb_runs])


def row_from_wandb(run) -> dict:
    """One W&B public-API run (``.name .state .url .summary .history()``) as a run row."""
    history = run.history(samples=2000, pandas=True)
    step = "trainer/global_step" if "trainer/global_step" in history else "_step"  # Lightning's step when logged
    history = history.rename(columns={step: "step"}) if len(history) else None
    results = _plain(run.summary.get("results"))
    if results:
        return row_from_results(results, run.url, history)
    names = run.name.split(",")
    return row_from_results(
        {
            "run_name": run.name,
            "variant": ",".join(without_seed(names)),
            "seed": seed_of(names),
            "status": WANDB_STATUS.get(run.state, run.state),
            "error": f"W&B state {run.state!r}, no 'results' in summary",
        },
        run.url,
        history,
    )


def _plain(value):
    """W&B summary sub-dicts -> plain dicts, recursively."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


# ---------------------------------------------------------------- tables


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per variant with at least one finished run (columns ``SUMMARY_COLUMNS``)."""
    finished = runs[runs.status == "finished"]
    unfinished = runs[runs.status != "finished"].variant.value_counts()
    rows = [
        _variant_row(group, unfinished.get(variant, 0)) for variant, group in finished.groupby("variant", sort=False)
    ]
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).astype(
        {"window": "Int64", "n_params": "Int64", "n_seeds": "Int64", "n_unfinished": "Int64"}
    )
    overrides = {
        variant: frozenset(without_seed(group.overrides.iloc[0] or []))
        for variant, group in finished.groupby("variant")
    }
    table["reference"] = [_reference(row, table, overrides) for row in table.itertuples()]
    means = table.set_index("variant")
    for split in ("val", "test"):
        table[f"delta_{split}"] = [
            value - means.loc[ref, split] if ref in means.index else np.nan
            for value, ref in zip(table[split], table.reference)
        ]
    paired = pd.DataFrame([_paired_cells(row, table, finished) for row in table.itertuples()], index=table.index)
    table[list(PAIRED_COLUMNS)] = paired.reindex(columns=list(PAIRED_COLUMNS))
    return table


PAIRED_TABLE_COLUMNS = ["variant", "reference", "against", "measure", "n_pairs", "diff", "low", "high", "verdict"]
PAIRED_SPLIT = "test"  # the summary's paired columns; the checkpoint was chosen on val
PAIRED_NOTE = (
    "Paired differences (lower is better): for each seed both variants ran, variant minus reference; mean over "
    "the pairs with its 95% t-interval and the verdict (better / worse / not distinguishable at 95%). A seed fixes "
    "initialisation and data order for every variant alike. References come from the stored configs: SWA at w is "
    "the finished variant whose config equals this one's except for its attention (schedule, windowed flag) and "
    "whose schedule is `uniform` at mean window 1; SWA at budget the same with the `uniform` schedule at this "
    "variant's mean window, to the nearest whole window (`uniform_mswa_budget` for `mswa`: 56 = 0.875 w at w = 64 "
    "for mswa's 0.879 w)."
)


def paired_references(row, table: pd.DataFrame) -> dict[str, str | None]:
    """{"swa": SWA at w, "budget": SWA at the row's mean window} among ``table``'s variants (None: not there)."""
    found = dict.fromkeys(PAIRED_KINDS)
    if pd.isna(row.comparison_id):
        return found
    same = table[(table.dataset == row.dataset) & (table.metric == row.metric)
                 & (table.comparison_id == row.comparison_id) & (table.schedule_rule == "uniform")
                 & (table.variant != row.variant)]
    gaps = (pd.to_numeric(same.mean_window_over_w) - 1.0).abs()
    found["swa"] = next(iter(same.variant[gaps < 1e-9]), None)
    if pd.notna(row.mean_window_over_w) and pd.notna(row.window) and abs(row.mean_window_over_w - 1.0) > 1e-9:
        # a uniform window is a whole number: the nearest to w * mean window is within half a step of it
        gaps = (pd.to_numeric(same.mean_window_over_w) - row.mean_window_over_w).abs()
        found["budget"] = next(iter(same.variant[gaps <= 0.5 / row.window + 1e-9]), None)
    return found


def seed_values(values: pd.DataFrame, variant: str, column: str) -> dict[int, float]:
    """{seed: value} of ``variant``'s rows in a frame with columns variant, seed and ``column``."""
    runs = values[values.variant == variant]
    pairs = zip(runs.seed, runs[column])
    return {int(seed): float(value) for seed, value in pairs if pd.notna(seed) and pd.notna(value)}


def paired_comparison(values: pd.DataFrame, variant: str, reference: str, column: str) -> PairedDifference | None:
    return paired_difference(seed_values(values, variant, column), seed_values(values, reference, column))


def _paired_cells(row, table: pd.DataFrame, finished: pd.DataFrame) -> dict:
    cells = {}
    for kind, reference in paired_references(row, table).items():
        if reference is None:
            continue
        cells[f"{kind}_reference"] = reference
        if (diff := paired_comparison(finished, row.variant, reference, PAIRED_SPLIT)) is not None:
            cells |= {f"{kind}_n_pairs": diff.n_pairs, f"{kind}_diff": diff.mean, f"{kind}_low": diff.low,
                      f"{kind}_high": diff.high, f"{kind}_verdict": diff.verdict}
    return cells


def kind_values(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per finished run: variant, seed and its ``split`` bpc per byte kind (a column per kind)."""
    rows = [{"variant": run.variant, "seed": run.seed,
             **{r["kind"]: r["bpc"] for r in ((run.evaluation or {}).get(split) or {}).get("by_kind", [])}}
            for run in runs[runs.status == "finished"].itertuples()]
    return pd.DataFrame(rows, columns=["variant", "seed"]) if not rows else pd.DataFrame(rows)


def paired_table(runs: pd.DataFrame, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (variant, reference kind, measure) with a reference: the paired difference and its verdict.
    Measures: the val and test metric, then (synthetic corpus) the test bpc of each byte kind."""
    table = summary_table(runs) if table is None else table
    finished, kinds = runs[runs.status == "finished"], kind_values(runs)
    measures = [("val", finished, "val"), ("test", finished, "test")]
    measures += [(f"test {kind}", kinds, kind) for kind in kinds.columns[2:]]
    rows = []
    for row in table.itertuples():
        for kind, reference in paired_references(row, table).items():
            for measure, values, column in measures:
                diff = paired_comparison(values, row.variant, reference, column) if reference else None
                if diff is not None:
                    rows.append({"variant": row.variant, "reference": reference, "against": PAIRED_AGAINST[kind],
                                 "measure": measure, "n_pairs": diff.n_pairs, "diff": diff.mean, "low": diff.low,
                                 "high": diff.high, "verdict": diff.verdict})
    return pd.DataFrame(rows, columns=PAIRED_TABLE_COLUMNS)


def _interval(diff, low, high, verdict) -> str:
    if pd.isna(diff):
        return ""
    bounds = f" [{low:+.4f}, {high:+.4f}]" if pd.notna(low) else ""
    return f"{diff:+.4f}{bounds} {verdict}"


def paired_markdown(runs: pd.DataFrame, table: pd.DataFrame, common: Sequence[str] = ()) -> str:
    """The report's section of paired differences (empty when no variant has a reference with shared seeds);
    names shown without the ``common`` overrides."""
    pairs = paired_table(runs, table)
    if pairs.empty:
        return ""
    shown = pairs.assign(**{"difference [95% interval] verdict": [
        _interval(*cells) for cells in zip(pairs["diff"], pairs.low, pairs.high, pairs.verdict)]},
        variant=[short_variant(v, common) for v in pairs.variant],
        reference=[short_variant(v, common) for v in pairs.reference])
    shown = shown[["variant", "against", "reference", "measure", "n_pairs", "difference [95% interval] verdict"]]
    return "\n\n".join(["## Paired differences over seeds", PAIRED_NOTE, markdown_table(shown.astype(str))])


def _variant_row(group: pd.DataFrame, n_unfinished: int) -> dict:
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
        steps=group.steps.mean(),
        wall_time_s=group.wall_time_s.mean(),
    )
    return row


def _reference(row, table: pd.DataFrame, overrides: Mapping[str, frozenset]) -> str | None:
    """The SWA variant this row is compared with (see ``REFERENCE_RULE``)."""
    comparable = table[(table.dataset == row.dataset) & (table.metric == row.metric)]
    counterpart = str(row.model).replace("mswa", "swa")  # hybrids compare with the same hybrid under SWA
    for pick in (
        (comparable.model == counterpart) & (comparable.schedule == "uniform"),
        (comparable.model == "swa") & (comparable.schedule == "uniform"),
        comparable.model == "swa",
        comparable.schedule == "uniform",
    ):
        candidates = comparable[pick]
        if not candidates.empty:
            break
    else:
        return None
    differing = candidates.variant.map(lambda name: len(overrides[name] ^ overrides[row.variant]))
    best = candidates.variant[differing == differing.min()].tolist()
    return best[0] if len(best) == 1 else "ambiguous: " + " | ".join(best)


def failed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run that did not finish, with its status and error."""
    return runs.loc[runs.status != "finished", list(FAILED_COLUMNS)].reset_index(drop=True)


def refused_attempts(runs: pd.DataFrame) -> pd.DataFrame:
    """Attempts on a run folder that were refused and left the run as it was (attempts.jsonl, written by
    train.py beside results.json): a start into a folder holding a run, a resume whose checkpoint failed to load."""
    rows = []
    for path in runs.path:
        log = Path(str(path)) / "attempts.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
        for attempt in (json.loads(line) for line in lines if line.strip()):
            if attempt.get("status") == "refused":
                rows.append({**attempt, "path": str(path), "overrides": ",".join(attempt.get("overrides") or [])})
    return pd.DataFrame(rows, columns=list(ATTEMPT_COLUMNS))


def split_overrides(variant: str) -> list[str]:
    """``a=1,b=[2,3]`` -> ``["a=1", "b=[2,3]"]``: commas inside brackets, braces or quotes belong to a value."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(variant):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(variant[start:i])
            start = i + 1
    return [*parts, variant[start:]]


def common_overrides(variants: Iterable[str]) -> list[str]:
    """Overrides shared by every variant, in the order of the first; none when there is one variant only."""
    names = list(dict.fromkeys(str(v) for v in variants))
    if len(names) < 2:
        return []
    shared = set.intersection(*(set(split_overrides(name)) for name in names))
    return [part for part in split_overrides(names[0]) if part in shared]


def short_variant(variant, common: Sequence[str]) -> str:
    """A variant's name without the overrides common to all runs (a reference "ambiguous: a | b" part by part)."""
    if pd.isna(variant) or not common:
        return variant
    if str(variant).startswith("ambiguous: "):
        return "ambiguous: " + " | ".join(short_variant(v, common) for v in variant[len("ambiguous: "):].split(" | "))
    return ",".join(part for part in split_overrides(str(variant)) if part not in common) or "(common only)"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of string cells."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += [
        "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "" if value is None or pd.isna(value) else format(value, spec)


def _mean_std(mean, std) -> str:
    return _fmt(mean, ".4f") + (f" ± {std:.4f}" if pd.notna(std) else "")


def summary_markdown_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The summary table formatted for reading; columns empty in every row are left out."""
    shown = pd.DataFrame(
        {
            "variant": table.variant,
            "metric": table.metric,
            "seeds": [f"{n}" + (f" (+{u} unfinished)" if u else "") for n, u in zip(table.n_seeds, table.n_unfinished)],
            "val": [_mean_std(m, s) for m, s in zip(table.val, table.val_std)],
            "test": [_mean_std(m, s) for m, s in zip(table.test, table.test_std)],
            "Δ val": [_fmt(v, "+.4f") for v in table.delta_val],
            "Δ test": [_fmt(v, "+.4f") for v in table.delta_test],
            "SWA reference": table.reference.fillna(""),
            **{f"{PAIRED_SPLIT} − {against} [95%]": [
                _interval(*cells) for cells in zip(*(table[f"{kind}_{f}"] for f in ("diff", "low", "high", "verdict")))]
               for kind, against in PAIRED_AGAINST.items()},
            "pairs / SWA": [_fmt(v, ".3f") for v in table.pairs_vs_swa],
            "pairs / full": [_fmt(v, ".3f") for v in table.pairs_vs_full],
            "mean window / w": [_fmt(v, ".3f") for v in table.mean_window_over_w],
            "params": [_fmt(v, ",.0f") for v in table.n_params],
            "tokens/s": [_fmt(v, ",.0f") for v in table.tokens_per_s],
            "steps": [_fmt(v, ".0f") for v in table.steps],
            "entropy floor (bits/byte)": [_fmt(v, ".4f") for v in table.entropy_floor_bpb],
        }
    )
    return shown.loc[:, (shown != "").any(axis=0)]


# ---------------------------------------------------------------- plots


def _new_figure(n_panels: int, panel_size: tuple[float, float], ncols: int | None = None) -> tuple[Figure, list]:
    """A pyplot-free Agg figure (no global state, safe in scripts and notebooks) with a row-major panel grid."""
    ncols = ncols or n_panels
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _metrics(runs: pd.DataFrame) -> list[str]:
    return sorted(runs.metric.dropna().unique())


def plot_curves(runs: pd.DataFrame) -> Figure:
    """Validation (solid) and training (dashed) metric against step, both in the metric's unit (train/loss
    converted: bpc = loss / ln 2, ppl = exp(loss)): mean over the finished seeds of each variant, band ± std."""
    finished = runs[runs.status == "finished"]
    metrics = _metrics(finished) or ["bpc"]
    fig, axes = _new_figure(len(metrics), (6.0, 4.2))
    for ax, metric in zip(axes, metrics):
        for variant, group in finished[finished.metric == metric].groupby("variant", sort=False):
            color = None
            for column, style in ((f"val/{metric}", "-"), ("train/loss", "--")):
                curves = [_in_unit(h[["step", column]].dropna(), column, metric) for h in group.history
                          if h is not None and column in h]
                if curves:
                    stats = pd.concat(curves).groupby("step")["value"].agg(["mean", "std"])
                    label = f"{variant} {column.split('/')[0]} (n={len(curves)})"
                    (line,) = ax.plot(stats.index, stats["mean"], style, color=color, label=label)
                    color = line.get_color()
                    ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=color, alpha=0.2)
        if metric == "bpc":
            for floor in finished.entropy_floor_bpb.dropna().unique():
                ax.axhline(floor, color="black", linestyle=":", linewidth=1, label=f"entropy floor {floor:.3f}")
        _finish_axes(ax, f"{metric}: val (solid), train (dashed)", "step", metric)
    return fig


def _in_unit(curve: pd.DataFrame, column: str, metric: str) -> pd.DataFrame:
    """A logged curve as column ``value`` in the metric's unit (train/loss is in nats per token)."""
    values = curve[column]
    if column == "train/loss":
        values = values / np.log(2) if metric == "bpc" else np.exp(values)
    return pd.DataFrame({"step": curve["step"], "value": values})


def _finish_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data (no finished run logged it)", ha="center", va="center", transform=ax.transAxes)


def plot_budget(runs: pd.DataFrame, split: str = "test") -> Figure:
    """Final ``split`` metric (mean ± std over seeds) against attended pairs relative to full attention.

    The x axis is pairs / full rather than pairs / SWA so that full attention (x = 1) and SWA at different
    base windows share one axis.
    """
    table = summary_table(runs)
    metrics = _metrics(table)
    fig, axes = _new_figure(max(1, len(metrics)), (6.0, 4.5))
    for ax, metric in zip(axes, metrics):
        rows = table[table.metric == metric]
        for model, group in rows.groupby("model", sort=False):
            ax.errorbar(
                group.pairs_vs_full, group[split], yerr=group[f"{split}_std"].fillna(0), fmt="o", capsize=3, label=model
            )
        for row in rows.itertuples():
            ax.annotate(
                row.variant,
                (row.pairs_vs_full, getattr(row, split)),
                fontsize=6,
                textcoords="offset points",
                xytext=(4, 4),
            )
        ax.set_xlim(0, 1.05)
        _finish_axes(
            ax, f"{split} {metric} vs attention budget", "attended pairs / full attention", f"{split} {metric}"
        )
    if not metrics:
        _finish_axes(axes[0], f"{split} metric vs attention budget", "attended pairs / full attention", split)
    return fig


def plot_windows(runs: pd.DataFrame) -> Figure:
    """Layer x head heatmap of every distinct window schedule (log colour scale, values written in)."""
    schedules: dict[tuple, list[str]] = {}
    for variant, windows in zip(runs.variant, runs.windows):
        if windows:
            names = schedules.setdefault(tuple(tuple(layer) for layer in windows), [])
            if variant not in names:
                names.append(variant)
    finite = [w for windows in schedules for layer in windows for w in layer if w is not None]
    norm = LogNorm(vmin=min(finite, default=1), vmax=max(max(finite, default=2), min(finite, default=1) + 1))
    n_head = max((len(windows[0]) for windows in schedules), default=1)
    n_layer = max((len(windows) for windows in schedules), default=1)
    fig, axes = _new_figure(
        max(1, len(schedules)),
        (max(3.2, 0.25 * n_head + 1.5), max(2.6, 0.2 * n_layer + 1.4)),
        ncols=min(4, max(1, len(schedules))),
    )
    for ax, (windows, names) in zip(axes, schedules.items()):
        _window_panel(ax, windows, norm, "\n".join(names))
    if schedules:
        colorbar = fig.colorbar(axes[0].images[0], ax=axes, label="window (log scale); grey = full causal")
        if len(set(finite)) <= 12:  # label the windows that occur rather than powers of ten
            colorbar.set_ticks(sorted(set(finite)), labels=[str(w) for w in sorted(set(finite))])
            colorbar.minorticks_off()
    else:
        _finish_axes(axes[0], "windows", "head", "layer")
    return fig


def _window_panel(ax, windows: tuple[tuple, ...], norm: LogNorm, title: str) -> None:
    values = np.ma.masked_invalid(
        np.array([[np.nan if w is None else w for w in layer] for layer in windows], dtype=float)
    )
    ax.imshow(values, norm=norm, cmap=matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey"), aspect="auto")
    for (top, bottom, left, right), window in _equal_blocks(windows):
        dark = window is not None and norm(window) < 0.5
        ax.text(
            (left + right) / 2,
            (top + bottom) / 2,
            "full" if window is None else str(window),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if dark else "black",
            in_layout=False,
        )
    ax.set(
        title=title,
        xlabel="head",
        ylabel="layer (shallow at top)",
        xticks=range(values.shape[1]),
        yticks=range(values.shape[0]),
    )
    ax.title.set_fontsize(8)


def _equal_blocks(windows: tuple[tuple, ...]) -> list[tuple[tuple[int, int, int, int], int | None]]:
    """((first layer, last layer, first head, last head), window) for each block of equal windows: runs of
    identical consecutive layers, split into runs of equal consecutive heads. One label per block keeps the
    group structure readable and the drawing fast."""
    blocks, top = [], 0
    for row, layers in itertools.groupby(windows):
        bottom, left = top + len(list(layers)) - 1, 0
        for window, heads in itertools.groupby(row):
            right = left + len(list(heads)) - 1
            blocks.append(((top, bottom, left, right), window))
            left = right + 1
        top = bottom + 1
    return blocks


# ---------------------------------------------------------------- loss by distance, bpc by kind, evaluation settings

EVALUATION_FILES = "evaluation_*.json"  # written beside results.json by `python -m mswa.evaluate`
DISTANCE_NOTE = (
    "Context offered = tokens before the target inside its evaluation chunk (log-spaced buckets), whatever "
    "the windows: how much of the offered context a model uses. Means over the finished seeds of each variant."
)
KIND_NOTE = (
    "Synthetic corpus: bits per byte by what the byte is (word bytes; copies at each scale, named by their "
    "distance back, marker included) beside the entropy floor of that kind on the same split."
)


def _evaluation_rows(runs: pd.DataFrame, split: str, part: str) -> list[dict]:
    """The ``part`` rows (by_distance, by_kind) of ``split`` in each finished run's results, with its variant."""
    rows = []
    for run in runs[runs.status == "finished"].itertuples():
        for row in ((run.evaluation or {}).get(split) or {}).get(part, []):
            rows.append({"variant": run.variant, "metric": run.metric, **row})
    return rows


def distance_table(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per (variant, context bucket): ``context_lo``/``context_hi``, the metric (bpc or ppl) in the
    bucket, mean over the variant's finished seeds, and ``n_seeds``."""
    columns = ["variant", "metric", "context_lo", "context_hi", "value", "n_seeds"]
    rows = [
        {"variant": r["variant"], "metric": r["metric"], "context_lo": r["context"][0], "context_hi": r["context"][1],
         "value": r[r["metric"]]}
        for r in _evaluation_rows(runs, split, "by_distance")
    ]
    if not rows:
        return pd.DataFrame(columns=columns)
    grouped = pd.DataFrame(rows).groupby(["variant", "metric", "context_lo", "context_hi"], sort=False).value
    return grouped.agg(value="mean", n_seeds="count").reset_index()[columns]


def kind_table(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per (variant, byte kind) of synthetic-corpus runs: ``bpc`` (mean over seeds) and ``floor_bpc``."""
    columns = ["variant", "kind", "bpc", "floor_bpc", "n_seeds"]
    rows = _evaluation_rows(runs, split, "by_kind")
    if not rows:
        return pd.DataFrame(columns=columns)
    grouped = pd.DataFrame(rows).groupby(["variant", "kind"], sort=False)
    return grouped.agg(bpc=("bpc", "mean"), floor_bpc=("floor_bpc", "mean"), n_seeds=("bpc", "count")).reset_index()[columns]


def load_evaluations(runs: pd.DataFrame) -> pd.DataFrame:
    """Every ``evaluation_*.json`` beside a finished run's results.json: one row per variant and setting
    (seq_len, stride, checkpoint) with the val and test metric, mean over seeds."""
    columns = ["variant", "metric", "train_seq_len", "seq_len", "stride", "checkpoint", "val", "test", "n_seeds"]
    rows = []
    for run in runs[runs.status == "finished"].itertuples():
        for path in sorted(Path(str(run.path)).glob(EVALUATION_FILES)):
            record = json.loads(path.read_text())
            metric, evaluation = record["metric"], record["evaluation"]
            rows.append({"variant": run.variant, "metric": metric, "train_seq_len": record["train_seq_len"],
                         "seq_len": evaluation["seq_len"], "stride": evaluation["stride"], "checkpoint": record["checkpoint"],
                         "val": record["metrics"][f"val/{metric}"], "test": record["metrics"][f"test/{metric}"]})
    if not rows:
        return pd.DataFrame(columns=columns)
    rows.sort(key=lambda row: (natural_key(str(row["variant"])), row["seq_len"], row["stride"]))
    grouped = pd.DataFrame(rows).groupby(columns[:6], sort=False)
    return grouped.agg(val=("val", "mean"), test=("test", "mean"), n_seeds=("val", "count")).reset_index()[columns]


def plot_distance(runs: pd.DataFrame, split: str = "test") -> Figure:
    """The metric by context offered (log axis), one curve per variant and one panel per metric."""
    table = distance_table(runs, split)
    metrics = _metrics(table) or ["bpc"]
    fig, axes = _new_figure(len(metrics), (6.0, 4.2))
    for ax, metric in zip(axes, metrics):
        for variant, group in table[table.metric == metric].groupby("variant", sort=False):
            centre = np.sqrt(group.context_lo.astype(float) * group.context_hi.astype(float))
            ax.plot(centre, group.value, "o-", label=f"{variant} (n={group.n_seeds.max()})")
        ax.set_xscale("log", base=2)
        _finish_axes(ax, f"{split} {metric} by context offered", "tokens before the target in its chunk", metric)
    return fig


def plot_kinds(runs: pd.DataFrame, split: str = "test") -> Figure:
    """Grouped bars: one group per byte kind, one bar per variant; the kind's entropy floor marked in black."""
    table = kind_table(runs, split)
    kinds, variants = list(dict.fromkeys(table.kind)), list(dict.fromkeys(table.variant))
    fig, (ax,) = _new_figure(1, (max(6.0, 0.3 * len(kinds) * max(1, len(variants)) + 2.0), 4.5))
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        rows = table[table.variant == variant].set_index("kind").reindex(kinds)
        x = np.arange(len(kinds)) + (i - (len(variants) - 1) / 2) * width
        ax.bar(x, rows.bpc, width, label=variant)
        ax.scatter(x, rows.floor_bpc, marker="_", s=400 * width, color="black", zorder=3,
                   label="entropy floor" if i == 0 else None)
    ax.set_xticks(np.arange(len(kinds)), kinds)
    if np.isfinite(top := table.bpc.max()):
        ax.set_ylim(0, 1.4 * top)  # headroom above the bars for the legend
    _finish_axes(ax, f"{split} bits per byte by byte kind", "byte kind", "bpc")
    return fig


def evaluation_markdown(runs: pd.DataFrame, split: str = "test") -> str:
    """The report's sections on loss by distance, bpc by kind and evaluation settings (empty when no run has them)."""
    parts = []
    distance = distance_table(runs, split)
    if len(distance):
        distance["context"] = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in zip(distance.context_lo, distance.context_hi)]
        shown = distance.pivot_table(index=["variant", "metric"], columns="context", values="value", sort=False)
        parts += [f"## {split} metric by context offered", DISTANCE_NOTE, markdown_table(_formatted(shown))]
    kinds = kind_table(runs, split)
    if len(kinds):
        shown = kinds.pivot_table(index="variant", columns="kind", values="bpc", sort=False)
        floors = kinds.groupby("kind", sort=False).floor_bpc.mean().to_frame("entropy floor").T
        parts += [f"## {split} bpc by byte kind", KIND_NOTE, markdown_table(_formatted(pd.concat([shown, floors])))]
    settings = load_evaluations(runs)
    if len(settings):
        shown = settings.assign(val=[_fmt(v, ".4f") for v in settings.val], test=[_fmt(v, ".4f") for v in settings.test])
        parts += ["## Evaluation settings (`python -m mswa.evaluate`)", markdown_table(shown.astype(str))]
    return "\n\n".join(parts)


def _formatted(table: pd.DataFrame) -> pd.DataFrame:
    """A pivoted table with its index as leading columns and values to 4 decimals."""
    cells = table.apply(lambda column: [_fmt(v, ".4f") for v in column])
    return cells.reset_index().rename(columns={"index": "variant"}).astype(str)


def write_evaluation_plots(runs: pd.DataFrame, out: Path) -> dict[str, Path]:
    paths = {"distance.png": out / "distance.png", "kinds.png": out / "kinds.png"}
    plot_distance(runs).savefig(paths["distance.png"], dpi=100)
    plot_kinds(runs).savefig(paths["kinds.png"], dpi=100)
    return paths


# ---------------------------------------------------------------- common-sense evaluations (lm_eval.json)


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
    record = read_lm_eval(folder / LM_EVAL_FILE)
    results = read_results(folder) if (folder / "results.json").is_file() else {}
    row = {
        "path": str(folder),
        "run_name": results.get("run_name") or name,
        "variant": results.get("variant") or name,
        "seed": results.get("seed"),
        "model": results.get("model") or record.get("model"),
        "schedule": results.get("schedule") or record.get("schedule"),
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
    return _by_variant_and_seed(frame)


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
            "shots": [_fmt(v, "g") for v in table.num_fewshot],
            "seeds": table.seeds,
            "limit": [_fmt(v, "g") for v in table.limit],
            **{c: [_percent(v, e) for v, e in zip(table[c], _spread(table, c))] for c in accuracy_columns(table)},
        }
    )
    return shown.loc[:, (shown != "").any(axis=0)]


def lm_eval_markdown(table: pd.DataFrame) -> str:
    notes = [
        (
            "Accuracy in % per task, as `task/metric` (lm_eval's `acc_norm` where the task reports it, else `acc`), "
            "and their unweighted average. ±: lm_eval's standard error for a single evaluation (for the average, "
            "the tasks' combined as independent); the sample std (n-1) over seeds where a variant has several."
        )
    ]
    if table[accuracy_columns(table)].isna().any(axis=None):
        notes.append("Not every row has every task: an average covers only the tasks of its row.")
    if table.limit.notna().any():
        notes.append("limit: examples per task (a smoke evaluation, not comparable with full ones).")
    return "\n\n".join(
        [
            "## Common-sense reasoning (lm_eval)",
            *notes,
            markdown_table(lm_eval_markdown_frame(table)),
            "![lm_eval accuracy](lm_eval.png)",
        ]
    )


def plot_lm_eval(table: pd.DataFrame) -> Figure:
    """Grouped bars: one group per task and the average, one bar per row of ``lm_eval_table``; error bars are
    the table's ± (stderr, or std over seeds)."""
    columns = accuracy_columns(table)
    fig, (ax,) = _new_figure(1, (max(6.0, 0.25 * len(columns) * len(table) + 2.0), 4.5))
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
    _finish_axes(ax, "lm_eval accuracy (error bars: stderr, or std over seeds)", "task", "accuracy (%)")
    return fig


# ---------------------------------------------------------------- report folder


def write_report(runs: pd.DataFrame, out: str | Path, title: str, evals: pd.DataFrame | None = None) -> dict[str, Path]:
    """summary.md in ``out``, with summary.csv, curves.png, budget.png and windows.png when there are runs
    and lm_eval.csv and lm_eval.png when there are evaluations (``load_lm_eval``); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary.md": out / "summary.md"}
    markdown = f"# Report: {title}\n\nNo training runs (results.json).\n"
    if len(runs):
        run_paths, markdown = _write_runs(runs, out, title)
        paths.update(run_paths)
    if evals is not None and len(evals):
        eval_paths, eval_markdown = _write_lm_eval(evals, out)
        paths.update(eval_paths)
        markdown += "\n" + eval_markdown + "\n"
    paths["summary.md"].write_text(markdown)
    return paths


def _write_runs(runs: pd.DataFrame, out: Path, title: str) -> tuple[dict[str, Path], str]:
    """The runs' CSV and plots written to ``out`` (their paths), and the runs' markdown."""
    paths = {name: out / name for name in ("summary.csv", "curves.png", "budget.png", "windows.png")}
    common = common_overrides(runs.variant)
    labelled = runs.assign(variant=[short_variant(v, common) for v in runs.variant])  # legends as short as the table
    for name, plot in (("curves.png", plot_curves), ("budget.png", plot_budget), ("windows.png", plot_windows)):
        plot(labelled).savefig(paths[name], dpi=100)
    paths |= write_evaluation_plots(labelled, out)
    table, failed = summary_table(runs), failed_runs(runs)
    csv = pd.concat([table.assign(status="finished"), failed.rename(columns={"seed": "seeds"})], ignore_index=True)
    csv.to_csv(paths["summary.csv"], index=False)
    return paths, summary_markdown(runs, table, failed, title)


def _write_lm_eval(evals: pd.DataFrame, out: Path) -> tuple[dict[str, Path], str]:
    """lm_eval.csv (fractions, not %) and lm_eval.png written to ``out`` (their paths), and their markdown."""
    paths = {name: out / name for name in ("lm_eval.csv", "lm_eval.png")}
    table = lm_eval_table(evals)
    table.to_csv(paths["lm_eval.csv"], index=False)
    plot_lm_eval(table).savefig(paths["lm_eval.png"], dpi=100)
    return paths, lm_eval_markdown(table)


def summary_markdown(runs: pd.DataFrame, table: pd.DataFrame, failed: pd.DataFrame, title: str) -> str:
    n_finished = int((runs.status == "finished").sum())
    no_curve = int(sum(h is None for h in runs.history[runs.status == "finished"]))
    common = common_overrides(runs.variant)
    paired = paired_markdown(runs, table, common)  # before the names are shortened: it reads the runs by variant
    table = table.assign(variant=[short_variant(v, common) for v in table.variant],
                         reference=[short_variant(v, common) for v in table.reference])
    failed = failed.assign(variant=[short_variant(v, common) for v in failed.variant])
    parts = [
        f"# Report: {title}",
        f"{len(runs)} runs: {n_finished} finished, {len(failed)} failed or unfinished (listed below, not averaged).",
        "val / test: final metric (bpc: bits per byte, ppl: perplexity per word; lower is better), "
        "mean ± sample std (n-1) over the finished seeds of each variant.",
        REFERENCE_RULE,
        BUDGET_NOTE,
    ]
    if common:
        parts.append("Overrides common to all runs (left out of the variant names below): " + ", ".join(f"`{o}`" for o in common))
    parts.append(markdown_table(summary_markdown_frame(table)) if len(table) else "No finished runs.")
    if no_curve:
        parts.append(f"Note: {no_curve} finished run(s) have no metrics.csv, so they are missing from curves.png.")
    if paired:
        parts.append(paired)
    parts.append("## Failed or unfinished runs")
    parts.append(markdown_table(failed.astype("string").fillna("")) if len(failed) else "None.")
    refused = refused_attempts(runs)
    if len(refused):
        parts.append("## Refused attempts (each left its run folder as it was)")
        parts.append(markdown_table(refused.astype("string").fillna("")))
    if section := evaluation_markdown(runs.assign(variant=[short_variant(v, common) for v in runs.variant])):
        parts.append(section)
    parts.append(
        "## Plots\n\n![validation curves](curves.png)\n\n![metric vs budget](budget.png)\n\n![windows](windows.png)"
        "\n\n![metric by context offered](distance.png)\n\n![bpc by byte kind](kinds.png)"
    )
    return "\n\n".join(parts) + "\n"


def default_out(dirs: Sequence[str], wandb_path: str | None) -> Path:
    """reports/<parent>_<name> of the first DIR (a Hydra sweep's <date>_<time>), or reports/<project>."""
    if wandb_path:
        return Path("reports") / wandb_path.strip("/").split("/")[-1]
    first = Path(dirs[0]).resolve()
    return Path("reports") / f"{first.parent.name}_{first.name}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mswa.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="folders searched recursively for runs")
    parser.add_argument("--out", help="output folder (default: reports/<parent>_<name> of the first DIR)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from the W&B API instead of DIRs")
    args = parser.parse_args(argv)
    if bool(args.dirs) == bool(args.wandb):
        parser.error("pass either run folders (DIR ...) or --wandb ENTITY/PROJECT, not both and not neither")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        evals = load_lm_eval(args.dirs)  # no DIRs with --wandb: none
        runs = load_wandb_runs(args.wandb) if args.wandb else load_runs(args.dirs, allow_empty=len(evals) > 0)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out(args.dirs, args.wandb)
    paths = write_report(runs, out, title=args.wandb or ", ".join(args.dirs), evals=evals)
    print(paths["summary.md"].read_text())
    for path in paths.values():
        print(f"wrote {path}")
    n_evals = f" and {len(evals)} lm_eval evaluations" if len(evals) else ""
    print(f"report of {len(runs)} runs{n_evals} written in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
