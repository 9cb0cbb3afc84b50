"""Normalization-activation layers and Weight Standardization: the small-batch remedies that
need no batch statistics at all (FRN, EvoNorm-S0), or only per-channel variances (EvoNorm-B0),
and the one that changes the convolution instead of the norm (Weight Standardization).

FRN and EvoNorm **replace the norm and the ReLU** after a convolution (timm's
``create_norm_act`` pattern); their parameter names are timm's (``timm/layers/evo_norm.py``,
``filter_response_norm.py``, ``std_conv.py``), so a timm user recognises them. Each is
tested against a float64 implementation of its paper's formula, written in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .device import at_least_fp32


def _per_channel(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) parameter shaped to broadcast over (N, C, H, W), in ``x``'s dtype."""
    return param.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


def _act_repr(layer: nn.Module) -> str:
    return "" if layer.apply_act else ", apply_act=False"


def _check_2d(layer: nn.Module, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{type(layer).__name__} expects (N, C, H, W) input, got "
                         f"{x.dim()}-D")


class _NotScriptable:
    """TorchScript cannot compile these layers' Python (optional parameters, shapes in
    f-strings); refuse in one line, before TorchScript's many lines from inside them."""

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(f"torch.jit.script cannot compile normlab's {type(self).__name__}, "
                           f"which PyTorch has no layer for; use torch.compile(model), or "
                           f"torch.export.export(model, (example,)) to deploy it")


class FilterResponseNorm2d(_NotScriptable, nn.Module):
    """Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2020):

        ν² = mean over H, W of x²,   y = max(γ · x / √(ν² + ε) + β, τ),

    per image and channel, with a learned threshold τ per channel. No batch statistics and no
    mean subtraction; it **replaces the norm and the ReLU** after a convolution. ε = 1e-6 (the
    paper's; it suggests a learned ε for 1×1 maps, which normlab's model never has).
    Parameters ``weight`` (γ), ``bias`` (β) and ``tau`` (τ), as timm names them.
    ``apply_act=False`` drops the threshold (no τ): the normalization alone, for a norm no
    ReLU follows (a residual block's last, before the addition), as timm's ``apply_act``.

    Examples:
        >>> frn = FilterResponseNorm2d(8)
        >>> y = frn(torch.randn(2, 8, 4, 4))
        >>> bool((y >= frn.tau.view(1, -1, 1, 1)).all())  # the threshold
        True
    """

    def __init__(self, num_features: int, eps: float = 1e-6, *, apply_act: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_features, self.eps, self.apply_act = num_features, eps, apply_act
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        self.tau = nn.Parameter(torch.zeros(num_features, **kw)) if apply_act else None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}{_act_repr(self)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_2d(self, x)
        # mean over H, W of x^2 as one fused reduction (a norm), then one fused multiply-add
        nu2 = torch.linalg.vector_norm(at_least_fp32(x), dim=(2, 3), keepdim=True).square() \
            / (x.shape[2] * x.shape[3])
        scale = torch.rsqrt(nu2 + self.eps).to(x.dtype) * _per_channel(self.weight, x)
        y = torch.addcmul(_per_channel(self.bias, x), x, scale)
        return torch.maximum(y, _per_channel(self.tau, x)) if self.apply_act else y


class EvoNorm2dB0(_NotScriptable, nn.Module):
    """EvoNorm-B0 (Liu et al. 2020), a normalization and activation in one layer:

        y = x / max(√(var_{N,H,W}(x) + ε), v · x + √(var_{H,W}(x) + ε)) · γ + β,

    the batch variance per channel (biased, in training; a running variance at eval) against
    each image's own variance per channel. Batch-dependent like Batch Norm, so it takes
    ``virtual_batches`` (each part its own batch variance) and keeps a running variance
    (unbiased, momentum 0.1, as timm); under data parallelism each device uses its own part.
    ε = 1e-3 and the parameter names ``weight``, ``bias``, ``v`` and buffer ``running_var``
    are timm's. It **replaces the norm and the ReLU**. ``apply_act=False`` keeps the left
    side of the maximum, y = x / √(var_{N,H,W}(x) + ε) · γ + β (no ``v``): the normalization
    without the nonlinearity, for a norm no ReLU follows. (timm's ``apply_act=False`` drops
    the division too, leaving only γ x + β; normlab keeps the layer a normalization.)

    Examples:
        >>> evo = EvoNorm2dB0(8, virtual_batches=2)  # a variance per half batch
        >>> evo(torch.randn(4, 8, 5, 5)).shape, evo.running_var.shape
        (torch.Size([4, 8, 5, 5]), torch.Size([8]))
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.1, *,
                 virtual_batches: int = 1, apply_act: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if virtual_batches < 1:
            raise ValueError(f"virtual_batches must be >= 1, got {virtual_batches}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.virtual_batches, self.apply_act = virtual_batches, apply_act
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        self.v = nn.Parameter(torch.ones(num_features, **kw)) if apply_act else None
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def extra_repr(self) -> str:
        extra = f", virtual_batches={self.virtual_batches}" if self.virtual_batches > 1 else ""
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}{extra}"
                f"{_act_repr(self)}")

    def _batch_var(self, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor
                   ) -> torch.Tensor:
        """Each image's batch variance per channel, (N, C, 1, 1), over its part of the batch
        (``virtual_batches``, split as ``torch.tensor_split`` splits), from the images' own
        means and variances by Chan's formula (the part's variance is the mean of its
        images' variances plus the variance of their means): no second pass over ``x``. The
        running variance moves towards the average of the parts' unbiased variances."""
        k = self.virtual_batches
        if len(x) < k:
            raise ValueError(f"virtual_batches={k} needs at least {k} images, got {len(x)}: "
                             f"every part needs an image to compute its statistics")
        pixels = x.shape[2] * x.shape[3]
        if (len(x) // k) * pixels <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"input size {list(x.shape)} in {k} part(s): EvoNorm-B0's batch "
                             f"variance needs at least two values")
        n, c = x.shape[:2]
        if n % k == 0:  # the usual case: every part at once, as (K, N/K, C)
            m, v = mean.view(k, n // k, c), var.view(k, n // k, c)
            batch = v.mean(1) + (m - m.mean(1, keepdim=True)).square().mean(1)  # (K, C)
            count = n // k * pixels
            self._update_running(batch.detach().mean(0) * count / (count - 1))
            return batch.unsqueeze(1).expand(k, n // k, c).reshape(n, c, 1, 1)
        # A smaller last batch that K does not divide: split it as K devices would.
        parts = [(m.flatten(1), v.flatten(1)) for m, v in zip(mean.tensor_split(k),
                                                               var.tensor_split(k), strict=True)]
        batch = [v.mean(0) + (m - m.mean(0)).square().mean(0) for m, v in parts]
        self._update_running(torch.stack([b.detach() * len(m) * pixels / (len(m) * pixels - 1)
                                          for b, (m, _) in zip(batch, parts, strict=True)]
                                         ).mean(0))
        return torch.cat([b.view(1, -1, 1, 1).expand(len(m), -1, 1, 1)
                          for b, (m, _) in zip(batch, parts, strict=True)])

    @torch.no_grad()
    def _update_running(self, unbiased_var: torch.Tensor) -> None:
        self.running_var.mul_(1 - self.momentum).add_(unbiased_var * self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_2d(self, x)
        var, mean = torch.var_mean(at_least_fp32(x), (2, 3), correction=0, keepdim=True)
        batch = self._batch_var(mean, var, x) if self.training \
            else _per_channel(self.running_var, var)
        left = (batch + self.eps).sqrt().to(x.dtype)
        if self.apply_act:
            right = torch.addcmul((var + self.eps).sqrt().to(x.dtype), x,
                                  _per_channel(self.v, x))
            left = torch.maximum(left, right)
        return torch.addcmul(_per_channel(self.bias, x), x / left, _per_channel(self.weight, x))


class EvoNorm2dS0(_NotScriptable, nn.Module):
    """EvoNorm-S0 (Liu et al. 2020), a normalization and activation in one layer:

        y = x · sigmoid(v · x) / √(var over (C/G, H, W) + ε) · γ + β,

    the variance per image and group of channels, as Group Norm's (biased); no batch
    statistics and no running state. ε = 1e-5, ``groups`` as Group Norm's, parameter names
    ``weight``, ``bias``, ``v`` as timm's. It **replaces the norm and the ReLU**.
    ``apply_act=False`` drops the sigmoid gate (no ``v``), as timm's: y = x / σ · γ + β.

    Examples:
        >>> EvoNorm2dS0(8, groups=4)(torch.randn(2, 8, 3, 3)).shape
        torch.Size([2, 8, 3, 3])
    """

    def __init__(self, num_features: int, groups: int = 4, eps: float = 1e-5, *,
                 apply_act: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if groups < 1 or num_features % groups:
            raise ValueError(f"num_groups={groups} does not divide {num_features} channels; "
                             f"pick a divisor of {num_features}")
        self.num_features, self.groups, self.eps = num_features, groups, eps
        self.apply_act = apply_act
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        self.v = nn.Parameter(torch.ones(num_features, **kw)) if apply_act else None

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}{_act_repr(self)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_2d(self, x)
        n, c = x.shape[:2]
        var, _ = torch.var_mean(at_least_fp32(x).reshape(n, self.groups, -1), 2, correction=0,
                                keepdim=True)
        inv = torch.rsqrt(var + self.eps).expand(n, self.groups, c // self.groups)
        scale = inv.reshape(n, c, 1, 1).to(x.dtype) * _per_channel(self.weight, x)
        gated = x * torch.sigmoid(x * _per_channel(self.v, x)) if self.apply_act else x
        return torch.addcmul(_per_channel(self.bias, x), gated, scale)


class NormAct(nn.Module):
    """A normalization followed by what a norm-activation layer of another library did
    after normalizing: timm's ``BatchNormAct2d``, ``GroupNormAct`` and their kind apply
    ``drop`` then ``act`` inside their own ``forward``. ``normlab.convert`` replaces such a
    layer by ``NormAct(new norm, its drop, its act)``, so converting keeps every activation
    (the layout of timm's ``create_norm_act``: the norm, then the same drop and activation).

    Examples:
        >>> layer = NormAct(nn.GroupNorm(2, 4), nn.Identity(), nn.SiLU())
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.equal(layer(x), F.silu(F.group_norm(x, 2, layer.norm.weight,
        ...                                             layer.norm.bias)))
        True
    """

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


class _WeightStandardized:
    """Weight Standardization (Qiao et al. 2019) for a convolution of any dimension: every
    forward, each output filter is standardised to zero mean and unit variance over its inputs
    and kernel positions (biased variance, ε = 1e-6 inside the square root, as timm's
    ``StdConv2d``) before the convolution. The stored ``weight`` stays the raw one, so weights
    load as for the plain convolution. Meant for convolutions followed by a normalization: it
    removes the filters' scale, which the following norm then has to supply."""

    eps: float
    weight: torch.Tensor
    bias: torch.Tensor | None
    out_channels: int

    def standardised_weight(self) -> torch.Tensor:
        # Batch Norm's kernel over (1, out, in * k...): one mean and variance per filter.
        return F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                            training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardised_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class StdConv1d(_WeightStandardized, nn.Conv1d):
    """``nn.Conv1d`` with Weight Standardization (see ``StdConv2d``)."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps


class StdConv2d(_WeightStandardized, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (Qiao et al. 2019): every forward, each output
    filter is standardised to zero mean and unit variance over its inputs and kernel
    positions (biased variance, ε = 1e-6 inside the square root, as timm's ``StdConv2d``)
    before the convolution. The stored ``weight`` stays the raw one, so weights load as for
    ``nn.Conv2d``.

    Examples:
        >>> conv = StdConv2d(3, 4, 3)
        >>> w = conv.standardised_weight().flatten(1)
        >>> var, mean = torch.var_mean(w, 1, correction=0)
        >>> bool(mean.abs().max() < 1e-6), bool((var - 1).abs().max() < 1e-4)
        (True, True)
    """

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps


class StdConv3d(_WeightStandardized, nn.Conv3d):
    """``nn.Conv3d`` with Weight Standardization (see ``StdConv2d``)."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
