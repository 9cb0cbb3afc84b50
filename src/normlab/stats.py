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
    """The mean of ``values`` with its two-sided ``level`` confidence interval (Student's t)."""
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
    """Interval of mean(a - b) over the seeds both ``a`` and ``b`` have (seed -> value)."""
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        raise ValueError("the two variants share no seed")
    return t_interval([a[s] - b[s] for s in seeds], level)
