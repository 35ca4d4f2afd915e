"""Paired comparisons of two variants over seeds: mean difference, 95% t-interval, verdict.

A seed fixes the initialisation and the data order of every variant alike, so the runs of two
variants with the same seed are a pair and the seed-to-seed spread cancels in their difference.
Lower is better (loss, bpc, ppl): a difference whose whole interval lies below 0 is "better".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from scipy.stats import t as student_t

LEVEL = 0.95
BETTER, WORSE, UNDECIDED, ONE_PAIR = "better", "worse", "not distinguishable at 95%", "one pair: no interval"


@dataclass(frozen=True)
class PairedDifference:
    """variant - reference over the seeds both have (lower is better)."""

    n_pairs: int
    mean: float
    low: float  # the 95% t-interval of the mean difference; NaN with a single pair
    high: float

    @property
    def verdict(self) -> str:
        if self.n_pairs < 2:
            return ONE_PAIR
        if self.high < 0:
            return BETTER
        if self.low > 0:
            return WORSE
        return UNDECIDED


def paired_difference(variant: Mapping[int, float], reference: Mapping[int, float]) -> PairedDifference | None:
    """The paired difference of two {seed: metric} maps; None when they share no finite seed."""
    seeds = sorted(s for s in variant.keys() & reference.keys() if math.isfinite(variant[s]) and math.isfinite(reference[s]))
    if not seeds:
        return None
    diffs = [variant[s] - reference[s] for s in seeds]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = student_t.ppf(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half)
