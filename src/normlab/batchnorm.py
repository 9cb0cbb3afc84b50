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

from .device import at_least_fp32
from .fastbn import FAST_MIN_PIXELS, _FastBatchNorm, channel_statistics, over_ranks

__all__ = ["FAST_MIN_PIXELS", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "RenormSchedule", "renorm_limits", "twin_of"]


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
            full = at_least_fp32(x)
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
            mean, var, _ = over_ranks(mean, var, x.numel() // x.shape[1], group)
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


_TORCH_BATCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def twin_of(layer: _BatchStatistics, dims: int | None = None, share: bool = False
            ) -> nn.Module | str:
    """PyTorch's layer that computes what ``layer`` computes in eval mode, with its settings,
    state and mode: copies of its tensors, or with ``share`` the very same ones (for
    TorchScript). A string says why there is none."""
    dims = next((d for d, kind in _TORCH_BATCH.items() if isinstance(layer, kind)), dims)
    settings = dict(eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                    track_running_stats=layer.track_running_stats)
    if layer.sync or dims is None:
        if share:
            return (f"{type(layer).__name__} with sync=True, or of any dimension, whose "
                    f"PyTorch twin nn.SyncBatchNorm TorchScript cannot compile")
        twin = nn.SyncBatchNorm(layer.num_features, process_group=layer.process_group,
                                **settings)
    else:
        twin = _TORCH_BATCH[dims](layer.num_features, **settings)
    if share:
        twin._parameters, twin._buffers = layer._parameters, layer._buffers
    else:
        state = next(iter(layer.parameters()), None)
        state = state if state is not None else next(iter(layer.buffers()), None)
        if state is not None:  # first, so that the state is copied at its own precision
            twin.to(device=state.device, dtype=state.dtype)
        twin.load_state_dict(layer.state_dict())
        for key, param in twin.named_parameters():
            param.requires_grad_(getattr(layer, key).requires_grad)
    return twin.train(layer.training)

