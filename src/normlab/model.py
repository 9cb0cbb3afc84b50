"""The compact MNIST CNN whose only moving part is the normalization layer.

Every convolution is followed by the same block: norm -> ReLU (-> dropout), or, for the
norms that are their own activation (FRN, EvoNorm: their record's ``activation``), that
one layer (timm's ``create_norm_act`` pattern). Which normalization it is comes from
``normlab.norms.make_norm`` and its records (``norms.NORMS``), so the switch lives in one
place (the pattern timm's ``create_norm.py`` uses). ``weight_std`` makes every convolution
followed by a norm a Weight-Standardized one (``StdConv2d``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .norms import NORMS, StdConv2d, make_norm, norm_record

__all__ = ["ARCHITECTURE", "NORMS", "MaxPool2x2", "Net", "count_parameters", "make_norm"]


# (name, out_channels, kernel) for each conv; "pool" is a 2x2 max-pool. Input 1x28x28.
# Unpadded 3x3 convs shrink the map: 28 -> 26 -> 24, pool -> 12, 1x1 transition, then
# 12 -> 10 -> 8 -> 6 -> 4 and global average pooling before a 1x1 classifier. Pooling after
# two convolutions rather than three keeps the costly full-resolution part short (1.06 M
# multiply-adds per image instead of 1.62 M) and scored higher on held-out training images
# (docs/tuning.md).
ARCHITECTURE: tuple[tuple[str, int, int], ...] = (
    ("conv1", 8, 3),
    ("conv2", 16, 3),
    ("pool", 0, 2),
    ("trans", 8, 1),
    ("conv3", 12, 3),
    ("conv4", 16, 3),
    ("conv5", 16, 3),
    ("conv6", 20, 3),
)


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        corners = [x[..., i::2, j::2] for i, j in _CORNERS]
        y = torch.maximum(torch.maximum(corners[0], corners[1]),
                          torch.maximum(corners[2], corners[3]))
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, y = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        taken = torch.zeros_like(y, dtype=torch.bool)
        for i, j in _CORNERS:  # each window's gradient goes to its first maximum only
            hit = (x[..., i::2, j::2] == y) & ~taken
            taken |= hit
            grad_x[..., i::2, j::2] = grad * hit
        return grad_x


_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)``: the same outputs and the same gradients (a tie goes to the first
    maximum of the window in row-major order, as PyTorch's kernel does), computed as the
    maximum of four strided slices. PyTorch's channels-first CPU kernel spent 14% of a
    training step on this one layer; this takes a fifth of its forward time
    (docs/performance.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor odd sizes, as MaxPool2d
        return _MaxPool2x2.apply(x[..., :h, :w])


class Net(nn.Module):
    """Compact CNN for 1x28x28 digits; returns N x 10 log-probabilities.

    Args:
        norm: which normalization every conv block uses (see ``NORMS``).
        num_groups: groups for ``norm="group"``; must divide every conv's channels.
        dropout: drop probability after each conv block (0 disables it).
        architecture: the conv stack, as in ``ARCHITECTURE``; change it to study width.
        virtual_batches: for the batch-dependent norms that take them (their record's
            ``virtual``),
            split each training batch into this many parts, each normalised with its own
            statistics (``norms.BatchNorm2d``).
        weight_std: Weight Standardization (``norms.StdConv2d``) for every convolution
            followed by a norm; the classifier is not.

    Examples:
        >>> net = Net("group", num_groups=4)
        >>> net(torch.randn(2, 1, 28, 28)).exp().sum(1)  # probabilities
        tensor([1.0000, 1.0000], grad_fn=<SumBackward1>)
        >>> count_parameters(net)
        9530
    """

    def __init__(
        self,
        norm: str = "batch",
        num_groups: int = 4,
        dropout: float = 0.0,
        architecture: Sequence[tuple[str, int, int]] = ARCHITECTURE,
        num_classes: int = 10,
        virtual_batches: int = 1,
        weight_std: bool = False,
    ) -> None:
        super().__init__()
        record = norm_record(norm)
        if num_groups <= 0:
            raise UsageError(f"num_groups must be positive, got {num_groups}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {dropout}")
        if num_classes <= 0:
            raise UsageError(f"num_classes must be positive, got {num_classes}")
        self.norm, self.num_groups, self.dropout = norm, num_groups, dropout
        self.virtual_batches, self.weight_std = virtual_batches, weight_std
        self.architecture = tuple((str(n), int(c), int(k)) for n, c, k in architecture)

        layers: list[nn.Module] = []
        in_ch = 1
        for name, out_ch, kernel in self.architecture:
            if name == "pool":
                if kernel != 2:
                    raise UsageError(f"layer {name}: only 2x2 max-pooling is supported")
                layers.append(MaxPool2x2())
                continue
            if out_ch <= 0 or kernel <= 0:
                raise UsageError(f"layer {name}: channels and kernel must be positive")
            try:
                record.check(out_ch, num_groups, virtual_batches)
            except UsageError as exc:
                raise UsageError(f"layer {name}: {exc}") from None
            conv = StdConv2d if weight_std and norm != "none" else nn.Conv2d
            block = [conv(in_ch, out_ch, kernel, bias=norm == "none"),
                     make_norm(norm, out_ch, num_groups, virtual_batches)]
            if not record.activation:
                block.append(nn.ReLU(inplace=True))
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            layers.append(nn.Sequential(*block))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(in_ch, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.head(x.mean(dim=(2, 3), keepdim=True))
        return F.log_softmax(x.flatten(1), dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters.

    Examples:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
