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

The runs themselves are executed by ``study.run_study`` like a comparison's (resumable,
``--jobs``, torchrun).
"""

from __future__ import annotations

from typing import Any

DEFAULT_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128)
REFERENCE_BATCH = 128


def scaled_lr(lr: float, batch_size: int) -> float:
    """The linear scaling rule: the peak learning rate grows with the batch size."""
    return lr * batch_size / REFERENCE_BATCH


def run_key(variant: str, batch_size: int, seed: int) -> str:
    return f"{variant}/bs{batch_size}/seed{seed}"


def error_table(results: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """variant -> batch size -> test errors (%) over seeds, in run order; failed runs left out
    (the report lists them)."""
    table: dict[str, dict[int, list[float]]] = {}
    for r in results["runs"].values():
        if "failed" in r:
            continue
        table.setdefault(r["variant"], {}).setdefault(r["batch_size"], []).append(r["test_error"])
    return {v: dict(sorted(b.items())) for v, b in table.items()}
