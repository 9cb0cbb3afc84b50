"""Batch-size sweep: where Batch Norm breaks down and Group/Layer Norm do not.

Wu & He (2018) introduced Group Norm because BN's batch statistics get noisy as batches
shrink. On MNIST at batch 128 the variants differ by hundredths of a percent; this sweep
trains each variant across batch sizes under one fair protocol so the difference shows:

* every run sees the same number of training images (``samples``: the first ``samples``
  images for ``epochs`` epochs), so small batches get proportionally more steps;
* the peak learning rate is scaled linearly with the batch size (``lr * batch / 128``,
  Goyal et al. 2017), under the same one-cycle schedule;
* everything else (model, augmentation, seed handling, evaluation on the full test set in
  eval mode, so BN uses its running statistics) is ``train_model``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_json
from .data import Data
from .engine import VARIANTS, TrainingDiverged, train_model

DEFAULT_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128)
REFERENCE_BATCH = 128


def scaled_lr(lr: float, batch_size: int) -> float:
    """The linear scaling rule: the peak learning rate grows with the batch size."""
    return lr * batch_size / REFERENCE_BATCH


def run_key(variant: str, batch_size: int, seed: int) -> str:
    return f"{variant}/bs{batch_size}/seed{seed}"


def run_sweep(results: dict[str, Any], path: Path, data: Data, variants: Sequence[str],
              batch_sizes: Sequence[int], seeds: Sequence[int], epochs: int, lr: float,
              lambda_l1: float, num_groups: int, device: torch.device, progress: bool = True,
              log: Callable[[str], None] = print, precision: str = "fp32") -> dict[str, Any]:
    """Train every (variant, batch size, seed) not yet in ``results["runs"]``.

    ``results`` is rewritten to ``path`` after every run, and the run in progress is
    checkpointed after every epoch (in ``path``'s folder), so a killed sweep resumes where
    it stopped. Smallest batches run first within a variant: they are the slow ones.
    """
    runs = results.setdefault("runs", {})
    todo = [(v, b, s) for s in seeds for v in variants for b in batch_sizes
            if run_key(v, b, s) not in runs]
    done = len(runs)
    checkpoints = path.parent / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    for i, (name, batch_size, seed) in enumerate(todo, 1):
        variant = VARIANTS[name]
        key = run_key(name, batch_size, seed)
        run_lr = scaled_lr(lr, batch_size)
        l1 = lambda_l1 if variant.l1 else 0.0
        checkpoint = checkpoints / (key.replace("/", "_") + ".ckpt")
        run = dict(variant=name, batch_size=batch_size, seed=seed, lr=run_lr,
                   steps=epochs * -(-len(data.train_labels) // batch_size))
        try:
            _, history = train_model(variant.norm, lambda_l1=l1, num_groups=num_groups,
                                     epochs=epochs, seed=seed, batch_size=batch_size,
                                     lr=run_lr, device=device, data=data,
                                     name=f"{name} bs={batch_size}", progress=progress,
                                     checkpoint=checkpoint, precision=precision)
        except TrainingDiverged as exc:  # recorded, and the sweep goes on
            runs[key] = {**run, "failed": str(exc), "wall_time_s": 0.0}
            outcome = f"failed: {exc}"
        else:
            runs[key] = {**run, "test_acc": history["test_acc"][-1],
                         "test_error": 100.0 - history["test_acc"][-1],
                         "test_loss": history["test_loss"][-1],
                         "train_loss": history["train_loss"][-1],
                         "wall_time_s": sum(history["epoch_time"])}
            outcome = (f"test error {runs[key]['test_error']:5.2f}%  "
                       f"{runs[key]['wall_time_s']:5.1f}s")
        write_json(path, results)
        checkpoint.unlink(missing_ok=True)
        log(f"[{done + i}/{done + len(todo)}] {name:6s} batch {batch_size:4d} seed {seed}  "
            f"lr {run_lr:.5f}  {run['steps']:6d} steps  {outcome}")
    if not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    return results


def error_table(results: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """variant -> batch size -> test errors (%) over seeds, in run order; failed runs left out
    (the report lists them)."""
    table: dict[str, dict[int, list[float]]] = {}
    for r in results["runs"].values():
        if "failed" in r:
            continue
        table.setdefault(r["variant"], {}).setdefault(r["batch_size"], []).append(r["test_error"])
    return {v: dict(sorted(b.items())) for v, b in table.items()}
