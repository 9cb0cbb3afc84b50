"""Normalization layers by name: one record per normalization, and ``make_norm``.

Everything normlab needs to know about a normalization -- how to build it, whether its
statistics depend on the batch, whether it takes virtual batches or groups, whether it is also
the activation, which map dimensions it is defined for -- is in its ``Norm`` record in
``NORMS`` (timm's ``create_norm_act.py`` keeps one such map); every other module asks the
record instead of comparing names. ``make_norm(name, channels)`` is the single switch
between them. Putting them into any model is ``normlab.convert``; Batch Norm's inference
remedies are ``normlab.precise``; both are re-exported here. The layers themselves are in
``normlab.batchnorm`` (Batch Norm in its settings, Batch Renorm) and ``normlab.normact``
(FRN, EvoNorm, Weight Standardization).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .batchnorm import (
    FAST_MIN_PIXELS,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    RenormSchedule,
    renorm_limits,
)
from .normact import (
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNorm2d,
    StdConv1d,
    StdConv2d,
    StdConv3d,
    standardize_weights,
)

# Also importable from here, though defined in their own modules (see the end):
# convert, to_torch (normlab.convert); precise_bn, batch_statistics, statistics_seen
# (normlab.precise).
__all__ = ["ACT_NORMS", "BATCH_NORMS", "FAST_MIN_PIXELS", "NORMS", "VIRTUAL_BATCH_NORMS",
           "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm",
           "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "EvoNorm2dB0", "EvoNorm2dS0",
           "FilterResponseNorm2d", "Norm", "RenormSchedule", "StdConv1d", "StdConv2d",
           "StdConv3d", "check_norm", "make_norm", "norm_record", "renorm_limits",
           "standardize_weights"]

_BATCH = {None: BatchNorm, 1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_RENORM = {None: BatchRenorm, 1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
ANY_DIMS = (1, 2, 3)


@dataclass(frozen=True)
class Norm:
    """One normalization, as every part of normlab needs to know it.

    ``build(channels, num_groups, virtual_batches, dims, **options)`` makes the layer; dims is
    1, 2 or 3, or None for "any" (a converted layer whose input dimension is unknown), and
    ``options`` are keyword arguments of the layer (eps, affine, r_max, ...).
    """

    name: str
    build: Callable[..., nn.Module]
    what: str  # which values share a mean and variance
    batch_dependent: bool = False  # training statistics depend on the other images
    virtual: bool = False  # takes virtual_batches (parts of a batch with own statistics)
    grouped: bool = False  # takes num_groups, which must divide the channels
    activation: bool = False  # is also the activation: replaces the norm and its ReLU
    synchronized: bool = False  # statistics over every rank's batch
    batch_family: bool = False  # a Batch Norm (running statistics, momentum, state keys)
    dims: tuple[int, ...] = ANY_DIMS  # the map dimensions it is defined for
    settings: tuple[str, ...] = ()  # the layer settings a conversion carries into it


_BN_SETTINGS = ("eps", "momentum", "affine", "track_running_stats")
_GN_SETTINGS = ("eps", "affine")

NORMS: dict[str, Norm] = {n.name: n for n in (
    Norm("batch", lambda c, g, k, d, **o: _BATCH[d](c, virtual_batches=k, **o),
         "per channel, over (N, *spatial): statistics shared across the batch",
         batch_dependent=True, virtual=True, batch_family=True, settings=_BN_SETTINGS),
    Norm("syncbatch", lambda c, g, k, d, **o: _BATCH[d](c, sync=True, **o),
         "per channel, over (N, *spatial) of every rank's batch (one process: batch)",
         batch_dependent=True, synchronized=True, batch_family=True, settings=_BN_SETTINGS),
    Norm("layer", lambda c, g, k, d, **o: nn.GroupNorm(1, c, **o),
         "per sample, over (C, *spatial): Group Norm with one group", settings=_GN_SETTINGS),
    Norm("group", lambda c, g, k, d, **o: nn.GroupNorm(g, c, **o),
         "per sample, per group of channels, over (C/G, *spatial)", grouped=True,
         settings=_GN_SETTINGS),
    Norm("instance", lambda c, g, k, d, **o: nn.GroupNorm(c, c, **o),
         "per sample, per channel, over (*spatial): Group Norm with one channel a group",
         settings=_GN_SETTINGS),
    Norm("batchrenorm", lambda c, g, k, d, **o: _RENORM[d](c, virtual_batches=k, **o),
         "batch, corrected towards the running statistics (Ioffe 2017)",
         batch_dependent=True, virtual=True, batch_family=True,
         settings=_BN_SETTINGS),
    Norm("frn", lambda c, g, k, d, **o: FilterResponseNorm2d(c, **o),
         "per sample, per channel, mean square over (H, W); with its own activation",
         activation=True, dims=(2,)),
    Norm("evonorm-b0", lambda c, g, k, d, **o: EvoNorm2dB0(c, virtual_batches=k, **o),
         "batch variance per channel against each sample's; with its own activation",
         batch_dependent=True, virtual=True, activation=True, dims=(2,)),
    Norm("evonorm-s0", lambda c, g, k, d, **o: EvoNorm2dS0(c, g, **o),
         "per sample, per group of channels; with its own activation", grouped=True,
         activation=True, dims=(2,)),
    Norm("none", lambda c, g, k, d, **o: nn.Identity(), "no normalization"),
)}
# The names by property, for argument choices and documentation.
ACT_NORMS = tuple(n for n, r in NORMS.items() if r.activation)
BATCH_NORMS = tuple(n for n, r in NORMS.items() if r.batch_dependent)
VIRTUAL_BATCH_NORMS = tuple(n for n, r in NORMS.items() if r.virtual)


def norm_record(norm: str) -> Norm:
    """The record of the normalization called ``norm``; ValueError naming the choices."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[norm]


def check_norm(norm: str) -> None:
    norm_record(norm)


def make_norm(norm: str, channels: int, num_groups: int = 4, virtual_batches: int = 1,
              dims: int | None = 2, **options: Any) -> nn.Module:
    """The normalization layer called ``norm`` for ``channels`` channels of a ``dims``-D map
    (1, 2 or 3; None: any). For the names in ``ACT_NORMS`` the layer is also the activation.

    Args:
        norm: one of ``NORMS``.
        channels: the channels of the maps it normalises.
        num_groups: groups for ``group`` and ``evonorm-s0``; must divide ``channels``.
        virtual_batches: for a batch-dependent norm that takes them (``VIRTUAL_BATCH_NORMS``),
            more than 1 splits each training batch into that many parts with their own
            statistics; the norms without batch statistics ignore it.
        dims: 1, 2 or 3 for (N, C, L), (N, C, H, W), (N, C, D, H, W) inputs, None for any.
        **options: keyword arguments of the layer itself (``eps``, ``affine``, Batch
            Renorm's ``r_max`` and ``d_max``, ...).

    Returns:
        The layer, e.g. ``BatchNorm2d(channels)`` for ``make_norm("batch", channels)``.

    Raises:
        ValueError: an unknown name, groups that do not divide the channels, virtual batches
            with ``syncbatch``, or FRN/EvoNorm for other than 2-D maps.

    Example: ``make_norm("group", 64, num_groups=8)`` is ``nn.GroupNorm(8, 64)``.
    """
    record = norm_record(norm)
    if record.grouped and (num_groups <= 0 or channels % num_groups):
        raise ValueError(f"num_groups={num_groups} does not divide {channels} channels; "
                         f"pick a divisor of {channels}")
    if virtual_batches > 1 and record.synchronized:
        raise ValueError("synchronized Batch Norm computes over the whole global batch; it "
                         "does not combine with virtual batches")
    if dims not in (*record.dims, *([None] if record.dims == ANY_DIMS else [])):
        where = f"{dims}-D ones" if dims else "maps of unknown dimension"
        raise ValueError(f"{norm} is defined for 2-D maps (N, C, H, W) only, not {where}")
    return record.build(channels, num_groups, virtual_batches, dims, **options)


# The rest of the public norm API lives in its own modules, which use the records above:
# ``normlab.norms.convert`` and the others are found there when first asked for (PEP 562).
_ELSEWHERE = {"convert": "convert", "to_torch": "convert", "precise_bn": "precise",
              "batch_statistics": "precise", "statistics_seen": "precise"}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        module = importlib.import_module(f".{_ELSEWHERE[name]}", __package__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
