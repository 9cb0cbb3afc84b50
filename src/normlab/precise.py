"""Batch Norm's two inference remedies for any model, side by side: ``precise_bn``
recomputes the population statistics of its batch-dependent layers with the final weights
(Wu & Johnson 2021; fvcore's ``update_bn_stats``, which has its own module there too), and
``batch_statistics`` evaluates with mini-batch statistics instead; ``statistics_seen`` shows
what each Batch Norm normalised with in training against what eval mode uses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import sum_over_ranks
from .norms import layer_types

__all__ = ["batch_statistics", "precise_bn", "statistics_seen"]

Input = str | int | Callable[[Any], torch.Tensor] | None


def _batch_dependent(model: nn.Module) -> list[nn.Module]:
    """The layers whose output depends on the other images of the batch in training and
    that keep running statistics for eval: PyTorch's Batch Norms that track them, and every
    batch-dependent record's layers (Batch Renorm, EvoNorm-B0, registered ones)."""
    records = layer_types(batch_dependent=True)
    return [m for m in model.modules()
            if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None)
            or (isinstance(m, records) and getattr(m, "running_var", None) is not None)]


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
def precise_bn(model: nn.Module, batches: Iterable[Any], images: int | None = None,
               images_per_statistic: int | None = None, *, input: Input = None) -> int:
    """PreciseBN (Wu & Johnson 2021; fvcore's ``update_bn_stats``): recompute the running
    statistics of every batch-dependent layer of ``model`` with its final weights, as the
    average over ``batches`` of each batch's statistics (equal weight per batch), instead of
    the moving average that training left, which mixes statistics of earlier weights.

    The batch-dependent layers (any Batch Norm, Batch Renorm as plain Batch Norm, EvoNorm-B0)
    run in training mode, everything else in eval mode, without gradients; nothing but
    their ``running_mean`` / ``running_var`` changes. ``batches`` yields inputs, tuples whose
    first element is the input, or anything ``input`` picks the input from (a key of a dict
    batch, as MONAI's loaders yield, or a function); ``images`` stops after that many
    images, in whole batches. ``images_per_statistic`` computes each statistic over that
    many images of a batch, e.g. the grouping the model trained with; by default over the
    whole batch, the population statistics. Under torch.distributed
    every rank calls it with its own batches, and the averages are taken over all ranks'.

    Args:
        model: any model with Batch Norm (or Batch Renorm, EvoNorm-B0) layers.
        batches: its inputs, or tuples whose first element is the input, or batches that
            ``input`` picks the input from.
        images: stop after this many images, in whole batches (default: all batches).
        images_per_statistic: compute each statistic over this many images of a batch.
        input: where the input is in each batch: a key (``"image"`` for a dict, an index for
            a tuple) or a function of the batch; by default the batch itself, or its first
            element if it is a tuple or list.

    Returns:
        The number of statistics averaged (batches, or groups of images per statistic where
        the layers cannot cut a batch themselves).

    Raises:
        ValueError: a model without running statistics, fewer images than one batch, or a
            batch whose input cannot be found (it names what it got).

    Example: ``precise_bn(model, train_loader, images=10_000, input="image")`` for a loader
    of ``{"image": ..., "label": ...}`` dicts.
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
                x = _input_of(batch, input)
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
    total = torch.tensor([float(used)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total, *flat = sum_over_ranks(total, *(t for pair in sums for t in pair))
        sums = [flat[i:i + 2] for i in range(0, len(flat), 2)]
    for m, (mean, var) in zip(layers, sums, strict=True):
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(mean / total)
        m.running_var.copy_(var / total)
    return used


def _input_of(batch: Any, input: Input) -> torch.Tensor:
    """The model's input in ``batch``, picked by ``input`` (precise_bn's argument)."""
    if callable(input):
        x = input(batch)
    elif input is not None:
        try:
            x = batch[input]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"precise_bn(input={input!r}): a batch of type "
                             f"{_kind(batch)} has no {input!r}") from None
    else:
        x = batch[0] if isinstance(batch, tuple | list) and batch else batch
    if not isinstance(x, torch.Tensor):
        hint = (" (pass input= with the key of the images)" if isinstance(batch, Mapping)
                else "")
        raise ValueError(f"precise_bn needs a tensor input from each batch, got "
                         f"{_kind(x if input is not None else batch)}{hint}")
    return x


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"dict with keys {', '.join(map(repr, list(value)[:6]))}"
    return type(value).__name__


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

    Examples:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), BatchNorm2d(4))
        >>> batches = [torch.randn(8, 1, 6, 6) for _ in range(3)]
        >>> seen = statistics_seen(model, batches, 2)
        >>> list(seen), seen["1"]["mean"].shape  # a row per batch, a column per channel
        (['1'], torch.Size([3, 4]))
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
