"""Paired t-intervals against a hand computation."""

import math

import pytest

from mswa.stats import BETTER, ONE_PAIR, UNDECIDED, WORSE, paired_difference

# t quantile for 95% two-sided with 2 degrees of freedom, from a printed table
T_975_DF2 = 4.302653


def test_interval_matches_hand_computation():
    variant = {0: 1.10, 1: 1.20, 2: 1.05, 7: 9.0}  # seed 7 has no partner: ignored
    reference = {0: 1.20, 1: 1.25, 2: 1.20, 3: 0.5}
    # differences -0.10, -0.05, -0.15: mean -0.10, sd 0.05, half width t * 0.05 / sqrt(3)
    half = T_975_DF2 * 0.05 / math.sqrt(3)
    result = paired_difference(variant, reference)
    assert result.n_pairs == 3
    assert result.mean == pytest.approx(-0.10, abs=1e-12)
    assert result.low == pytest.approx(-0.10 - half, abs=1e-6)
    assert result.high == pytest.approx(-0.10 + half, abs=1e-6)
    assert result.verdict == UNDECIDED  # half = 0.124 > 0.10: the interval crosses 0


def test_verdict_flips_when_the_interval_leaves_zero():
    reference = {0: 1.0, 1: 1.0, 2: 1.0}
    tight = {0: 0.90, 1: 0.91, 2: 0.89}  # mean -0.10, sd 0.01: half width 0.025
    assert paired_difference(tight, reference).verdict == BETTER
    assert paired_difference(reference, tight).verdict == WORSE
    loose = {0: 0.80, 1: 1.00, 2: 0.90}  # mean -0.10, sd 0.10: half width 0.25
    assert paired_difference(loose, reference).verdict == UNDECIDED


def test_one_pair_has_no_interval_and_no_pair_is_none():
    one = paired_difference({0: 1.0}, {0: 2.0, 1: 2.0})
    assert one.mean == -1.0 and math.isnan(one.low) and one.verdict == ONE_PAIR
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    assert paired_difference({0: math.nan}, {0: 1.0}) is None
