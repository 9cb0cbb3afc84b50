"""Spread and confidence intervals over seeds: is a difference between variants real?

With a handful of seeds the normal approximation is far too optimistic, so intervals use
Student's t distribution with n - 1 degrees of freedom (for n = 3 the 95% multiplier is
4.30, not 1.96). Differences between two variants are *paired* by seed: the same seed gives
both the same data order and augmentation, so the per-seed difference removes that shared
noise and its interval is the honest answer to "is A better than B?".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and a t-based confidence interval of n values.

    With a single value, std and the interval are NaN: one run says nothing about spread.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` with its two-sided ``level`` confidence interval (Student's t).

    Examples:
        >>> i = t_interval([99.5, 99.6, 99.7])
        >>> round(i.mean, 2), round(i.low, 2), round(i.high, 2)
        (99.6, 99.35, 99.85)
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan, level)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half, level)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95
                      ) -> Interval:
    """Interval of mean(a - b) over the seeds both ``a`` and ``b`` have (seed -> value).

    Examples:
        >>> a, b = {1: 12.0, 2: 13.0, 3: 12.5}, {1: 10.0, 2: 10.4, 3: 10.8}
        >>> d = paired_difference(a, b)
        >>> round(d.mean, 2), d.excludes_zero()
        (2.1, True)
    """
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        raise ValueError("the two variants share no seed")
    return t_interval([a[s] - b[s] for s in seeds], level)


def paired_p_value(a: Mapping[int, float], b: Mapping[int, float]) -> float:
    """Two-sided paired t-test p-value of mean(a - b) = 0 over the seeds both have; NaN
    with fewer than two seeds or when every difference is the same (no spread to test).

    Examples:
        >>> a, b = {1: 12.0, 2: 13.0, 3: 12.5}, {1: 10.0, 2: 10.4, 3: 10.8}
        >>> round(paired_p_value(a, b), 4)
        0.0155
    """
    seeds = sorted(a.keys() & b.keys())
    differences = [a[s] - b[s] for s in seeds]
    if len(seeds) < 2 or max(differences) == min(differences):
        return math.nan
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given; NaN stays NaN and is not counted.

    Why Holm: it controls the family-wise error (the chance that *any* claim of a table is
    chance) under any dependence between the tests -- ours share a baseline and seeds, so
    they are correlated -- and is uniformly more powerful than Bonferroni. An adjusted
    p-value below alpha is exactly a rejection by Holm's step-down rule at alpha.

    Examples:
        >>> holm([0.01, 0.04, 0.03, float("nan")])  # 3 x 0.01, 2 x 0.03, ...
        [0.03, 0.06, 0.06, nan]
    """
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(order)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - k) * p))  # step-down: never below a smaller p's
        adjusted[i] = running
    return adjusted


def bootstrap_share(loss_small: Mapping[int, float], loss_large: Mapping[int, float],
                    remedy: Mapping[int, float], resamples: int = 10_000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """Share of a loss won back, (small - remedy) / (small - large) of the means, with a
    paired bootstrap percentile interval: seeds are resampled together, so each keeps its
    three values. A ratio of means has no t interval; with few seeds the bootstrap
    interval is wide, and that is the honest answer. Fixed ``seed``: the report is a pure
    function of the record. Resamples whose loss is not positive are left out (the share
    is undefined there); NaNs when fewer than two seeds have all three values, and for
    the interval when no resample has a loss.

    Examples:
        >>> share, low, high = bootstrap_share({1: 20.0, 2: 16.0, 3: 18.0},
        ...                                    {1: 10.0, 2: 10.0, 3: 11.0},
        ...                                    {1: 12.0, 2: 13.0, 3: 12.5})
        >>> round(share, 3), low < share < high
        (0.717, True)
    """
    seeds = sorted(loss_small.keys() & loss_large.keys() & remedy.keys())
    if len(seeds) < 2:
        return math.nan, math.nan, math.nan
    values = np.array([[loss_small[s], loss_large[s], remedy[s]] for s in seeds])

    def share(rows: np.ndarray) -> np.ndarray:
        small, large, fixed = rows.mean(axis=-2).T
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(small > large, (small - fixed) / (small - large), np.nan)

    picks = np.random.default_rng(seed).integers(0, len(seeds), (resamples, len(seeds)))
    shares = share(values[picks])
    shares = shares[~np.isnan(shares)]
    point = float(share(values[None])[0])
    if len(shares) == 0:  # no loss to win back in any resample: the share is undefined
        return point, math.nan, math.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(shares, [tail, 100 - tail])
    return point, float(low), float(high)
