"""A residual network as a user would write it: He et al.'s CIFAR ResNets (2016, section 4.2),
adapted to any input size and channel count, with plain PyTorch Batch Norm.

Three stages of ``n`` basic blocks (16, 32 and 64 channels, the last two starting with a
stride of 2), global average pooling and one linear layer: ResNet-``6n+2``, so
``resnet(depth=20)`` is ResNet-20 (0.27 M parameters) and ``resnet(depth=8)`` ResNet-8. Where
the channels or the size change, the shortcut is a 1x1 convolution with its own norm (the
paper's option B). Nothing here knows about normlab: run it through any study with

    normlab remedies --model examples/resnet.py:resnet --model-arg depth=8

and normlab converts its Batch Norms to each variant's normalization (``norms.convert``).
Each norm that a ReLU follows sits with it in an ``nn.Sequential``, as ``convert`` needs to
replace the pair by a normalization-activation layer (FRN, EvoNorm); the block's second norm,
followed by the addition, becomes such a layer without its activation.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_norm(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    """A bias-free convolution and the Batch Norm after it (its bias would be cancelled)."""
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(*conv_norm(c_in, c_out, stride), nn.ReLU(inplace=True),
                                      *conv_norm(c_out, c_out))
        self.shortcut = (nn.Sequential(*conv_norm(c_in, c_out, stride, kernel=1))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10,
                 width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (8, 14, 20, 32, ...), got {depth}")
        blocks = (depth - 2) // 6
        layers: list[nn.Module] = [*conv_norm(in_channels, width), nn.ReLU(inplace=True)]
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if stage and i == 0 else 1))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():  # He initialisation, as the paper
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        return torch.log_softmax(self.head(x), 1)  # normlab's loss is the NLL of log-probs


def resnet(depth: int = 20, in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-``depth`` for ``in_channels``-channel images and ``num_classes`` classes."""
    return ResNet(depth, in_channels, num_classes)
