"""What an experiment is, as the runner sees it: a list of ``Run``s, what to keep of each, and
how to report them (``Experiment``), plus the resolved ``Settings`` every run trains with.

Each module of ``normlab.experiments`` subclasses ``Experiment`` once; the runner
(``normlab.runner``) executes any of them without knowing which.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import Data
from ..model import Net
from ..modelspec import ModelSpec
from ..norms import NORMS
from ..variants import VARIANTS


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

    def virtual_batch_size_given(self, default: int | None) -> int | None:
        """The virtual batch size this run trains with: its own, else the command line's
        (``default``); None for the norms without batch statistics."""
        if not NORMS[VARIANTS[self.variant].norm].virtual:
            return None
        return self.virtual_batch_size or default

    def images_per_statistic(self, s: Settings) -> int | None:
        """How many images each of its batch statistics covers: a virtual batch, else each
        process's part of the batch (synchronized: the whole batch); None for the norms
        without batch statistics."""
        norm = NORMS[VARIANTS[self.variant].norm]
        if norm.synchronized:
            return self.batch_size
        if not norm.batch_dependent:
            return None
        return (self.virtual_batch_size_given(s.virtual_batch_size)
                or self.batch_size // s.world_size)

    @property
    def stem(self) -> str:
        """The run's file name without suffix (keys may hold "/", file names may not)."""
        return self.key.replace("/", "_")


@dataclass(frozen=True)
class Settings:
    """Everything a run needs besides its data and device; picklable for --jobs workers."""

    out: Path
    epochs: int
    lambda_l1: float
    num_groups: int
    precision: str
    virtual_batch_size: int | None
    progress: bool
    revision: str = "unknown"  # the git revision, recorded in every weights file
    tensorboard: Path | None = None  # log every run's epochs here, one TensorBoard run each
    writes: bool = True  # rank 0 (or a single process): writes weights and figures
    world_size: int = 1  # processes each run is spread over (torchrun)
    model: ModelSpec | None = None  # the user's model (--model); None: normlab's Net


class Experiment:
    """What the runner needs to know of an experiment. Each module of ``normlab.experiments``
    defines one subclass with a ``name``, and the CLI makes it a subcommand.

    The record is a JSON file (``record_name``) rewritten after every finished run; by
    default it keeps each run's result under ``record["runs"][run.key]`` in the order of
    ``runs()``. Figures and report.md are a pure function of it (``render``), so
    ``normlab report`` can redraw them from the record alone.
    """

    name = ""  # the subcommand
    record_name = ""  # the record file in the output folder
    position = 99  # where the subcommand is listed
    help = ""  # one line for ``normlab --help``
    description = ""  # the subcommand's own --help text
    epoch_lines = False  # print every epoch of every run (and each run as it starts)
    fixed: tuple[str, ...] = ()  # record config keys the experiment sets, not its options
    more = False  # set by ``after``: the CLI trains another pass into the folder (recommend)

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The subcommand's options (``normlab.options`` has the shared ones)."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse settings that cannot work (raise UsageError) before anything runs."""

    def variants(self) -> list[str]:
        """Every variant the experiment trains: the runner builds one of each before any data
        is read, so an impossible setting fails at once."""
        return list(self.args.variants)

    def runs(self) -> list[Run]:
        """Every run of the experiment, in the order they are recorded."""
        raise NotImplementedError

    def load(self) -> Data:
        raise NotImplementedError

    def new_record(self, data: Data) -> dict[str, Any]:
        """A record with its "config" and an empty set of runs."""
        raise NotImplementedError

    def finished(self, record: dict[str, Any], run: Run) -> bool:
        return run.key in record["runs"]

    def result(self, run: Run, model: Net, history: dict[str, list[float]], data: Data,
               device: torch.device, s: Settings) -> dict[str, Any]:
        """What to keep of a finished run (called where it trained, so it may write files
        when ``s.writes``)."""
        raise NotImplementedError

    def failed(self, run: Run, message: str, data: Data, s: Settings) -> dict[str, Any]:
        """What to keep of a run that diverged."""
        return {"seed": run.seed, "failed": message}

    def keep(self, record: dict[str, Any], run: Run, result: dict[str, Any]) -> None:
        """Put a finished run into the record, in the order of ``runs()`` (--jobs finishes
        runs in any order)."""
        record["runs"][run.key] = result
        order = [r.key for r in self.runs()]
        record["runs"] = dict(sorted(record["runs"].items(),
                                     key=lambda kv: order.index(kv[0]) if kv[0] in order
                                     else len(order)))

    def images_per_device(self, world_size: int) -> int | None:
        """Images per device per step, where every run shares one batch size (the record's
        parallelism line says so); None otherwise."""
        return None

    def announce(self, data: Data, device: torch.device, verb: str, out: Path) -> str:
        """The line printed when the experiment starts or resumes."""
        raise NotImplementedError

    def outcome(self, result: dict[str, Any]) -> str:
        """What the line printed for a finished run says: ``summary`` or why it failed."""
        return f"failed: {result['failed']}" if "failed" in result else self.summary(result)

    def summary(self, result: dict[str, Any]) -> str:
        """A finished run's numbers, in a few words."""
        return "finished"

    def after(self, out: Path, record: dict[str, Any], data: Data, device: torch.device
              ) -> None:
        """Work on the finished runs before the report (rank 0 only)."""

    @classmethod
    def command_today(cls, record: dict[str, Any]) -> str | None:
        """The recorded command with every option added whose value in the record today's
        default would not give: the same run with today's normlab. None when the command as
        run still gives it (or no longer parses)."""
        parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
        cls.add_arguments(parser)
        argv = shlex.split(record["command"])[2:]  # after "normlab <name>"
        try:
            args = parser.parse_args(argv)
        except (argparse.ArgumentError, SystemExit):
            return None
        options = {a.dest: a for a in parser._actions if a.option_strings}
        extra = []
        for key, value in record.get("config_as_run", record["config"]).items():
            dest = {"lambda_l1": "l1"}.get(key, key)
            if isinstance(value, dict):  # a description (config.model), not an option value
                continue
            if dest in options and key not in cls.fixed and getattr(args, dest) != value:
                values = value if isinstance(value, list) else [value]
                extra += [options[dest].option_strings[0], *map(str, values)]
        return shlex.join(["normlab", cls.name, *argv, *extra]) if extra else None

    @staticmethod
    def render(out: Path, record: dict[str, Any]) -> None:
        """Figures and report.md from the record alone; prints a summary."""
        raise NotImplementedError

    def exit_code(self, record: dict[str, Any]) -> int:
        return 0
