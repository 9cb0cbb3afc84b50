"""Provenance: the machine, versions and git revision that a record's numbers depend on.

Every record captures ``environment()`` once, so a number can be traced to the code and the
machine that made it; ``git_revision`` also tells the CLI and the docs which code is running.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__


def git_revision(cwd: str | Path | None = None) -> str:
    """The checked-out commit (with "-dirty" if there are uncommitted changes), or "unknown"."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=where,
                             capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and machine facts that the numbers depend on."""
    env = dict(normlab=__version__, python=platform.python_version(), torch=torch.__version__,
               numpy=np.__version__, platform=platform.platform(), cpu=cpu_name(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               device=str(device), git_revision=git_revision())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
