"""Batch Norm's training statistics from Group Norm's vectorised kernel (``_FastBatchNorm``),
over this batch or over every rank's: the synchronized layer's only implementation, and the
plain and virtual-batch layers' with ``fast=True`` (``normlab.batchnorm`` says when).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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
            mean, var, count = over_ranks(mean, var, count, group)
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


def over_ranks(mean: torch.Tensor, var: torch.Tensor, count: int, group
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
