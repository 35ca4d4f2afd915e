"""Which variant each variant is compared with, read from the stored configs, never from names.

A variant's comparison (``mswa.sweeps.comparison_id``) is its config minus its attention (schedule and
windowed flag): variants of one comparison differ only in their windows. Among them:

- SWA at w: the variant whose schedule rule (``kind``) is ``uniform`` at mean window 1;
- SWA at budget: the ``uniform`` variant whose mean window is this variant's, to the nearest whole window
  (``uniform_mswa_budget`` for ``mswa``: 56 = 0.875 w at w = 64 for mswa's 0.879 w);
- mswa, for windows chosen from data or given as a table (rule ``custom`` or ``learned``): the ``mswa`` variant
  at mswa's own ratios (mean window (15/16)^2 w). Such a variant that attends no more pairs than that mswa (the
  allocation sweep gives it mswa's budget) has mswa's SWA at budget as its own.

Two candidates for one reference name both (``ambiguous: a | b``) and give no numbers.
"""

from __future__ import annotations

import pandas as pd

UNIFORM = "uniform"  # the schedule rule of sliding window attention
AMBIGUOUS = "ambiguous: "
PAIRED_AGAINST = {"swa": "SWA at w", "budget": "SWA at budget", "mswa": "mswa"}  # the references a variant is paired with
DATA_CHOSEN = ("custom", "learned")  # schedule rules whose windows are a table (searched, learned, or a user's)
MSWA_MEAN_WINDOW = (15 / 16) ** 2  # mean window / w of the mswa rule at its own ratios
PAIRED_KINDS = tuple(PAIRED_AGAINST)

REFERENCE_RULE = (
    "Δ = variant mean minus its SWA reference mean (negative = better). The SWA reference comes from the stored "
    "configs: the finished variant whose config equals this one's except for its attention (schedule, windowed "
    "flag) and whose schedule rule is `uniform` at mean window 1 (SWA at w; SWA's own reference is itself); two "
    "such variants leave Δ empty and name both."
)


def uniform_variants(row, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``table`` of the row's comparison whose schedule rule is ``uniform``."""
    if pd.isna(row.comparison_id):
        return table.iloc[:0]
    return table[(table.comparison_id == row.comparison_id) & (table.schedule_rule == UNIFORM)]


def one_of(names: list[str]) -> str | None:
    """The one name, None for none, and ``ambiguous: a | b`` for several."""
    if len(names) > 1:
        return AMBIGUOUS + " | ".join(names)
    return names[0] if names else None


def swa_reference(row, table: pd.DataFrame) -> str | None:
    """SWA at w of the row's comparison; the row's own variant when it is SWA at w."""
    candidates = uniform_variants(row, table)
    at_w = (pd.to_numeric(candidates.mean_window_over_w) - 1.0).abs() < 1e-9
    return one_of(candidates.variant[at_w].tolist())


def budget_reference(row, table: pd.DataFrame) -> str | None:
    """SWA at the row's mean window, another variant of its comparison (None for a variant at mean window 1); for
    windows chosen from data within mswa's attended pairs, mswa's SWA at budget."""
    mswa = mswa_reference(row, table)
    if mswa is not None and not mswa.startswith(AMBIGUOUS):
        reference = table[table.variant == mswa].iloc[0]
        if row.pairs_vs_swa <= reference.pairs_vs_swa + 1e-9:
            return budget_reference(reference, table)
    if pd.isna(row.mean_window_over_w) or pd.isna(row.window) or abs(row.mean_window_over_w - 1.0) < 1e-9:
        return None
    candidates = uniform_variants(row, table)
    candidates = candidates[candidates.variant != row.variant]
    # a uniform window is a whole number: the nearest to w * mean window is within half a step of it
    gaps = (pd.to_numeric(candidates.mean_window_over_w) - row.mean_window_over_w).abs()
    return one_of(candidates.variant[gaps <= 0.5 / row.window + 1e-9].tolist())


def mswa_reference(row, table: pd.DataFrame) -> str | None:
    """For windows chosen from data (rule custom or learned): the ``mswa`` variant of the row's comparison at mswa's
    own ratios; None for other variants."""
    if row.schedule_rule not in DATA_CHOSEN or pd.isna(row.comparison_id) or pd.isna(row.window):
        return None
    candidates = table[(table.comparison_id == row.comparison_id) & (table.schedule_rule == "mswa")]
    own = (pd.to_numeric(candidates.mean_window_over_w) - MSWA_MEAN_WINDOW).abs() <= 0.5 / row.window
    return one_of(candidates.variant[own].tolist())


def paired_references(row, table: pd.DataFrame) -> dict[str, str | None]:
    """{"swa": SWA at w, "budget": SWA at the row's budget, "mswa": mswa for windows chosen from data} among
    ``table``'s other variants (None: none)."""
    swa = swa_reference(row, table)
    return {"swa": None if swa == row.variant else swa, "budget": budget_reference(row, table), "mswa": mswa_reference(row, table)}
