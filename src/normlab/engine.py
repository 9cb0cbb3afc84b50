"""Training and evaluation: the canonical ``train`` / ``test`` loop, plus ``train_model``.

``train`` and ``test`` follow pytorch/examples' mnist/main.py but return (loss, accuracy)
so that histories can be plotted; ``train_model`` wires data, model, optimiser and
schedule together for one variant and one seed.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .checkpoint import load_training_state, read_for_ranks, save_training_state
from .config import (  # noqa: F401 - also part of engine's documented API
    DEFAULTS,
    TrainConfig,
    virtual_batches_per_process,
)
from .data import Data, Loader, load_data, make_loaders
from .device import (  # noqa: F401 - also part of engine's documented API
    PRECISIONS,
    at_least_fp32,
    autocast,
    native_bf16,
    resolve_precision,
    select_device,
)
from .model import Net
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




def train(model: nn.Module, device: torch.device, loader: Loader,
          optimizer: torch.optim.Optimizer, lambda_l1: float = 0.0,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
          progress: bool | str = True, precision: str = "fp32",
          graph: CudaGraphStep | None = None, trainer: Trainer | None = None
          ) -> tuple[float, float]:
    """One epoch of training: (mean data loss, accuracy %) over the epoch's batches.

    Example: ``train_loss, train_acc = train(model, device, train_loader, optimizer)``.

    The reported loss is the NLL alone, so variants with and without L1 stay comparable.
    ``progress`` shows a progress bar (a string labels it). ``precision="bf16"`` runs the
    forward pass under bfloat16 autocast. ``graph`` (on a CUDA device, float32, one
    process) replays full batches from a CUDA graph; pass the same one every epoch. Called
    by a ``Trainer`` (``trainer``), its hooks run before and after every step (the schedule
    is one of them).

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
    bar = progress_bar(loader, desc=progress if isinstance(progress, str) else None,
                       leave=False, disable=not progress, unit="batch")
    for batch, (x, y) in enumerate(bar, 1):
        x, y = x.to(device), y.to(device)
        if trainer is not None:
            trainer.call("before_step")
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
        if trainer is not None:
            trainer.step += 1
            trainer.call("after_step")
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


class Hook:
    """Something to do at fixed points of training, as detectron2's ``HookBase`` and
    Lightning's ``Callback``: each method gets the ``Trainer`` (its ``net``, ``optimizer``,
    ``scheduler``, ``config``, ``epoch``, ``step`` -- the steps taken so far -- ``row``, the
    epoch's numbers, and ``history``). ``after_train`` runs once when training ends, finished
    or not (to close what the hook opened). ``state_dict``/``load_state_dict`` are saved in
    and restored from the training checkpoint. ``changes_steps`` says whether
    ``before_step`` changes what a step computes (a CUDA graph, which replays the first step
    as captured, then cannot be used).

    Examples:
        >>> class BestAccuracy(Hook):
        ...     best = 0.0
        ...     def after_epoch(self, trainer):
        ...         self.best = max(self.best, trainer.row["test_acc"])
        ...     def state_dict(self):
        ...         return {"best": self.best}
        ...     def load_state_dict(self, state):
        ...         self.best = state["best"]

        ``train_model(config, hooks=[BestAccuracy()])`` then keeps the best test accuracy,
        across a resume too.
    """

    changes_steps = False

    def before_train(self, trainer: Trainer) -> None:
        pass

    def before_step(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_epoch(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# -- the default hooks, in the order they run: what every run does besides its steps


class LRSchedule(Hook):
    """The one-cycle schedule, stepped after every optimizer step."""

    def after_step(self, trainer: Trainer) -> None:
        trainer.scheduler.step()


class RenormLimits(Hook):
    """Batch Renorm's limits on the paper's schedule (``RenormSchedule``), set before every
    step: a function of the step alone, so a resumed run continues exactly."""

    changes_steps = True

    def __init__(self, schedule: RenormSchedule) -> None:
        self.schedule = schedule

    def before_step(self, trainer: Trainer) -> None:
        self.schedule.update(trainer.step)


class AverageRunningStatistics(Hook):
    """Under torchrun, each process's Batch Norm running statistics averaged once an epoch
    (DDP does not copy buffers every step: ``_NO_BUFFER_SYNC``)."""

    def after_epoch(self, trainer: Trainer) -> None:
        if trainer.world > 1:
            distributed.average_running_stats(trainer.net)


class Evaluate(Hook):
    """The epoch's test loss and accuracy, and its time (training and this evaluation)."""

    def after_epoch(self, trainer: Trainer) -> None:
        test_loss, test_acc = test(trainer.net, trainer.device, trainer.test_loader,
                                   trainer.precision)
        trainer.row.update(test_loss=test_loss, test_acc=test_acc,
                           epoch_time=time.perf_counter() - trainer.epoch_start)


class Checkpoint(Hook):
    """The full training state saved atomically after every epoch (rank 0 only): model,
    optimizer, schedule, random states, history and every hook's ``state_dict``."""

    def __init__(self, path: str | Path) -> None:
        self.path = path

    def after_epoch(self, trainer: Trainer) -> None:
        if trainer.rank == 0:
            save_training_state(self.path, trainer.key, trainer.epoch, trainer.net,
                                trainer.optimizer, trainer.scheduler,
                                trainer.train_loader.generator, trainer.history,
                                hooks=trainer.hook_states())


HISTORY_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time")


class Trainer:
    """One run: the seeded model (in DDP under torchrun), its loaders, optimizer and
    schedule, trained epoch by epoch with ``hooks`` around every step and epoch (the outline
    is ``run``). The default hooks come first -- the schedule, Batch Renorm's limits,
    running-statistics averaging, evaluation, the checkpoint -- then the caller's."""

    def __init__(self, config: TrainConfig, device: torch.device, data: Data, *,
                 name: str | None = None, progress: bool = True,
                 checkpoint: str | Path | None = None, hooks: Sequence[Hook] = (),
                 cuda_graph: bool = True) -> None:
        self.config, self.device, self.name, self.progress = config, device, name, progress
        self.precision = resolve_precision(config.precision, device)
        self._build(data)
        self.epoch = self.step = 0
        self.row: dict[str, float] = {}
        self.rows: list[dict[str, float]] = []
        renorm = RenormSchedule(self.net, config.epochs * len(self.train_loader))
        self.hooks = [LRSchedule(), *([RenormLimits(renorm)] if renorm.layers else []),
                      AverageRunningStatistics(), Evaluate(),
                      *([Checkpoint(checkpoint)] if checkpoint is not None else []), *hooks]
        self._resume(checkpoint)
        # A hook that changes the steps (Batch Renorm's limits) rules out replaying a graph.
        self.graph = graph_step(self.net, config.lambda_l1, device, self.precision, self.world) \
            if cuda_graph and not any(h.changes_steps for h in self.hooks) else None

    def _build(self, data: Data) -> None:
        config, device = self.config, self.device
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) \
            if dist.is_initialized() else (0, 1)
        parts = virtual_batches_per_process(len(data.train_labels), config.batch_size,
                                            self.world, config.virtual_batch_size)
        torch.manual_seed(config.seed)
        if config.model is None:
            net = Net(config.norm, num_groups=config.num_groups, dropout=config.dropout,
                      architecture=config.architecture, virtual_batches=parts,
                      weight_std=config.weight_std)
        else:
            net = config.model.variant(config.norm, config.num_groups, parts,
                                       config.weight_std, data.in_channels, data.num_classes)
        self.net = net.to(device)
        # Plain Batch Norm keeps per-device running statistics: no buffer broadcasts each
        # step, an average once an epoch instead (AverageRunningStatistics).
        self.model = self.net if self.world == 1 else DistributedDataParallel(
            self.net, device_ids=[device] if device.type == "cuda" else None, **_NO_BUFFER_SYNC)
        self.train_loader, self.test_loader = make_loaders(
            data, config.batch_size, config.seed, device, shard=(self.rank, self.world))
        self.optimizer, self.scheduler = make_optimizer(
            self.net, config.lr, config.epochs, len(self.train_loader), config.momentum,
            config.weight_decay)
        self.key = config.checkpoint_key(self.precision, len(self.train_loader.labels),
                                         self.world)

    def _resume(self, checkpoint: str | Path | None) -> None:
        state = read_for_ranks(checkpoint, self.rank, self.world)
        if state is None:
            return
        self.epoch, history, hooks = load_training_state(
            checkpoint, self.key, self.net, self.optimizer, self.scheduler,
            self.train_loader.generator, state)
        self.step = self.epoch * len(self.train_loader)
        self.rows = [dict(zip(history, values, strict=True))
                     for values in zip(*history.values(), strict=True)]
        for hook, saved in zip(self.hooks, hooks or [{}] * len(self.hooks), strict=False):
            hook.load_state_dict(saved)

    @property
    def history(self) -> History:
        """The finished epochs' numbers, as lists (``train_model``'s second result)."""
        done = [r for r in self.rows if all(k in r for k in HISTORY_KEYS)]
        return {k: [r[k] for r in done] for k in HISTORY_KEYS}

    def hook_states(self) -> list[dict[str, Any]]:
        return [hook.state_dict() for hook in self.hooks]

    def call(self, event: str) -> None:
        """Every hook's ``event`` method, in order."""
        for hook in self.hooks:
            getattr(hook, event)(self)

    def run(self) -> tuple[nn.Module, History]:
        """Train the remaining epochs: for each, the steps, then the hooks' ``after_epoch``."""
        self.call("before_train")
        try:
            for epoch in range(self.epoch + 1, self.config.epochs + 1):
                self.epoch, self.epoch_start = epoch, time.perf_counter()
                self.row = {"lr": self.optimizer.param_groups[0]["lr"]}
                self.rows.append(self.row)
                self._train_epoch()
                self.call("after_epoch")
        finally:
            self.call("after_train")
        return self.net, self.history

    def _train_epoch(self) -> None:
        config = self.config
        name = self.name or config.norm
        try:
            self.row["train_loss"], self.row["train_acc"] = train(
                self.model, self.device, self.train_loader, self.optimizer, config.lambda_l1,
                progress=self.progress and self.rank == 0 and f"{name} {self.epoch}/"
                f"{config.epochs}", precision=self.precision, graph=self.graph, trainer=self)
        except FloatingPointError as exc:
            raise TrainingDiverged(f"{name}: {exc} in epoch {self.epoch}; try a lower --lr"
                                   f"{' or --l1' if config.lambda_l1 else ''}") from None


def train_model(config: TrainConfig | str = "batch", *, device: str | torch.device | None = None,
                data: Data | None = None, data_dir: str | None = None,
                limit_train: int | None = None, name: str | None = None,
                progress: bool = True, checkpoint: str | Path | None = None,
                hooks: Sequence[Hook] = (), cuda_graph: bool = True,
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
    ``hooks`` (``Hook``) see the ``Trainer`` before and after every step, after every epoch
    (a printed line, a log, early stopping by raising) and at the end, after its own
    (the schedule, Batch Renorm's limits, evaluation, the checkpoint).

    With ``checkpoint``, the full training state (model, optimiser, schedule, RNG states,
    history, the hooks' states) is saved there atomically after every epoch, and an
    existing checkpoint is resumed from: the result is identical to an uninterrupted run
    with the same seed.

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
    if data is None:
        data = load_data(data_dir, limit_train=limit_train)
    return Trainer(config, device, data, name=name, progress=progress, checkpoint=checkpoint,
                   hooks=hooks, cuda_graph=cuda_graph).run()


# DDP must not copy rank 0's buffers to the others every step. torch >= 2.13 spells this
# forward_sync_buffers (buffers are then synced once, at construction, where ours agree).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
