"""Batch Norm's inference remedies, without retraining: saved weights re-evaluated with
the running statistics training left, with PreciseBN's population statistics, or with
mini-batch statistics at test time (``normlab evaluate``, and the remedies study).

Wu & Johnson (2021) showed that much of Batch Norm's loss at small batches is a train/test
inconsistency: training normalises each image with its few neighbours' statistics, testing
with running averages of them. The modes (``BN_STATS``):

* ``running``: the running statistics as saved -- the accuracy the run recorded;
* ``precise``: PreciseBN (``norms.precise_bn``): the statistics recomputed with the final
  weights over the first N training images, each over a whole batch of the run's size
  (population statistics);
* ``precise-grouped``: the same, each statistic over the run's training grouping (its images
  per statistic): what the network actually normalised with in training;
* ``precise-augmented``: PreciseBN as fvcore's ``update_bn_stats`` does it: over N images of
  the training loader as training saw them (shuffled and augmented, from a fixed seed), each
  statistic over a whole batch;
* ``batch``: the test set normalised in consecutive groups of the run's images per
  statistic with their own statistics, as in training (``norms.batch_statistics``); a
  prediction then depends on the other images of its group.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_model_and_meta
from .data import Data, load_data, make_loaders
from .device import at_least_fp32, autocast
from .engine import test
from .model import Net
from .norms import NORMS
from .precise import batch_statistics, precise_bn

BN_STATS = ("running", "precise", "precise-grouped", "precise-augmented", "batch")
PRECISE_SEED = 0  # the shuffle and augmentation of precise-augmented: fixed, so it repeats
DEFAULT_PRECISE_IMAGES = 10_000
# The records beside weights files, newest kind first: where a file's header does not say
# how its run trained (weights written before normlab 0.4), its folder's record does.
RECORDS = ("remedies.json", "statistics.json", "metrics.json", "sweep.json")


@dataclass(frozen=True)
class Trained:
    """How a saved model was trained, as far as evaluating it needs: its data, batch, the
    images each batch statistic covered (None: no batch statistics), and its precision."""

    dataset: str
    batch_size: int
    images_per_statistic: int | None
    precision: str
    holdout: int | None = None
    test_acc: float | None = None  # what the run recorded


def norm_of(model: nn.Module) -> str:
    """The normalization a normlab-trained model uses (``Net`` or a ``--model`` network)."""
    config = getattr(model, "normlab_config", None)
    return config["norm"] if config is not None else model.norm


def batch_dependent(model: nn.Module) -> bool:
    """Whether ``model``'s norm normalises with statistics of the batch in training."""
    return NORMS[norm_of(model)].batch_dependent


def load_trained(path: str | Path, device: torch.device) -> tuple[Net, Trained]:
    """A saved normlab model and how it was trained: from the file's header, else from the
    record of the folder it lies in."""
    path = Path(path)
    model, meta = load_model_and_meta(path, device)
    record = _record_config(path)
    merged = {**record, **{k: v if k in ("dataset", "precision") else json.loads(v)
                           for k, v in meta.items()
                           if k in ("dataset", "batch_size", "images_per_statistic",
                                    "precision", "holdout", "test_acc")}}
    missing = [k for k in ("dataset", "batch_size") if merged.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: neither its header nor a normlab record beside it "
                              f"({', '.join(RECORDS)}) says its {' and '.join(missing)}; "
                              f"evaluate weights in the folder normlab wrote them to")
    norm = NORMS[norm_of(model)]
    if "images_per_statistic" not in merged:  # a compare: per process, or per virtual batch
        per_process = merged["batch_size"] // merged.get("world_size", 1)
        merged["images_per_statistic"] = (None if norm.synchronized else
                                          merged.get("virtual_batch_size") or per_process)
    if norm.synchronized:  # statistics over the whole global batch
        merged["images_per_statistic"] = merged["batch_size"]
    if not batch_dependent(model):
        merged["images_per_statistic"] = None
    return model, Trained(
        merged["dataset"], int(merged["batch_size"]), merged["images_per_statistic"],
        merged.get("precision", "fp32"), merged.get("holdout"), merged.get("test_acc"))


def _record_config(path: Path) -> dict[str, Any]:
    """The settings of the run that wrote ``path``, from its folder's record (empty if none)."""
    for name in RECORDS:
        record = path.parent / name
        if record.exists():
            try:
                config = json.loads(record.read_text())["config"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointError(f"{record} is corrupt; it cannot say how {path.name} "
                                      f"was trained") from None
            return {k: config.get(k) for k in ("dataset", "batch_size", "precision", "holdout",
                                               "world_size", "virtual_batch_size")
                    if config.get(k) is not None}
    return {}


def evaluate_model(model: Net, data: Data, trained: Trained, mode: str, device: torch.device,
                   precise_images: int = DEFAULT_PRECISE_IMAGES) -> tuple[float, float]:
    """(mean test NLL, test accuracy %) of ``model`` with ``mode``'s statistics (``BN_STATS``);
    ``model`` itself is not changed."""
    if mode not in BN_STATS:
        raise ValueError(f"unknown --bn-stats {mode!r}; choose one of: {', '.join(BN_STATS)}")
    _, test_loader = make_loaders(data, trained.batch_size, 0, device)
    if mode == "running" or not batch_dependent(model):
        return test(model, device, test_loader, trained.precision)
    model = copy.deepcopy(model)  # the caller's model keeps its statistics
    if mode == "batch":
        with batch_statistics(model, trained.images_per_statistic or trained.batch_size) as f:
            return _test_with(f, data, trained, device)
    if precise_images < trained.batch_size:
        raise ValueError(f"--precise-images {precise_images} is below one batch of "
                         f"{trained.batch_size} images (the run's batch size); give at least "
                         f"{trained.batch_size}")
    if mode == "precise-augmented":  # the training loader's batches, as fvcore takes them
        train = data.loader(data.train_images, data.train_labels, trained.batch_size,
                            shuffle=True, augment=data.training_augment,
                            seed=PRECISE_SEED, device=device)
    else:  # the first training images, in order, without augmentation, in the run's batches
        train = data.loader(data.train_images[:precise_images],
                            data.train_labels[:precise_images], trained.batch_size,
                            device=device)
    grouped = trained.images_per_statistic if mode == "precise-grouped" else None
    with autocast(device, trained.precision):
        precise_bn(model, (x for x, _ in train), images=precise_images,
                   images_per_statistic=grouped)
    return test(model, device, test_loader, trained.precision)


@torch.inference_mode()
def _test_with(forward: Callable[[torch.Tensor], torch.Tensor], data: Data, trained: Trained,
               device: torch.device) -> tuple[float, float]:
    """``engine.test`` for a forward that must see whole groups: test batches of a multiple
    of the group size, so that the groups are consecutive over the whole test set."""
    group = trained.images_per_statistic or trained.batch_size
    loader = data.loader(data.test_images, data.test_labels, group * max(1, 1024 // group),
                         device=device)
    total, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in loader:
        with autocast(device, trained.precision):
            output = at_least_fp32(forward(x))
        total += F.nll_loss(output, y, reduction="sum")
        correct += (output.argmax(1) == y).sum()
    return total.item() / len(data.test_labels), 100.0 * correct.item() / len(data.test_labels)


def evaluate_files(paths: list[Path], modes: list[str], device: torch.device,
                   precise_images: int = DEFAULT_PRECISE_IMAGES,
                   data_dir: str | None = None) -> list[dict[str, Any]]:
    """Every file under every mode: one row per (file, mode) with its loss and accuracy and,
    for ``running``, the accuracy the run recorded. Data sets are loaded once each."""
    rows: list[dict[str, Any]] = []
    loaded: dict[tuple[str, int | None], Data] = {}
    for path in paths:
        model, trained = load_trained(path, device)
        key = (trained.dataset, trained.holdout)
        if key not in loaded:
            loaded[key] = load_data(data_dir, trained.dataset, holdout=trained.holdout)
        for mode in modes:
            loss, acc = evaluate_model(model, loaded[key], trained, mode, device, precise_images)
            rows.append(dict(file=str(path), mode=mode, test_loss=loss, test_acc=acc,
                             recorded_acc=trained.test_acc if mode == "running" else None,
                             images_per_statistic=trained.images_per_statistic,
                             batch_size=trained.batch_size, dataset=trained.dataset,
                             applies=batch_dependent(model) or mode == "running"))
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    """``evaluate_files``' rows as the lines ``normlab evaluate`` prints."""
    width = max(len(r["file"]) for r in rows)
    modes = max(len("statistics"), *(len(r["mode"]) for r in rows))  # precise-augmented: 17
    lines = [f"{'weights':{width}s}  {'statistics':{modes}s} {'test acc':>9s} "
             f"{'test loss':>9s}  recorded"]
    for r in rows:
        if not r["applies"]:
            lines.append(f"{r['file']:{width}s}  {r['mode']:{modes}s} {'–':>9s} {'–':>9s}  "
                         f"(no batch statistics: as running)")
            continue
        recorded = ""
        if r["recorded_acc"] is not None:
            same = "same" if r["recorded_acc"] == r["test_acc"] else "DIFFERENT"
            recorded = f"{r['recorded_acc']:.2f}% ({same})"
        lines.append(f"{r['file']:{width}s}  {r['mode']:{modes}s} {r['test_acc']:8.2f}% "
                     f"{r['test_loss']:9.4f}  {recorded}")
    if any(r["mode"] == "batch" and r["applies"] for r in rows):
        lines.append("batch: each test image was normalised with the statistics of its group "
                     "of images per statistic, so its prediction depends on the other images "
                     "of its group")
    return lines
