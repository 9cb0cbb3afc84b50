"""Normalization layers by name: one record per normalization, ``make_norm`` and ``register``.

Everything normlab needs to know about a normalization -- how to build it, which layer
classes are it, whether its statistics depend on the batch, whether it takes virtual batches
or groups, whether it is also the activation, which map dimensions it is defined for, which
settings are valid (``Norm.check``) -- is in its ``Norm`` record in ``NORMS`` (timm's
``create_norm_act.py`` keeps one such map); every other module asks the records instead of
comparing names or layer types. ``make_norm(name, channels)`` is the single switch between
them, and ``register(record)`` adds one from outside: it then works in ``Net``, ``convert``,
``standardize_weights``, ``precise_bn``/``evaluate`` and as a variant of every study.
Putting norms into any model is ``normlab.convert``; Batch Norm's inference remedies are
``normlab.precise``; both are re-exported here. The layers themselves are in
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
from .errors import UsageError
from .normact import (
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNorm2d,
    StdConv1d,
    StdConv2d,
    StdConv3d,
)
from .variants import VARIANTS, Variant

# Also importable from here, though defined in their own modules (see the end):
# convert, to_torch (normlab.convert); precise_bn, batch_statistics, statistics_seen
# (normlab.precise); standardize_weights (normlab.weightstd).
__all__ = ["FAST_MIN_PIXELS", "NORMS", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "EvoNorm2dB0",
           "EvoNorm2dS0", "FilterResponseNorm2d", "Norm", "RenormSchedule", "StdConv1d",
           "StdConv2d", "StdConv3d", "layer_types", "make_norm", "norm_record", "register",
           "renorm_limits"]

_BATCH = {None: BatchNorm, 1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_RENORM = {None: BatchRenorm, 1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
ANY_DIMS = (1, 2, 3)
_SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


@dataclass(frozen=True)
class Norm:
    """One normalization, as every part of normlab needs to know it.

    ``build(channels, num_groups, virtual_batches, dims, **options)`` makes the layer; dims is
    1, 2 or 3, or None for "any" (a converted layer whose input dimension is unknown), and
    ``options`` are keyword arguments of the layer (eps, affine, r_max, ...). ``layers`` are
    the classes ``build`` returns: how normlab recognises this norm in a model (``convert``
    replaces them, ``standardize_weights`` standardises the convolution before them).

    A ``batch_dependent`` layer must keep running statistics for eval, as Batch Norm's do:
    a ``running_var`` buffer (and ``running_mean`` if it has one) that training mode updates
    with its ``momentum`` attribute (1: they become the batch's). ``precise_bn`` and
    ``batch_statistics`` rely on exactly that.
    """

    name: str
    build: Callable[..., nn.Module]
    label: str  # the name reports and figures show
    layers: tuple[type[nn.Module], ...] = ()  # the classes build returns
    batch_dependent: bool = False  # training statistics depend on the other images
    virtual: bool = False  # takes virtual_batches (parts of a batch with own statistics)
    grouped: bool = False  # takes num_groups, which must divide the channels
    activation: bool = False  # is also the activation: replaces the norm and its ReLU
    synchronized: bool = False  # statistics over every rank's batch
    batch_family: bool = False  # a Batch Norm (running statistics, momentum, state keys)
    dims: tuple[int, ...] = ANY_DIMS  # the map dimensions it is defined for
    settings: tuple[str, ...] = ()  # the layer settings a conversion carries into it

    def check(self, channels: int, num_groups: int = 4, virtual_batches: int = 1,
              dims: int | None = 2) -> None:
        """Raise ``UsageError`` (a ``ValueError``) saying what to change if this norm cannot
        be built for ``channels`` channels of ``dims``-D maps (None: any) with these groups
        and virtual batches: the one place each of these rules is written."""
        if self.grouped and (num_groups <= 0 or channels % num_groups):
            raise UsageError(f"num_groups={num_groups} does not divide {channels} channels; "
                             f"pick a divisor of {channels}")
        if virtual_batches < 1:
            raise UsageError(f"virtual_batches must be >= 1, got {virtual_batches}")
        if virtual_batches > 1 and self.synchronized:
            raise UsageError(f"{self.label} computes over the whole global batch; it does "
                             f"not combine with virtual batches")
        if dims not in (*self.dims, *([None] if self.dims == ANY_DIMS else [])):
            where = f"{dims}-D ones" if dims else "maps of unknown dimension"
            raise UsageError(f"{self.name} is defined for {self.maps} only, not {where}")

    @property
    def maps(self) -> str:
        """The inputs it is defined for, in words: "2-D maps (N, C, H, W)"."""
        return " or ".join(f"{d}-D maps {_SHAPES[d]}" for d in self.dims)


_BN_SETTINGS = ("eps", "momentum", "affine", "track_running_stats")
_GN_SETTINGS = ("eps", "affine")
_BN_LAYERS = tuple(_BATCH.values())
_RENORM_LAYERS = tuple(_RENORM.values())

NORMS: dict[str, Norm] = {n.name: n for n in (
    # per channel, over (N, *spatial): statistics shared across the batch
    Norm("batch", lambda c, g, k, d, **o: _BATCH[d](c, virtual_batches=k, **o), "Batch Norm",
         _BN_LAYERS, batch_dependent=True, virtual=True, batch_family=True,
         settings=_BN_SETTINGS),
    # per channel, over (N, *spatial) of every rank's batch (one process: batch)
    Norm("syncbatch", lambda c, g, k, d, **o: _BATCH[d](c, sync=True, **o),
         "Synchronized Batch Norm", _BN_LAYERS, batch_dependent=True, synchronized=True,
         batch_family=True, settings=_BN_SETTINGS),
    # per sample, over (C, *spatial): Group Norm with one group
    Norm("layer", lambda c, g, k, d, **o: nn.GroupNorm(1, c, **o), "Layer Norm",
         (nn.GroupNorm,), settings=_GN_SETTINGS),
    # per sample, per group of channels, over (C/G, *spatial)
    Norm("group", lambda c, g, k, d, **o: nn.GroupNorm(g, c, **o), "Group Norm",
         (nn.GroupNorm,), grouped=True, settings=_GN_SETTINGS),
    # per sample, per channel, over (*spatial): Group Norm with one channel a group
    Norm("instance", lambda c, g, k, d, **o: nn.GroupNorm(c, c, **o), "Instance Norm",
         (nn.GroupNorm,), settings=_GN_SETTINGS),
    # batch, corrected towards the running statistics (Ioffe 2017)
    Norm("batchrenorm", lambda c, g, k, d, **o: _RENORM[d](c, virtual_batches=k, **o),
         "Batch Renorm", _RENORM_LAYERS, batch_dependent=True, virtual=True,
         batch_family=True, settings=_BN_SETTINGS),
    # per sample, per channel, mean square over (H, W); with its own activation
    Norm("frn", lambda c, g, k, d, **o: FilterResponseNorm2d(c, **o), "Filter Response Norm",
         (FilterResponseNorm2d,), activation=True, dims=(2,)),
    # batch variance per channel against each sample's; with its own activation
    Norm("evonorm-b0", lambda c, g, k, d, **o: EvoNorm2dB0(c, virtual_batches=k, **o),
         "EvoNorm-B0", (EvoNorm2dB0,), batch_dependent=True, virtual=True, activation=True,
         dims=(2,)),
    # per sample, per group of channels; with its own activation
    Norm("evonorm-s0", lambda c, g, k, d, **o: EvoNorm2dS0(c, g, **o), "EvoNorm-S0",
         (EvoNorm2dS0,), grouped=True, activation=True, dims=(2,)),
    Norm("none", lambda c, g, k, d, **o: nn.Identity(), "No norm"),
)}
_BUILT_IN = frozenset(NORMS)


def register(norm: Norm, *, variant: str | None = None) -> Norm:
    """Add ``norm`` to ``NORMS`` and a study variant of it to ``VARIANTS`` (called
    ``variant``, by default the norm's own name), so that ``Net``, ``convert``,
    ``standardize_weights``, ``precise_bn``/``evaluate`` and every study know it.

    Register at the top level of the module that defines the layer: ``--jobs`` workers
    import that module again, and a norm registered only inside a function is unknown there.
    Returns ``norm``. Raises ``UsageError`` for one of normlab's own names, or a variant
    name another normalization has.
    """
    variant = variant or norm.name
    if norm.name in _BUILT_IN:
        raise UsageError(f"{norm.name!r} is one of normlab's own norms; register yours under "
                         f"another name")
    taken = VARIANTS.get(variant)
    if taken is not None and taken.norm != norm.name:
        raise UsageError(f"the variant name {variant!r} is taken by {taken.label}; pass "
                         f"register(..., variant=) another name")
    NORMS[norm.name] = norm  # registering again (a notebook cell run twice) replaces it
    VARIANTS[variant] = Variant(variant, norm.name, norm.label)
    return norm


def layer_types(**wanted: bool) -> tuple[type[nn.Module], ...]:
    """The layer classes of every record whose properties are ``wanted``, e.g.
    ``layer_types(batch_dependent=True)``; each class once, in the records' order."""
    found = [t for n in NORMS.values() for t in n.layers
             if all(getattr(n, key) == value for key, value in wanted.items())]
    return tuple(dict.fromkeys(found))


def norm_record(norm: str) -> Norm:
    """The record of the normalization called ``norm``; ``UsageError`` naming the choices."""
    if norm not in NORMS:
        raise UsageError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[norm]


def make_norm(norm: str, channels: int, num_groups: int = 4, virtual_batches: int = 1,
              dims: int | None = 2, **options: Any) -> nn.Module:
    """The normalization layer called ``norm`` for ``channels`` channels of a ``dims``-D map
    (1, 2 or 3; None: any). For a record with ``activation`` the layer is also the activation.

    Args:
        norm: one of ``NORMS``.
        channels: the channels of the maps it normalises.
        num_groups: groups for ``group`` and ``evonorm-s0``; must divide ``channels``.
        virtual_batches: for a batch-dependent norm that takes them (``Norm.virtual``),
            more than 1 splits each training batch into that many parts with their own
            statistics; the norms without batch statistics ignore it.
        dims: 1, 2 or 3 for (N, C, L), (N, C, H, W), (N, C, D, H, W) inputs, None for any.
        **options: keyword arguments of the layer itself (``eps``, ``affine``, Batch
            Renorm's ``r_max`` and ``d_max``, ...).

    Returns:
        The layer, e.g. ``BatchNorm2d(channels)`` for ``make_norm("batch", channels)``.

    Raises:
        UsageError: (a ``ValueError``) an unknown name, or settings ``Norm.check`` refuses:
            groups that do not divide the channels, virtual batches with ``syncbatch``,
            FRN/EvoNorm for other than 2-D maps.

    Example: ``make_norm("group", 64, num_groups=8)`` is ``nn.GroupNorm(8, 64)``.
    """
    record = norm_record(norm)
    record.check(channels, num_groups, virtual_batches, dims)
    return record.build(channels, num_groups, virtual_batches, dims, **options)


# The rest of the public norm API lives in its own modules, which use the records above:
# ``normlab.norms.convert`` and the others are found there when first asked for (PEP 562).
_ELSEWHERE = {"convert": "convert", "to_torch": "convert", "precise_bn": "precise",
              "batch_statistics": "precise", "statistics_seen": "precise",
              "standardize_weights": "weightstd"}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        module = importlib.import_module(f".{_ELSEWHERE[name]}", __package__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
