"""The study runner: a list of training runs, executed one after another, N at a time in
separate processes (``--jobs``), or each across K data-parallel processes (torchrun).

``compare``, ``sweep`` and ``statistics`` differ only in which runs they list, what they keep
of each and what they draw (``statistics`` also launches its torchrun part at the end);
everything else is shared here: the output folder and its lock, resuming, the record file
rewritten after every finished run, checkpoints after every epoch, and which process may
write (rank 0 under torchrun; the parent for ``--jobs``, whose workers write only their own
run's weights, checkpoint and figure).
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (
    WEIGHTS_SUFFIX,
    CheckpointError,
    atomic_write,
    disk_full,
    load_model,
    save_model,
    write_json,
)
from .data import Data, DataError, load_data, make_loaders
from .distributed import Ranks
from .engine import (
    VARIANTS,
    TrainingDiverged,
    check_split,
    misclassified,
    resolve_precision,
    select_device,
    train_model,
)
from .model import Net, count_parameters
from .norms import statistics_seen
from .plots import plot_curves, plot_misclassified, plot_sweep, save_figure, statistics_figures
from .report import (
    environment,
    failed_runs,
    final_accuracies,
    good_runs,
    render_report,
    render_statistics_report,
    render_sweep_report,
)
from .stats import t_interval
from .sweep import error_table, run_key, scaled_lr


class UsageError(Exception):
    """A problem with what the user asked for, reported as one line with exit code 2."""


class WorkerDied(Exception):
    """A --jobs worker process ended without finishing its run."""


def error_line(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for the failures normlab expects; None for a bug."""
    if isinstance(exc, UsageError):
        return 2, f"error: {exc}"
    if isinstance(exc, DataError):
        return 1, f"data error: {exc}"
    if isinstance(exc, CheckpointError | WorkerDied):
        return 1, f"error: {exc}"
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        fix = "free some space" if disk_full(exc) else "fix that"
        return 1, (f"error: cannot write{where} ({exc.strerror or exc}); its previous version "
                   f"and every finished epoch are kept: {fix}, then resume")
    return None


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- what one run is, and executing it (in this process, a --jobs worker, or on every rank)

@dataclass(frozen=True)
class Run:
    """One training run: a variant from a seed at a batch size and peak learning rate."""

    variant: str
    seed: int
    batch_size: int
    lr: float
    key: str  # the record's key and the stem of its checkpoint (and weights) file
    label: str  # what the epoch lines call it
    virtual_batch_size: int | None = None  # this run's images per Batch Norm statistic

    def split(self, default: int | None) -> int | None:
        """The virtual batch size this run trains with: its own, else the command line's
        (``default``); None for the norms without batch statistics."""
        if VARIANTS[self.variant].norm != "batch":
            return None
        return self.virtual_batch_size or default


@dataclass(frozen=True)
class Settings:
    """Everything a run needs besides its data and device; picklable for --jobs workers."""

    kind: str  # "compare", "sweep" or "statistics"
    out: Path
    epochs: int
    lambda_l1: float
    num_groups: int
    precision: str
    virtual_batch_size: int | None
    progress: bool
    first_seed: int
    revision: str = "unknown"  # the git revision, recorded in every weights file
    tensorboard: Path | None = None  # log every run's epochs here, one TensorBoard run each
    writes: bool = True  # rank 0 (or a single process): writes weights and figures


def checkpoint_of(out: Path, run: Run) -> Path:
    return out / "checkpoints" / (run.key.replace("/", "_") + ".ckpt")


def execute(run: Run, s: Settings, data: Data, device: torch.device) -> dict[str, Any]:
    """Train ``run`` (resuming its checkpoint if any) and return its record; for a compare,
    also write its weights and, for the first seed, its misclassified figure."""
    variant = VARIANTS[run.variant]
    lambda_l1 = s.lambda_l1 if variant.l1 else 0.0

    board = _board(s, run)

    def log(epoch: int, row: dict[str, float]) -> None:
        if board is not None:
            for name, value in (("loss/train", row["train_loss"]),
                                (f"loss/{data.eval_split}", row["test_loss"]),
                                ("accuracy/train", row["train_acc"]),
                                (f"accuracy/{data.eval_split}", row["test_acc"]),
                                ("learning_rate", row["lr"])):
                board.add_scalar(name, value, epoch)
            board.flush()  # so that a live `tensorboard --logdir` shows every epoch
        if s.writes and s.kind == "compare":
            tqdm.write(f"  {run.label} epoch {epoch:2d}/{s.epochs}  lr {row['lr']:.4f}  "
                       f"train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
                       f"{data.eval_split} loss {row['test_loss']:.4f} "
                       f"acc {row['test_acc']:6.2f}%  {row['epoch_time']:5.1f}s")

    try:
        model, history = train_model(
            variant.norm, lambda_l1=lambda_l1, num_groups=s.num_groups, epochs=s.epochs,
            seed=run.seed, batch_size=run.batch_size, lr=run.lr, device=device, data=data,
            name=run.label, progress=s.progress, on_epoch=log,
            checkpoint=checkpoint_of(s.out, run), precision=s.precision,
            virtual_batch_size=run.split(s.virtual_batch_size))
    except TrainingDiverged as exc:
        if s.writes:
            print(f"normlab {s.kind}: error: {exc}; carrying on with the other runs",
                  file=sys.stderr)
        failed = {"seed": run.seed, "failed": str(exc)}
        return failed if s.kind == "compare" else {**_grid_fields(run, s, data), **failed,
                                                   "wall_time_s": 0.0}
    finally:
        if board is not None:
            board.close()
    if s.kind != "compare":  # a sweep's or statistics study's point: its final numbers
        result = {**_grid_fields(run, s, data), "test_acc": history["test_acc"][-1],
                  "test_error": 100.0 - history["test_acc"][-1],
                  "test_loss": history["test_loss"][-1],
                  "train_loss": history["train_loss"][-1],
                  "wall_time_s": sum(history["epoch_time"])}
        if s.kind == "statistics":  # the curves, and the first seed's weights for the figure
            result["history"] = history
            if s.writes and run.seed == s.first_seed:
                save_model(model, s.out / (run.key.replace("/", "_") + WEIGHTS_SUFFIX),
                           variant=run.variant, seed=run.seed, test_acc=result["test_acc"],
                           images_per_statistic=result["images_per_statistic"],
                           git_revision=s.revision)
        return result
    record: dict[str, Any] = dict(seed=run.seed, wall_time_s=sum(history["epoch_time"]),
                                  history=history)
    if s.writes:
        save_model(model, s.out / f"{run.key}{WEIGHTS_SUFFIX}", variant=run.variant,
                   seed=run.seed, test_acc=history["test_acc"][-1], eval_split=data.eval_split,
                   git_revision=s.revision)
        _, test_loader = make_loaders(data, run.batch_size, run.seed, device)
        wrong = misclassified(model, device, test_loader, n=10)
        if run.seed == s.first_seed:
            plot_misclassified(wrong, f"{variant.label} ({run.variant}, seed {run.seed})",
                               data.spec.classes, s.out / f"misclassified_{run.variant}.png",
                               split=data.eval_split)
        record["misclassified"] = dict(index=wrong.indices, predicted=wrong.predicted,
                                       target=wrong.target, confidence=wrong.confidence)
    return record


def _board(s: Settings, run: Run):
    """A TensorBoard writer for this run (rank 0 only), or None."""
    if s.tensorboard is None or not s.writes:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(s.tensorboard / run.key.replace("/", "_")))


def _grid_fields(run: Run, s: Settings, data: Data) -> dict[str, Any]:
    fields = dict(variant=run.variant, batch_size=run.batch_size, seed=run.seed, lr=run.lr,
                  steps=s.epochs * -(-len(data.train_labels) // run.batch_size))
    if s.kind == "statistics":  # None for the norms without batch statistics
        fields["images_per_statistic"] = run.split(run.batch_size)
    return fields


# -- --jobs: independent runs in worker processes

_worker: dict[str, Any] = {}


def _init_worker(threads: int, data: Data, device: torch.device) -> None:
    """A --jobs worker: its thread count, the shared data, and Ctrl-C ignored between runs
    (a terminal's Ctrl-C reaches every process; a worker waiting for work has nothing to
    save and must not die with a traceback)."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(data=data, device=device)


def _execute_in_worker(run: Run, s: Settings) -> dict[str, Any]:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # interruptible while training
    try:
        return execute(run, s, _worker["data"], _worker["device"])
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_parallel(runs: list[Run], s: Settings, data: Data, device: torch.device, jobs: int,
                 threads: int, on_done: Callable[[Run, dict[str, Any]], None]) -> None:
    """Execute ``runs`` ``jobs`` at a time in spawned processes of ``threads`` threads each;
    ``on_done`` records each as it finishes. An interrupt or error stops the workers (each
    keeps its last finished epoch's checkpoint) before it is re-raised."""
    context = torch.multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                               initargs=(threads, data, device))
    pending = {pool.submit(_execute_in_worker, run, replace(s, progress=False)): run
               for run in runs}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise WorkerDied("a --jobs worker process died (killed, or out of "
                                     "memory); finished runs and epochs are saved") from None
                on_done(pending.pop(future), result)
    except BaseException:
        for future in pending:
            future.cancel()
        for child in multiprocessing.active_children():  # a busy worker saves and stops
            os.kill(child.pid, signal.SIGINT)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- the output folder

def prepare_out(out: Path | None, kind: str = "compare", record: str = "metrics.json") -> Path:
    """Create the output folder (a fresh one under runs/ by default) and prove it writable."""
    if out is None:
        out = Path("runs") / datetime.now().strftime(f"%Y%m%d-%H%M%S-{kind}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if (out / record).exists():
        raise UsageError(f"--out {out} already holds a run ({record}); continue it with "
                         f"--resume {out}, or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".normlab-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to --out {out} ({exc.strerror}); choose a writable "
                         f"folder") from None
    return out


def open_resume(args: argparse.Namespace, record: str = "metrics.json") -> dict[str, Any]:
    """Load ``record`` from the run folder ``args.resume`` and put its settings into ``args``.

    A resumed run uses the run's own settings, not this command line's defaults.
    """
    out = args.resume
    path = out / record
    if not out.is_dir():
        raise UsageError(f"--resume {out}: no such folder")
    if not path.exists():
        raise UsageError(f"--resume {out}: not a normlab {args.command} folder (no {record}); "
                         f"start a new run with --out")
    try:
        results = json.loads(path.read_text())
        config = results["config"]
        for key in ("variants", "epochs", "lambda_l1", "num_groups", "dataset"):
            config[key]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is corrupt ({type(exc).__name__}: {exc}); cannot resume "
                         f"from it: start a new run with --out") from None
    apply_config(args, config)
    return results


def apply_config(args: argparse.Namespace, config: dict[str, Any]) -> None:
    for key, value in config.items():
        setattr(args, {"lambda_l1": "l1", "seed": "seeds"}.get(key, key),
                [value] if key == "seed" else value)  # records before --seeds had one


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` so that two runs never write into one folder."""
    try:
        import fcntl
    except ImportError:  # Windows has no fcntl: run without the lock
        yield
        return
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another normlab run is writing to {out}; wait for it to finish "
                             f"or choose another --out") from None
        yield


# -- one study from start to finish, in whichever way it is parallel

def build_models(variants: list[str], num_groups: int) -> dict[str, Net]:
    """One untrained model per variant; raises UsageError for an impossible combination."""
    try:
        return {name: Net(VARIANTS[name].norm, num_groups=num_groups) for name in variants}
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _device_for(args: argparse.Namespace, ranks: Ranks) -> torch.device:
    try:
        device = select_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if ranks.distributed and device.type == "cuda":  # one GPU per local rank
        if ranks.local_world_size > torch.cuda.device_count():
            raise UsageError(f"{ranks.local_world_size} processes on this machine but "
                             f"{torch.cuda.device_count()} GPU(s); use --nproc-per-node "
                             f"{torch.cuda.device_count()} or --device cpu")
        device = torch.device("cuda", ranks.local_rank)
    elif ranks.distributed and device.type != "cpu":
        raise UsageError(f"data-parallel runs use CPUs (gloo) or CUDA GPUs (nccl), not "
                         f"{device.type}")
    return device


# --jobs auto trains one run per core only where that measured faster on the 2-core CPU
# (docs/performance.md): at batches under 64 images a step is dominated by per-step overhead
# (Python, many small kernels) that a second thread does not share but a second process
# does; from 64 up one run with every thread was as fast. A worker costs seconds to start
# (torch, the data), so runs of fewer images than AUTO_JOBS_MIN_IMAGES stay in-process.
AUTO_JOBS_BELOW_BATCH = 64
AUTO_JOBS_MIN_IMAGES = 10_000


def resolve_jobs(jobs: int | str, runs: list[Run], device: torch.device, ranks: Ranks,
                 images_per_run: int) -> int:
    """The number of runs to train at a time: ``jobs`` as asked, or for "auto" one per core
    on a CPU when several runs train small batches over enough images; otherwise one (a GPU,
    torchrun ranks, or steps that already keep every core busy)."""
    if jobs != "auto":
        return int(jobs)
    if (device.type != "cpu" or ranks.distributed or len(runs) < 2 or cores() < 2
            or min(run.batch_size for run in runs) >= AUTO_JOBS_BELOW_BATCH
            or images_per_run < AUTO_JOBS_MIN_IMAGES):
        return 1
    return min(cores(), len(runs))


def _check_parallel(args: argparse.Namespace, ranks: Ranks) -> None:
    """Refuse combinations that cannot work."""
    if args.jobs != "auto" and args.jobs > 1 and ranks.distributed:
        raise UsageError("--jobs runs independent runs in worker processes; under torchrun "
                         "each run is already spread over the ranks: drop --jobs or torchrun")
    if args.virtual_batch_size is not None and "sbn" in args.variants:
        raise UsageError("sbn (synchronized Batch Norm) computes over the whole global batch; "
                         "--virtual-batch-size does not combine with it")


def _set_threads(args: argparse.Namespace, ranks: Ranks) -> int:
    """Set and return the torch threads per process: --threads, else every core for one
    plain process (torch's default, which OMP_NUM_THREADS sets), else the cores shared out
    (--jobs workers set theirs when they start)."""
    if args.threads is not None:
        threads = args.threads
    elif args.jobs == 1 and not ranks.distributed:
        return torch.get_num_threads()
    else:
        threads = max(1, cores() // max(args.jobs, ranks.local_world_size))
    if args.jobs == 1:
        torch.set_num_threads(threads)
    return threads


class Study:
    """What differs between compare and sweep: which runs, and how a finished one is kept."""

    kind = "compare"
    record_name = "metrics.json"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def runs(self) -> list[Run]:
        a = self.args
        several = len(a.seeds) > 1
        return [Run(name, seed, a.batch_size, a.lr, f"{name}-seed{seed}",
                    f"{name} seed {seed}" if several else name)
                for seed in a.seeds for name in a.variants]

    def load(self) -> Data:
        a = self.args
        return load_data(a.data_dir, a.dataset, a.limit_train, holdout=a.holdout)

    def new_record(self, data: Data) -> dict[str, Any]:
        a = self.args
        return {"config": dict(variants=a.variants, epochs=a.epochs, seeds=a.seeds,
                               batch_size=a.batch_size, lr=a.lr, lambda_l1=a.l1,
                               num_groups=a.num_groups, dataset=a.dataset,
                               limit_train=a.limit_train, holdout=a.holdout,
                               eval_split=data.eval_split, precision=a.precision,
                               train_images=len(data.train_labels),
                               test_images=len(data.test_labels)),
                "variants": {}, "wall_time_s": 0.0}

    def finished(self, record: dict[str, Any], run: Run) -> bool:
        runs = record["variants"].get(run.variant, {}).get("runs", [])
        return any(r["seed"] == run.seed for r in runs)

    def keep(self, record: dict[str, Any], run: Run, result: dict[str, Any]) -> None:
        a, variant = self.args, VARIANTS[run.variant]
        entry = record["variants"].setdefault(run.variant, dict(
            label=variant.label, norm=variant.norm, lambda_l1=a.l1 if variant.l1 else 0.0,
            params=count_parameters(Net(variant.norm, num_groups=a.num_groups)), runs=[]))
        entry["runs"].append(result)
        # --jobs finishes runs in any order; the record keeps the command line's order.
        entry["runs"].sort(key=lambda r: a.seeds.index(r["seed"]))
        record["variants"] = {v: record["variants"][v] for v in a.variants
                              if v in record["variants"]}
        record["wall_time_s"] = sum(r.get("wall_time_s", 0.0) for v in
                                    record["variants"].values() for r in v["runs"])

    def announce(self, data: Data, device: torch.device, verb: str, out: Path) -> str:
        a = self.args
        seeds = f" x {len(a.seeds)} seeds" if len(a.seeds) > 1 else ""
        return (f"normlab compare: {len(a.variants)} variants{seeds} x {a.epochs} epochs on "
                f"{len(data.train_labels):,} {a.dataset} images, evaluated on the "
                f"{data.eval_split} set, device {device}; {verb} {out}")

    def after(self, out: Path, record: dict[str, Any], data: Data, device: torch.device
              ) -> None:
        """Work on the finished runs before the report (rank 0 only); none for compare."""

    def finish(self, out: Path, record: dict[str, Any]) -> None:
        finish(out, record)

    def exit_code(self, record: dict[str, Any]) -> int:
        return 1 if any(failed_runs(v) for v in record["variants"].values()) else 0


class Sweep(Study):
    kind = "sweep"
    record_name = "sweep.json"

    def runs(self) -> list[Run]:
        a = self.args
        # Smallest batches first: they take the most steps, and --jobs finishes soonest when
        # the longest runs start first.
        return [Run(v, s, b, scaled_lr(a.lr, b), run_key(v, b, s), f"{v} bs={b}")
                for b in sorted(a.batch_sizes) for s in a.seeds for v in a.variants]

    def load(self) -> Data:
        return load_data(self.args.data_dir, self.args.dataset, self.args.samples)

    def new_record(self, data: Data) -> dict[str, Any]:
        a = self.args
        return {"config": dict(variants=a.variants, batch_sizes=a.batch_sizes, seeds=a.seeds,
                               samples=a.samples, epochs=a.epochs, lr=a.lr, lambda_l1=a.l1,
                               num_groups=a.num_groups, dataset=a.dataset,
                               precision=a.precision, train_images=len(data.train_labels),
                               test_images=len(data.test_labels)),
                "runs": {}}

    def finished(self, record: dict[str, Any], run: Run) -> bool:
        return run.key in record["runs"]

    def keep(self, record: dict[str, Any], run: Run, result: dict[str, Any]) -> None:
        record["runs"][run.key] = result
        order = [r.key for r in self.runs()]  # --jobs finishes runs in any order
        record["runs"] = dict(sorted(record["runs"].items(),
                                     key=lambda kv: order.index(kv[0]) if kv[0] in order
                                     else len(order)))

    def announce(self, data: Data, device: torch.device, verb: str, out: Path) -> str:
        a = self.args
        total = len(a.variants) * len(a.batch_sizes) * len(a.seeds)
        return (f"normlab sweep: {len(a.variants)} variants x {len(a.batch_sizes)} batch sizes "
                f"x {len(a.seeds)} seed(s) = {total} runs of {a.epochs} epoch(s) on "
                f"{len(data.train_labels):,} {a.dataset} images, device {device}; {verb} {out}")

    def finish(self, out: Path, record: dict[str, Any]) -> None:
        finish_sweep(out, record)

    def exit_code(self, record: dict[str, Any]) -> int:
        return 0


class Statistics(Sweep):
    """The per-device statistics study: one optimiser setting (global batch, learning rate,
    schedule, steps, data order), and Batch Norm's statistics computed over 2 ... 128 of the
    batch's images (``--virtual-batch-size``), with Group and Layer Norm, which do not depend
    on the grouping, as references. Then the same under torchrun on 2 processes: plain Batch
    Norm (statistics per device) and synchronized Batch Norm (over the global batch)."""

    kind = "statistics"
    record_name = "statistics.json"
    references = ("gn", "ln")

    def runs(self) -> list[Run]:
        a = self.args
        runs = []
        for seed in a.seeds:
            for ips in a.images_per_statistic:
                runs.append(Run("bn", seed, a.batch_size, a.lr, f"bn/ips{ips}/seed{seed}",
                                f"bn {ips}/statistic",
                                virtual_batch_size=ips if ips < a.batch_size else None))
            runs += [Run(v, seed, a.batch_size, a.lr, f"{v}/seed{seed}", v)
                     for v in self.references]
        return runs

    def load(self) -> Data:
        a = self.args
        return load_data(a.data_dir, a.dataset, a.limit_train)

    def new_record(self, data: Data) -> dict[str, Any]:
        a = self.args
        return {"config": dict(variants=["bn", *self.references],
                               images_per_statistic=a.images_per_statistic, seeds=a.seeds,
                               epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                               lambda_l1=0.0, num_groups=a.num_groups, dataset=a.dataset,
                               limit_train=a.limit_train, processes=a.processes,
                               precision=a.precision, train_images=len(data.train_labels),
                               test_images=len(data.test_labels)),
                "runs": {}}

    def announce(self, data: Data, device: torch.device, verb: str, out: Path) -> str:
        a = self.args
        total = len(self.runs())
        two = (f", then sbn and bn on {a.processes} processes (torchrun)"
               if a.processes > 1 else "")
        return (f"normlab statistics: Batch Norm over {' '.join(map(str, a.images_per_statistic))} "
                f"images per statistic and {' '.join(self.references)} x {len(a.seeds)} "
                f"seed(s) = {total} runs of {a.epochs} epoch(s), global batch {a.batch_size}, "
                f"on {len(data.train_labels):,} {a.dataset} images, device {device}{two}; "
                f"{verb} {out}")

    def after(self, out: Path, record: dict[str, Any], data: Data, device: torch.device
              ) -> None:
        a = self.args
        if a.processes > 1:
            record["two_processes"] = self._two_processes(out)
            write_json(out / self.record_name, record)
        if "bn_statistics" not in record:
            record["bn_statistics"] = self._statistics_seen(out, record, data, device)
            write_json(out / self.record_name, record)

    def _two_processes(self, out: Path) -> dict[str, Any]:
        """Train sbn and bn with ``torchrun --nproc-per-node P`` (a compare in out/two-processes,
        resumed if it was interrupted) and return what the statistics report needs of it."""
        a, part = self.args, out / TWO_PROCESSES
        record = part / "metrics.json"
        metrics = json.loads(record.read_text()) if record.exists() else None
        if metrics is None or not _complete(metrics, a.seeds):
            data_dir = ["--data-dir", str(a.data_dir)] if a.data_dir else []
            args = ["--resume", str(part), *data_dir] if metrics is not None else [
                "--variants", *TWO_PROCESS_VARIANTS, "--seeds", *map(str, a.seeds),
                "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                "--lr", str(a.lr), "--num-groups", str(a.num_groups), "--dataset", a.dataset,
                "--precision", a.precision, "--device", "cpu", "--no-progress",
                "--out", str(part), *data_dir,
                *(["--limit-train", str(a.limit_train)] if a.limit_train else [])]
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc-per-node", str(a.processes), "-m", "normlab", "compare"]
            print(f"normlab statistics: sbn and bn on {a.processes} processes: "
                  f"torchrun ... compare {shlex.join(args)}", flush=True)
            code = _wait(subprocess.Popen([*launch, *args]))
            if code != 0:
                raise WorkerDied(f"the {a.processes}-process part (torchrun, in {part}) "
                                 f"failed with exit code {code}, its error is above; the "
                                 f"finished runs are saved: resume with normlab statistics "
                                 f"--resume {out}")
            metrics = json.loads(record.read_text())
        per_device = a.batch_size // a.processes
        return {"folder": TWO_PROCESSES, "command": metrics["command"],
                "processes": a.processes,
                "images_per_statistic": {"sbn": a.batch_size, "bn": per_device},
                "runs": {name: {str(r["seed"]): {"test_acc": r["history"]["test_acc"][-1],
                                                 "test_error": 100 - r["history"]["test_acc"][-1],
                                                 "wall_time_s": r["wall_time_s"]}
                                for r in good_runs(v)}
                         for name, v in metrics["variants"].items()}}

    def _statistics_seen(self, out: Path, record: dict[str, Any], data: Data,
                         device: torch.device) -> dict[str, Any]:
        """For the first seed's Batch Norm models at the fewest and the most images per
        statistic: what each Batch Norm layer normalised with over STATISTICS_BATCHES
        training batches, against the running estimates it uses at test time. Kept in full
        for channel 0 of the last layer (the figure), summarised for every layer."""
        a = self.args
        seed = a.seeds[0]
        seen: dict[str, Any] = {"seed": seed, "channel": 0, "by_images": {}}
        train_loader, _ = make_loaders(data, a.batch_size, seed, device)
        batches = [x for x, _ in islice(train_loader, STATISTICS_BATCHES)
                   if len(x) == a.batch_size]  # the same batches for every model
        for ips in sorted({min(a.images_per_statistic), max(a.images_per_statistic)}):
            weights = out / f"bn_ips{ips}_seed{seed}{WEIGHTS_SUFFIX}"
            result = record["runs"].get(f"bn/ips{ips}/seed{seed}", {})
            if not weights.exists() or "failed" in result:
                continue
            model = load_model(weights, device)
            stats = statistics_seen(model, batches, ips)
            names = {name: f"after {model.architecture[int(name.split('.')[1])][0]}"
                     for name in stats}
            last = stats[list(stats)[-1]]
            seen.update(batches=len(batches), layer=names[list(stats)[-1]])
            seen["by_images"][str(ips)] = {
                "test_error": result["test_error"],
                "mean": last["mean"][:, 0].tolist(), "var": last["var"][:, 0].tolist(),
                "running_mean": float(last["running_mean"][0]),
                "running_var": float(last["running_var"][0]),
                # Per layer, medians over its channels: how far one batch's statistics stray
                # from the running ones (standard deviation over batches, in running standard
                # deviations for the mean and as a fraction of the running variance), and the
                # average batch variance over the running variance (1: no train/test shift).
                "layers": {names[name]: {
                    "mean_noise": float((st["mean"].std(0) / st["running_var"].sqrt()).median()),
                    "var_noise": float((st["var"].std(0) / st["running_var"]).median()),
                    "var_ratio": float((st["var"].mean(0) / st["running_var"]).median())}
                    for name, st in stats.items()}}
        return seen

    def finish(self, out: Path, record: dict[str, Any]) -> None:
        finish_statistics(out, record)

    def exit_code(self, record: dict[str, Any]) -> int:
        return 0


TWO_PROCESSES = "two-processes"
TWO_PROCESS_VARIANTS = ("sbn", "bn")
STATISTICS_BATCHES = 300  # "a few hundred training batches" for the statistics figure


def _complete(metrics: dict[str, Any], seeds: list[int]) -> bool:
    """Whether a compare record holds a finished run of every variant for every seed."""
    variants = metrics["variants"]
    return all(v in variants and {r["seed"] for r in variants[v].get("runs", [])} >= set(seeds)
               for v in TWO_PROCESS_VARIANTS)


def _wait(process: subprocess.Popen) -> int:
    """Wait for a child; on Ctrl-C (which reaches it too) give it a minute to save its
    epoch and stop before it is terminated."""
    try:
        return process.wait()
    except BaseException:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
        raise


def _outcome(study: Study, result: dict[str, Any]) -> str:
    if "failed" in result:
        return f"failed: {result['failed']}"
    if study.kind == "statistics":
        return f"test error {result['test_error']:5.2f}%  {result['wall_time_s']:5.1f}s"
    if study.kind == "sweep":
        return (f"lr {result['lr']:.5f}  {result['steps']:6d} steps  test error "
                f"{result['test_error']:5.2f}%  {result['wall_time_s']:5.1f}s")
    return f"final {result['history']['test_acc'][-1]:.2f}%"


def run_study(study: Study) -> int:
    """Prepare (rank 0), load data (every rank), run what is not finished, write the report.

    Under torchrun every rank runs this; only rank 0 touches the output folder, and a step
    that fails on one rank makes every rank stop with that rank's one-line error.
    """
    args = study.args
    try:
        ranks = distributed.from_env()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    build_models(args.variants, args.num_groups)  # fail fast, before any data is read
    if args.tensorboard is not None:
        try:
            importlib.import_module("torch.utils.tensorboard")  # needs tensorboard installed
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install "
                             "'normlab[tensorboard]'") from None
    _check_parallel(args, ranks)
    device = _device_for(args, ranks)
    ranks = distributed.start(ranks, device)
    try:
        with ExitStack() as stack:  # holds the output folder's lock until the study ends
            return _run(study, ranks, device, stack)
    finally:
        distributed.close()


def _on_every_rank(ranks: Ranks, step: Callable[[], Any]) -> Any:
    """Run ``step``; under torchrun, a failure on any rank stops every rank with it."""
    try:
        try:
            result = step()
        except ValueError as exc:  # an impossible setting, found once the data is known
            raise UsageError(str(exc)) from None
    except (UsageError, DataError, CheckpointError) as exc:
        if ranks.distributed:
            distributed.agree(error_line(exc))
        raise
    if ranks.distributed:
        distributed.agree(None)
    return result


def _run(study: Study, ranks: Ranks, device: torch.device, stack: ExitStack) -> int:
    args = study.args

    def prepare() -> tuple[dict[str, Any] | None, Path]:
        if not ranks.leader:
            return None, Path(".")
        record = open_resume(args, study.record_name) if args.resume else None
        out = args.resume or prepare_out(args.out, study.kind, study.record_name)
        stack.enter_context(run_lock(out))
        return record, out

    record, out = _on_every_rank(ranks, prepare)
    if ranks.distributed:  # the others learn the run's settings and folder from rank 0
        shared = json.loads(distributed.broadcast_bytes(
            json.dumps({"record": record, "out": str(out)}).encode() if ranks.leader else None))
        record, out = shared["record"], Path(shared["out"])
        if record is not None:
            apply_config(args, record["config"])
    args.out = out  # named in the message if interrupted
    data = _on_every_rank(ranks, lambda: _load_and_check(study, record, ranks))
    args.precision = resolve_precision(args.precision, device)
    runs = study.runs()
    args.jobs = resolve_jobs(args.jobs, runs, device, ranks, args.epochs * len(data.train_labels))
    threads = _set_threads(args, ranks)
    if record is None:
        record = {"command": shlex.join(["normlab", *args.argv]),
                  "started": datetime.now(UTC).isoformat(timespec="seconds"),
                  **study.new_record(data)}
        record["config"].update(world_size=ranks.world_size,
                                virtual_batch_size=args.virtual_batch_size)
    if "environment" not in record:
        record["environment"] = environment(device)
        record["environment"]["torch_threads"] = threads  # what each run trained with
    todo = [r for r in runs if not study.finished(record, r)]
    parallel = dict(
        world_size=ranks.world_size, nodes=ranks.nodes, backend=ranks.backend,
        images_per_device=args.batch_size // ranks.world_size if study.kind == "compare"
        else None, jobs=args.jobs, threads_per_process=threads)
    # Like "environment", "parallel" says how the study's runs were trained: a resume keeps
    # it, and notes the runs it trains in another way (a resume that trains nothing, e.g.
    # to redo a study's last step, changes nothing).
    if not args.resume:
        record["parallel"] = parallel
    elif todo and parallel != record.get("parallel"):
        record.setdefault("resumed_parallel", []).append(
            {"parallel": parallel, "runs": [run.key for run in todo]})
    if ranks.leader:
        write_json(out / study.record_name, record)
        (out / "checkpoints").mkdir(exist_ok=True)
        print(study.announce(data, device, "resuming" if args.resume else "writing to",
                             out) + _parallel_note(ranks, args.jobs, threads))
    settings = Settings(study.kind, out, args.epochs, args.l1, args.num_groups,
                        args.precision, args.virtual_batch_size, not args.no_progress,
                        args.seeds[0], record["environment"]["git_revision"],
                        args.tensorboard, writes=ranks.leader)
    count = {"done": len(runs) - len(todo)}

    def on_done(run: Run, result: dict[str, Any]) -> None:
        count["done"] += 1
        if not ranks.leader:
            return
        study.keep(record, run, result)
        write_json(out / study.record_name, record)  # finished runs survive what follows
        checkpoint_of(out, run).unlink(missing_ok=True)
        if args.jobs > 1 or study.kind != "compare":
            tqdm.write(f"[{count['done']}/{len(runs)}] {run.label} seed {run.seed}  "
                       f"{_outcome(study, result)}")

    if ranks.leader and study.kind == "compare":
        for i, run in enumerate(runs, 1):
            if run not in todo:
                print(f"[{i}/{len(runs)}] {run.variant}: {VARIANTS[run.variant].label}, "
                      f"seed {run.seed} - finished earlier, kept")
    if args.jobs > 1:
        run_parallel(todo, settings, data, device, args.jobs, threads, on_done)
    else:
        for run in todo:
            if ranks.leader and study.kind == "compare":
                print(f"[{runs.index(run) + 1}/{len(runs)}] {run.variant}: "
                      f"{VARIANTS[run.variant].label}, seed {run.seed}")
            on_done(run, execute(run, settings, data, device))
    if ranks.leader:
        if not any((out / "checkpoints").iterdir()):
            (out / "checkpoints").rmdir()
        study.after(out, record, data, device)
        study.finish(out, record)
    return study.exit_code(record)


def _parallel_note(ranks: Ranks, jobs: int, threads: int) -> str:
    if ranks.distributed:
        return (f"; {ranks.world_size} processes on {ranks.nodes} machine(s) ({ranks.backend}), "
                f"{threads} thread(s) each")
    if jobs > 1:
        return f"; {jobs} runs at a time, {threads} thread(s) each"
    return ""


def _load_and_check(study: Study, record: dict[str, Any] | None, ranks: Ranks) -> Data:
    """Read the data on this rank, and check that the run can be split as asked."""
    args = study.args
    recorded = (record or {}).get("config", {}).get("world_size", 1)
    if record is not None and recorded != ranks.world_size:
        launch = (f"torchrun --nproc-per-node {recorded} -m normlab" if recorded > 1
                  else "normlab")
        raise UsageError(f"{args.out} was run by {recorded} process(es), this is "
                         f"{ranks.world_size}; resume it the same way: {launch} "
                         f"{study.kind} --resume {args.out}")
    data = study.load()
    splits = {(r.batch_size, r.split(args.virtual_batch_size)) for r in study.runs()}
    for batch, virtual in sorted(splits, key=str):
        check_split(len(data.train_labels), batch, ranks.world_size, virtual)
    return data


# -- figures and reports, from the record alone (also `normlab report`)

def finish_sweep(out: Path, results: dict[str, Any]) -> None:
    """sweep.png, report.md and the error table, from sweep.json's contents."""
    errors = {f"{VARIANTS[v].label} ({v})": by_batch
              for v, by_batch in error_table(results).items()}
    cfg = results["config"]
    seeds = f"; mean of {len(cfg['seeds'])} seeds, band min–max" if len(cfg["seeds"]) > 1 else ""
    plot_sweep(errors, f"Test error vs batch size ({cfg['dataset']})",
               out / "sweep.png",
               note=f"{cfg['epochs']} epoch(s) over {cfg['train_images']:,} images at every "
               f"batch size; peak lr {cfg['lr']} × batch / 128, one-cycle with warm-up;\n"
               f"Batch Norm's statistics over the whole batch; eval on {cfg['test_images']:,} "
               f"test images{seeds}")
    report = render_sweep_report(results, errors)
    atomic_write(out / "report.md", report)
    print("\n".join(line for line in report.splitlines() if line.startswith("|")))
    print(f"\nreport: {out / 'report.md'}")


def finish_statistics(out: Path, results: dict[str, Any]) -> None:
    """statistics.png, bn_statistics.png and report.md, from statistics.json's contents."""
    errors, seen = statistics_figures(results)
    if errors is not None:
        save_figure(errors, out / "statistics.png", dpi=110)
    if seen is not None:
        save_figure(seen, out / "bn_statistics.png", dpi=100)
    report = render_statistics_report(results)
    atomic_write(out / "report.md", report)
    print("\n".join(line for line in report.splitlines()[:12] if line.startswith("|")))
    print(f"\nreport: {out / 'report.md'}")


def finish(out: Path, metrics: dict[str, Any]) -> None:
    """The curves figure, report.md and a summary table, from metrics.json's contents."""
    split = metrics["config"].get("eval_split", "test")
    plot_curves({f"{v['label']} ({name})": [r["history"] for r in good_runs(v)]
                 for name, v in metrics["variants"].items() if good_runs(v)},
                out / "curves.png", split=split)
    atomic_write(out / "report.md", render_report(metrics))
    accs = final_accuracies(metrics)
    print(f"\n{'variant':8s} {'params':>7s} {'seeds':>5s} {'final ' + split + ' acc':>19s} "
          f"{'95% CI':>15s}")
    for name, v in metrics["variants"].items():
        if name not in accs:
            print(f"{name:8s} {v['params']:7,d} {0:5d} {'failed':>19s}")
            continue
        iv = t_interval(list(accs[name].values()))
        ci = f"{iv.low:.2f}–{iv.high:.2f}%" if iv.n > 1 else "–"
        print(f"{name:8s} {v['params']:7,d} {iv.n:5d} {iv.mean:18.2f}% {ci:>15s}")
    print(f"\nreport: {out / 'report.md'}  ({metrics['wall_time_s']:.0f} s of training)")


def redraw(run: Path) -> None:
    """Figures and report.md are pure functions of the run's JSON record: redraw them."""
    drawers = {"metrics.json": finish, "sweep.json": finish_sweep,
               "statistics.json": finish_statistics}
    record = next((run / n for n in drawers if (run / n).exists()), None)
    if record is None:
        raise UsageError(f"{run}: no metrics.json, sweep.json or statistics.json; give a "
                         f"compare, sweep or statistics output folder")
    try:
        results = json.loads(record.read_text())
        drawers[record.name](run, results)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{record} is corrupt ({type(exc).__name__}: {exc}); cannot draw "
                         f"a report from it") from None
