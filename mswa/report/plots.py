"""Run rows -> figures: training curves, metric against attention budget, window schedules, metric by context
offered, bpc by byte kind. Each is a pyplot-free Agg figure (no global state, safe in scripts and notebooks);
legends sit below the panels, in room added for them, so they never cover the data."""

from __future__ import annotations

import itertools
import textwrap

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from mswa.report.tables import distance_table, finished_runs, kind_table, length_table, summary_table

TITLE_WIDTH = 40  # characters per line of a window panel's title (variant names wrap at commas)
LEGEND_ROW_INCHES = 0.16  # height of one legend entry at LEGEND_FONT_SIZE, added to the figure below its panels
LEGEND_FONT_SIZE = 7


def new_figure(n_panels: int, panel_size: tuple[float, float], ncols: int | None = None, legend_rows: int = 0) -> tuple[Figure, list]:
    """An Agg figure with a row-major grid of ``n_panels`` panels of ``panel_size`` inches, and room below them
    for a legend of ``legend_rows`` entries (``add_legend``)."""
    ncols = ncols or n_panels
    nrows = -(-n_panels // ncols)
    height = panel_size[1] * nrows + (LEGEND_ROW_INCHES * (legend_rows + 1) if legend_rows else 0)
    fig = Figure(figsize=(panel_size[0] * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def finish_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
    """Title, labels and grid; a "no data" note when nothing labelled was drawn."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if not ax.get_legend_handles_labels()[0]:
        ax.text(0.5, 0.5, "no data (no finished run logged it)", ha="center", va="center", transform=ax.transAxes)


def add_legend(fig: Figure) -> Figure:
    """One legend of every labelled artist of the figure's panels, below them (outside the data)."""
    entries = {label: handle for ax in fig.axes for handle, label in zip(*ax.get_legend_handles_labels())}
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", fontsize=LEGEND_FONT_SIZE)
    return fig


def metrics_of(frame: pd.DataFrame) -> list[str]:
    return sorted(frame.metric.dropna().unique())


def plot_curves(runs: pd.DataFrame) -> Figure:
    """Validation (solid) and training (dashed) metric against step, both in the metric's unit (train/loss
    converted: bpc = loss / ln 2, ppl = exp(loss)): mean over the finished seeds of each variant, band ± std.
    The y axis ends a little above the highest validation mean, so that the first training steps (several
    times the final loss) do not squash the part of the curves where variants differ."""
    finished = finished_runs(runs)
    metrics = metrics_of(finished) or ["bpc"]
    legend_rows = 2 * finished.variant.nunique() + finished.entropy_floor_bpb.nunique()
    fig, axes = new_figure(len(metrics), (6.0, 4.2), legend_rows=legend_rows)
    for ax, metric in zip(axes, metrics):
        highest_val = []
        for variant, group in finished[finished.metric == metric].groupby("variant", sort=False):
            color = None
            for column, style in ((f"val/{metric}", "-"), ("train/loss", "--")):
                color, highest = _mean_curve(ax, variant, group.history, column, metric, style, color)
                if column.startswith("val/") and highest is not None:
                    highest_val.append(highest)
        if highest_val:
            ax.set_ylim(top=1.1 * max(highest_val))
        if metric == "bpc":
            for floor in finished.entropy_floor_bpb.dropna().unique():
                ax.axhline(floor, color="black", linestyle=":", linewidth=1, label=f"entropy floor {floor:.3f}")
                ax.set_ylim(bottom=min(ax.get_ylim()[0], 0.9 * floor))
        finish_axes(ax, f"{metric}: val (solid), train (dashed)", "step", metric)
    return add_legend(fig)


def _mean_curve(ax, variant: str, histories: pd.Series, column: str, metric: str, style: str, color):
    """The mean ± std over seeds of one logged ``column``; returns the colour used (the variant's next line's)
    and the highest mean (None when no run logged it)."""
    curves = [_in_unit(h[["step", column]].dropna(), column, metric) for h in histories if h is not None and column in h]
    if not curves:
        return color, None
    stats = pd.concat(curves).groupby("step")["value"].agg(["mean", "std"])
    label = f"{variant} {column.split('/')[0]} (n={len(curves)})"
    (line,) = ax.plot(stats.index, stats["mean"], style, color=color, label=label)
    ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], color=line.get_color(), alpha=0.2)
    return line.get_color(), float(stats["mean"].max())


def _in_unit(curve: pd.DataFrame, column: str, metric: str) -> pd.DataFrame:
    """A logged curve as column ``value`` in the metric's unit (train/loss is in nats per token), one value per step:
    the last logged there (at a step validated during training and then evaluated in full at the end, the full pass)."""
    curve = curve.drop_duplicates("step", keep="last")
    values = curve[column]
    if column == "train/loss":
        values = values / np.log(2) if metric == "bpc" else np.exp(values)
    return pd.DataFrame({"step": curve["step"], "value": values})


def plot_budget(runs: pd.DataFrame, split: str = "test") -> Figure:
    """Final ``split`` metric (mean ± std over seeds) of each variant against attended pairs relative to full
    attention, one marker colour per variant.

    The x axis is pairs / full rather than pairs / SWA so that full attention (x = 1) and SWA at different
    base windows share one axis.
    """
    table = summary_table(runs)
    metrics = metrics_of(table)
    fig, axes = new_figure(max(1, len(metrics)), (6.0, 4.5), legend_rows=len(table))
    for ax, metric in zip(axes, metrics):
        for row in table[table.metric == metric].itertuples():
            spread = getattr(row, f"{split}_std")
            ax.errorbar(
                [row.pairs_vs_full], [getattr(row, split)], yerr=[0 if pd.isna(spread) else spread], fmt="o", capsize=3, label=row.variant
            )
        ax.set_xlim(0, 1.05)
        finish_axes(ax, f"{split} {metric} vs attention budget", "attended pairs / full attention", f"{split} {metric}")
    if not metrics:
        finish_axes(axes[0], f"{split} metric vs attention budget", "attended pairs / full attention", split)
    return add_legend(fig)


def plot_windows(runs: pd.DataFrame) -> Figure:
    """Layer x head heatmap of every distinct window schedule (log colour scale, values written in)."""
    schedules = distinct_schedules(runs)
    finite = sorted({w for windows in schedules for layer in windows for w in layer if w is not None})
    norm = LogNorm(vmin=min(finite, default=1), vmax=max(max(finite, default=2), min(finite, default=1) + 1))
    n_head = max((len(windows[0]) for windows in schedules), default=1)
    n_layer = max((len(windows) for windows in schedules), default=1)
    fig, axes = new_figure(
        max(1, len(schedules)),
        (max(3.2, 0.25 * n_head + 1.5), max(2.6, 0.2 * n_layer + 1.4)),
        ncols=min(4, max(1, len(schedules))),
    )
    for ax, (windows, names) in zip(axes, schedules.items()):
        _window_panel(ax, windows, norm, "\n".join(_wrapped(name) for name in names))
    if schedules:
        colorbar = fig.colorbar(axes[0].images[0], ax=axes, label="window (log scale)\ngrey = full causal")
        if len(finite) <= 12:  # label the windows that occur rather than powers of ten
            ticks = _spaced(finite)
            colorbar.set_ticks(ticks, labels=[str(w) for w in ticks])
            colorbar.minorticks_off()
    else:
        finish_axes(axes[0], "windows", "head", "layer")
    return fig


def distinct_schedules(runs: pd.DataFrame) -> dict[tuple, list[str]]:
    """{windows (a tuple per layer): the variants that ran them}, in the order of the runs. A variant whose seeds
    ran different windows (learned spans: each seed learns its own) is named with the seeds of each."""
    seeds: dict[tuple, dict[str, list]] = {}
    for variant, windows, seed in zip(runs.variant, runs.windows, runs.seed):
        if windows:
            seeds.setdefault(tuple(tuple(layer) for layer in windows), {}).setdefault(variant, []).append(seed)
    schedules_of = pd.Series([variant for by_variant in seeds.values() for variant in by_variant]).value_counts()
    return {
        windows: [
            variant if schedules_of[variant] == 1 else f"{variant},seed={','.join(str(s) for s in sorted(ran))}"
            for variant, ran in by_variant.items()
        ]
        for windows, by_variant in seeds.items()
    }


def _wrapped(name: str) -> str:
    """A variant name broken after commas into lines of about ``TITLE_WIDTH`` characters."""
    return "\n".join(textwrap.wrap(str(name).replace(",", ", "), TITLE_WIDTH)).replace(", ", ",")


def _spaced(windows: list[int], ratio: float = 1.25) -> list[int]:
    """Colour-bar ticks for ``windows`` (sorted) at least ``ratio`` apart on the log scale, so labels never overlap."""
    kept = windows[:1]
    for window in windows[1:]:
        if window >= ratio * kept[-1]:
            kept.append(window)
    return kept


def _window_panel(ax, windows: tuple[tuple, ...], norm: LogNorm, title: str) -> None:
    values = np.ma.masked_invalid(np.array([[np.nan if w is None else w for w in layer] for layer in windows], dtype=float))
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
    ax.set(title=title, xlabel="head", ylabel="layer (shallow at top)", xticks=range(values.shape[1]), yticks=range(values.shape[0]))
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


def plot_distance(runs: pd.DataFrame, split: str = "test") -> Figure:
    """The metric by context offered (log axis), one curve per variant and one panel per metric."""
    table = distance_table(runs, split)
    metrics = metrics_of(table) or ["bpc"]
    fig, axes = new_figure(len(metrics), (6.0, 4.2), legend_rows=table.variant.nunique())
    for ax, metric in zip(axes, metrics):
        for variant, group in table[table.metric == metric].groupby("variant", sort=False):
            centre = np.sqrt(group.context_lo.astype(float) * group.context_hi.astype(float))
            ax.plot(centre, group.value, "o-", label=f"{variant} (n={group.n_seeds.max()})")
        ax.set_xscale("log", base=2)
        finish_axes(ax, f"{split} {metric} by context offered", "tokens before the target in its chunk", metric)
    return add_legend(fig)


def plot_kinds(runs: pd.DataFrame, split: str = "test") -> Figure:
    """Grouped bars: one group per byte kind, one bar per variant; the kind's entropy floor marked in black."""
    table = kind_table(runs, split)
    kinds, variants = list(dict.fromkeys(table.kind)), list(dict.fromkeys(table.variant))
    legend_rows = len(variants) + 1 if variants else 0  # the floor's marker too
    fig, (ax,) = new_figure(1, (max(6.0, 0.3 * len(kinds) * max(1, len(variants)) + 2.0), 4.5), legend_rows=legend_rows)
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        rows = table[table.variant == variant].set_index("kind").reindex(kinds)
        x = np.arange(len(kinds)) + (i - (len(variants) - 1) / 2) * width
        ax.bar(x, rows.bpc, width, label=variant)
        ax.scatter(x, rows.floor_bpc, marker="_", s=400 * width, color="black", zorder=3, label="entropy floor" if i == 0 else None)
    ax.set_xticks(np.arange(len(kinds)), kinds)
    finish_axes(ax, f"{split} bits per byte by byte kind", "byte kind", "bpc")
    return add_legend(fig)


def plot_lengths(runs: pd.DataFrame) -> Figure:
    """Test metric against evaluation length (log axis), one line per variant: does a model hold its metric
    beyond the length it was trained at (``length_table``)?"""
    table = length_table(runs)
    metrics = metrics_of(table) or ["bpc"]
    fig, axes = new_figure(len(metrics), (6.0, 4.2), legend_rows=table.variant.nunique())
    for ax, metric in zip(axes, metrics):
        for variant, group in table[table.metric == metric].groupby("variant", sort=False):
            ax.plot(group.seq_len.astype(float), group.test, "o-", label=f"{variant} (n={group.n_seeds.min()})")
        ax.set_xscale("log", base=2)
        finish_axes(ax, f"test {metric} by evaluation length", "evaluation length (tokens per chunk)", metric)
    return add_legend(fig)
