"""Training and evaluation: the canonical ``train`` / ``test`` loop, plus ``train_model``.

``train`` and ``test`` follow pytorch/examples' mnist/main.py but return (loss, accuracy)
so that histories can be plotted; ``train_model`` wires data, model, optimiser and
schedule together for one variant and one seed.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .checkpoint import load_training_state, save_training_state
from .data import Data, Loader, load_data, make_loaders
from .device import (  # noqa: F401 - also part of engine's documented API
    PRECISIONS,
    at_least_fp32,
    autocast,
    native_bf16,
    resolve_precision,
    select_device,
)
from .errors import UsageError
from .model import ARCHITECTURE, Net
from .modelspec import ModelSpec
from .norms import RenormSchedule
from .progress import bar as progress_bar
from .step import (  # noqa: F401 - also part of engine's documented API
    CudaGraphStep,
    Totals,
    graph_step,
    l1_penalty,
    objective,
)
from .variants import STUDY_VARIANTS, VARIANTS, Variant  # noqa: F401 - the catalogue

History = dict[str, list[float]]


class TrainingDiverged(Exception):
    """The loss became NaN/inf; the message names the variant, epoch and batch."""


# Defaults shared by the CLI, the notebook and train_model.
DEFAULTS = dict(epochs=20, batch_size=128, lr=0.05, momentum=0.9, weight_decay=0.0,
                lambda_l1=1e-5, num_groups=4, dropout=0.0, seed=1, precision="fp32")


def train(model: nn.Module, device: torch.device, loader: Loader,
          optimizer: torch.optim.Optimizer, lambda_l1: float = 0.0,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
          desc: str | None = None, progress: bool = True, precision: str = "fp32",
          graph: CudaGraphStep | None = None, hooks: Sequence[Hook] = ()
          ) -> tuple[float, float]:
    """One epoch of training: (mean data loss, accuracy %) over the epoch's batches.

    Example: ``train_loss, train_acc = train(model, device, train_loader, optimizer)``.

    The reported loss is the NLL alone, so variants with and without L1 stay comparable.
    ``precision="bf16"`` runs the forward pass under bfloat16 autocast. ``graph`` (on a
    CUDA device, float32, one process) replays full batches from a CUDA graph; pass the same
    one every epoch. Each of ``hooks`` has its ``before_step`` called before every step with
    the scheduler's step count (without a scheduler, the steps taken this epoch; Batch
    Renorm's schedule sets its limits there).

    Data-parallel (``model`` a ``DistributedDataParallel``, ``loader`` sharded): each rank's
    loss is weighted by its share of the global batch, so DDP's gradient average is the
    global batch's mean gradient even when the last batch splits unevenly; the returned
    loss and accuracy are over all ranks' images.
    """
    model.train()
    world = loader.shard[1]
    totals = graph.totals if graph is not None else Totals(device)
    totals.reset()
    seen = 0
    bar = progress_bar(loader, desc=desc, leave=False, disable=not progress, unit="batch")
    for batch, (x, y) in enumerate(bar, 1):
        x, y = x.to(device), y.to(device)
        # The steps taken so far: the scheduler counts them across epochs; without one,
        # the steps of this epoch.
        step = scheduler.last_epoch if scheduler is not None else batch - 1
        for hook in hooks:
            hook.before_step(step)
        if graph is not None and graph.fits(x):
            graph(x, y, optimizer)
        else:
            # A graph (captured at the first batch, so before any eager step) owns the
            # gradient tensors: zero them in place rather than drop them.
            optimizer.zero_grad(set_to_none=graph is None)
            loss, data_loss, output = objective(model, x, y, lambda_l1, precision)
            if world > 1:
                loss = loss * (world * len(y) / loader.batch_length(batch - 1))
            loss.backward()
            totals.add(loss, data_loss, output, y)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        seen += len(y)
    total_loss, correct, first_bad = totals.loss, totals.correct, totals.first_bad
    if world > 1:
        total_loss, correct, seen = distributed.sum_over_ranks(total_loss, correct,
                                                               torch.tensor(seen))
        first_bad = distributed.first_over_ranks(first_bad)
    if int(first_bad) >= 0:
        raise FloatingPointError(f"loss became non-finite (NaN or inf) at batch "
                                 f"{int(first_bad)} of {len(loader)}")
    return total_loss.item() / int(seen), 100.0 * correct.item() / int(seen)


# On a CPU, evaluation runs the model on chunks of this many images of each test batch: a
# 1000-image batch's activations (22 MB after the first convolution) overflow the caches,
# 250 images' fit, and the chunked pass was 2.7x faster on the project's CPU. Each image's
# logits do not depend on the others in its batch (checked bit for bit on the study's models
# in float32 and bfloat16; docs/performance.md), and the loss is still summed over the whole
# test batch, so the numbers are those of one 1000-image pass (tests/test_engine.py).
EVAL_CHUNK = 250


def _forward(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cpu" or len(x) <= EVAL_CHUNK:  # a GPU wants large batches
        return model(x)
    return torch.cat([model(part) for part in x.split(EVAL_CHUNK)])


@torch.inference_mode()
def test(model: nn.Module, device: torch.device, loader: Loader, precision: str = "fp32"
         ) -> tuple[float, float]:
    """(mean NLL, accuracy %) of ``model`` over ``loader``, in eval mode.

    Example: ``test_loss, test_acc = test(model, device, test_loader)``.

    Under ``torch.distributed`` every rank must call it: rank r evaluates batches r, r + K,
    ..., and the per-batch sums are added up in batch order on every rank, so the numbers
    are exactly a single process's.
    """
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batch_loss = torch.zeros(len(loader), device=device)
    batch_correct = torch.zeros(len(loader), device=device, dtype=torch.long)
    for i, (x, y) in enumerate(loader):
        if i % world != rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            output = at_least_fp32(_forward(model, x, device))
        batch_loss[i] = F.nll_loss(output, y, reduction="sum")
        batch_correct[i] = (output.argmax(1) == y).sum()
    if world > 1:  # every batch was evaluated by exactly one rank: the sum adds zeros only
        batch_loss, batch_correct = distributed.sum_over_ranks(batch_loss, batch_correct)
    total_loss = torch.zeros((), device=device)
    for value in batch_loss:  # in batch order, as one process accumulates
        total_loss += value
    seen = len(loader.labels)
    return total_loss.item() / seen, 100.0 * batch_correct.sum().item() / seen


@dataclass
class Misclassified:
    """Test images a model gets wrong, as uint8 pixels, with predicted/true label and confidence."""

    images: torch.Tensor  # n x 28 x 28 uint8
    predicted: list[int]
    target: list[int]
    confidence: list[float]  # softmax probability of the predicted class
    indices: list[int]  # positions in the test split


@torch.inference_mode()
def misclassified(model: nn.Module, device: torch.device, loader: Loader, n: int = 10
                  ) -> Misclassified:
    """The first ``n`` examples of ``loader`` (in order) that ``model`` gets wrong, with
    their pixels, predicted and true labels, confidence and index in the split; fewer if
    it gets fewer wrong."""
    model.eval()
    found: list[tuple[int, int, int, float]] = []
    offset = 0
    for x, y in loader:
        output = _forward(model, x.to(device), device)
        prob, pred = output.exp().max(1)
        for i in torch.nonzero(pred != y.to(device)).flatten().tolist():
            found.append((offset + i, int(pred[i]), int(y[i]), float(prob[i])))
        offset += len(y)
        if len(found) >= n:
            break
    found = found[:n]
    index = [f[0] for f in found]
    images = loader.images[torch.tensor(index, dtype=torch.long, device=loader.images.device)]
    return Misclassified(images.cpu(), [f[1] for f in found], [f[2] for f in found],
                         [f[3] for f in found], index)


def make_optimizer(model: nn.Module, lr: float, epochs: int, steps_per_epoch: int,
                   momentum: float = DEFAULTS["momentum"],
                   weight_decay: float = DEFAULTS["weight_decay"],
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with Nesterov momentum under a one-cycle schedule peaking at ``lr``.

    A short warm-up and a long anneal reach a good minimum in few epochs, which is what a
    20-epoch budget needs. Weight decay applies to convolution weights only: decaying the
    norm layers' scale and shift, or biases, only fights the normalization.

    Examples:
        >>> optimizer, scheduler = make_optimizer(nn.Linear(4, 2), lr=0.05, epochs=2,
        ...                                       steps_per_epoch=10)
        >>> type(optimizer).__name__, optimizer.param_groups[0]["nesterov"]
        ('SGD', True)
    """
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
    return optimizer, scheduler


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


class Hook:
    """Something to do at fixed points of training, as detectron2's ``HookBase``: before
    every step (with the number of steps taken), after every epoch (with its numbers) and
    once when training ends, finished or not (to close what the hook opened).
    ``changes_steps`` says whether ``before_step`` changes what a step computes (a CUDA
    graph, which replays the first step as captured, then cannot be used).

    Examples:
        >>> class BestAccuracy(Hook):
        ...     best = 0.0
        ...     def after_epoch(self, epoch, row):
        ...         self.best = max(self.best, row["test_acc"])

        ``train_model(config, hooks=[BestAccuracy()])`` then keeps the best test accuracy.
    """

    changes_steps = False

    def before_step(self, step: int) -> None:
        pass

    def after_epoch(self, epoch: int, row: dict[str, float]) -> None:
        pass

    def after_train(self) -> None:
        pass


class RenormHook(Hook):
    """Batch Renorm's limits on the paper's schedule (``RenormSchedule``), set before every
    step: a function of the step alone, so a resumed run continues exactly."""

    changes_steps = True

    def __init__(self, schedule: RenormSchedule) -> None:
        self.schedule = schedule

    def before_step(self, step: int) -> None:
        self.schedule.update(step)


class EpochCallback(Hook):
    """``on_epoch(epoch, row)`` after every epoch: train_model's keyword, as a hook."""

    def __init__(self, on_epoch: Callable[[int, dict[str, float]], None]) -> None:
        self.on_epoch = on_epoch

    def after_epoch(self, epoch: int, row: dict[str, float]) -> None:
        self.on_epoch(epoch, row)


@dataclass
class _Training:
    """One run's moving parts, made by ``_prepare``."""

    net: nn.Module  # Net, or the model of a ModelSpec
    model: nn.Module  # net, or net in DistributedDataParallel
    train_loader: Loader
    test_loader: Loader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    key: dict[str, Any]
    rank: int
    world: int


def train_model(config: TrainConfig | str = "batch", *, device: str | torch.device | None = None,
                data: Data | None = None, data_dir: str | None = None,
                limit_train: int | None = None, name: str | None = None,
                progress: bool = True, checkpoint: str | Path | None = None,
                hooks: Sequence[Hook] = (), cuda_graph: bool = True,
                on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                **settings: Any) -> tuple[Net, History]:
    """Train one model from scratch; returns it with per-epoch losses, accuracies and times.

    Example: ``model, history = train_model("group", epochs=20, seed=1)``, then
    ``history["test_acc"][-1]`` is the final test accuracy (%). ``history`` holds lists
    ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``lr`` and ``epoch_time``.
    The first argument is a ``TrainConfig`` or a norm's name; ``settings`` are
    ``TrainConfig``'s fields (``lambda_l1``, ``epochs``, ``seed``, ``batch_size``, ``lr``,
    ``virtual_batch_size``, ``weight_std``, ...), over the config's.

    Pass ``data`` (from ``load_data``) to reuse one in-memory copy across models; otherwise
    MNIST is loaded from ``data_dir`` (first ``limit_train`` training images).

    The optimiser and schedule come from ``make_optimizer``. ``precision`` "bf16" trains in
    bfloat16 mixed precision, "auto" does so where the hardware has it (see
    ``resolve_precision``); the default is float32 (docs/performance.md says why).
    ``hooks`` (``Hook``) run before every step, after every epoch and at the end; ``on_epoch(epoch,
    row)`` is one, called after each epoch with that epoch's numbers. Batch Renorm's limits
    follow ``RenormSchedule`` (a hook train_model adds itself).

    With ``checkpoint``, the full training state (model, optimiser, schedule, RNG states,
    history) is saved there atomically after every epoch, and an existing checkpoint is
    resumed from: the result is identical to an uninterrupted run with the same seed.

    ``virtual_batch_size=B``: Batch Norm computes its training statistics over each B images
    of a batch, as batch/B devices would (``norms.BatchNorm2d``). ``weight_std``: Weight
    Standardization (``norms.StdConv2d``).

    On a CUDA device, in float32 and one process, full batches train through a CUDA graph
    (``CudaGraphStep``; ``cuda_graph=False`` turns it off): the same computation, launched
    at once.

    Under ``torch.distributed`` (torchrun), every rank calls this with the same arguments:
    ``batch_size`` stays the global batch, each rank trains on its part of it with
    ``DistributedDataParallel``, only rank 0 writes the checkpoint, and every rank returns
    the same model and history.
    """
    config = TrainConfig(norm=config, **settings) if isinstance(config, str) \
        else replace(config, **settings)
    device = device if isinstance(device, torch.device) else select_device(device)
    precision = resolve_precision(config.precision, device)
    if data is None:
        data = load_data(data_dir, limit_train=limit_train)
    t = _prepare(config, precision, device, data)
    done, history = 0, {k: [] for k in HISTORY_KEYS}
    state = _read_checkpoint(checkpoint, t.rank, t.world)
    if state is not None:
        done, history = load_training_state(checkpoint, t.key, t.net, t.optimizer,
                                            t.scheduler, t.train_loader.generator, state)
    renorm = RenormSchedule(t.net, config.epochs * len(t.train_loader))
    hooks = [*([RenormHook(renorm)] if renorm.layers else []), *hooks,
             *([EpochCallback(on_epoch)] if on_epoch is not None else [])]
    # A hook that changes the steps (Batch Renorm's limits) rules out replaying a graph.
    graph = graph_step(t.net, config.lambda_l1, device, precision, t.world) \
        if cuda_graph and not any(h.changes_steps for h in hooks) else None
    try:
        for epoch in range(done + 1, config.epochs + 1):
            row = _epoch(t, config, precision, device, graph, hooks, epoch,
                         name or config.norm, progress)
            for key, value in row.items():
                history[key].append(value)
            if checkpoint is not None and t.rank == 0:
                save_training_state(checkpoint, t.key, epoch, t.net, t.optimizer,
                                    t.scheduler, t.train_loader.generator, history)
            for hook in hooks:
                hook.after_epoch(epoch, row)
    finally:
        for hook in hooks:
            hook.after_train()
    return t.net, history


HISTORY_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time")


def _prepare(config: TrainConfig, precision: str, device: torch.device, data: Data
             ) -> _Training:
    """The seeded model (in DDP under torchrun), its loaders, optimiser and schedule."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    parts = virtual_batches_per_process(len(data.train_labels), config.batch_size, world,
                                        config.virtual_batch_size)
    torch.manual_seed(config.seed)
    if config.model is None:
        net = Net(config.norm, num_groups=config.num_groups, dropout=config.dropout,
                  architecture=config.architecture, virtual_batches=parts,
                  weight_std=config.weight_std).to(device)
    else:
        net = config.model.variant(config.norm, config.num_groups, parts, config.weight_std,
                                   data.in_channels, data.num_classes).to(device)
    # Plain Batch Norm keeps per-device running statistics: no buffer broadcasts each step,
    # an average once an epoch instead (distributed.average_running_stats).
    model = net if world == 1 else DistributedDataParallel(
        net, device_ids=[device] if device.type == "cuda" else None, **_NO_BUFFER_SYNC)
    train_loader, test_loader = make_loaders(data, config.batch_size, config.seed, device,
                                             shard=(rank, world))
    optimizer, scheduler = make_optimizer(net, config.lr, config.epochs, len(train_loader),
                                          config.momentum, config.weight_decay)
    key = config.checkpoint_key(precision, len(train_loader.labels), world)
    return _Training(net, model, train_loader, test_loader, optimizer, scheduler, key, rank,
                     world)


def _epoch(t: _Training, config: TrainConfig, precision: str, device: torch.device,
           graph: CudaGraphStep | None, hooks: Sequence[Hook], epoch: int, name: str,
           progress: bool) -> dict[str, float]:
    """Train one epoch and test; the epoch's row of the history."""
    start = time.perf_counter()
    lr_now = t.optimizer.param_groups[0]["lr"]
    try:
        train_loss, train_acc = train(t.model, device, t.train_loader, t.optimizer,
                                      config.lambda_l1, t.scheduler,
                                      desc=f"{name} {epoch}/{config.epochs}",
                                      progress=progress and t.rank == 0, precision=precision,
                                      graph=graph, hooks=hooks)
    except FloatingPointError as exc:
        raise TrainingDiverged(f"{name}: {exc} in epoch {epoch}; try a lower --lr"
                               f"{' or --l1' if config.lambda_l1 else ''}") from None
    if t.world > 1:
        distributed.average_running_stats(t.net)
    test_loss, test_acc = test(t.net, device, t.test_loader, precision)
    return dict(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                test_acc=test_acc, lr=lr_now, epoch_time=time.perf_counter() - start)


# DDP must not copy rank 0's buffers to the others every step. torch >= 2.13 spells this
# forward_sync_buffers (buffers are then synced once, at construction, where ours agree).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


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


def _read_checkpoint(path: str | Path | None, rank: int, world: int) -> bytes | None:
    """The checkpoint's bytes on every rank, or None without one: rank 0 reads the file
    (only it writes files) and sends it to the others, who may be on other machines."""
    if path is None:
        return None
    blob = Path(path).read_bytes() if rank == 0 and Path(path).exists() else None
    if world > 1:
        blob = distributed.broadcast_bytes(blob) or None
    return blob
