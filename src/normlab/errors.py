"""The failures normlab expects, each reported as one line that says what is wrong and what
to do (``error_line``), never a traceback. Core modules raise these types directly, so the
command line only has to print them.

``UsageError`` is a ``ValueError``: library callers catch what they always caught.
"""

from __future__ import annotations

import errno


class UsageError(ValueError):
    """A problem with what the user asked for, reported as one line with exit code 2."""


class DataError(Exception):
    """Bad or missing data; the message says which file, what is wrong and what to do."""


class CheckpointError(Exception):
    """A weights/metrics file that cannot be used; the message says why and what to do."""


class WorkerDied(Exception):
    """A --jobs worker (or a launched part of an experiment) ended without finishing."""


def first_line(exc: BaseException, limit: int = 200, *, joined: bool = False) -> str:
    """An exception's message as one line of at most ``limit`` characters: its first line
    (``joined``: every line, for messages such as PyTorch's "Error(s) in loading
    state_dict", whose following lines say what did not fit), or its type's name where it
    says nothing: the part of a one-line error that quotes a library."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = (" ".join(lines) if joined else lines[0]) if lines else type(exc).__name__
    return text[:limit]


def disk_full(exc: BaseException) -> bool:
    """A write that failed for want of space (full disk, or quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


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
