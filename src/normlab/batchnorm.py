"""Batch Norm, the one normalization whose statistics depend on *which images share a
batch*, in the settings normlab studies, for (N, C), (N, C, L), (N, C, H, W) and
(N, C, D, H, W) inputs; ``normlab.norms`` builds them by name and puts them into any model.

Under data-parallel training each device normalises with its own slice of the global batch,
which is what Group Norm was invented to avoid (Wu & He, 2018). One implementation covers:

* plain: exactly ``nn.BatchNorm1d/2d/3d`` (the layers *are* those; the forward is
  PyTorch's own);
* ``virtual_batches=K``: each training batch is split into K parts (as ``torch.tensor_split``
  splits it over K devices) and each part is normalised with its own statistics -- "ghost
  batch norm" (Hoffer et al., 2017), the per-device effect inside one process;
* ``sync=True``: statistics over the whole global batch of every rank, gathered and reduced
  with ``torch.distributed``, so it runs on CPU too (``nn.SyncBatchNorm`` refuses CPU
  tensors);
* Batch Renormalization (Ioffe 2017, ``BatchRenorm*d``) in each of these settings.

All keep ``nn.BatchNorm*d``'s running statistics (unbiased variance, same momentum) and its
state_dict keys, so their weights load into one another. ``BatchNorm`` and ``BatchRenorm``
take any input of two or more dimensions, as ``nn.SyncBatchNorm`` does; the 1d/2d/3d classes
check the dimension as PyTorch's do.

One implementation, ``_FastBatchNorm``, computes the statistics from Group Norm's vectorised
kernel instead of Batch Norm's scalar loop and serves all settings: the synchronized layer
always, plain and virtual batches with ``fast=True`` on maps of ``FAST_MIN_PIXELS`` or more.
It agrees with ``nn.BatchNorm2d`` (outputs, gradients, running statistics) to float32
rounding, not bit for bit, so ``fast`` is off by default and the plain and virtual-batch
results keep PyTorch's kernel (docs/performance.md).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _FastBatchNorm(torch.autograd.Function):
    """Training-mode Batch Norm of an (N, C, *) tensor with statistics from Group Norm's
    kernel, over this batch or (``group``) over every rank's batch.

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
        c = x.shape[1]
        count = x.numel() // c  # values per channel
        mean, var = channel_statistics(x)
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


def channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's mean and biased variance over (N, *) of a contiguous (N, C, *) tensor,
    from Group Norm's vectorised kernel with one group per channel (each image's mean and
    1/std per channel), combined by Chan's formula; zeros for an empty batch. No gradient."""
    n, c = x.shape[:2]
    if not n:  # a rank with no images this step still joins the all-gather
        return x.new_zeros(c), x.new_zeros(c)
    _, means, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, x.numel() // (n * c),
                                                      c, 0.0)
    mean = means.mean(0)
    return mean, rstd.pow(-2).mean(0) + (means - mean).square().mean(0)


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



class _BatchStatistics:
    """What normlab adds to ``nn.BatchNorm1d/2d/3d`` (mixed in before them): training
    statistics from parts of the batch (``virtual_batches``) or from every rank's batch
    (``sync``), and the fast statistics (``fast``).

    Running statistics: with ``virtual_batches=K`` they move towards the *average* of the K
    parts' means and unbiased variances, which is exactly what K devices' running statistics
    averaged after training give (the update is linear); with ``sync`` towards the global
    batch's. In one process, or in eval mode, the layer is plain Batch Norm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 virtual_batches: int = 1, sync: bool = False,
                 process_group: dist.ProcessGroup | None = None,
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

    def __prepare_scriptable__(self) -> nn.Module:
        """For ``torch.jit.script``: a plain layer becomes its PyTorch twin
        (``nn.BatchNorm1d/2d/3d``, sharing this layer's parameters and buffers), which
        TorchScript compiles; any other setting is refused in one line saying what to do."""
        from .convert import twin_of

        special = [what for what, on in (
            (f"virtual_batches={self.virtual_batches}", self.virtual_batches > 1),
            ("sync=True", self.sync), ("fast=True", self.fast),
            ("Batch Renorm's correction", self._corrects())) if on]
        twin = twin_of(self, share=True) if not special else None
        if twin is None or isinstance(twin, str):
            why = ", ".join(special) if special else "no fixed dimension"
            raise RuntimeError(f"torch.jit.script cannot compile normlab's "
                               f"{type(self).__name__} ({why}); use torch.compile, or "
                               f"normlab.convert.to_torch(model) first for PyTorch's layers "
                               f"(its eval outputs are the same)")
        return twin

    def _synchronised(self) -> bool:
        return (self.sync and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def _corrects(self) -> bool:
        """Whether training statistics need ``_correction`` (Batch Renorm's r and d)."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and (self.virtual_batches > 1 or self._synchronised()
                              or self._corrects()):
            self._check_input_dim(x)
            # Statistics in float32 also under bfloat16 autocast, as PyTorch's kernels do.
            full = x.to(torch.promote_types(x.dtype, torch.float32))
            y = self._sync_forward(full) if self.sync else self._virtual_forward(full)
            return y.to(x.dtype)
        if self.training and len(x) and self._fast_for(x):  # plain, fast statistics
            self._check_input_dim(x)
            y, mean, var = _FastBatchNorm.apply(x, self.weight, self.bias, self.eps)
            self._update_running(mean, var)
            return y
        return super().forward(x)

    def _virtual_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch Norm per part (``_batch_norm``), whose means and unbiased variances we then
        average for the running statistics."""
        k, c = self.virtual_batches, self.num_features
        n = len(x)
        if n < k:
            raise ValueError(f"virtual_batches={k} needs at least {k} images, got {n}: every "
                             f"part needs an image to compute its statistics")
        values = n // k * math.prod(x.shape[2:])  # per channel in the smallest part
        if values < 2 and (k > 1 or self._corrects()):
            where = f" in {k} virtual batches leaves" if k > 1 else " has"
            raise ValueError(f"an input of shape {tuple(x.shape)}{where} {values} value per "
                             f"channel{' in a part' if k > 1 else ''}, and Batch Norm's "
                             f"statistics need at least two: give more images or larger "
                             f"maps{', or fewer virtual batches' if k > 1 else ''}")
        if k == 1:  # Batch Renorm over the whole batch
            y, mean, var = self._batch_norm(x, self.weight, self.bias, 1)
            self._update_running(mean, var)
            return y
        if n % k == 0:  # the usual case: one call on (N/K, K*C, ...), parts side by side
            parts = x.reshape(k, n // k, c, *x.shape[2:]).transpose(0, 1).flatten(1, 2)
            y, mean, var = self._batch_norm(parts, self._repeat(self.weight, k),
                                            self._repeat(self.bias, k), k)
            y = y.reshape(n // k, k, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)
            self._update_running(mean.view(k, c).mean(0), var.view(k, c).mean(0))
            return y
        # A smaller last batch that K does not divide: split it as K devices would.
        outputs, means, variances = [], [], []
        for part in x.tensor_split(k):
            if len(part) == 0:
                continue
            y, mean, var = self._batch_norm(part, self.weight, self.bias, 1)
            outputs.append(y)
            means.append(mean)
            variances.append(var)
        self._update_running(torch.stack(means).mean(0), torch.stack(variances).mean(0))
        return torch.cat(outputs)

    def _fast_for(self, x: torch.Tensor) -> bool:
        """Whether plain or virtual batches take ``_FastBatchNorm``: asked for, on a float32
        contiguous CPU tensor whose maps have at least ``FAST_MIN_PIXELS`` values. Smaller
        maps, where a few more small operations cost more than the faster statistics save,
        and anything else go to PyTorch's kernel."""
        return (self.fast and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.dim() > 2 and x.is_contiguous()
                and math.prod(x.shape[2:]) >= FAST_MIN_PIXELS)

    def _batch_norm(self, x: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, parts: int) -> tuple[torch.Tensor, ...]:
        """Training-mode Batch Norm of ``x`` over its own statistics (``x`` holds ``parts``
        parts side by side as channels): the output, and the per-channel mean and unbiased
        variance for the running statistics."""
        if self._corrects():
            weight, bias = self._correction(x, weight, bias, parts)
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
        weight, bias = self.weight, self.bias
        if self._corrects():
            weight, bias = self._correction(x, weight, bias, 1, group)
        y, mean, var = _FastBatchNorm.apply(x.contiguous(), weight, bias, self.eps, group)
        self._update_running(mean, var)
        return y

    def _correction(self, x: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, parts: int, group=None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return weight, bias

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """``nn.BatchNorm``'s update: momentum, or a cumulative average when it is None."""
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked.add_(1)
        f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
             else self.momentum)
        self.running_mean.mul_(1 - f).add_(mean.detach() * f)
        self.running_var.mul_(1 - f).add_(unbiased_var.detach() * f)


class _AnyDimension:
    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least a 2-D input (N, C, ...), got {x.dim()}-D")


class BatchNorm(_BatchStatistics, _AnyDimension, nn.modules.batchnorm._BatchNorm):
    """Batch Norm with the arguments of ``BatchNorm2d`` for inputs of any dimension
    (N, C, ...), like ``nn.SyncBatchNorm``: what ``convert`` puts in place of a layer whose
    input dimension it cannot know (``nn.SyncBatchNorm``, ``nn.GroupNorm``)."""


class BatchNorm1d(_BatchStatistics, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (inputs (N, C) or (N, C, L)) with the arguments of
    ``BatchNorm2d``: virtual batches, synchronized and fast statistics."""


class BatchNorm2d(_BatchStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (inputs (N, C, H, W)) whose training statistics may come from
    parts of the batch or from every rank's batch; plain, it is PyTorch's own layer, with
    its state_dict keys and running statistics.

    Args:
        num_features: channels, as for ``nn.BatchNorm2d``.
        eps: added to the variance, as for ``nn.BatchNorm2d``.
        momentum: of the running statistics (None: a cumulative average), as for
            ``nn.BatchNorm2d``.
        affine: learn a scale and shift per channel.
        track_running_stats: keep running statistics for eval mode.
        virtual_batches: split each training batch into this many parts (as
            ``torch.tensor_split`` splits it over that many devices), each normalised with
            its own statistics ("ghost batch norm"); the running statistics move towards the
            parts' average, as averaging that many devices' would.
        sync: normalise with the statistics of every rank's batch under
            ``torch.distributed`` (gloo or nccl; unequal batches, even empty ones, weigh
            exactly); in one process, plain Batch Norm.
        process_group: the ranks to synchronize over (default: all).
        fast: compute plain and virtual statistics with Group Norm's vectorised kernel on
            float32 CPU maps of ``FAST_MIN_PIXELS`` or more (equal to PyTorch's within
            float32 rounding, not bit for bit).

    ``BatchNorm1d``, ``BatchNorm3d`` and ``BatchNorm`` (any dimension) take the same
    arguments.

    Examples:
        Each quarter of a batch normalised on its own, as four devices would:

        >>> bn = BatchNorm2d(8, virtual_batches=4)
        >>> x = torch.randn(16, 8, 5, 5)
        >>> y = bn(x)
        >>> part = y[:4].transpose(0, 1).flatten(1)  # the first device's images
        >>> var, mean = torch.var_mean(part, 1, correction=0)
        >>> bool(mean.abs().max() < 1e-5), bool((var - 1).abs().max() < 1e-3)
        (True, True)
    """


class BatchNorm3d(_BatchStatistics, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` (inputs (N, C, D, H, W)) with the arguments of ``BatchNorm2d``:
    virtual batches, synchronized and fast statistics."""


class _BatchRenorm(_BatchStatistics):
    """Batch Renormalization (Ioffe 2017, Algorithm 1): in training,

        x̂ = (x − μ_B) / σ_B · r + d,   r = clip(σ_B / σ, 1/r_max, r_max),
                                        d = clip((μ_B − μ) / σ, −d_max, d_max),

    with σ_B = √(biased batch variance + ε), σ = √(running_var + ε), μ = running_mean, and
    r and d treated as constants by autograd; then y = γ x̂ + β. With r = 1 and d = 0 it is
    Batch Norm; with the clips wide open, training normalises like the running statistics
    that eval mode uses, which is what removes the train/test mismatch at small batches.
    It is computed as Batch Norm with scale γ·r and shift β + γ·d (r and d detached), so
    every Batch Norm setting applies: virtual batches (each part its own r and d),
    synchronized statistics, the fast statistics. Eval mode uses the running statistics.

    Running statistics are updated exactly as ``nn.BatchNorm`` updates them (the batch's
    mean and *unbiased* variance, the same momentum), so Batch Norm weights load into it and
    back; the paper keeps a moving average of σ instead of the variance, which differs only
    in second order. ``r_max`` and ``d_max`` are plain attributes: ``RenormSchedule`` raises
    them from 1 and 0 during training, as the paper does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 r_max: float = 3.0, d_max: float = 5.0, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        if r_max < 1 or d_max < 0:
            raise ValueError(f"Batch Renorm needs r_max >= 1 and d_max >= 0, got r_max={r_max}, "
                             f"d_max={d_max}")
        self.r_max, self.d_max = r_max, d_max

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"

    def _corrects(self) -> bool:
        return self.running_mean is not None

    @torch.no_grad()
    def _renorm(self, x: torch.Tensor, parts: int, group=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """r and d for each channel of ``x`` (``parts`` parts side by side as channels), from
        its statistics (over every rank's with ``group``) and the running ones."""
        mean, var = channel_statistics(x.contiguous())
        if group is not None:
            mean, var, _ = _over_ranks(mean, var, x.numel() // x.shape[1], group)
        running_std = (self.running_var + self.eps).sqrt().repeat(parts)
        r = ((var + self.eps).sqrt() / running_std).clamp(1 / self.r_max, self.r_max)
        d = ((mean - self.running_mean.repeat(parts)) / running_std).clamp(-self.d_max,
                                                                            self.d_max)
        return r.to(x.dtype), d.to(x.dtype)

    def _correction(self, x: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, parts: int, group=None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        r, d = self._renorm(x, parts, group)
        scale = r if weight is None else weight * r
        shift = d if weight is None else weight * d
        return scale, shift if bias is None else bias + shift


class BatchRenorm(_BatchRenorm, _AnyDimension, nn.modules.batchnorm._BatchNorm):
    """Batch Renorm (``_BatchRenorm``) for inputs of any dimension (N, C, ...)."""


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    """Batch Renorm (``_BatchRenorm``) for (N, C) or (N, C, L) inputs."""


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    """Batch Renorm (``_BatchRenorm``) for (N, C, H, W) inputs.

    Examples:
        >>> brn = BatchRenorm2d(8, r_max=1.5, d_max=0.5)  # Wu & He's limits
        >>> brn(torch.randn(4, 8, 3, 3)).shape
        torch.Size([4, 8, 3, 3])
    """


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    """Batch Renorm (``_BatchRenorm``) for (N, C, D, H, W) inputs."""


# Ioffe (2017) trained plain Batch Norm (r_max 1, d_max 0) for the first 5k steps, then
# relaxed the limits linearly to r_max = 3 at 40k steps and d_max = 5 at 25k steps, and
# reported Batch Renorm at 130k steps; a faster relaxation caused loss blow-ups. As fractions
# of a run, rounded: plain for the first 5%, d_max reached at 20%, r_max at 30% (which also
# ends the one-cycle schedule's warm-up).
RENORM_PLAIN, RENORM_D_FULL, RENORM_R_FULL = 0.05, 0.20, 0.30


def renorm_limits(progress: float, r_max: float = 3.0, d_max: float = 5.0
                  ) -> tuple[float, float]:
    """(r_max, d_max) at ``progress`` (0 to 1) through a run, on the paper's schedule.

    Examples:
        >>> renorm_limits(0.0), renorm_limits(0.2), renorm_limits(1.0)
        ((1.0, 0.0), (2.2, 5.0), (3.0, 5.0))
    """
    if progress < RENORM_PLAIN:
        return 1.0, 0.0
    grown = progress - RENORM_PLAIN
    return (1.0 + (r_max - 1.0) * min(1.0, grown / (RENORM_R_FULL - RENORM_PLAIN)),
            d_max * min(1.0, grown / (RENORM_D_FULL - RENORM_PLAIN)))


class RenormSchedule:
    """Sets every Batch Renorm layer's ``r_max`` and ``d_max`` from the steps a run has
    taken (``update(step)`` before each step), on the paper's schedule towards each layer's
    own limits as it was built (``convert(model, "batchrenorm", r_max=..., d_max=...)``),
    or towards ``r_max`` and ``d_max`` where given; a function of the step alone, so a
    resumed run continues exactly.

    Examples:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchRenorm2d(8))
        >>> schedule = RenormSchedule(model, total_steps=1000)
        >>> schedule.update(0)  # plain Batch Norm at first
        >>> model[1].r_max, model[1].d_max
        (1.0, 0.0)
        >>> schedule.update(1000)
        >>> model[1].r_max, model[1].d_max
        (3.0, 5.0)
    """

    def __init__(self, model: nn.Module, total_steps: int, r_max: float | None = None,
                 d_max: float | None = None) -> None:
        self.layers = [(m, r_max or m.r_max, m.d_max if d_max is None else d_max)
                       for m in model.modules() if isinstance(m, _BatchRenorm)]
        self.total = total_steps

    def update(self, step: int) -> None:
        for layer, r_max, d_max in self.layers:
            layer.r_max, layer.d_max = renorm_limits(step / self.total, r_max, d_max)
