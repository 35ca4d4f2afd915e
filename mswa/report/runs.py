"""Run folders -> one row per run: what a run folder holds and how the report reads it.

A run is a folder holding ``results.json`` (written by ``train.py``) and ``metrics.csv`` (Lightning's
CSVLogger), found anywhere below the folders given, so a Hydra multirun folder works as is. A Hydra job
folder (``.hydra/overrides.yaml``) with no ``results.json`` is a job that died before the end: it is
listed with status ``no results``, never dropped. A run still marked running whose process is gone or
silent reads ``stopped``; a second finished run of one config and seed reads ``duplicate``.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import yaml

from mswa.sweeps import comparison_id, schedule_rule, variant_id, variant_name

SCHEMA = 1
RESULTS_FILE, HISTORY_FILE, ATTEMPTS_FILE = "results.json", "metrics.csv", "attempts.jsonl"
LM_EVAL_FILE = "lm_eval.json"  # mswa.hf.evaluate.RESULTS_FILE; not imported, that module needs torch
NO_RESULTS = "no results"  # status of a Hydra job folder that never wrote results.json
STOPPED = "stopped"  # results.json (or an attempt's line) says running, but its process is gone or silent
UNKNOWN = "unknown"  # an attempt's line says running, on another machine: killed there, or still running
REFUSED = "refused"  # an attempt that left the run folder as it was
DUPLICATE = "duplicate"  # status of a finished run whose variant and seed another run already has
SILENT_HEARTBEATS = 5  # missed heartbeats after which a run on another machine counts as stopped
SEED_KEYS = ("seed", "+seed", "++seed")

# results.json keys copied as they are into a run's row
RESULT_KEYS = (
    "run_name",
    "variant",
    "seed",
    "status",
    "error",
    "dataset",
    "data_source",
    "unit",
    "metric",
    "model",
    "schedule",
    "window",
    "windows",
    "n_params",
    "entropy_floor_bpb",
    "tokens_per_s",
    "mfu",
    "steps",
    "wall_time_s",
    "git_commit",
    "overrides",
    "evaluation",
)
BUDGET_KEYS = ("seq_len", "mean_window_over_w", "attended_pairs", "pairs_vs_swa", "pairs_vs_full")
# from the stored config (mswa.sweeps): one variant whatever the folder or overrides; the rule of its schedule
CONFIG_COLUMNS = ("variant_id", "comparison_id", "schedule_rule")
RUN_COLUMNS = ("path", *RESULT_KEYS, *BUDGET_KEYS, *CONFIG_COLUMNS, "val", "test", "history")
NUMERIC_RUN_COLUMNS = (
    "seed",
    "window",
    "n_params",
    "entropy_floor_bpb",
    "tokens_per_s",
    "mfu",
    "steps",
    "wall_time_s",
    *BUDGET_KEYS,
    "val",
    "test",
)
INTEGER_RUN_COLUMNS = ("seed", "window", "n_params", "steps", "seq_len", "attended_pairs")
ATTEMPT_COLUMNS = ("started", "ended", "status", "path", "error", "overrides")


class ReportError(ValueError):
    """Input the report cannot use; the message names the value and the fix."""


def load_runs(dirs: Sequence[str | Path], allow_empty: bool = False, setting: str | None = None) -> pd.DataFrame:
    """One row per run found below ``dirs`` (columns ``RUN_COLUMNS``), sorted by variant then seed.
    ``allow_empty``: no rows rather than an error (the dirs hold evaluations, lm_eval.json, only).
    ``setting``: each run's metrics and evaluation sections come from its ``evaluation_<setting>.json``
    (written by ``python -m mswa.evaluate``, e.g. ``L4096_stride2048_best``) instead of its training's own final
    evaluation, so every table, interval and plot compares the runs at that setting."""
    if setting is not None and (not setting or Path(setting).name != setting):
        raise ReportError(f"--setting {setting!r} must be the name of an evaluation, e.g. L4096_stride2048_best")
    missing = [str(d) for d in dirs if not Path(d).is_dir()]
    if not dirs or missing:
        raise ReportError(
            f"run folder(s) {missing or '(none given)'} not found; pass existing sweep output folders, e.g. multirun/<date>/<time>"
        )
    results_dirs, job_dirs = find_run_folders(dirs)
    if not results_dirs and not job_dirs and not allow_empty:
        raise ReportError(
            f"no {RESULTS_FILE} or Hydra job folder (.hydra/overrides.yaml) found below {[str(d) for d in dirs]}, "
            f"and no {LM_EVAL_FILE} either; pass the folder a sweep (or `python -m mswa.hf.evaluate --out`) wrote into"
        )
    rows = [row_from_results(results := at_setting(read_results(d), d, setting), str(d), read_history(d, results)) for d in results_dirs]
    rows += [row_from_hydra_job(d) for d in job_dirs]
    return runs_frame(rows)


def find_run_folders(dirs: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(folders with results.json, Hydra job folders without one); nested copies of a run are skipped."""
    results_dirs = outermost_folders(dirs, RESULTS_FILE)
    jobs = {p.parent.parent.resolve() for d in dirs for p in Path(d).rglob("overrides.yaml") if p.parent.name == ".hydra"}
    has_results = set(results_dirs).union(*(r.parents for r in results_dirs))
    return results_dirs, sorted(jobs - has_results)


def outermost_folders(dirs: Iterable[str | Path], filename: str) -> list[Path]:
    """Folders below ``dirs`` holding ``filename``, except those inside another one (e.g. a W&B copy)."""
    found = {p.parent.resolve() for d in dirs for p in Path(d).rglob(filename)}
    return sorted(f for f in found if not any(parent in found for parent in f.parents))


def read_results(run_dir: Path) -> dict:
    """results.json as a dict; an unreadable file becomes a failed run rather than stopping the report."""
    path = run_dir / RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return {"status": "failed", "error": f"{RESULTS_FILE} is not valid JSON ({err})", "run_name": run_dir.name}
    if results.get("schema") != SCHEMA:
        raise ReportError(
            f"{path} has schema={results.get('schema')!r}, this report reads schema={SCHEMA}; use the mswa version that wrote the runs"
        )
    return results


def at_setting(results: dict, run_dir: Path, setting: str | None) -> dict:
    """The run's results with metrics and evaluation sections of ``evaluation_<setting>.json``; a finished run
    without that file becomes a failed row that names the command to write it."""
    if setting is None or results.get("status") != "finished":
        return results
    path = run_dir / f"evaluation_{setting}.json"
    if not path.is_file():
        fix = f"python -m mswa.evaluate 'run_dir=\"{run_dir}\"' with that setting"
        return results | {"status": "failed", "error": f"no {path.name}; write it with {fix}"}
    evaluation = json.loads(path.read_text())
    return results | {"metrics": evaluation["metrics"], "evaluation": evaluation["evaluation"]}


def read_history(run_dir: Path, results: Mapping) -> pd.DataFrame | None:
    """The run's metrics.csv (sparse: one row per logging step) at the optimizer steps its weights had taken, or
    None when the run has none."""
    path = run_dir / HISTORY_FILE
    return at_steps_done(pd.read_csv(path), results) if path.is_file() else None


def at_steps_done(history: pd.DataFrame, results: Mapping) -> pd.DataFrame:
    """A history whose every metric sits at the number of optimizer steps of the weights it measured. Runs written
    before results.json said ``step_convention`` logged validation during training one step early (at the index of
    the step's batch: 124 for the weights of step 125) and the final evaluation at the last step: their in-training
    validation rows, those before ``steps``, move one step on."""
    if results.get("step_convention") or "step" not in history:
        return history
    validation = history.filter(regex=r"^val/").notna().any(axis=1)
    final = results.get("steps")
    early = validation & (history["step"] < final if final is not None else True)
    return history.assign(step=history["step"] + early.astype(int))


def row_from_results(results: Mapping, path: str, history: pd.DataFrame | None) -> dict:
    """A run's row from its results dict; a 'finished' run without its final metrics counts as failed."""
    row = dict.fromkeys(RUN_COLUMNS)
    row.update({key: results.get(key) for key in RESULT_KEYS})
    row.update({key: (results.get("budget") or {}).get(key) for key in BUDGET_KEYS})
    metrics, metric = results.get("metrics") or {}, results.get("metric")
    row.update(path=path, history=history, val=metrics.get(f"val/{metric}"), test=metrics.get(f"test/{metric}"))
    row.update(config_columns(results))
    if row["status"] == "finished" and (row["val"] is None or row["test"] is None):
        row.update(status="failed", error=f"status is finished but metrics lack val/{metric} or test/{metric}")
    if row["status"] == "running" and (why := why_stopped(results.get("process") or {})):
        row.update(status=STOPPED, error=why)
    return row


def schedule_of(results: Mapping) -> tuple[str | None, str | None]:
    """(schedule name, rule) of a run: the name is the schedule file's, the rule (``kind``) what it applies.

    Two layouts: a config with ``window_schedule.kind`` names its file in ``window_schedule.name``; an older
    one holds only the rule in ``window_schedule.name``, and the file (Hydra's choice) in results' ``schedule``."""
    schedule = (results.get("config") or {}).get("window_schedule")
    if not isinstance(schedule, Mapping):
        return results.get("schedule"), None
    name = schedule.get("name") if "kind" in schedule else results.get("schedule") or schedule.get("name")
    return name, schedule_rule(results["config"])


def config_columns(results: Mapping) -> dict:
    """``CONFIG_COLUMNS`` and the schedule's name of a run, from its stored resolved config (ids None for a
    config too partial to identify)."""
    name, rule = schedule_of(results)
    config = results.get("config")
    if not isinstance(config, Mapping) or not {"model", "window_schedule", "dataset"} <= config.keys():
        return dict.fromkeys(CONFIG_COLUMNS) | {"schedule": name}
    return {"variant_id": variant_id(config), "comparison_id": comparison_id(config), "schedule_rule": rule, "schedule": name}


def why_stopped(process: Mapping, now: datetime.datetime | None = None) -> str | None:
    """Why a run whose results.json still says running has in fact stopped without a word (killed, machine
    lost), or None while it may be alive: its process is gone from this machine, or its heartbeat is silent."""
    pid, host, every = process.get("pid"), process.get("host"), process.get("heartbeat_every_s")
    resume = "resume it with ckpt_path=last"
    if pid and host == socket.gethostname() and not _alive(pid):
        return f"its process ({pid} on {host}) ended without recording an end (killed?); {resume}"
    beat = process.get("heartbeat") or process.get("started")
    if beat and every:
        now = now or datetime.datetime.now(datetime.UTC)
        silent = (now - datetime.datetime.fromisoformat(beat)).total_seconds()
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
    """A job that never wrote results.json, named from the overrides Hydra saved for it, as train.py names one."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    logs = sorted(p.name for p in job_dir.glob("*.log"))
    row = dict.fromkeys(RUN_COLUMNS)
    row.update(
        path=str(job_dir),
        run_name=",".join(overrides),
        variant=variant_name(overrides, not_in_variant(job_dir)),
        seed=seed_of(overrides),
        overrides=overrides,
        status=NO_RESULTS,
        error=f"no {RESULTS_FILE}: the job stopped before writing it" + (f" (see {', '.join(logs)})" if logs else ""),
    )
    return row


def not_in_variant(job_dir: Path) -> list[str]:
    """The override keys the job's Hydra config leaves out of run names (paths, hardware, ...): none without one."""
    path = job_dir / ".hydra" / "hydra.yaml"
    hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {}) if path.is_file() else {}
    return ((hydra.get("job") or {}).get("config") or {}).get("override_dirname", {}).get("exclude_keys") or []


def seed_of(overrides: Iterable[str]) -> int | None:
    seeds = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] in SEED_KEYS]
    return int(seeds[0]) if seeds else None


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """Run rows as a typed frame, runs of one config under one name, sorted by variant then seed."""
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    for column in NUMERIC_RUN_COLUMNS:
        runs[column] = pd.to_numeric(runs[column])
    for column in INTEGER_RUN_COLUMNS:
        runs[column] = runs[column].astype("Int64")
    return by_variant_and_seed(merge_identical_variants(runs))


def by_variant_and_seed(frame: pd.DataFrame) -> pd.DataFrame:
    order = sorted(range(len(frame)), key=lambda i: (natural_key(str(frame.variant[i])), _seed_key(frame.seed[i])))
    return frame.iloc[order].reset_index(drop=True)


def natural_key(text: str) -> list:
    """Sort key that puts window=64 before window=128."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _seed_key(seed) -> tuple:
    return (pd.isna(seed), 0 if pd.isna(seed) else seed)


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


def attempts(runs: pd.DataFrame) -> pd.DataFrame:
    """Every attempt on the runs' folders (attempts.jsonl, written by train.py beside results.json: a line when an
    attempt starts, replaced by how it ended). A line still ``running`` reads ``stopped`` when its process is gone
    from this machine (killed before it could record its end), ``unknown`` when it ran on another one."""
    rows = []
    for path in runs.path:
        log = Path(str(path)) / ATTEMPTS_FILE
        lines = log.read_text().splitlines() if log.is_file() else []
        for attempt in (json.loads(line) for line in lines if line.strip()):
            overrides = ",".join(attempt.get("overrides") or [])
            rows.append({**attempt, **attempt_end(attempt), "path": str(path), "overrides": overrides})
    return pd.DataFrame(rows, columns=list(ATTEMPT_COLUMNS))


def attempt_end(attempt: Mapping) -> dict:
    """How an attempt ended: as its line says, or for a line still ``running``, whether its process is alive."""
    if attempt.get("status") != "running":
        return {}
    pid, host = attempt.get("pid"), attempt.get("host")
    if host != socket.gethostname():
        return {"status": UNKNOWN, "error": f"no end recorded; its process ({pid} on {host}) was killed or still runs there"}
    if not _alive(pid):
        return {"status": STOPPED, "error": f"its process ({pid}) ended without recording an end (killed?)"}
    return {}


def refused_attempts(runs: pd.DataFrame) -> pd.DataFrame:
    """Attempts that were refused and left the run as it was: a start into a folder holding a run, a resume whose
    checkpoint failed to load."""
    recorded = attempts(runs)
    return recorded[recorded.status == REFUSED].reset_index(drop=True)
