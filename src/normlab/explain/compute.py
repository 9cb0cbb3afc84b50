"""Batch, Layer, Group and Instance Norm worked through on a tiny example, every number checked.

The reference study explained the normalizations with a hand-made spreadsheet whose counts
were partly wrong. This module rebuilds that explanation from code, so the numbers cannot
drift: ``normlab explain`` prints them, ``--json`` / ``--markdown`` / ``--xlsx`` / ``--figure``
export them, and the tests compare all of them with torch.

The example is two layers of activations, each shaped (N=3 samples, C=4 channels, H=2, W=2).
All four techniques compute ``y = (x - mean) / sqrt(variance + eps)`` -- with the population
(biased) variance and eps = 1e-5, as torch does, and no affine transform (gamma = 1,
beta = 0). They differ only in which values share one mean and variance (a "set"):

    BN  per channel c,            over (n, h, w)
    LN  per sample n,             over (c, h, w)
    GN  per sample n and group g, over (the C/G channels of g, h, w)
    IN  per sample n and channel c, over (h, w)

One routine, ``_reduce``, serves all four: it views the activations as (N, C, H, W), or as
(N, G, C/G, H, W) for GN, and averages over that technique's axes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

EPS = 1e-5  # torch's default for every normalization layer
LAYERS, N, C, H, W = 2, 3, 4, 2, 2  # the example's shape
GROUPS = 2  # GN groups in the example: 4 channels -> 2 groups of 2
DEFAULT_SEED = 0
AFFINE_NOTE = "no affine transform: gamma = 1, beta = 0"


@dataclass(frozen=True)
class Technique:
    """What one normalization averages over, as axes of a view of the (N, C, H, W) input."""

    key: str
    name: str
    axes: tuple[int, ...]  # reduced axes of the view
    grouped: bool = False  # view as (N, G, C/G, H, W) instead of (N, C, H, W)

    def axis_names(self) -> tuple[str, ...]:
        """Names of the view's axes, e.g. ("n", "g", "c", "h", "w") for GN."""
        return ("n", "g", "c", "h", "w") if self.grouped else ("n", "c", "h", "w")

    def view_shape(self, shape: Sequence[int], groups: int) -> tuple[int, ...]:
        """The shape the (N, C, H, W) input is viewed as before averaging."""
        n, c, h, w = shape
        return (n, groups, c // groups, h, w) if self.grouped else (n, c, h, w)

    def kept_axes(self) -> tuple[int, ...]:
        """The view's axes that are *not* averaged over: one set per combination of them."""
        return tuple(a for a in range(len(self.axis_names())) if a not in self.axes)

    def stat_shape(self, shape: Sequence[int], groups: int) -> tuple[int, ...]:
        """Shape of the means (and variances): the sizes of the kept axes."""
        view = self.view_shape(shape, groups)
        return tuple(view[a] for a in self.kept_axes())

    def describe(self) -> str:
        """What shares one mean and variance, e.g. "per (n, g), over (channels of g, h, w)"."""
        names = self.axis_names()
        kept = [names[a] for a in self.kept_axes()]
        over = [names[a] for a in self.axes]
        if self.grouped:  # the reduced "c" is the channels of one group
            over = ["channels of g" if name == "c" else name for name in over]
        per = kept[0] if len(kept) == 1 else f"({', '.join(kept)})"
        return f"per {per}, over ({', '.join(over)})"


TECHNIQUES: dict[str, Technique] = {
    t.key: t
    for t in (
        Technique("BN", "Batch Norm", axes=(0, 2, 3)),
        Technique("LN", "Layer Norm", axes=(1, 2, 3)),
        Technique("GN", "Group Norm", axes=(2, 3, 4), grouped=True),
        Technique("IN", "Instance Norm", axes=(2, 3)),
    )
}


def check_groups(channels: int, groups: int) -> None:
    if groups < 1 or channels % groups:
        raise ValueError(f"groups={groups} must be a positive divisor of C={channels}")


def _reduce(x: torch.Tensor, technique: Technique, groups: int, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, population variance and normalised output of ``x`` (N, C, H, W) for one technique.

    The only place anything is computed: every technique is "view, then average over axes".
    """
    view = x.reshape(technique.view_shape(x.shape, groups))
    variance, mean = torch.var_mean(view, dim=technique.axes, correction=0, keepdim=True)
    normalised = ((view - mean) / torch.sqrt(variance + eps)).reshape(x.shape)
    return mean.squeeze(technique.axes), variance.squeeze(technique.axes), normalised


@dataclass(frozen=True)
class NormSet:
    """One set of values that share a mean and a variance, listed for reading."""

    index: tuple[int, ...]  # the set's index into ``Explanation.means``
    label: str  # e.g. "n=0, g=1"
    members: list[tuple[int, int, int, int]]  # (n, c, h, w) of every value, in order
    values: list[float]
    mean: float
    variance: float
    normalised: list[float]  # same order as ``values``

    def describe(self) -> str:
        """The set as a slice of x, e.g. "x[n=0, c=2..3, h=0..1, w=0..1] (8 values)"."""
        parts = []
        for name, coords in zip("nchw", zip(*self.members, strict=True), strict=True):
            low, high = min(coords), max(coords)
            parts.append(f"{name}={low}" if low == high else f"{name}={low}..{high}")
        return f"x[{', '.join(parts)}] ({len(self.members)} values)"


@dataclass(frozen=True)
class Explanation:
    """One technique applied to one layer: its sets, their statistics, and the output.

    ``means`` and ``variances`` are shaped like the sets: BN (C,), LN (N,), GN (N, G) and
    IN (N, C); ``normalised`` is shaped like ``x``.
    """

    technique: Technique
    x: torch.Tensor
    groups: int
    eps: float
    means: torch.Tensor
    variances: torch.Tensor
    normalised: torch.Tensor

    @cached_property
    def sets(self) -> list[NormSet]:
        """Every set with its members, found by pushing flat indices through the same view."""
        t, shape = self.technique, tuple(self.x.shape)
        flat = np.arange(self.x.numel()).reshape(t.view_shape(shape, self.groups))
        rows = flat.transpose(*t.kept_axes(), *t.axes).reshape(self.means.numel(), -1)
        coords = np.stack(np.unravel_index(rows, shape), axis=-1).tolist()  # (set, member, 4)
        names = [t.axis_names()[a] for a in t.kept_axes()]
        x, y = self.x.flatten().tolist(), self.normalised.flatten().tolist()
        indices = itertools.product(*map(range, self.means.shape))
        return [
            NormSet(
                index=index,
                label=", ".join(f"{name}={i}" for name, i in zip(names, index, strict=True)),
                members=[tuple(member) for member in members],
                values=[x[i] for i in row],
                mean=self.means[index].item(),
                variance=self.variances[index].item(),
                normalised=[y[i] for i in row],
            )
            for index, row, members in zip(indices, rows.tolist(), coords, strict=True)
        ]


def build_example(seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The worked example: 2 layers x (N=3, C=4, H=2, W=2) of small integers, as float64.

    Integers 0..9 keep every mean and variance checkable by hand; float64 keeps the
    comparison with torch exact to far below the printed 6 decimals.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (LAYERS, N, C, H, W), generator=generator).to(torch.float64)


def explain(x: torch.Tensor, technique: str, groups: int = GROUPS, eps: float = EPS
            ) -> Explanation:
    """Normalise one layer ``x`` (N, C, H, W) with ``technique`` (BN, LN, GN or IN).

    Returns the statistics as tensors for checking and ``.sets`` for reading. ``groups`` only
    matters for GN but must always divide C, so one call signature fits all techniques.
    """
    if x.dim() != 4:
        raise ValueError(f"expected one layer shaped (N, C, H, W), got shape {tuple(x.shape)}")
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown technique {technique!r}; choose one of {', '.join(TECHNIQUES)}")
    check_groups(x.shape[1], groups)
    t = TECHNIQUES[technique]
    x = x if x.is_floating_point() else x.to(torch.float64)
    return Explanation(t, x, groups, eps, *_reduce(x, t, groups, eps))


def stat_counts(n: int, c: int, groups: int = GROUPS, layers: int = LAYERS
                ) -> dict[str, dict[str, int | str]]:
    """How many means and variances each technique computes, per layer and over all layers.

    Derived from the same shapes ``explain`` uses (one mean and one variance per set), not
    typed in, because the reference study's hand-typed counts were wrong. Assumes every layer
    has the same N and C; otherwise add the per-layer counts. H and W never matter: every
    technique averages over them.
    """
    check_groups(c, groups)
    counts: dict[str, dict[str, int | str]] = {}
    for key, t in TECHNIQUES.items():
        per_layer = math.prod(t.stat_shape((n, c, 1, 1), groups))
        formula = " * ".join(t.axis_names()[a].upper() for a in t.kept_axes())
        counts[key] = {"formula": formula, "means_per_layer": per_layer,
                       "variances_per_layer": per_layer, "means_total": per_layer * layers,
                       "variances_total": per_layer * layers}
    return counts


def explain_all(x: torch.Tensor, groups: int = GROUPS) -> list[dict[str, Explanation]]:
    """Every technique for every layer of ``x`` (layers, N, C, H, W): ``[layer][technique]``."""
    if x.dim() != 5:
        raise ValueError(f"expected (layers, N, C, H, W), got shape {tuple(x.shape)}")
    return [{key: explain(layer, key, groups) for key in TECHNIQUES} for layer in x]
