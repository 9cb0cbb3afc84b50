"""Progress bars: tqdm's notebook bars in Jupyter where ipywidgets is installed, text bars in
a terminal, and none where the output is a log file (a bar there is a line of ``\\r``
redraws) or where the user said ``--no-progress`` (``set_enabled``). tqdm's warning in
Jupyter without ipywidgets is silenced: it falls back to the text bar then anyway, and the
warning would only show the user a path inside tqdm."""

from __future__ import annotations

import sys
import warnings
from typing import Any

from tqdm.std import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["bar", "set_enabled", "shown", "tqdm"]

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every bar normlab draws on or off (``--no-progress`` turns them off)."""
    global _enabled
    _enabled = enabled


def shown() -> bool:
    """Whether bars are drawn: enabled, and the output is a terminal or a notebook."""
    from tqdm.notebook import tqdm as notebook_bar

    notebook = issubclass(tqdm, notebook_bar)  # tqdm.auto chose Jupyter's bar
    return _enabled and (notebook or sys.stderr.isatty())


def bar(iterable: Any = None, *, disable: bool = False, **options: Any) -> tqdm:
    """A tqdm bar, drawn only where ``shown()``."""
    return tqdm(iterable, disable=disable or not shown(), **options)
