"""The decision rule ``stats.decide`` and Fieller's share interval, checked by simulation:
under null and mixed configurations, with 3, 5 and 10 seeds, a shared per-seed effect,
normal and heavy-tailed noise and an outlier seed, the chance of any false claim stays at
most alpha (within Monte-Carlo error), the intervals cover, and the power to call a
3-point deficit "worse" is measured. The sequential design (looks at 3, 5, 8, 10 seeds,
seeds added only to the open options) is simulated with its looks included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from normlab import simulate
from normlab.stats import decide, fieller_share, look_levels

ALPHA = 0.05
REPLICATES = 600
# Monte-Carlo slack: three standard errors of a rate of ALPHA over REPLICATES runs.
SLACK = 3 * math.sqrt(ALPHA * (1 - ALPHA) / REPLICATES)


@pytest.mark.parametrize("noise", simulate.NOISES)
@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("gaps", [simulate.NULL, simulate.MIXED], ids=["null", "mixed"])
def test_any_false_claim_at_most_alpha_and_intervals_cover(gaps, n, noise):
    rates = simulate.one_look_rates(gaps, n, noise, REPLICATES, seed=n)
    assert rates["false_claims"] <= ALPHA + SLACK
    assert rates["coverage"] >= 1 - ALPHA - SLACK


def test_power_to_call_a_three_point_deficit_worse():
    at5, at10 = simulate.power(5, 400, seed=1), simulate.power(10, 400, seed=1)
    assert at10 > 0.95 and at10 > at5 > 0.2


@pytest.mark.parametrize("noise", ["normal", "t3"])
@pytest.mark.parametrize("gaps", [simulate.NULL, simulate.MIXED], ids=["null", "mixed"])
def test_the_sequential_design_keeps_its_error_with_its_looks(gaps, noise):
    """Looks at 3, 5, 8, 10 seeds, seeds only for the open options, verdicts kept."""
    rates = simulate.sequential_rates(gaps, noise, REPLICATES // 2, seed=2)
    assert rates["false_claims"] <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) /
                                                          (REPLICATES // 2))
    if gaps == simulate.MIXED:  # decided options stop: fewer runs than all six to 10 seeds
        assert rates["mean_runs"] < 60


def test_fieller_covers_where_the_bootstrap_does_not():
    """PreciseBN's share of Batch Norm's loss as committed, 5 seeds: Fieller's 95 %
    interval covers; the percentile bootstrap covers less."""
    rates = simulate.share_coverage(5, 400, seed=3)
    assert rates["fieller"] >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / 400)
    assert rates["bootstrap"] < rates["fieller"]


def test_the_rule_picks_apart_what_it_should():
    """Hand-checked: a clear gap is "worse", a tiny one within the margin "equivalent",
    the lowest mean "best"; with too few seeds nothing is decided."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 10)
    errors = {"a": list(10 + base), "b": list(10.05 + base + rng.normal(0, 0.02, 10)),
              "c": list(13 + base + rng.normal(0, 0.3, 10))}
    d = decide(errors, margin=0.5)
    assert d.verdicts == {"a": "best", "b": "equivalent", "c": "worse"}
    assert d.intervals["c"][0] > 2 and d.signs["c"] == (10, 10)
    assert not d.normality  # ten seeds
    few = decide({k: v[:2] for k, v in errors.items()}, margin=0.5)
    assert few.verdicts["b"] == "undecided" and few.normality is False


def test_the_intervals_are_the_bonferroni_pairwise_ones():
    """Option c's interval is max over others of the paired t interval at level
    1 - alpha/(k(k-1)) per side, computed here with scipy."""
    rng = np.random.default_rng(3)
    errors = {o: list(rng.normal(m, 1, 7)) for o, m in (("a", 10), ("b", 11), ("c", 12))}
    d = decide(errors, margin=0.5, alpha=0.05)
    c = sps.t.ppf(1 - 0.05 / 6, 6)
    lows, highs = [], []
    for other in ("a", "b"):
        diff = np.array(errors["c"]) - np.array(errors[other])
        half = c * diff.std(ddof=1) / math.sqrt(7)
        lows.append(diff.mean() - half)
        highs.append(diff.mean() + half)
    assert d.intervals["c"] == pytest.approx((max(lows), max(highs)), abs=1e-12)


def test_looks_spend_alpha_and_earlier_verdicts_are_kept():
    levels = look_levels(0.05, (3, 5, 8, 10))
    assert sum(levels.values()) == pytest.approx(0.05) and levels[3] < levels[10]
    errors = {"a": [1, 2, 3], "b": [5, 6, 7]}
    assert decide(errors, margin=0.1, earlier={"a": "equivalent"}).verdicts["a"] == \
        "equivalent"


def test_fieller_against_a_direct_search():
    """The interval is the set of ratios r the paired t-test does not reject, found here
    on a fine grid."""
    small, large, remedy = ({i: v for i, v in enumerate(x)} for x in (
        [18.0, 16.5, 19.2, 17.1, 17.9], [10.4, 10.6, 10.5, 10.9, 10.2],
        [15.0, 15.9, 16.8, 15.2, 16.1]))
    share, low, high = fieller_share(small, large, remedy)
    a = np.array([small[s] - remedy[s] for s in range(5)])
    b = np.array([small[s] - large[s] for s in range(5)])
    grid = np.linspace(-1, 2, 300_001)
    t = sps.t.ppf(0.975, 4)
    diff = a[None, :] - grid[:, None] * b[None, :]
    inside = np.abs(diff.mean(1)) <= t * diff.std(1, ddof=1) / math.sqrt(5)
    assert share == pytest.approx(a.mean() / b.mean())
    assert low == pytest.approx(grid[inside].min(), abs=2e-5)
    assert high == pytest.approx(grid[inside].max(), abs=2e-5)


def test_fieller_is_unbounded_without_a_significant_loss():
    share, low, high = fieller_share({1: 11.0, 2: 10.0, 3: 10.6}, {1: 10.0, 2: 10.5, 3: 10.4},
                                     {1: 10.8, 2: 10.2, 3: 10.5})
    assert low == -math.inf and high == math.inf
