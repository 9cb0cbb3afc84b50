"""Normalization layers by name, and the one Batch Norm that data-parallel training needs.

``make_norm(name, channels)`` is the single switch between normalizations (the pattern of
timm's ``create_norm.py``); ``convert(model, name)`` applies it to any model.

Batch Norm is the only normalization whose statistics depend on *which images share a
batch*. Under data-parallel training each device normalises with its own slice of the
global batch, which is what Group Norm was invented to avoid (Wu & He, 2018). One layer,
``BatchNorm2d``, covers the three settings normlab studies:

* plain: exactly ``nn.BatchNorm2d`` (it *is* one; the forward is PyTorch's own);
* ``virtual_batches=K``: each training batch is split into K parts (as ``torch.tensor_split``
  splits it over K devices) and each part is normalised with its own statistics -- "ghost
  batch norm" (Hoffer et al., 2017), the per-device effect inside one process;
* ``sync=True``: statistics over the whole global batch of every rank, gathered and
  reduced with ``torch.distributed``, so it runs on CPU (``nn.SyncBatchNorm`` refuses CPU
  tensors).

All three keep ``nn.BatchNorm2d``'s running statistics (unbiased variance, same momentum)
and its state_dict keys, so their weights load into one another.

One implementation, ``_FastBatchNorm``, computes the statistics from Group Norm's vectorised
kernel instead of Batch Norm's scalar loop and serves all three: the synchronized layer
always, plain and virtual batches with ``fast=True`` on maps of ``FAST_MIN_PIXELS`` or more.
It agrees with ``nn.BatchNorm2d`` (outputs, gradients, running statistics) to float32
rounding, not bit for bit, so ``fast`` is off by default and the plain and virtual-batch
results keep PyTorch's kernel (docs/performance.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _FastBatchNorm(torch.autograd.Function):
    """Training-mode Batch Norm of an NCHW tensor with statistics from Group Norm's kernel,
    over this batch or (``group``) over every rank's batch.

    PyTorch's CPU Batch Norm gathers each channel's statistics in a scalar loop over N x H x
    W (vectorising it, pytorch PR 113350, was closed over accuracy on large maps), which
    made its forward the slowest norm kernel of a step. Group Norm's kernel, with one group
    per channel, gets every image's per-channel mean and 1/std in one vectorised Welford
    pass over contiguous rows; Chan et al.'s formula combines them exactly (the channel's
    variance is the mean of the images' variances plus the variance of their means), on
    N x C numbers, with no ``E[x^2] - mean^2`` cancellation. The same formula, weighted by
    each rank's pixel count, combines the ranks' statistics: one all-gather of 1 + 2C
    numbers. PyTorch's own vectorised kernels then apply ``x * alpha + beta`` (its eval-mode
    path, fed these statistics) and compute the gradients (below).

    Returns the output, the mean and the *unbiased* variance (for the running statistics).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c = x.shape[:2]
        count = x.numel() // c  # values per channel
        if n:
            _, means, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, count // n,
                                                              c, 0.0)
            mean = means.mean(0)
            var = rstd.pow(-2).mean(0) + (means - mean).square().mean(0)
        else:  # a rank with no images this step still joins the all-gather
            mean, var = x.new_zeros(c), x.new_zeros(c)
        if group is None:
            bessel = count / max(count - 1, 1)  # for the unbiased running variance
        else:  # count becomes a tensor: no host sync on a GPU
            mean, var, count = _over_ranks(mean, var, count, group)
            bessel = count / (count - 1).clamp(min=1)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        y = _affine(x, scale, bias, mean)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.group, ctx.count = eps, group, count
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var * bessel

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _mean: None, _var: None
                 ) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        if ctx.group is None:
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad.contiguous(), x, weight, None, None, mean, invstd, True, ctx.eps,
                [need_x, need_w, need_b])
            return grad_x, grad_w, grad_b, None, None
        # Synchronised: the input gradient needs sum(dy) and sum(dy * (x - mean)) over every
        # rank's images. The eval-mode backward with scale w/std, running_var 0 and eps 1
        # gives this rank's two sums and the first term, dy * w/std, in one pass.
        scale = invstd if weight is None else invstd * weight
        if len(x):
            first, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad.contiguous(), x, scale, mean, torch.zeros_like(mean), None, None, False,
                1.0, [need_x, True, True])
        else:  # (the native kernel divides by zero on an empty batch)
            first = torch.zeros_like(x)
            sum_dy_xmu, sum_dy = mean.new_zeros(2, len(mean))
        # Weight and bias gradients are this rank's share, as DistributedDataParallel expects.
        grad_w = sum_dy_xmu * invstd if need_w else None
        grad_b = sum_dy if need_b else None
        grad_x = None
        if need_x:
            sums = torch.stack([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, group=ctx.group)
            # dx = w/std * (dy - sum(dy)/n - (x - mean)/std^2 * sum(dy (x - mean))/n)
            #    = first - (x * k + b), with the per-channel k and b below.
            k = scale * invstd.square() * sums[1] / ctx.count
            b = scale * sums[0] / ctx.count - mean * k
            grad_x = first.sub_(_affine(x, k, b)) if len(x) else first
        return grad_x, grad_w, grad_b, None, None


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
            mean: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - mean) * scale + shift`` per channel in one vectorised pass: PyTorch's eval-mode
    Batch Norm with running_var 0 and eps 1 multiplies by exactly 1/sqrt(1)."""
    mean = torch.zeros_like(scale) if mean is None else mean
    return torch.ops.aten.native_batch_norm(x, scale, shift, mean, torch.zeros_like(scale),
                                            False, 0.0, 1.0)[0]


def _over_ranks(mean: torch.Tensor, var: torch.Tensor, count: int, group
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's (pixel count, mean, biased variance) per channel, combined exactly by
    Chan's formula in float64 (ranks may hold unequal batches, even none). The count comes
    back as a 0-d tensor."""
    mine = torch.cat([mean.new_tensor([count], dtype=torch.float64), mean.double(),
                      var.double()])
    ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ranks, mine, group=group)
    table = torch.stack(ranks)
    counts, means, variances = table[:, :1], table[:, 1:1 + len(mean)], table[:, 1 + len(mean):]
    total = counts.sum()
    overall = (counts * means).sum(0) / total
    spread = (counts * (variances + (means - overall).square())).sum(0) / total
    return overall.to(mean.dtype), spread.to(var.dtype), total


# Against PyTorch's kernel the fast statistics won on 26x26 and 24x24 maps (about 2x the
# forward) and lost on 10x10 and smaller (benchmarks/fast_batchnorm.py). The synchronized
# layer has no PyTorch kernel to fall back on and uses them at every size.
FAST_MIN_PIXELS = 256


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics may come from parts of the batch
    (``virtual_batches``) or from every rank's batch (``sync``); see the module docstring.

    Running statistics: with ``virtual_batches=K`` they move towards the *average* of the K
    parts' means and unbiased variances, which is exactly what K devices' running statistics
    averaged after training give (the update is linear); with ``sync`` towards the global
    batch's. In one process, or in eval mode, the layer is plain Batch Norm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 virtual_batches: int = 1, sync: bool = False, process_group=None,
                 fast: bool = False, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        if virtual_batches < 1:
            raise ValueError(f"virtual_batches must be >= 1, got {virtual_batches}")
        if sync and virtual_batches > 1:
            raise ValueError("synchronized Batch Norm normalises over the whole global batch; "
                             "it cannot also use virtual batches")
        self.virtual_batches, self.sync, self.process_group = virtual_batches, sync, process_group
        self.fast = fast

    def extra_repr(self) -> str:
        extra = f", virtual_batches={self.virtual_batches}" if self.virtual_batches > 1 else ""
        return (super().extra_repr() + extra + (", sync=True" if self.sync else "")
                + (", fast=True" if self.fast else ""))

    def _synchronised(self) -> bool:
        return (self.sync and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and (self.virtual_batches > 1 or self._synchronised()):
            if x.dim() != 4:
                raise ValueError(f"expected a 4-D input (N, C, H, W), got {x.dim()}-D")
            # Statistics in float32 also under bfloat16 autocast, as PyTorch's kernels do.
            full = x.to(torch.promote_types(x.dtype, torch.float32))
            y = self._sync_forward(full) if self.sync else self._virtual_forward(full)
            return y.to(x.dtype)
        if self.training and len(x) and self._fast_for(x):  # plain, fast statistics
            y, mean, var = _FastBatchNorm.apply(x, self.weight, self.bias, self.eps)
            self._update_running(mean, var)
            return y
        return super().forward(x)

    def _virtual_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch Norm per part (``_batch_norm``), whose means and unbiased variances we then
        average for the running statistics."""
        k, c = self.virtual_batches, self.num_features
        n = len(x)
        if n % k == 0:  # the usual case: one call on (N/K, K*C, H, W), parts side by side
            parts = x.reshape(k, n // k, c, *x.shape[2:]).transpose(0, 1).flatten(1, 2)
            y, mean, var = self._batch_norm(parts, self._repeat(self.weight, k),
                                            self._repeat(self.bias, k))
            y = y.reshape(n // k, k, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)
            self._update_running(mean.view(k, c).mean(0), var.view(k, c).mean(0))
            return y
        # A smaller last batch that K does not divide: split it as K devices would.
        outputs, means, variances = [], [], []
        for part in x.tensor_split(k):
            if len(part) == 0:
                continue
            y, mean, var = self._batch_norm(part, self.weight, self.bias)
            outputs.append(y)
            means.append(mean)
            variances.append(var)
        self._update_running(torch.stack(means).mean(0), torch.stack(variances).mean(0))
        return torch.cat(outputs)

    def _fast_for(self, x: torch.Tensor) -> bool:
        """Whether plain or virtual batches take ``_FastBatchNorm``: asked for, on a float32
        NCHW CPU tensor whose maps have at least ``FAST_MIN_PIXELS`` pixels. Smaller maps,
        where a few more small operations cost more than the faster statistics save, and
        anything else go to PyTorch's kernel."""
        return (self.fast and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.dim() == 4 and x.is_contiguous()
                and x.shape[2] * x.shape[3] >= FAST_MIN_PIXELS)

    def _batch_norm(self, x: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Training-mode Batch Norm of ``x`` over its own statistics: the output, and the
        per-channel mean and unbiased variance for the running statistics."""
        if self._fast_for(x):
            return _FastBatchNorm.apply(x, weight, bias, self.eps)
        # Running buffers with momentum 1 receive the batch's mean and unbiased variance.
        mean, var = x.new_zeros(x.shape[1]), x.new_ones(x.shape[1])
        return F.batch_norm(x, mean, var, weight, bias, True, 1.0, self.eps), mean, var

    @staticmethod
    def _repeat(param: torch.Tensor | None, k: int) -> torch.Tensor | None:
        return None if param is None else param.repeat(k)

    def _sync_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch Norm over every rank's images, by ``_FastBatchNorm`` at any map size: one
        all-gather of each rank's (count, mean, variance) forward, one all-reduce of two
        gradient sums backward, so ranks with unequal batches (or none) weigh exactly."""
        group = self.process_group or dist.group.WORLD
        y, mean, var = _FastBatchNorm.apply(x.contiguous(), self.weight, self.bias, self.eps,
                                            group)
        self._update_running(mean, var)
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """``nn.BatchNorm2d``'s update: momentum, or a cumulative average when it is None."""
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked.add_(1)
        f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
             else self.momentum)
        self.running_mean.mul_(1 - f).add_(mean.detach() * f)
        self.running_var.mul_(1 - f).add_(unbiased_var.detach() * f)


# name -> factory(channels, num_groups). Every normalizing layer carries a per-channel
# scale and shift, so all of them have identical parameter counts and differ only in which
# values share a mean and variance:
#   batch     : per channel, over (N, H, W)          -- statistics shared across the batch
#   syncbatch : per channel, over (N, H, W) of every rank's batch (one process: "batch")
#   layer     : per sample, over (C, H, W)           -- GroupNorm with one group
#   group     : per sample, per group of channels    -- over (C/G, H, W)
#   instance  : per sample, per channel, over (H, W) -- GroupNorm with one channel a group
NORM_LAYERS: dict[str, Callable[[int, int], nn.Module]] = {
    "batch": lambda channels, groups: BatchNorm2d(channels),
    "syncbatch": lambda channels, groups: BatchNorm2d(channels, sync=True),
    "layer": lambda channels, groups: nn.GroupNorm(1, channels),
    "group": lambda channels, groups: nn.GroupNorm(groups, channels),
    "instance": lambda channels, groups: nn.GroupNorm(channels, channels),
    "none": lambda channels, groups: nn.Identity(),
}
NORMS: tuple[str, ...] = tuple(NORM_LAYERS)


def check_norm(norm: str) -> None:
    if norm not in NORM_LAYERS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")


def make_norm(norm: str, channels: int, num_groups: int = 4, virtual_batches: int = 1
              ) -> nn.Module:
    """The normalization layer called ``norm`` for ``channels`` channels.

    ``virtual_batches`` > 1 splits each training batch of a "batch" norm into that many
    parts with their own statistics; the norms without batch statistics ignore it.
    """
    check_norm(norm)
    if norm == "group" and channels % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide {channels} channels; "
                         f"pick a divisor of {channels}")
    if virtual_batches > 1 and norm == "syncbatch":
        raise ValueError("synchronized Batch Norm computes over the whole global batch; it "
                         "does not combine with virtual batches")
    if virtual_batches > 1 and norm == "batch":
        return BatchNorm2d(channels, virtual_batches=virtual_batches)
    return NORM_LAYERS[norm](channels, num_groups)


def convert(module: nn.Module, norm: str, num_groups: int = 4, virtual_batches: int = 1
            ) -> nn.Module:
    """Replace every 2-D normalization in ``module`` -- ``nn.BatchNorm2d`` (normlab's too),
    ``nn.SyncBatchNorm`` and ``nn.GroupNorm`` (so also normlab's layer/group/instance norms)
    -- by ``make_norm(norm, channels, num_groups, virtual_batches)``, the way timm's
    ``convert_sync_batchnorm`` converts: recursively, in place for children, returning the
    module (a new one if ``module`` itself is a norm). The scale and shift are carried over,
    and between Batch Norms the running statistics too, with ``eps``, device, dtype and
    train/eval mode; so ``convert(model, "group")`` runs the study on any network, and
    ``convert(model, "syncbatch")`` makes it ready for ``DistributedDataParallel`` on CPU.
    A ``num_groups`` that does not divide a layer's channels raises a ValueError naming it.
    """
    check_norm(norm)
    return _convert(module, norm, num_groups, virtual_batches, "")


def _convert(module: nn.Module, norm: str, num_groups: int, virtual_batches: int, name: str
             ) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm | nn.GroupNorm):
        return _replacement(module, norm, num_groups, virtual_batches, name or "(the model)")
    for child_name, child in module.named_children():
        new = _convert(child, norm, num_groups, virtual_batches,
                       f"{name}.{child_name}" if name else child_name)
        if new is not child:
            setattr(module, child_name, new)
    return module


def _replacement(old: nn.Module, norm: str, num_groups: int, virtual_batches: int, name: str
                 ) -> nn.Module:
    channels = old.num_channels if isinstance(old, nn.GroupNorm) else old.num_features
    try:
        new = make_norm(norm, channels, num_groups, virtual_batches)
    except ValueError as exc:
        raise ValueError(f"layer {name}: {exc}") from None
    state = next(iter(old.parameters()), None)
    state = state if state is not None else next(iter(old.buffers()), None)
    if state is not None:
        new.to(device=state.device, dtype=state.dtype)
    new.train(old.training)
    if isinstance(new, nn.Identity):
        return new
    new.eps = old.eps
    with torch.no_grad():
        if getattr(old, "weight", None) is not None:
            new.weight.copy_(old.weight)
            new.bias.copy_(old.bias)
        both_track = all(isinstance(m, nn.modules.batchnorm._BatchNorm) and
                         m.running_mean is not None for m in (old, new))
        if both_track:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(new, key).copy_(getattr(old, key))
    return new


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
                var, mean = torch.var_mean(part, dim=(0, 2, 3), correction=0)
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
