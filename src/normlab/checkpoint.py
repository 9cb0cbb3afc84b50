"""Saving and loading results: atomic writes, and weights that load without running code.

Every file is written to a temporary name and renamed into place, so a kill at any
instant leaves either the old or the new version, never half a file. Weights are read
with ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .model import Net


class CheckpointError(Exception):
    """A weights/metrics file that cannot be used; the message says why and what to do."""


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def save_model(model: Net, path: str | Path, **meta: Any) -> None:
    """Save the weights with what is needed to rebuild the model (norm, groups, dropout)."""
    buffer = io.BytesIO()
    config = dict(norm=model.norm, num_groups=model.num_groups, dropout=model.dropout)
    torch.save({"config": config, "meta": meta, "state_dict": model.state_dict()}, buffer)
    atomic_write(path, buffer.getvalue())


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Net:
    """Rebuild a ``Net`` saved by ``save_model``; never unpickles arbitrary objects."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable normlab weights file ({first[:160]}); "
                              f"it may be corrupt or unsafe: re-create it") from None
    if not isinstance(blob, dict) or not {"config", "state_dict"} <= blob.keys():
        raise CheckpointError(f"{path}: not a normlab weights file (no config/state_dict)")
    model = Net(**blob["config"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit Net({blob['config']}): "
                              f"{str(exc).splitlines()[0]}") from None
    return model
