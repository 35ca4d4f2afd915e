"""A W&B project -> the same run rows as run folders give (``python -m mswa.report --wandb ENTITY/PROJECT``).

train.py mirrors its results dict into the W&B run summary under ``results``; a run without it (crashed
early) is listed with its W&B state.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from mswa.report.runs import ReportError, at_steps_done, row_from_results, runs_frame, seed_of, variant_name

WANDB_STATUS = {
    "finished": "finished",
    "running": "running",
    "failed": "failed",
    "crashed": "failed",
    "killed": "failed",
    "preempting": "preempted",  # marked by a run stopped by SIGTERM / SIGUSR1, until its requeued attempt resumes it
}


def load_wandb_runs(project_path: str, api=None) -> pd.DataFrame:
    """Runs of a W&B project as the same frame as ``load_runs``; ``api``: a ``wandb.Api`` (made when None)."""
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
        return row_from_results(results, run.url, history if history is None else at_steps_done(history, results))
    names = run.name.split(",")
    results = {
        "run_name": run.name,
        "variant": variant_name(names),
        "seed": seed_of(names),
        "status": WANDB_STATUS.get(run.state, run.state),
        "error": f"W&B state {run.state!r}, no 'results' in summary",
    }
    return row_from_results(results, run.url, history)


def _plain(value):
    """W&B summary sub-dicts -> plain dicts, recursively."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value
