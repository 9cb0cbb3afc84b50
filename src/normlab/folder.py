"""The output folder of an experiment: made fresh and proven writable, or opened to resume
(its record's settings put back into the command line's), and locked while a run writes
into it. The runner calls these; they know nothing of what an experiment computes."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import UsageError


def prepare_out(out: Path | None, kind: str, record: str) -> Path:
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


def remove_unused(out: Path) -> None:
    """Remove a folder this run made but wrote nothing into (a start refused after the
    folder was made): its lock and empty checkpoints folder, then the folder if empty.
    Anything else in it stays."""
    with contextlib.suppress(OSError):  # anything else in it: it stays
        (out / ".lock").unlink(missing_ok=True)
        if (out / "checkpoints").is_dir():
            (out / "checkpoints").rmdir()
        out.rmdir()


def open_resume(args: argparse.Namespace, record: str) -> dict[str, Any]:
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
    # How the runs were spread (--jobs, --threads) decides their rounding, so a resume
    # keeps it too, unless this command line sets it again (a new --jobs alone shares the
    # cores out anew, as for a new run).
    parallel = results.get("parallel", {})
    if "jobs" in parallel and not given(args, "--jobs"):
        args.jobs = parallel["jobs"]
        if "threads_per_process" in parallel and not given(args, "--threads"):
            args.threads = parallel["threads_per_process"]
    return results


def given(args: argparse.Namespace, flag: str) -> bool:
    """Whether the command line itself set ``flag`` (as ``--flag V``, ``--flag=V`` or an
    abbreviation argparse accepts), rather than leaving it at its default."""
    for token in getattr(args, "argv", None) or []:
        name = token.partition("=")[0]
        if name.startswith("--") and len(name) > 2 and flag.startswith(name):
            return True
    return False


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
