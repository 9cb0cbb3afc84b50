"""Confidence intervals over seeds, against hand computations and scipy's own interval."""

import math

import pytest
from scipy import stats as sps

from normlab.stats import paired_difference, t_interval


def test_t_interval_of_three_seeds_by_hand():
    iv = t_interval([99.5, 99.6, 99.7])
    # mean 99.6; sample std = sqrt((0.01 + 0 + 0.01) / 2) = 0.1; t(0.975, df=2) = 4.302653
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert iv.n == 3
    assert iv.mean == pytest.approx(99.6, abs=1e-12)
    assert iv.std == pytest.approx(0.1, abs=1e-12)
    assert (iv.low, iv.high) == pytest.approx((99.6 - half, 99.6 + half), abs=1e-9)
    assert iv.half_width == pytest.approx(half, abs=1e-9)


@pytest.mark.parametrize("values, level", [([1.0, 2.0], 0.95), ([3.1, 2.7, 3.3, 2.9, 3.0], 0.9),
                                           ([0.5] * 4 + [0.7], 0.99)])
def test_t_interval_matches_scipy(values, level):
    iv = t_interval(values, level)
    low, high = sps.t.interval(level, len(values) - 1, loc=sps.tmean(values),
                               scale=sps.sem(values))
    assert (iv.low, iv.high) == pytest.approx((low, high), abs=1e-9)


def test_one_seed_has_no_spread_and_errors_are_explicit():
    iv = t_interval([99.4])
    assert iv.mean == 99.4 and math.isnan(iv.std) and math.isnan(iv.low)
    assert not iv.excludes_zero()
    with pytest.raises(ValueError, match="no values"):
        t_interval([])
    with pytest.raises(ValueError, match="confidence level"):
        t_interval([1.0, 2.0], level=1.5)


def test_paired_difference_uses_shared_seeds_and_pairs_them():
    a = {1: 99.60, 2: 99.50, 3: 99.70, 4: 99.9}
    b = {1: 99.50, 2: 99.40, 3: 99.60}  # always exactly 0.1 lower on the shared seeds
    d = paired_difference(a, b)
    assert d.n == 3 and d.mean == pytest.approx(0.1, abs=1e-9)
    assert d.std == pytest.approx(0.0, abs=1e-9) and d.excludes_zero()
    # Unpaired, the same numbers would not separate: each variant's own intervals overlap,
    # because the seed-to-seed spread (0.1) is as large as the difference.
    ia, ib = t_interval([a[s] for s in (1, 2, 3)]), t_interval(list(b.values()))
    assert ia.low < ib.high
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({1: 1.0}, {2: 1.0})
