"""Batched augmentation: each works on a whole batch as a few tensor operations (airbench's
way), from random numbers drawn up front, so one seed gives the same images on any device.

Each augmentation is an ``Augment``: how many uniform numbers in [-1, 1) it draws per image,
and the function that applies them. ``AUGMENTS`` maps the names ``--augment`` takes; a data
set's kind chooses the default (``default_augment``): MNIST's small affine maps for
one-channel images, random crops of the image padded by 4 and horizontal flips for colour
images (He et al.'s CIFAR recipe), none for signals and volumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 7.0,
                  translate: float = 2.0, scale: float = 0.1) -> torch.Tensor:
    """Rotate (+-degrees), shift (+-translate pixels) and scale (1 +- scale) a whole batch.

    The per-batch equivalent of torchvision's per-sample RandomAffine, with the random draws
    from ``generator`` (on the CPU) so that one seed gives the same augmentation on any device.
    """
    draws = torch.rand(len(x), 4, generator=generator).to(x.device) * 2 - 1
    return affine(x, draws, degrees, translate, scale)


def affine(x: torch.Tensor, draws: torch.Tensor, degrees: float = 7.0, translate: float = 2.0,
           scale: float = 0.1) -> torch.Tensor:
    """Apply the affine maps chosen by ``draws`` (n x 4, uniform in [-1, 1): angle, scale, x and
    y shift, as fractions of their ranges) to the batch ``x``: one affine grid, sampled
    bilinearly, computed on ``x``'s device.

    Examples:
        >>> x = torch.rand(2, 1, 28, 28)
        >>> same = affine(x, torch.zeros(2, 4))  # draws of 0: the identity map
        >>> torch.allclose(same, x, atol=1e-5)
        True
    """
    n, _, h, w = x.shape
    angle = draws[:, 0] * math.radians(degrees)
    factor = 1 + draws[:, 1] * scale
    # affine_grid works in normalised coordinates, where the image spans [-1, 1].
    shift = draws[:, 2:] * translate * torch.tensor([2 / w, 2 / h], device=draws.device)
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_flip(x: torch.Tensor, draws: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Each image of ``x`` (n, C, H, W) cropped back to H x W from a copy padded by ``pad``
    zeros on every side, at the offset ``draws[:, :2]`` chooses, and mirrored left-right
    where ``draws[:, 2] >= 0`` (probability 1/2): the standard CIFAR augmentation, as one
    gather for the whole batch.

    Examples:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> centre = torch.tensor([[0.0, 0.0, -1.0]])  # offset 1 of 0..2, no flip
        >>> crop_flip(x, centre, pad=1)[0, 0]
        tensor([[ 0.,  1.,  2.,  3.],
                [ 4.,  5.,  6.,  7.],
                [ 8.,  9., 10., 11.],
                [12., 13., 14., 15.]])
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offset = ((draws[:, :2] + 1) / 2 * (2 * pad + 1)).long().clamp_(0, 2 * pad)  # 0 .. 2 pad
    rows = offset[:, 0, None] + torch.arange(h, device=x.device)  # (n, H)
    cols = offset[:, 1, None] + torch.arange(w, device=x.device)  # (n, W)
    cols = torch.where(draws[:, 2, None] >= 0, cols.flip(1), cols)  # a mirrored crop
    batch = torch.arange(n, device=x.device)[:, None, None]
    # padded[i, :, rows[i, r], cols[i, c]] for every i, r, c: (n, H, W, C), then channels first
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Augment:
    """A batched augmentation: ``draws`` uniform numbers per image, applied by ``apply``."""

    name: str
    draws: int
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    what: str


AUGMENTS: dict[str, Augment] = {a.name: a for a in (
    Augment("affine", 4, affine, "rotation by up to 7 degrees, shifts by up to 2 pixels and "
            "scaling by up to 10 % (MNIST's)"),
    Augment("crop-flip", 3, crop_flip, "random 4-pixel-padded crops and horizontal flips "
            "(CIFAR's)"),
    Augment("none", 0, None, "no augmentation"),
)}


def default_augment(kind: str, channels: int) -> str:
    """The augmentation a data set gets unless ``--augment`` says otherwise.

    Examples:
        >>> [default_augment("image", 1), default_augment("image", 3),
        ...  default_augment("volume", 1)]
        ['affine', 'crop-flip', 'none']
    """
    if kind != "image":
        return "none"  # a flip or crop of a signal or volume may change its class
    return "affine" if channels == 1 else "crop-flip"
