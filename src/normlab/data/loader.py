"""Mini-batches from a split held in memory: the whole split is one tensor, so a batch is an
index into it rather than 128 Python objects, and augmentation runs on the batch as one tensor
operation (airbench's way)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from .augment import AUGMENTS

Stat = float | Sequence[float]


class Loader:
    """Mini-batches from an in-memory split: uint8 pixels (N x H x W for grayscale images,
    N x C x ... otherwise), scaled to [0, 1], or floats as they are.

    The split is moved to ``device`` once; each batch is gathered by index, converted to
    float, optionally augmented and normalised there, so a GPU run makes no per-batch host
    copies. Shuffling and augmentation draw from one seeded generator: the same seed gives
    the same batches, and ``generator.get_state()`` is all a checkpoint needs to resume.
    ``augment`` is a name of ``AUGMENTS`` (True: "affine", False: none); ``mean`` and
    ``std`` one number, or one per channel. ``grayscale`` says that 3-D ``images`` are
    N x H x W grayscale images, given their channel dimension here (default: when they are
    uint8), not N x C x L signals.

    Data parallelism: with ``shard=(rank, world)`` every rank draws the same global shuffle
    and augmentation, and yields only its own contiguous part of each global batch of
    ``batch_size`` (cut as ``torch.tensor_split`` cuts it), so the union over ranks is
    exactly what one process would train on.

    Examples:
        >>> images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
        >>> labels = torch.zeros(10, dtype=torch.long)
        >>> loader = Loader(images, labels, 4, shuffle=True, augment="crop-flip",
        ...                 seed=1, mean=(0.5,) * 3, std=(0.25,) * 3)
        >>> [tuple(x.shape) for x, _ in loader]
        [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, augment: bool | str = False, seed: int = 0,
                 device: torch.device | str = "cpu", mean: Stat = 0.1307, std: Stat = 0.3081,
                 shard: tuple[int, int] = (0, 1), grayscale: bool | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.shuffle, self.shard = batch_size, shuffle, shard
        name = {True: "affine", False: "none"}.get(augment, augment)
        self.augment = AUGMENTS[name] if name != "none" else None
        self.mean, self.std = _per_channel(mean, self.images), _per_channel(std, self.images)
        self.generator = torch.Generator().manual_seed(seed)
        self.grayscale = (images.dim() == 3 and images.dtype == torch.uint8
                          if grayscale is None else grayscale and images.dim() == 3)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def batch_length(self, i: int) -> int:
        """Images in global batch ``i`` (all ranks together): the last one may be short."""
        return min(self.batch_size, len(self.labels) - i * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.labels), self.images.device
        # An epoch's randomness is drawn up front on the CPU generator (the same numbers on
        # any device) and moved to the device in one copy each: no per-batch host transfers.
        order = torch.randperm(n, generator=self.generator).to(device) if self.shuffle else None
        draws = (torch.rand(n, self.augment.draws, generator=self.generator).to(device) * 2 - 1
                 if self.augment is not None else None)
        # On a GPU, prepare the whole epoch in a few large kernels (airbench's way): a step
        # then costs two slices instead of a dozen small launches. On a CPU, batch by batch
        # keeps the working set in cache. Each image's result is the same either way.
        epoch = self._prepare(slice(None) if order is None else order, draws) \
            if self.images.is_cuda else None
        rank, world = self.shard
        for start in range(0, n, self.batch_size):
            stop = start + self.batch_size
            if world > 1:  # this rank's part of the global batch
                start, stop = split_bounds(start, min(stop, n), rank, world)
            index = slice(start, stop) if order is None else order[start:stop]
            x = epoch[start:stop] if epoch is not None else \
                self._prepare(index, None if draws is None else draws[start:stop])
            yield x, self.labels[index]

    def _prepare(self, index: slice | torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """The images at ``index`` as a normalised float batch, augmented by ``draws``."""
        x = self.images[index]
        if self.grayscale:  # N x H x W: one channel
            x = x.unsqueeze(1)
        if x.dtype == torch.uint8:
            x = x.to(torch.get_default_dtype()).div_(255)
        else:
            x = x.to(torch.get_default_dtype(), copy=True)
        if draws is not None:
            x = self.augment.apply(x, draws)
        return x.sub_(self.mean).div_(self.std)


def _per_channel(value: Stat, images: torch.Tensor) -> float | torch.Tensor:
    """A statistic as ``sub_`` / ``div_`` take it: a number, or one per channel shaped to
    broadcast over (N, C, ...)."""
    if isinstance(value, int | float):
        return value
    values = torch.tensor(list(value), dtype=torch.get_default_dtype(), device=images.device)
    return values.view(1, -1, *([1] * (images.dim() - 2)))


def split_bounds(start: int, stop: int, rank: int, world: int) -> tuple[int, int]:
    """The ``rank``-th of ``world`` contiguous parts of ``range(start, stop)``, cut as
    ``torch.tensor_split`` cuts: the first ``(stop - start) % world`` parts one longer."""
    size, extra = divmod(stop - start, world)
    lo = start + rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)
