"""The hooks a study adds to every run's training (``engine.Hook``): a printed line per
epoch, and TensorBoard's event files."""

from __future__ import annotations

from pathlib import Path

from .engine import Hook, Trainer
from .progress import tqdm


class EpochLines(Hook):
    """One printed line per finished epoch (rank 0, experiments that print epochs)."""

    def __init__(self, label: str, epochs: int, split: str) -> None:
        self.label, self.epochs, self.split = label, epochs, split

    def after_epoch(self, trainer: Trainer) -> None:
        row = trainer.row
        tqdm.write(f"  {self.label} epoch {trainer.epoch:2d}/{self.epochs}  lr {row['lr']:.4f}  "
                   f"train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
                   f"{self.split} loss {row['test_loss']:.4f} "
                   f"acc {row['test_acc']:6.2f}%  {row['epoch_time']:5.1f}s")


class TensorBoard(Hook):
    """Each epoch's losses, accuracies and learning rate for ``tensorboard --logdir``."""

    def __init__(self, folder: Path, split: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.board, self.split = SummaryWriter(log_dir=str(folder)), split

    def after_epoch(self, trainer: Trainer) -> None:
        row = trainer.row
        for name, value in (("loss/train", row["train_loss"]),
                            (f"loss/{self.split}", row["test_loss"]),
                            ("accuracy/train", row["train_acc"]),
                            (f"accuracy/{self.split}", row["test_acc"]),
                            ("learning_rate", row["lr"])):
            self.board.add_scalar(name, value, trainer.epoch)
        self.board.flush()  # so that a live `tensorboard --logdir` shows every epoch

    def after_train(self, trainer: Trainer) -> None:
        self.board.close()
