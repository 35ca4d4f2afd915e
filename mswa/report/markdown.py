"""Tables -> the text of summary.md: formatted cells, short variant names, and each section with its note."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

from mswa.report.references import AMBIGUOUS, PAIRED_AGAINST, REFERENCE_RULE
from mswa.report.runs import REFUSED, STOPPED, UNKNOWN, attempts
from mswa.report.tables import PAIRED_SPLIT, distance_table, kind_table, length_table, load_evaluations, paired_table

MEANS_NOTE = (
    "val / test: final metric (bpc: bits per byte, ppl: perplexity per word; lower is better), "
    "mean ± sample std (n-1) over the finished seeds of each variant."
)
BUDGET_NOTE = (
    "pairs / SWA and pairs / full: attended query-key pairs at the run's sequence length, relative to SWA "
    "at the base window and to full causal attention; mean window / w: mean window over all heads and layers."
)
PAIRED_NOTE = (
    "Paired differences (lower is better): for each seed both variants ran, variant minus reference; mean over "
    "the pairs with its 95% t-interval and the verdict (better / worse / not distinguishable at 95%). A seed fixes "
    "initialisation and data order for every variant alike. References come from the stored configs: SWA at w is "
    "the finished variant whose config equals this one's except for its attention (schedule, windowed flag) and "
    "whose schedule is `uniform` at mean window 1; SWA at budget the same with the `uniform` schedule at this "
    "variant's mean window, to the nearest whole window (`uniform_mswa_budget` for `mswa`: 56 = 0.875 w at w = 64 "
    "for mswa's 0.879 w); windows chosen from data (searched, learned, custom) are also paired with `mswa` and, "
    "when they attend no more pairs than it, with mswa's SWA at budget."
)
DISTANCE_NOTE = (
    "Context offered = tokens before the target inside its evaluation chunk (log-spaced buckets), whatever "
    "the windows: how much of the offered context a model uses. Means over the finished seeds of each variant."
)
KIND_NOTE = (
    "Synthetic corpus: bits per byte by what the byte is (word bytes; copies at each scale, named by their "
    "distance back, marker included) beside the entropy floor of that kind on the same split."
)
ATTEMPT_SECTIONS = {  # the attempts summary.md lists, by status
    "Refused attempts (each left its run folder as it was)": (REFUSED,),
    "Attempts that never recorded their end (killed, or running on another machine)": (STOPPED, UNKNOWN),
}
PLOTS = (
    "## Plots\n\n![validation curves](curves.png)\n\n![metric vs budget](budget.png)\n\n![windows](windows.png)"
    "\n\n![metric by context offered](distance.png)\n\n![bpc by byte kind](kinds.png)"
)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of string cells."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += [
        "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def fmt(value, spec: str) -> str:
    """``value`` formatted by ``spec``; empty for a missing value."""
    return "" if value is None or pd.isna(value) else format(value, spec)


def mean_std(mean, std) -> str:
    return fmt(mean, ".4f") + (f" ± {std:.4f}" if pd.notna(std) else "")


def interval(diff, low, high, verdict) -> str:
    """A paired difference as ``+0.0123 [-0.0100, +0.0346] verdict`` (no brackets for a single pair)."""
    if pd.isna(diff):
        return ""
    bounds = f" [{low:+.4f}, {high:+.4f}]" if pd.notna(low) else ""
    return f"{diff:+.4f}{bounds} {verdict}"


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
    if str(variant).startswith(AMBIGUOUS):
        return AMBIGUOUS + " | ".join(short_variant(v, common) for v in variant[len(AMBIGUOUS) :].split(" | "))
    return ",".join(part for part in split_overrides(str(variant)) if part not in common) or "(common only)"


def shortened(frame: pd.DataFrame, common: Sequence[str], columns: Sequence[str] = ("variant",)) -> pd.DataFrame:
    """``frame`` with the variant names in ``columns`` shortened by ``short_variant``."""
    return frame.assign(**{column: [short_variant(v, common) for v in frame[column]] for column in columns})


def summary_markdown_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The summary table formatted for reading; columns empty in every row are left out."""
    shown = pd.DataFrame(
        {
            "variant": table.variant,
            "metric": table.metric,
            "seeds": [f"{n}" + (f" (+{u} unfinished)" if u else "") for n, u in zip(table.n_seeds, table.n_unfinished)],
            "val": [mean_std(m, s) for m, s in zip(table.val, table.val_std)],
            "test": [mean_std(m, s) for m, s in zip(table.test, table.test_std)],
            "Δ val": [fmt(v, "+.4f") for v in table.delta_val],
            "Δ test": [fmt(v, "+.4f") for v in table.delta_test],
            "SWA reference": table.reference.fillna(""),
            **{
                f"{PAIRED_SPLIT} − {against} [95%]": [
                    interval(*cells) for cells in zip(*(table[f"{kind}_{f}"] for f in ("diff", "low", "high", "verdict")))
                ]
                for kind, against in PAIRED_AGAINST.items()
            },
            "pairs / SWA": [fmt(v, ".3f") for v in table.pairs_vs_swa],
            "pairs / full": [fmt(v, ".3f") for v in table.pairs_vs_full],
            "mean window / w": [fmt(v, ".3f") for v in table.mean_window_over_w],
            "params": [fmt(v, ",.0f") for v in table.n_params],
            "tokens/s": [fmt(v, ",.0f") for v in table.tokens_per_s],
            "MFU": [fmt(v, ".1%") for v in table.mfu],
            "steps": [fmt(v, ".0f") for v in table.steps],
            "entropy floor (bits/byte)": [fmt(v, ".4f") for v in table.entropy_floor_bpb],
        }
    )
    return shown.loc[:, (shown != "").any(axis=0)]


def paired_markdown(runs: pd.DataFrame, table: pd.DataFrame, common: Sequence[str] = ()) -> str:
    """The report's section of paired differences (empty when no variant has a reference with shared seeds);
    names shown without the ``common`` overrides."""
    pairs = paired_table(runs, table)
    if pairs.empty:
        return ""
    cells = [interval(*cells) for cells in zip(pairs["diff"], pairs.low, pairs.high, pairs.verdict)]
    shown = shortened(pairs, common, ("variant", "reference")).assign(**{"difference [95% interval] verdict": cells})
    shown = shown[["variant", "against", "reference", "measure", "n_pairs", "difference [95% interval] verdict"]]
    return "\n\n".join(["## Paired differences over seeds", PAIRED_NOTE, markdown_table(shown.astype(str))])


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """A pivoted table with its index as leading columns and values to 4 decimals."""
    cells = table.apply(lambda column: [fmt(v, ".4f") for v in column])
    return cells.reset_index().rename(columns={"index": "variant"}).astype(str)


def distance_markdown(runs: pd.DataFrame, split: str) -> list[str]:
    distance = distance_table(runs, split)
    if not len(distance):
        return []
    distance["context"] = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in zip(distance.context_lo, distance.context_hi)]
    shown = distance.pivot_table(index=["variant", "metric"], columns="context", values="value", sort=False)
    return [f"## {split} metric by context offered", DISTANCE_NOTE, markdown_table(formatted(shown))]


def kind_markdown(runs: pd.DataFrame, split: str) -> list[str]:
    kinds = kind_table(runs, split)
    if not len(kinds):
        return []
    shown = kinds.pivot_table(index="variant", columns="kind", values="bpc", sort=False)
    floors = kinds.groupby("kind", sort=False).floor_bpc.mean().to_frame("entropy floor").T
    return [f"## {split} bpc by byte kind", KIND_NOTE, markdown_table(formatted(pd.concat([shown, floors])))]


def settings_markdown(runs: pd.DataFrame) -> list[str]:
    settings = load_evaluations(runs)
    if not len(settings):
        return []
    shown = settings.assign(val=[fmt(v, ".4f") for v in settings.val], test=[fmt(v, ".4f") for v in settings.test])
    return ["## Evaluation settings (`python -m mswa.evaluate`)", markdown_table(shown.astype(str)), *lengths_markdown(runs)]


def lengths_markdown(runs: pd.DataFrame) -> list[str]:
    """Test metric by evaluation length (the run's own length and the evaluated ones), as a table and the plot."""
    lengths = length_table(runs)
    if not len(lengths):
        return []
    shown = lengths.pivot_table(index="variant", columns="seq_len", values="test", sort=False)
    shown.columns = [f"test at {length:,}" for length in shown.columns]
    return ["### Test metric by evaluation length", markdown_table(formatted(shown)), "![metric by evaluation length](lengths.png)"]


def evaluation_markdown(runs: pd.DataFrame, split: str = "test") -> str:
    """The report's sections on loss by distance, bpc by kind and evaluation settings (empty when no run has them)."""
    return "\n\n".join([*distance_markdown(runs, split), *kind_markdown(runs, split), *settings_markdown(runs)])


def summary_markdown(runs: pd.DataFrame, table: pd.DataFrame, failed: pd.DataFrame, title: str) -> str:
    """summary.md of the runs: counts and notes, the variant table, paired differences, failed runs and
    refused attempts, the evaluation sections, and the plots."""
    common = common_overrides(runs.variant)
    paired = paired_markdown(runs, table, common)  # before the names are shortened: it reads the runs by variant
    names = ("variant", "reference", *(f"{kind}_reference" for kind in PAIRED_AGAINST))
    parts = [*heading(runs, failed, title, common), variants_markdown(shortened(table, common, names))]
    no_curve = int(sum(h is None for h in runs.history[runs.status == "finished"]))
    if no_curve:
        parts.append(f"Note: {no_curve} finished run(s) have no metrics.csv, so they are missing from curves.png.")
    if paired:
        parts.append(paired)
    parts += unfinished_markdown(runs, shortened(failed, common))
    if section := evaluation_markdown(shortened(runs, common)):
        parts.append(section)
    parts.append(PLOTS)
    return "\n\n".join(parts) + "\n"


def heading(runs: pd.DataFrame, failed: pd.DataFrame, title: str, common: Sequence[str]) -> list[str]:
    n_finished = int((runs.status == "finished").sum())
    parts = [
        f"# Report: {title}",
        f"{len(runs)} runs: {n_finished} finished, {len(failed)} failed or unfinished (listed below, not averaged).",
        MEANS_NOTE,
        REFERENCE_RULE,
        BUDGET_NOTE,
    ]
    parts += sources_markdown(runs)
    if common:
        parts.append("Overrides common to all runs (left out of the variant names below): " + ", ".join(f"`{o}`" for o in common))
    return parts


def variants_markdown(table: pd.DataFrame) -> str:
    """The variant table, and a line naming the variants left without an SWA reference (their Δ stays empty)."""
    if not len(table):
        return "No finished runs."
    parts = [markdown_table(summary_markdown_frame(table))]
    if len(alone := table.variant[table.reference.isna()]):
        parts.append(
            f"No SWA reference for {', '.join(f'`{v}`' for v in alone)}: no finished variant of the same "
            "config otherwise has a `uniform` schedule at mean window 1 (or the stored config is missing)."
        )
    return "\n\n".join([*parts, *unpaired_notes(table)])


def unpaired_notes(table: pd.DataFrame) -> list[str]:
    """Why a variant with a reference has no paired difference: the reference is ambiguous, or no seed is shared."""
    notes = []
    for kind, against in PAIRED_AGAINST.items():
        unpaired = table[table[f"{kind}_reference"].notna() & table[f"{kind}_n_pairs"].isna()]
        for variant, reference in zip(unpaired.variant, unpaired[f"{kind}_reference"]):
            why = "two candidates, so no numbers" if str(reference).startswith(AMBIGUOUS) else "no seed in common"
            notes.append(f"No paired difference for `{variant}` against {against} (`{reference}`): {why}.")
    return notes


def unfinished_markdown(runs: pd.DataFrame, failed: pd.DataFrame) -> list[str]:
    """The sections on failed or unfinished runs, and on refused and unended attempts (each only when there are some)."""
    parts = ["## Failed or unfinished runs", markdown_table(failed.astype("string").fillna("")) if len(failed) else "None."]
    recorded = attempts(runs)
    for title, statuses in ATTEMPT_SECTIONS.items():
        if len(rows := recorded[recorded.status.isin(statuses)]):
            parts += [f"## {title}", markdown_table(rows.astype("string").fillna(""))]
    return parts


def sources_markdown(runs: pd.DataFrame) -> list[str]:
    """One line naming each user corpus (dataset=bytes) the runs read: name, size and sha256, so a reader knows the bytes."""
    sources = {(s["name"], s["bytes"], s["sha256"]) for s in runs.data_source if isinstance(s, dict)}
    return [f"Data: `{name}`, {size:,} bytes, sha256 `{digest}`." for name, size, digest in sorted(sources)]
