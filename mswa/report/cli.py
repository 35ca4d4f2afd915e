"""``python -m mswa.report``: read runs (folders or W&B) and evaluations, write the report folder.

python -m mswa.report DIR [DIR ...] [--out OUT]
python -m mswa.report --wandb ENTITY/PROJECT [--out OUT]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from mswa.atomic import write_atomic
from mswa.folders import FolderError, check_folder
from mswa.report.lm_eval import lm_eval_markdown, lm_eval_table, load_lm_eval, plot_lm_eval
from mswa.report.markdown import common_overrides, shortened, summary_markdown
from mswa.report.plots import plot_budget, plot_curves, plot_distance, plot_kinds, plot_lengths, plot_windows
from mswa.report.runs import ReportError, load_runs
from mswa.report.tables import failed_runs, length_table, summary_table
from mswa.report.wandb import load_wandb_runs

RUN_PLOTS = {
    "curves.png": plot_curves,
    "budget.png": plot_budget,
    "windows.png": plot_windows,
    "distance.png": plot_distance,
    "kinds.png": plot_kinds,
}
DPI = 100


def write_report(runs: pd.DataFrame, out: str | Path, title: str, evals: pd.DataFrame | None = None) -> dict[str, Path]:
    """summary.md in ``out``, with summary.csv and the plots of ``RUN_PLOTS`` when there are runs, and
    lm_eval.csv and lm_eval.png when there are evaluations (``load_lm_eval``); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary.md": out / "summary.md"}
    markdown = f"# Report: {title}\n\nNo training runs (results.json).\n"
    if len(runs):
        run_paths, markdown = write_runs(runs, out, title)
        paths.update(run_paths)
    if evals is not None and len(evals):
        eval_paths, eval_markdown = write_lm_eval(evals, out)
        paths.update(eval_paths)
        markdown += "\n" + eval_markdown + "\n"
    write_atomic(paths["summary.md"], markdown)
    return paths


def write_runs(runs: pd.DataFrame, out: Path, title: str) -> tuple[dict[str, Path], str]:
    """The runs' CSV and plots written to ``out`` (their paths), and the runs' markdown."""
    paths = {"summary.csv": out / "summary.csv"} | {name: out / name for name in RUN_PLOTS}
    labelled = shortened(runs, common_overrides(runs.variant))  # legends as short as the table
    for name, plot in RUN_PLOTS.items():
        save_figure(plot(labelled), paths[name])
    if len(length_table(runs)):  # only runs evaluated at other lengths have this plot
        paths["lengths.png"] = out / "lengths.png"
        save_figure(plot_lengths(labelled), paths["lengths.png"])
    table, failed = summary_table(runs), failed_runs(runs)
    csv = pd.concat([table.assign(status="finished"), failed.rename(columns={"seed": "seeds"})], ignore_index=True)
    write_atomic(paths["summary.csv"], csv.to_csv(index=False))
    return paths, summary_markdown(runs, table, failed, title)


def save_figure(figure: Figure, path: Path) -> None:
    """A figure as PNG, written whole or not at all (a report rewritten over an old one never leaves half a plot)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI)
    write_atomic(path, buffer.getvalue())


def write_lm_eval(evals: pd.DataFrame, out: Path) -> tuple[dict[str, Path], str]:
    """lm_eval.csv (fractions, not %) and lm_eval.png written to ``out`` (their paths), and their markdown."""
    paths = {name: out / name for name in ("lm_eval.csv", "lm_eval.png")}
    table = lm_eval_table(evals)
    write_atomic(paths["lm_eval.csv"], table.to_csv(index=False))
    save_figure(plot_lm_eval(table), paths["lm_eval.png"])
    return paths, lm_eval_markdown(table)


def default_out(dirs: Sequence[str], wandb_path: str | None) -> Path:
    """reports/<parent>_<name> of the first DIR (a Hydra sweep's <date>_<time>), or reports/<project>."""
    if wandb_path:
        return Path("reports") / wandb_path.strip("/").split("/")[-1]
    first = Path(dirs[0]).resolve()
    return Path("reports") / f"{first.parent.name}_{first.name}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mswa.report",
        description="Comparison report: run folders (or a W&B project) -> one table row per variant, plus plots.",
    )
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="folders searched recursively for runs")
    parser.add_argument("--out", help="output folder (default: reports/<parent>_<name> of the first DIR)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from the W&B API instead of DIRs")
    parser.add_argument(
        "--setting", metavar="NAME", help="compare the runs at an evaluation setting of mswa.evaluate (e.g. L4096_stride2048_best)"
    )
    args = parser.parse_args(argv)
    if bool(args.dirs) == bool(args.wandb):
        parser.error("pass either run folders (DIR ...) or --wandb ENTITY/PROJECT, not both and not neither")
    if args.setting and args.wandb:
        parser.error("--setting reads evaluation files in run folders; pass DIRs, not --wandb")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 when the report is written, 2 (and one line on stderr) for input it cannot use."""
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out) if args.out else default_out(args.dirs, args.wandb)
    try:
        check_folder("--out", out)
        evals = load_lm_eval(args.dirs)  # no DIRs with --wandb: none
        runs = load_wandb_runs(args.wandb) if args.wandb else load_runs(args.dirs, allow_empty=len(evals) > 0, setting=args.setting)
    except (FolderError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    title = (args.wandb or ", ".join(args.dirs)) + (f" at evaluation setting {args.setting}" if args.setting else "")
    paths = write_report(runs, out, title=title, evals=evals)
    print(paths["summary.md"].read_text())
    for path in paths.values():
        print(f"wrote {path}")
    n_evals = f" and {len(evals)} lm_eval evaluations" if len(evals) else ""
    print(f"report of {len(runs)} runs{n_evals} written in {time.perf_counter() - start:.1f} s")
    return 0
