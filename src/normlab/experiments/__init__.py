"""normlab's experiments, one module each: its grid of runs, what it keeps of each, its report
and its figures (``base.Experiment`` says what a module provides).

Adding an experiment is adding a module here that defines one ``Experiment`` subclass with a
``name``: ``registry()`` finds it, the CLI makes it a subcommand, the runner
(``normlab.runner``) executes its runs, and ``normlab report`` redraws its folder.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from .base import Experiment


@cache
def registry() -> dict[str, type[Experiment]]:
    """name -> experiment, in the order the CLI lists them: every ``Experiment`` subclass
    defined (not just imported) by a module of this package."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, Experiment) and obj.name
                  and obj.__module__ == module.__name__]
    return {cls.name: cls for cls in sorted(found, key=lambda cls: cls.position)}
