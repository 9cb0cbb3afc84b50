"""What one training run computes from: ``TrainConfig``, the one frozen config object (as
nanoGPT keeps it), its defaults, and the check that its batches split over processes and
virtual batches. ``normlab.engine`` trains it and re-exports all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError
from .model import ARCHITECTURE
from .modelspec import ModelSpec

__all__ = ["DEFAULTS", "TrainConfig", "virtual_batches_per_process"]

# Defaults shared by the CLI, the notebook and train_model.
DEFAULTS = dict(epochs=20, batch_size=128, lr=0.05, momentum=0.9, weight_decay=0.0,
                lambda_l1=1e-5, num_groups=4, dropout=0.0, seed=1, precision="fp32")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what one training run computes, in one frozen object (as
    nanoGPT keeps it): ``train_model`` trains it, and its checkpoint is keyed by it, so a
    checkpoint is only ever continued by the run that made it.

    Examples:
        >>> config = TrainConfig("group", epochs=5, batch_size=32)
        >>> config.lr, config.checkpoint_key("fp32", 60000, 1)["batch_size"]
        (0.05, 32)
    """

    norm: str = "batch"
    lambda_l1: float = 0.0
    num_groups: int = DEFAULTS["num_groups"]
    epochs: int = DEFAULTS["epochs"]
    seed: int = DEFAULTS["seed"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    momentum: float = DEFAULTS["momentum"]
    weight_decay: float = DEFAULTS["weight_decay"]
    dropout: float = DEFAULTS["dropout"]
    precision: str = DEFAULTS["precision"]
    architecture: Sequence[tuple[str, int, int]] = ARCHITECTURE
    virtual_batch_size: int | None = None  # images per Batch Norm statistic (None: all)
    weight_std: bool = False
    model: ModelSpec | None = None  # a model of your own (None: normlab's Net)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.lambda_l1 < 0:
            raise ValueError(f"the L1 weight must be >= 0, got {self.lambda_l1}")

    def checkpoint_key(self, precision: str, train_images: int, world: int) -> dict[str, Any]:
        """What must match for a checkpoint to be continued: the settings, the precision as
        resolved, the data's size and the world size. Settings at their default that older
        checkpoints did not record (world size 1, no virtual batches, no WS) are left out,
        so those checkpoints still resume."""
        key = dict(norm=self.norm, num_groups=self.num_groups, dropout=self.dropout,
                   lambda_l1=self.lambda_l1,
                   architecture=[list(layer) for layer in self.architecture],
                   epochs=self.epochs, seed=self.seed, batch_size=self.batch_size, lr=self.lr,
                   momentum=self.momentum, weight_decay=self.weight_decay,
                   precision=precision, train_images=train_images)
        key.update({k: v for k, v in (("world_size", world),
                                      ("virtual_batch_size", self.virtual_batch_size))
                    if v not in (None, 1)})
        if self.weight_std:
            key["weight_std"] = True
        if self.model is not None:  # architecture and dropout then say nothing
            key["model"] = self.model.describe()
        return key


def virtual_batches_per_process(train_images: int, batch_size: int, world: int = 1,
                                virtual_batch_size: int | None = None) -> int:
    """Check that every batch can be cut into ``world`` device parts and each part into
    virtual batches; return how many virtual batches each process's batch holds (1: none).

    The global batch must be a multiple of the world size, so that K processes train on
    exactly the batches one process would; every part of the last, short batch must hold an
    image (an empty part has no statistics).
    """
    if batch_size % world:
        raise UsageError(f"the global batch of {batch_size} images does not split over "
                         f"{world} processes; choose a --batch-size that {world} divides")
    per_process = batch_size // world
    parts = 1
    if virtual_batch_size is not None:
        if virtual_batch_size <= 0 or per_process % virtual_batch_size:
            where = f" per process ({batch_size} over {world})" if world > 1 else ""
            raise UsageError(f"--virtual-batch-size {virtual_batch_size} does not divide the "
                             f"batch of {per_process} images{where}; choose a divisor of "
                             f"{per_process}")
        parts = per_process // virtual_batch_size
    last = train_images % batch_size
    if last and last < world * parts:
        raise UsageError(f"the last batch holds {last} of the {train_images:,} training "
                         f"images, too few to give each of {world * parts} parts one; "
                         f"change --limit-train or --batch-size")
    return parts
