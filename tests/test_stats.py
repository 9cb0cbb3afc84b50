"""Confidence intervals over seeds, against hand computations and scipy's own interval."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from normlab.stats import bootstrap_share, holm, paired_difference, paired_p_value, t_interval


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


def test_holm_by_hand_and_as_the_step_down_rule():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06
    # (an adjusted p never falls below a smaller p's); NaN is not a test and not counted.
    assert holm([0.01, 0.04, math.nan, 0.03, 0.005]) == pytest.approx(
        [0.03, 0.06, math.nan, 0.06, 0.02], nan_ok=True)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = list(rng.uniform(0, 0.1, rng.integers(1, 12)))
        rejected, m = set(), len(p)
        for k, (value, i) in enumerate(sorted((v, i) for i, v in enumerate(p))):
            if value > 0.05 / (m - k):
                break
            rejected.add(i)
        assert {i for i, a in enumerate(holm(p)) if a <= 0.05} == rejected


def test_paired_p_value_is_scipys_paired_t_test():
    a = {1: 10.2, 2: 11.0, 3: 9.7, 4: 10.9, 7: 99.0}
    b = {1: 9.9, 2: 10.1, 3: 9.8, 4: 10.0, 5: 0.0}
    expected = sps.ttest_rel([10.2, 11.0, 9.7, 10.9], [9.9, 10.1, 9.8, 10.0]).pvalue
    assert paired_p_value(a, b) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(paired_p_value({1: 1.0}, {1: 0.0}))
    assert math.isnan(paired_p_value({1: 1.0, 2: 2.0}, {1: 0.0, 2: 1.0}))  # no spread


def test_bootstrap_share_of_a_loss_won_back():
    small = {1: 20.0, 2: 16.0, 3: 18.0}
    large = {1: 10.0, 2: 10.0, 3: 11.0}
    remedy = {1: 12.0, 2: 13.0, 3: 12.5, 9: 0.0}  # seed 9 has no pair: left out
    share, low, high = bootstrap_share(small, large, remedy)
    # means 18, 10.333, 12.5: (18 - 12.5) / (18 - 10.333) = 0.7174
    assert share == pytest.approx(5.5 / (18 - 31 / 3), rel=1e-12)
    exact = []  # every resample of three seeds, enumerated
    for pick in itertools.product(range(3), repeat=3):
        s = np.mean([small[k + 1] for k in pick])
        la = np.mean([large[k + 1] for k in pick])
        r = np.mean([remedy[k + 1] for k in pick])
        exact.append((s - r) / (s - la))
    assert min(exact) <= low <= share <= high <= max(exact)
    assert low < share < high
    assert bootstrap_share(small, large, remedy) == (share, low, high)  # a fixed seed
    same = {s: 1.0 for s in (1, 2, 3)}
    assert bootstrap_share({k: 3.0 for k in same}, same, {k: 2.0 for k in same}) == \
        pytest.approx((0.5, 0.5, 0.5))
    assert all(math.isnan(v) for v in bootstrap_share({1: 2.0}, {1: 1.0}, {1: 1.5}))


def test_bootstrap_share_where_there_is_no_loss_to_win_back():
    """Batch Norm no worse at few images than at many (a small model or data set): the share
    and its interval are undefined, not an error."""
    small, large = {1: 10.0, 2: 11.0, 3: 9.0}, {1: 12.0, 2: 12.0, 3: 12.0}
    share, low, high = bootstrap_share(small, large, {1: 8.0, 2: 8.0, 3: 8.0})
    assert math.isnan(share) and math.isnan(low) and math.isnan(high)
