"""Normalization layers by name, and putting them into any model.

``make_norm(name, channels)`` is the single switch between normalizations (the pattern of
timm's ``create_norm.py``); ``convert(model, name)`` applies it to any network, 1-D, 2-D or
3-D, and refuses (naming every layer) what it cannot convert rather than leave it silently.
``precise_bn`` recomputes the population statistics of any model's batch-dependent layers
with its final weights, and ``batch_statistics`` evaluates with batch statistics instead:
Batch Norm's two inference remedies. The layers themselves are in ``normlab.batchnorm``
(Batch Norm in its settings, Batch Renorm) and ``normlab.normact`` (FRN, EvoNorm, Weight
Standardization).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
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
from .normact import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNorm2d, StdConv2d

__all__ = ["ACT_NORMS", "BATCH_NORMS", "FAST_MIN_PIXELS", "NORMS", "NORM_LAYERS",
           "VIRTUAL_BATCH_NORMS", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "EvoNorm2dB0",
           "EvoNorm2dS0", "FilterResponseNorm2d", "RenormSchedule", "StdConv2d",
           "batch_statistics", "check_norm", "convert", "make_norm", "precise_bn",
           "renorm_limits", "statistics_seen"]

_BATCH = {None: BatchNorm, 1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_RENORM = {None: BatchRenorm, 1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}

# name -> factory(channels, num_groups, virtual_batches, dims); dims is 1, 2 or 3, or None
# for "any" (a converted layer whose input dimension is unknown). Every layer carries a
# per-channel scale and shift; they differ in which values share a mean and variance:
#   batch       : per channel, over (N, *spatial)     -- statistics shared across the batch
#   syncbatch   : per channel, over (N, *spatial) of every rank's batch (one process: batch)
#   layer       : per sample, over (C, *spatial)      -- GroupNorm with one group
#   group       : per sample, per group of channels   -- over (C/G, *spatial)
#   instance    : per sample, per channel, over (*spatial) -- GroupNorm with one channel a group
#   batchrenorm : batch, corrected towards the running statistics (Ioffe 2017)
#   frn         : per sample, per channel, mean square over (H, W); with its own activation
#   evonorm-b0  : batch variance per channel against each sample's; with its own activation
#   evonorm-s0  : per sample, per group of channels; with its own activation
NORM_LAYERS: dict[str, Callable[[int, int, int, int | None], nn.Module]] = {
    "batch": lambda c, groups, parts, dims: _BATCH[dims](c, virtual_batches=parts),
    "syncbatch": lambda c, groups, parts, dims: _BATCH[dims](c, sync=True),
    "layer": lambda c, groups, parts, dims: nn.GroupNorm(1, c),
    "group": lambda c, groups, parts, dims: nn.GroupNorm(groups, c),
    "instance": lambda c, groups, parts, dims: nn.GroupNorm(c, c),
    "batchrenorm": lambda c, groups, parts, dims: _RENORM[dims](c, virtual_batches=parts),
    "frn": lambda c, groups, parts, dims: FilterResponseNorm2d(c),
    "evonorm-b0": lambda c, groups, parts, dims: EvoNorm2dB0(c, virtual_batches=parts),
    "evonorm-s0": lambda c, groups, parts, dims: EvoNorm2dS0(c, groups),
    "none": lambda c, groups, parts, dims: nn.Identity(),
}
NORMS: tuple[str, ...] = tuple(NORM_LAYERS)
ACT_NORMS = ("frn", "evonorm-b0", "evonorm-s0")  # layers that are also the activation
BATCH_NORMS = ("batch", "syncbatch", "batchrenorm", "evonorm-b0")  # depend on the batch
VIRTUAL_BATCH_NORMS = ("batch", "batchrenorm", "evonorm-b0")  # take virtual_batches
_TWO_D_ONLY = ("frn", "evonorm-b0", "evonorm-s0")


def check_norm(norm: str) -> None:
    if norm not in NORM_LAYERS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")


def make_norm(norm: str, channels: int, num_groups: int = 4, virtual_batches: int = 1,
              dims: int | None = 2) -> nn.Module:
    """The normalization layer called ``norm`` for ``channels`` channels of a ``dims``-D map
    (1, 2 or 3; None: any). For the names in ``ACT_NORMS`` the layer is also the activation.

    Args:
        norm: one of ``NORMS``.
        channels: the channels of the maps it normalises.
        num_groups: groups for ``group`` and ``evonorm-s0``; must divide ``channels``.
        virtual_batches: > 1 splits each training batch of a batch-dependent norm
            (``VIRTUAL_BATCH_NORMS``) into that many parts with their own statistics; the
            norms without batch statistics ignore it.
        dims: 1, 2 or 3 for (N, C, L), (N, C, H, W), (N, C, D, H, W) inputs, None for any.

    Returns:
        The layer, e.g. ``BatchNorm2d(channels)`` for ``make_norm("batch", channels)``.

    Raises:
        ValueError: an unknown name, groups that do not divide the channels, virtual batches
            with ``syncbatch``, or FRN/EvoNorm for other than 2-D maps.
    """
    check_norm(norm)
    if norm in ("group", "evonorm-s0") and (num_groups <= 0 or channels % num_groups):
        raise ValueError(f"num_groups={num_groups} does not divide {channels} channels; "
                         f"pick a divisor of {channels}")
    if virtual_batches > 1 and norm == "syncbatch":
        raise ValueError("synchronized Batch Norm computes over the whole global batch; it "
                         "does not combine with virtual batches")
    if norm in _TWO_D_ONLY and dims not in (2, None):
        raise ValueError(f"{norm} is defined for 2-D maps (N, C, H, W), not {dims}-D")
    return NORM_LAYERS[norm](channels, num_groups, virtual_batches, dims)


# -- convert: any model's normalization layers, replaced by name

_SOURCES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
            FilterResponseNorm2d, EvoNorm2dB0, EvoNorm2dS0)
_NOT_CONVERTIBLE = {  # normalizations over other axes than (channel, spatial): no target fits
    nn.LayerNorm: "normalises over its last dimension(s), not over channels and positions",
    nn.LocalResponseNorm: "normalises across neighbouring channels, with no scale or shift",
    **({nn.RMSNorm: "normalises over its last dimension(s), not over channels and positions"}
       if hasattr(nn, "RMSNorm") else {}),
}


def convert(model: nn.Module, norm: str, num_groups: int = 4, virtual_batches: int = 1, *,
            skip: tuple[type[nn.Module], ...] = (), report: bool = False
            ) -> nn.Module | tuple[nn.Module, dict[str, str]]:
    """Replace every normalization layer of ``model`` by ``make_norm(norm, ...)``.

    Converts ``nn.BatchNorm1d/2d/3d`` (normlab's and Batch Renorm too), ``nn.SyncBatchNorm``,
    ``nn.GroupNorm`` (so also normlab's layer, group and instance norms),
    ``nn.InstanceNorm1d/2d/3d`` and normlab's FRN and EvoNorm layers, the way timm's
    ``convert_sync_batchnorm`` converts: recursively, in place for children, returning the
    model (a new one if ``model`` itself is a norm). The new layer keeps the old one's
    dimension (``BatchNorm3d`` becomes ``normlab.norms.BatchNorm3d``; a layer of unknown
    dimension, such as ``nn.SyncBatchNorm``, becomes the any-dimension ``BatchNorm``), its
    scale and shift, ``eps`` and ``momentum``, device, dtype and train/eval mode, and between
    Batch Norms its running statistics, so eval outputs are unchanged. FRN and EvoNorm also
    replace the activation: a layer converts to them only when an ``nn.ReLU`` follows it in
    the same ``nn.Sequential`` (the ReLU becomes ``nn.Identity``) and its maps are 2-D; they
    keep their own papers' eps. Dropout or Identity between the norm and the ReLU is allowed
    (ReLU commutes with dropout's positive scaling).

    Raises ValueError, naming every such layer and why, for a normalization it cannot convert
    (``nn.LayerNorm`` over the last dimension, a target not defined there, groups that do not
    divide a layer's channels) unless its type is in ``skip``, and for a model with no
    normalization layer at all.

    Args:
        model: any ``nn.Module``; converted in place (a norm at its root is replaced).
        norm: the target, one of ``NORMS``.
        num_groups: groups for ``group`` and ``evonorm-s0``.
        virtual_batches: parts per training batch for the batch-dependent targets.
        skip: normalization types to leave as they are instead of refusing them.
        report: also return what was replaced.

    Returns:
        The model, or with ``report=True`` ``(model, changes)``, where ``changes`` maps each
        replaced layer's name to "old -> new".

    Raises:
        ValueError: naming every layer that cannot be converted, and why.

    Example: ``convert(unet3d, "syncbatch")`` before ``DistributedDataParallel(unet3d)``.
    """
    check_norm(norm)
    changes: dict[str, str] = {}
    problems: list[str] = []
    found = _convert(model, norm, num_groups, virtual_batches, skip, "", changes, problems)
    if problems:
        raise ValueError(f"cannot convert to {norm!r}: " + "; ".join(problems)
                         + " (pass skip=(type, ...) to leave such layers as they are)")
    if not found:
        raise ValueError("the model has no normalization layer (Batch, Group, Instance, "
                         "Layer Norm ...) to convert; nothing was changed")
    return (found[0], changes) if report else found[0]


def _convert(module: nn.Module, norm: str, num_groups: int, virtual_batches: int,
             skip: tuple[type[nn.Module], ...], name: str, changes: dict[str, str],
             problems: list[str], relu_after: bool = False) -> list[nn.Module]:
    """The (possibly new) module in a list, or an empty list if neither it nor any child is a
    normalization layer; fills ``changes`` and ``problems``."""
    label = name or "(the model)"
    if isinstance(module, skip):
        return [module]
    if isinstance(module, tuple(_NOT_CONVERTIBLE)):
        reason = next(r for t, r in _NOT_CONVERTIBLE.items() if isinstance(module, t))
        problems.append(f"layer {label}: {type(module).__name__} {reason}")
        return [module]
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and \
            isinstance(module, _SOURCES) and module.has_uninitialized_params():
        problems.append(f"layer {label}: {type(module).__name__} is not initialised yet; run "
                        f"one forward pass before converting")
        return [module]
    if isinstance(module, _SOURCES):
        try:
            if norm in ACT_NORMS and not relu_after:
                raise ValueError(f"{norm} replaces the norm and its activation, and no nn.ReLU "
                                 f"follows this layer in its nn.Sequential")
            new = _replacement(module, norm, num_groups, virtual_batches)
        except ValueError as exc:
            problems.append(f"layer {label}: {exc}")
            return [module]
        changes[label] = f"{_describe(module)} -> {_describe(new)}"
        return [new]
    children = list(module.named_children())
    found = False
    for i, (child_name, child) in enumerate(children):
        relu = _relu_after(module, children, i)
        new = _convert(child, norm, num_groups, virtual_batches, skip,
                       f"{name}.{child_name}" if name else child_name, changes, problems,
                       relu is not None)
        if new:
            found = True
            if new[0] is not child:
                setattr(module, child_name, new[0])
                if norm in ACT_NORMS and relu is not None:
                    setattr(module, relu, nn.Identity())
                    changes[f"{name}.{relu}" if name else relu] = \
                        f"ReLU -> Identity (part of {norm})"
    return [module] if found else []


def _relu_after(module: nn.Module, children: list[tuple[str, nn.Module]], i: int) -> str | None:
    """The name of the nn.ReLU that follows child ``i`` of an nn.Sequential, past Dropout and
    Identity (ReLU commutes with dropout's positive scaling), or None."""
    if not isinstance(module, nn.Sequential):
        return None
    for name, child in children[i + 1:]:
        if isinstance(child, nn.ReLU):
            return name
        if not isinstance(child, nn.Dropout | nn.Identity):
            return None
    return None


def _describe(layer: nn.Module) -> str:
    return f"{type(layer).__name__}({layer.extra_repr()})"


def _dims(layer: nn.Module) -> int | None:
    """The input dimension a layer is built for: 1, 2, 3, or None where it takes any."""
    for dims, types in ((1, (nn.BatchNorm1d, nn.InstanceNorm1d)),
                        (2, (nn.BatchNorm2d, nn.InstanceNorm2d, FilterResponseNorm2d,
                             EvoNorm2dB0, EvoNorm2dS0)),
                        (3, (nn.BatchNorm3d, nn.InstanceNorm3d))):
        if isinstance(layer, types):
            return dims
    return None


def _replacement(old: nn.Module, norm: str, num_groups: int, virtual_batches: int
                 ) -> nn.Module:
    channels = old.num_channels if isinstance(old, nn.GroupNorm) else old.num_features
    new = make_norm(norm, channels, num_groups, virtual_batches, _dims(old))
    state = next(iter(old.parameters()), None)
    state = state if state is not None else next(iter(old.buffers()), None)
    if state is not None:
        new.to(device=state.device, dtype=state.dtype)
    new.train(old.training)
    if isinstance(new, nn.Identity):
        return new
    if norm not in ACT_NORMS and not isinstance(old, FilterResponseNorm2d | EvoNorm2dB0
                                                   | EvoNorm2dS0):
        new.eps = old.eps
    both_batch = all(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in (old, new))
    if both_batch:
        new.momentum = old.momentum
    with torch.no_grad():
        if getattr(old, "weight", None) is not None and getattr(new, "weight", None) is not None:
            new.weight.copy_(old.weight)
            new.bias.copy_(old.bias)
        if both_batch and old.running_mean is not None and new.running_mean is not None:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(new, key).copy_(getattr(old, key))
    return new


# -- Batch Norm's inference remedies: population statistics, or batch statistics at test

def _batch_dependent(model: nn.Module) -> list[nn.Module]:
    """The layers whose output depends on the other images of the batch in training and
    that keep running statistics for eval: Batch Norm (every kind), Batch Renorm,
    EvoNorm-B0."""
    return [m for m in model.modules()
            if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None)
            or isinstance(m, EvoNorm2dB0)]


@contextmanager
def _batch_mode(layers: list[nn.Module], momentum: float) -> Iterator[None]:
    """The batch-dependent ``layers`` in training mode with ``momentum`` (1: the running
    statistics become the last batch's; 0: they stay), Batch Renorm as plain Batch Norm
    (r = 1, d = 0), everything restored afterwards but the running statistics."""
    saved = [(m.training, m.momentum, getattr(m, "r_max", None), getattr(m, "d_max", None),
              getattr(m, "num_batches_tracked", None), getattr(m, "virtual_batches", None))
             for m in layers]
    tracked = [None if s[4] is None else s[4].clone() for s in saved]
    try:
        for m in layers:
            m.train()
            m.momentum = momentum
            if hasattr(m, "r_max"):
                m.r_max, m.d_max = 1.0, 0.0
        yield
    finally:
        for m, (training, old_momentum, r_max, d_max, count, parts), n in zip(
                layers, saved, tracked, strict=True):
            m.train(training)
            m.momentum = old_momentum
            if r_max is not None:
                m.r_max, m.d_max = r_max, d_max
            if count is not None:
                count.copy_(n)
            if parts is not None:
                m.virtual_batches = parts


def _pieces(x: torch.Tensor, layers: list[nn.Module], images_per_statistic: int | None
            ) -> Iterator[torch.Tensor]:
    """The model calls that give every ``images_per_statistic`` consecutive images of ``x``
    their own statistics (the last group may be smaller); by default one call, over all of
    ``x``. Where every layer takes ``virtual_batches`` (normlab's), whole groups go in one
    call with the layers set to cut it; otherwise each group is a call of its own."""
    if images_per_statistic is None:
        _set_parts(layers, 1)
        yield x
        return
    if all(hasattr(m, "virtual_batches") for m in layers):
        full = len(x) // images_per_statistic * images_per_statistic
        if full:
            _set_parts(layers, full // images_per_statistic)
            yield x[:full]
        if full < len(x):
            _set_parts(layers, 1)
            yield x[full:]
        return
    _set_parts(layers, 1)
    yield from x.split(images_per_statistic)


def _set_parts(layers: list[nn.Module], parts: int) -> None:
    for m in layers:
        if hasattr(m, "virtual_batches"):
            m.virtual_batches = parts


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[torch.Tensor | tuple | list],
               images: int | None = None, images_per_statistic: int | None = None) -> int:
    """PreciseBN (Wu & Johnson 2021; fvcore's ``update_bn_stats``): recompute the running
    statistics of every batch-dependent layer of ``model`` with its final weights, as the
    average over ``batches`` of each batch's statistics (equal weight per batch), instead of
    the moving average that training left, which mixes statistics of earlier weights.

    The batch-dependent layers (any Batch Norm, Batch Renorm as plain Batch Norm, EvoNorm-B0)
    run in training mode, everything else in eval mode, without gradients; nothing but
    their ``running_mean`` / ``running_var`` changes. ``batches`` yields inputs (or tuples
    whose first element is the input); ``images`` stops after that many images, in whole
    batches. ``images_per_statistic`` computes each statistic over that many images of a
    batch, e.g. the grouping the model trained with;
    by default over the whole batch, the population statistics. Under torch.distributed
    every rank calls it with its own batches, and the averages are taken over all ranks'.

    Args:
        model: any model with Batch Norm (or Batch Renorm, EvoNorm-B0) layers.
        batches: its inputs, or tuples whose first element is the input.
        images: stop after this many images, in whole batches (default: all batches).
        images_per_statistic: compute each statistic over this many images of a batch.

    Returns:
        The number of statistics averaged (batches, or groups of images per statistic where
        the layers cannot cut a batch themselves).

    Raises:
        ValueError: a model without running statistics, or fewer images than one batch.

    Example: ``precise_bn(model, (x for x, _ in train_loader), images=10_000)``.
    """
    layers = _batch_dependent(model)
    if not layers:
        raise ValueError("the model has no layer with running statistics (Batch Norm, "
                         "Batch Renorm, EvoNorm-B0): nothing to recompute")
    was_training = model.training
    model.eval()
    sums = [[torch.zeros_like(m.running_var, dtype=torch.float64) for _ in range(2)]
            for m in layers]
    used = seen = 0
    try:
        with _batch_mode(layers, momentum=1.0):
            for batch in batches:
                x = batch[0] if isinstance(batch, tuple | list) else batch
                if images is not None and seen + len(x) > images:
                    if used == 0:
                        raise ValueError(f"{images} image(s) do not make one batch of {len(x)}")
                    break
                for piece in _pieces(x, layers, images_per_statistic):
                    model(piece)
                    for m, (mean, var) in zip(layers, sums, strict=True):
                        if getattr(m, "running_mean", None) is not None:
                            mean += m.running_mean
                        var += m.running_var
                    used += 1
                seen += len(x)
    finally:
        model.train(was_training)
    if used == 0:
        raise ValueError("no batches to compute the statistics from")
    batches_used = used
    total = torch.tensor([float(used)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([total, *(t for pair in sums for t in pair)])
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        flat = flat.to(device)
        dist.all_reduce(flat)
        total, rest = flat[:1].cpu(), flat[1:].cpu()
        sums, start = [], 0
        for m in layers:
            n = m.running_var.numel()
            sums.append([rest[start:start + n], rest[start + n:start + 2 * n]])
            start += 2 * n
    for m, (mean, var) in zip(layers, sums, strict=True):
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(mean / total)
        m.running_var.copy_(var / total)
    return batches_used


@contextmanager
def batch_statistics(model: nn.Module, images_per_statistic: int | None = None
                     ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Mini-batch statistics at test time (Wu & Johnson 2021): inside, the yielded function
    runs ``model`` (in eval mode) with its batch-dependent layers normalising every
    ``images_per_statistic`` consecutive images of the input with their own statistics (by
    default the whole input), as in training, and leaving the running statistics as they
    are. A prediction then depends on the other images of its group. Batch Renorm
    normalises as plain Batch Norm.

    Example: ``with batch_statistics(model, 8) as forward: logits = forward(x)``.
    """
    layers = _batch_dependent(model)
    was_training = model.training
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(piece) for piece in _pieces(x, layers, images_per_statistic)])

    try:
        with _batch_mode(layers, momentum=0.0):
            yield forward
    finally:
        model.train(was_training)


@torch.no_grad()
def statistics_seen(model: nn.Module, batches: Iterable[torch.Tensor], images_per_statistic: int
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """What each Batch Norm layer of ``model`` normalises with in training, and at test time.

    ``model`` runs in training mode on a copy (so its running statistics are not touched) on
    every batch; for each Batch Norm layer this records the per-channel mean and (biased)
    variance of the first ``images_per_statistic`` images of the batch -- the first part, as
    ``virtual_batches`` or a device would cut it -- and returns, per layer name,
    ``mean`` and ``var`` (batches x channels) with the model's own ``running_mean`` and
    ``running_var`` (channels), which eval mode uses instead. Why small-batch Batch Norm
    fails shows in the gap between the two.
    """
    clone = copy.deepcopy(model).train()
    seen: dict[str, dict[str, list[torch.Tensor]]] = {}
    hooks = []
    for name, layer in clone.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            seen[name] = {"mean": [], "var": []}

            def record(_layer: nn.Module, inputs: tuple[torch.Tensor], name: str = name) -> None:
                part = inputs[0][:images_per_statistic].float()
                var, mean = torch.var_mean(part, dim=[0, *range(2, part.dim())], correction=0)
                seen[name]["mean"].append(mean)
                seen[name]["var"].append(var)

            hooks.append(layer.register_forward_pre_hook(record))
    try:
        for x in batches:
            clone(x)
    finally:
        for hook in hooks:
            hook.remove()
    layers = dict(model.named_modules())
    return {name: {"mean": torch.stack(s["mean"]).cpu(), "var": torch.stack(s["var"]).cpu(),
                   "running_mean": layers[name].running_mean.detach().float().cpu(),
                   "running_var": layers[name].running_var.detach().float().cpu()}
            for name, s in seen.items()}
