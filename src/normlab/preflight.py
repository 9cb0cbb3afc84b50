"""What is checked of a run once its data are known, before any training: that a resumed
run continues on the data it started with, that every variant is defined for the data's
maps (a study's 2-D-only defaults are left out of a 1-D or 3-D network's, with a line), and
how few inputs a batch statistic can see (``modelspec.check`` runs a network on that many).
The runner calls these; each raises one ``UsageError`` line."""

from __future__ import annotations

import argparse
from typing import Any

from .data import Data
from .errors import UsageError
from .experiments.base import Experiment, Run
from .folder import given
from .norms import NORMS
from .variants import VARIANTS


def check_same_data(record: dict[str, Any] | None, data: Data, args: argparse.Namespace
                     ) -> None:
    """A resumed run continues on the data it started with, or not at all: a record of
    another data set would mix two in one."""
    recorded = ((record or {}).get("config", {}).get("data") or {}).get("fingerprint")
    if recorded is not None and recorded != data.fingerprint():
        raise UsageError(f"{args.resume} was trained on other data: {args.dataset} has "
                         f"changed since the run started (its fingerprint was "
                         f"{recorded[:19]}..., now {data.fingerprint()[:19]}...); restore "
                         f"that data to continue, or start a new run with --out")


def leave_out_inapplicable(experiment: Experiment, dims: int, say: bool) -> None:
    """Leave out, with one line, the default variants whose norm is not defined for the
    data's maps (FRN and EvoNorm are 2-D only), so a study runs on 1-D and 3-D networks
    as it is; variants the user named are refused instead."""
    args = experiment.args
    wrong = [v for v in experiment.variants() if dims not in NORMS[VARIANTS[v].norm].dims]
    if not wrong:
        return
    named = [v for v in wrong for flag in _VARIANT_OPTIONS
             if given(args, flag) and v in (getattr(args, flag[2:], None) or [])]
    why = f"{', '.join(wrong)}: defined for 2-D maps only, and the data's are {dims}-D"
    if named or getattr(args, "resume", None):
        raise UsageError(f"{why}; leave {'them' if len(wrong) > 1 else 'it'} out of "
                         f"--variants / --references")
    for flag in _VARIANT_OPTIONS:
        chosen = getattr(args, flag[2:], None)
        if isinstance(chosen, list):
            setattr(args, flag[2:], [v for v in chosen if v not in wrong])
    if not experiment.variants():
        raise UsageError(f"{why}, and no other variant is left; choose --variants")
    if say:
        print(f"left out {why}")


_VARIANT_OPTIONS = ("--variants", "--references")


def fewest_per_statistic(runs: list[Run], train_images: int, world: int,
                          virtual_batch_size: int | None) -> int:
    """The fewest inputs any batch statistic of these runs sees in training: a virtual
    batch, a process's part of a batch, or a part of the last, short batch."""
    fewest = train_images
    for run in runs:
        per_process = run.batch_size // world
        virtual = run.virtual_batch_size_given(virtual_batch_size) or per_process
        fewest = min(fewest, virtual)
        last = train_images % run.batch_size
        if last:
            fewest = min(fewest, last // (world * max(1, per_process // virtual)))
    return fewest
