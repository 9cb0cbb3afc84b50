"""Spread and confidence intervals over seeds: is a difference between variants real?

With a handful of seeds the normal approximation is far too optimistic, so intervals use
Student's t distribution with n - 1 degrees of freedom (for n = 3 the 95% multiplier is
4.30, not 1.96). Differences between two variants are *paired* by seed: the same seed gives
both the same data order and augmentation, so the per-seed difference removes that shared
noise and its interval is the honest answer to "is A better than B?".
"""

from __future__ import annotations

import functools
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


def fieller_share(loss_small: Mapping[int, float], loss_large: Mapping[int, float],
                  remedy: Mapping[int, float], level: float = 0.95
                  ) -> tuple[float, float, float]:
    """Share of a loss won back, ``(small - remedy) / (small - large)`` of the means, with
    Fieller's interval (1954) over the seeds all three have: the ratios ``r`` for which
    ``mean(a) - r mean(b)`` is not significant, ``a``, ``b`` the paired numerator and
    denominator. A percentile bootstrap over 5-10 seeds covers 82-89 % for a nominal 95 %
    (simulated in the tests); Fieller's interval covers as stated. Where the loss itself is
    not significant the set is unbounded: (share, -inf, inf). NaNs below two seeds.

    Examples:
        >>> share, low, high = fieller_share({1: 20.0, 2: 16.0, 3: 18.0, 4: 19.0},
        ...                                  {1: 10.0, 2: 10.0, 3: 11.0, 4: 10.5},
        ...                                  {1: 12.0, 2: 13.0, 3: 12.5, 4: 12.0})
        >>> round(share, 3), round(low, 3), round(high, 3)
        (0.746, 0.458, 0.907)
    """
    seeds = sorted(loss_small.keys() & loss_large.keys() & remedy.keys())
    n = len(seeds)
    if n < 2:
        return math.nan, math.nan, math.nan
    a = np.array([loss_small[s] - remedy[s] for s in seeds])
    b = np.array([loss_small[s] - loss_large[s] for s in seeds])
    m1, m2 = a.mean(), b.mean()
    cov = np.cov(a, b, ddof=1) / n
    v11, v22, v12 = cov[0, 0], cov[1, 1], cov[0, 1]
    t = float(stats.t.ppf(0.5 + level / 2, df=n - 1))
    share = m1 / m2 if m2 else math.nan
    quad_a = m2 ** 2 - t ** 2 * v22
    if quad_a <= 0:  # the denominator is not significant: no bounded set
        return float(share), -math.inf, math.inf
    quad_b = m1 * m2 - t ** 2 * v12
    quad_c = m1 ** 2 - t ** 2 * v11
    root = math.sqrt(max(quad_b ** 2 - quad_a * quad_c, 0.0))
    return float(share), float((quad_b - root) / quad_a), float((quad_b + root) / quad_a)


# -- Which options are best: a decision rule fixed before the data

VERDICTS = ("best", "equivalent", "worse", "undecided")
SIGNS_FROM = 6  # from this many seeds a decision also shows how many seeds agree in sign


@dataclass(frozen=True)
class Decision:
    """What ``decide`` concluded about each option at one size.

    ``verdicts``: "best" (the lowest mean error), "equivalent" (shown within ``margin``
    points of the truly best), "worse" (shown behind the truly best), "undecided".
    ``intervals``: each option's simultaneous interval for θ = its mean error minus the
    best other option's (θ > 0: some option is better; θ <= 0: it is the best).
    ``behind``: the lower end of θ's interval where it is above 0 (shown behind by at least
    that much). ``signs``: from ``SIGNS_FROM`` seeds, (seeds on which the option is worse
    than the best, seeds compared). ``normality``: a verdict rests on fewer seeds than
    ``SIGNS_FROM``, where only normality of the seed-to-seed differences carries it.
    """

    verdicts: dict[str, str]
    intervals: dict[str, tuple[float, float]]
    means: dict[str, float]
    seeds: dict[str, int]
    best: str
    margin: float
    alpha: float
    looks: tuple[int, ...] | None
    family: str
    signs: dict[str, tuple[int, int]]
    normality: bool

    def named(self, verdict: str) -> list[str]:
        """The options with ``verdict``, best mean first."""
        return sorted((o for o, v in self.verdicts.items() if v == verdict),
                      key=self.means.__getitem__)


def look_levels(alpha: float, looks: Sequence[int]) -> dict[int, float]:
    """The error each planned look may spend, from the power spending function
    α(t) = α t² at t = seeds / last look's seeds (Kim & DeMets 1987): little at the first
    looks, where three seeds decide little anyway. The levels add up to α, so a union
    bound over looks keeps the chance of any false claim at any look below α.

    Examples:
        >>> {n: round(a, 4) for n, a in look_levels(0.05, (3, 5, 10)).items()}
        {3: 0.0045, 5: 0.008, 10: 0.0375}
    """
    looks = sorted(set(looks))
    if not looks or looks[0] < 2:
        raise ValueError(f"looks must be seed counts of at least 2, got {looks}")
    levels, spent = {}, 0.0
    for n in looks:
        cumulative = alpha * (n / looks[-1]) ** 2
        levels[n] = cumulative - spent
        spent = cumulative
    return levels


def decide(errors: Mapping[str, Sequence[float]], *, margin: float, alpha: float = 0.05,
           looks: Sequence[int] | None = None,
           earlier: Mapping[str, str] | None = None) -> Decision:
    """Which options are best, and which are shown behind the best or within ``margin``
    points of it, from each option's per-seed test errors (%) at one size, paired by
    position (seed); a pure function of its arguments, fixed before any data.

    The rule is multiple comparisons with the best (Hsu 1984) built from simultaneous
    pairwise intervals: every pair's mean paired difference with its own paired standard
    error (Batch Norm at 2 images is far noisier than Group Norm, so no pooled variance)
    and a Bonferroni critical value over all k(k-1)/2 pairs, t_{n-1}(1 - α / (k(k-1))).
    When every pairwise interval holds, so does each option's interval for
    θ_i = μ_i - min_{j≠i} μ_j, [max_j (d_ij - c se_ij), max_j (d_ij + c se_ij)]; an option
    is "worse" when the lower end is above 0 and "equivalent" when the upper end is at most
    ``margin`` (this takes precedence: it is within the margin, even if shown slightly
    behind). Guarantee: the chance of any false claim -- "worse" for an option truly among
    the best, "equivalent" for one truly more than ``margin`` behind -- is at most
    ``alpha`` (the union bound; the tests check it by simulation, with heavy tails).

    With ``looks`` (planned seed counts, e.g. (3, 5, 8, 10)), a pair compared on n seeds
    uses the level that ``look_levels`` gives look n, so deciding at every look keeps the
    total error at ``alpha``; ``earlier`` verdicts ("worse", "equivalent") are kept, never
    withdrawn. Options may have different seed counts (those decided earlier stopped):
    each pair is compared on the seeds both have.

    Examples:
        >>> d = decide({"gn": [11.8, 11.6, 12.0, 11.7, 11.9, 11.8],
        ...             "gn+ws": [11.0, 11.1, 11.2, 10.9, 11.1, 11.0],
        ...             "bn": [17.5, 16.9, 18.2, 17.0, 17.7, 17.3]}, margin=0.5)
        >>> d.verdicts
        {'gn': 'worse', 'gn+ws': 'best', 'bn': 'worse'}
    """
    names = list(errors)
    k = len(names)
    if k < 2:
        raise ValueError("decide compares at least two options")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    values = {o: np.asarray(errors[o], dtype=float) for o in names}
    if any(len(v) == 0 for v in values.values()):
        raise ValueError("every option needs at least one seed")
    levels = look_levels(alpha, looks) if looks else None
    means = {o: float(v.mean()) for o, v in values.items()}
    best = min(names, key=means.__getitem__)

    def pair(i: str, j: str) -> tuple[float, float]:
        """Simultaneous interval for μ_i - μ_j on the seeds both have."""
        m = min(len(values[i]), len(values[j]))
        if levels is not None:
            m = max((n for n in levels if n <= m), default=0)
        if m < 2:
            return -math.inf, math.inf
        d = values[i][:m] - values[j][:m]
        c = _critical(levels[m] if levels is not None else alpha, k, m)
        half = c * float(d.std(ddof=1)) / math.sqrt(m)
        return float(d.mean()) - half, float(d.mean()) + half

    intervals, verdicts, signs = {}, {}, {}
    for i in names:
        bounds = [pair(i, j) for j in names if j != i]
        low, high = max(b[0] for b in bounds), max(b[1] for b in bounds)
        intervals[i] = (low, high)
        kept = (earlier or {}).get(i)
        if kept in ("worse", "equivalent"):
            verdicts[i] = kept
        elif high <= margin and i != best:
            verdicts[i] = "equivalent"
        elif low > 0:
            verdicts[i] = "worse"
        else:
            verdicts[i] = "best" if i == best else "undecided"
        shared = min(len(values[i]), len(values[best]))
        if i != best and shared >= SIGNS_FROM:
            signs[i] = (int((values[i][:shared] > values[best][:shared]).sum()), shared)
    decided = [o for o in names if verdicts[o] in ("worse", "equivalent")]
    normality = any(min(len(values[o]), len(values[best])) < SIGNS_FROM for o in decided)
    family = (f"all {k * (k - 1) // 2} pairwise differences of the {k} options, Bonferroni "
              f"over pairs" + (f", the error spent over looks at {', '.join(map(str, looks))} "
                               f"seeds" if looks else ""))
    return Decision(verdicts, intervals, means, {o: len(v) for o, v in values.items()}, best,
                    margin, alpha, tuple(looks) if looks else None, family, signs, normality)


@functools.lru_cache(maxsize=1024)
def _critical(level: float, k: int, m: int) -> float:
    """Bonferroni's two-sided t critical value over the k(k-1)/2 pairs, m seeds."""
    return float(stats.t.ppf(1 - level / (k * (k - 1)), df=m - 1))


def still_open(decision: Decision) -> list[str]:
    """The options that need more seeds: every undecided one, and the best (every option
    is compared with it) while any is undecided."""
    undecided = decision.named("undecided")
    return sorted({*undecided, decision.best}, key=decision.means.__getitem__) \
        if undecided else []
