"""The runner: executes an experiment's list of training runs -- one after another, ``--jobs N``
at a time in worker processes, or each across K data-parallel processes (torchrun).

It owns everything that does not depend on which experiment runs: the output folder and its
lock, resuming, the record rewritten after every finished run, checkpoints after every epoch,
and which process may write (rank 0 under torchrun; the parent for ``--jobs``, whose workers
write only their own run's weights, checkpoint and figure). What an experiment is -- its
runs, what it keeps of each, its report and figures -- is the ``Experiment`` it is given; the
experiments live in ``normlab.experiments``, one module each, and this module imports none.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from . import distributed, modelspec, preflight, progress
from .checkpoint import write_json
from .data import DATASETS, Data
from .device import resolve_precision, select_device
from .distributed import Ranks
from .engine import (
    Hook,
    TrainConfig,
    TrainingDiverged,
    train_model,
    virtual_batches_per_process,
)
from .errors import CheckpointError, DataError, UsageError, WorkerDied, error_line
from .experiments.base import Experiment, Run, Settings
from .folder import apply_config, open_resume, prepare_out, remove_unused, run_lock
from .hooks import EpochLines, TensorBoard
from .model import Net
from .norms import NORMS
from .progress import tqdm
from .provenance import environment
from .variants import VARIANTS


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def checkpoint_of(out: Path, run: Run) -> Path:
    return out / "checkpoints" / f"{run.stem}.ckpt"


# -- executing one run (in this process, a --jobs worker, or on every rank)

def execute(run: Run, experiment: Experiment, s: Settings, data: Data, device: torch.device
            ) -> dict[str, Any]:
    """Train ``run`` (resuming its checkpoint if any) and return what ``experiment`` keeps
    of it."""
    variant = VARIANTS[run.variant]
    config = TrainConfig(
        variant.norm, lambda_l1=s.lambda_l1 if variant.l1 else 0.0, num_groups=s.num_groups,
        epochs=s.epochs, seed=run.seed, batch_size=run.batch_size, lr=run.lr,
        precision=s.precision, weight_std=variant.weight_std,
        virtual_batch_size=run.virtual_batch_size_given(s.virtual_batch_size), model=s.model)
    hooks: list[Hook] = []
    if s.writes and experiment.epoch_lines:
        hooks.append(EpochLines(run.label, s.epochs, data.eval_split))
    if s.writes and s.tensorboard is not None:
        hooks.append(TensorBoard(s.tensorboard / run.stem, data.eval_split))
    try:
        model, history = train_model(config, device=device, data=data, name=run.label,
                                     progress=s.progress, checkpoint=checkpoint_of(s.out, run),
                                     hooks=hooks)
    except TrainingDiverged as exc:
        if s.writes:
            print(f"normlab {experiment.name}: error: {exc}; carrying on with the other runs",
                  file=sys.stderr)
        return experiment.failed(run, str(exc), data, s)
    return experiment.result(run, model, history, data, device, s)


# -- --jobs: independent runs in worker processes

_worker: dict[str, Any] = {}


def _init_worker(threads: int, data: Data, device: torch.device) -> None:
    """A --jobs worker: its thread count, the shared data, and Ctrl-C ignored between runs
    (a terminal's Ctrl-C reaches every process; a worker waiting for work has nothing to
    save and must not die with a traceback)."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(data=data, device=device)


def _execute_in_worker(run: Run, experiment: Experiment, s: Settings) -> dict[str, Any]:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # interruptible while training
    try:
        return execute(run, experiment, s, _worker["data"], _worker["device"])
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_parallel(runs: list[Run], experiment: Experiment, s: Settings, data: Data,
                 device: torch.device, jobs: int, threads: int,
                 on_done: Callable[[Run, dict[str, Any]], None]) -> None:
    """Execute ``runs`` ``jobs`` at a time in spawned processes of ``threads`` threads each;
    ``on_done`` records each as it finishes. An interrupt or error stops the workers (each
    keeps its last finished epoch's checkpoint) before it is re-raised."""
    context = torch.multiprocessing.get_context("spawn")
    # A worker that is killed cannot release its semaphores, and multiprocessing's resource
    # tracker (a process started with the pool) would add a warning about them after our
    # one-line error: nothing the user can act on.
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [
        os.environ.get("PYTHONWARNINGS"),
        "ignore::UserWarning:multiprocessing.resource_tracker"]))
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                               initargs=(threads, data, device))
    quiet = replace(s, progress=False)
    pending = {pool.submit(_execute_in_worker, run, experiment, quiet): run for run in runs}
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
            with contextlib.suppress(ProcessLookupError):  # it may have ended since listed
                os.kill(child.pid, signal.SIGINT)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def launch_torchrun(processes: int, argv: list[str]) -> int:
    """Run ``normlab ARGV`` data-parallel on ``processes`` processes of this machine
    (``torchrun --standalone``) and return its exit code, for an experiment with a
    multi-process part. On Ctrl-C, which reaches the child too, it gets a minute to save its
    epoch and stop before it is terminated."""
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node", str(processes), "-m", "normlab", *argv])
    try:
        return process.wait()
    except BaseException:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
        raise


# -- how the runs are spread: devices, --jobs, threads

def build_models(variants: list[str], num_groups: int) -> dict[str, Net]:
    """One untrained model per variant; raises UsageError for an impossible combination."""
    return {name: Net(VARIANTS[name].norm, num_groups=num_groups) for name in variants}


def _device_for(args: argparse.Namespace, ranks: Ranks) -> torch.device:
    device = select_device(args.device)
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


def _check_parallel(args: argparse.Namespace, variants: list[str], ranks: Ranks) -> None:
    """Refuse combinations that cannot work."""
    if args.jobs != "auto" and args.jobs > 1 and ranks.distributed:
        raise UsageError("--jobs runs independent runs in worker processes; under torchrun "
                         "each run is already spread over the ranks: drop --jobs or torchrun")
    if args.virtual_batch_size is not None and any(
            NORMS[VARIANTS[v].norm].synchronized for v in variants):
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


def _parallel_note(ranks: Ranks, jobs: int, threads: int) -> str:
    if ranks.distributed:
        return (f"; {ranks.world_size} processes on {ranks.nodes} machine(s) ({ranks.backend}), "
                f"{threads} thread(s) each")
    if jobs > 1:
        return f"; {jobs} runs at a time, {threads} thread(s) each"
    return ""


# -- one experiment from start to finish, in whichever way it is parallel

def run_experiment(experiment: Experiment) -> int:
    """Prepare (rank 0), load data (every rank), run what is not finished, write the report.

    Under torchrun every rank runs this; only rank 0 touches the output folder, and a step
    that fails on one rank makes every rank stop with that rank's one-line error.
    """
    experiment.check()
    args = experiment.args
    progress.set_enabled(not args.no_progress)  # also the data's bars (decoding, download)
    ranks = distributed.from_env()
    if modelspec.from_args(args) is None:  # fail fast, before any data is read
        build_models(experiment.variants(), args.num_groups)
    if args.tensorboard is not None:
        try:
            importlib.import_module("torch.utils.tensorboard")  # needs tensorboard installed
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install "
                             "'normlab[tensorboard]'") from None
    _check_parallel(args, experiment.variants(), ranks)
    device = _device_for(args, ranks)
    ranks = distributed.start(ranks, device)
    phases = _Phases(experiment, ranks, device)
    try:
        with ExitStack() as stack:  # holds the output folder's lock until the run ends
            return _run(phases, stack)
    except BaseException:
        phases.discard_if_unused()  # a refused start leaves no empty folder behind
        raise
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


def _run(phases: _Phases, stack: ExitStack) -> int:
    """The phases of one experiment, in order (as detectron2's ``train_loop`` outlines a
    training): each is a method of ``_Phases`` below."""
    phases.open_folder(stack)  # rank 0: a new output folder or the one to resume, locked
    phases.load_data()  # every rank; checks that the runs can be split as asked
    phases.start_record()  # command, settings, machine, how the runs are parallel
    phases.train_unfinished()  # each run kept in the record as it finishes
    distributed.all_done()  # under torchrun: the last collective is over on every rank
    return phases.finish()  # the experiment's last step, figures and report, from the record


class _Phases:
    """The state one experiment's phases pass on: its record, folder, data and runs."""

    def __init__(self, experiment: Experiment, ranks: Ranks, device: torch.device) -> None:
        self.experiment, self.ranks, self.device = experiment, ranks, device
        self.args = experiment.args
        self.record: dict[str, Any] | None = None
        self.out = Path(".")
        self.made = False  # this run made the output folder (rank 0)
        self.written = False  # the record is on disk (rank 0)

    def open_folder(self, stack: ExitStack) -> None:
        args, ranks = self.args, self.ranks

        def prepare() -> tuple[dict[str, Any] | None, Path]:
            if not ranks.leader:
                return None, Path(".")
            record = open_resume(args, self.experiment.record_name) if args.resume else None
            modelspec.from_args(args)  # a resumed --model whose code changed is refused here
            made = not args.resume and (args.out is None or not args.out.exists())
            out = args.resume or prepare_out(args.out, self.experiment.name,
                                             self.experiment.record_name)
            self.made, self.out = made, out
            stack.enter_context(run_lock(out))
            return record, out

        self.record, self.out = _on_every_rank(ranks, prepare)
        if ranks.distributed:  # the others learn the run's settings and folder from rank 0
            shared = json.loads(distributed.broadcast_bytes(
                json.dumps({"record": self.record, "out": str(self.out)}).encode()
                if ranks.leader else None))
            self.record, self.out = shared["record"], Path(shared["out"])
            if self.record is not None:
                apply_config(args, self.record["config"])
        args.out = self.out  # named in the message if interrupted

    def discard_if_unused(self) -> None:
        """Remove the output folder this run made if it stopped before writing its record."""
        if self.made and not self.written:
            remove_unused(self.out)

    def load_data(self) -> None:
        def load() -> Data:
            data = _load_and_check(self.experiment, self.record, self.ranks)
            preflight.check_same_data(self.record, data, self.args)
            self.model, self.parameters = None, None
            spec = modelspec.from_args(self.args)
            if spec is not None:  # every variant of the user's model, checked on this data
                preflight.leave_out_inapplicable(self.experiment,
                                                 len(data.input_shape) - 1, self.ranks.leader)
                fewest = preflight.fewest_per_statistic(
                    self.experiment.runs(), len(data.train_labels), self.ranks.world_size,
                    self.args.virtual_batch_size)
                self.model, self.parameters = modelspec.check(
                    spec, modelspec.variant_layers(self.experiment.variants()),
                    self.args.num_groups, data.example(), data.num_classes, fewest)
            return data

        self.data = _on_every_rank(self.ranks, load)

    def start_record(self) -> None:
        args, ranks, data = self.args, self.ranks, self.data
        args.precision = resolve_precision(args.precision, self.device)
        self.runs = self.experiment.runs()
        args.jobs = resolve_jobs(args.jobs, self.runs, self.device, ranks,
                                 args.epochs * len(data.train_labels))
        self.threads = _set_threads(args, ranks)
        if self.record is None:
            self.record = {"command": shlex.join(["normlab", *args.argv]),
                           "started": datetime.now(UTC).isoformat(timespec="seconds"),
                           **self.experiment.new_record(data)}
            self.record["config"].update(world_size=ranks.world_size,
                                         virtual_batch_size=args.virtual_batch_size)
            if args.augment is not None:
                self.record["config"]["augment"] = args.augment
            if data.spec.name not in DATASETS:  # not a data set normlab ships
                self.record["config"]["data"] = data.describe()
            if self.model is not None:  # what rebuilds it, and its size per variant
                self.record["config"]["model"] = {**self.model.describe(),
                                                  "parameters": self.parameters}
        record = self.record
        if "environment" not in record:
            record["environment"] = environment(self.device)
            record["environment"]["torch_threads"] = self.threads  # what each run trained with
        self.todo = [r for r in self.runs if not self.experiment.finished(record, r)]
        parallel = dict(
            world_size=ranks.world_size, nodes=ranks.nodes, backend=ranks.backend,
            images_per_device=self.experiment.images_per_device(ranks.world_size),
            jobs=args.jobs, threads_per_process=self.threads)
        # Like "environment", "parallel" says how the runs were trained: a resume keeps it,
        # and notes the runs it trains in another way (a resume that trains nothing, e.g. to
        # redo an experiment's last step, changes nothing).
        if not args.resume:
            record["parallel"] = parallel
        elif self.todo and parallel != record.get("parallel"):
            record.setdefault("resumed_parallel", []).append(
                {"parallel": parallel, "runs": [run.key for run in self.todo]})
        if ranks.leader:
            write_json(self.out / self.experiment.record_name, record)
            self.written = True
            (self.out / "checkpoints").mkdir(exist_ok=True)
            print(self.experiment.announce(data, self.device,
                                           "resuming" if args.resume else "writing to",
                                           self.out)
                  + _parallel_note(ranks, args.jobs, self.threads))
        self.done = len(self.runs) - len(self.todo)

    def train_unfinished(self) -> None:
        args, ranks, runs = self.args, self.ranks, self.runs
        settings = Settings(self.out, args.epochs, args.l1, args.num_groups, args.precision,
                            args.virtual_batch_size, progress.shown(),
                            self.record["environment"]["git_revision"], args.tensorboard,
                            writes=ranks.leader, world_size=ranks.world_size,
                            model=self.model)
        # An experiment that prints every epoch announces each run as it starts; otherwise
        # (and with --jobs, whose runs interleave) one line per finished run says how it went.
        starts = ranks.leader and self.experiment.epoch_lines
        if starts:
            for i, run in enumerate(runs, 1):
                if run not in self.todo:
                    print(f"[{i}/{len(runs)}] {run.variant}: {VARIANTS[run.variant].label}, "
                          f"seed {run.seed} - finished earlier, kept")
        if args.jobs > 1:
            run_parallel(self.todo, self.experiment, settings, self.data, self.device,
                         args.jobs, self.threads, self.keep)
            return
        for run in self.todo:
            if starts:
                print(f"[{runs.index(run) + 1}/{len(runs)}] {run.variant}: "
                      f"{VARIANTS[run.variant].label}, seed {run.seed}")
            self.keep(run, execute(run, self.experiment, settings, self.data, self.device))

    def keep(self, run: Run, result: dict[str, Any]) -> None:
        """A finished run into the record on disk at once: it survives what follows."""
        self.done += 1
        if not self.ranks.leader:
            return
        self.experiment.keep(self.record, run, result)
        write_json(self.out / self.experiment.record_name, self.record)
        checkpoint_of(self.out, run).unlink(missing_ok=True)
        if self.args.jobs > 1 or not self.experiment.epoch_lines:
            tqdm.write(f"[{self.done}/{len(self.runs)}] {run.label} seed {run.seed}  "
                       f"{self.experiment.outcome(result)}")

    def finish(self) -> int:
        if self.ranks.leader:
            if not any((self.out / "checkpoints").iterdir()):
                (self.out / "checkpoints").rmdir()
            self.experiment.after(self.out, self.record, self.data, self.device)
            self.experiment.render(self.out, self.record)
        return self.experiment.exit_code(self.record)


def _load_and_check(experiment: Experiment, record: dict[str, Any] | None, ranks: Ranks
                    ) -> Data:
    """Read the data on this rank, and check that the runs can be split as asked."""
    args = experiment.args
    recorded = (record or {}).get("config", {}).get("world_size", 1)
    if record is not None and recorded != ranks.world_size:
        launch = (f"torchrun --nproc-per-node {recorded} -m normlab" if recorded > 1
                  else "normlab")
        raise UsageError(f"{args.out} was run by {recorded} process(es), this is "
                         f"{ranks.world_size}; resume it the same way: {launch} "
                         f"{experiment.name} --resume {args.out}")
    data = experiment.load()
    splits = {(r.batch_size, r.virtual_batch_size_given(args.virtual_batch_size))
              for r in experiment.runs()}
    for batch, virtual in sorted(splits, key=str):
        virtual_batches_per_process(len(data.train_labels), batch, ranks.world_size, virtual)
    return data
