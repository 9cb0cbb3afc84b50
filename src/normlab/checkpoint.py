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

# The conv stack of normlab 0.1, whose weight files do not name their architecture.
ARCHITECTURE_0_1 = (("conv1", 8, 3), ("conv2", 12, 3), ("conv3", 16, 3), ("pool", 0, 2),
                    ("trans", 8, 1), ("conv4", 12, 3), ("conv5", 16, 3), ("conv6", 20, 3))


class CheckpointError(Exception):
    """A weights/metrics file that cannot be used; the message says why and what to do."""


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's files are private; results are not
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
    """Save the weights with what is needed to rebuild the model (norm, groups, dropout and
    the conv stack, so that a file outlives a change of the default architecture)."""
    config = dict(norm=model.norm, num_groups=model.num_groups, dropout=model.dropout,
                  architecture=[list(layer) for layer in model.architecture])
    if model.virtual_batches > 1:
        config["virtual_batches"] = model.virtual_batches
    _save(path, {"config": config, "meta": meta, "state_dict": model.state_dict()})


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Net:
    """Rebuild a ``Net`` saved by ``save_model``; never unpickles arbitrary objects."""
    path = Path(path)
    blob = _load(path, "weights file")
    if not isinstance(blob, dict) or not {"config", "state_dict"} <= blob.keys():
        raise CheckpointError(f"{path}: not a normlab weights file (no config/state_dict)")
    # Files written before weights recorded their architecture (normlab 0.1) used this one.
    config = {"architecture": ARCHITECTURE_0_1, **blob["config"]}
    model = Net(**config)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit Net({config}): "
                              f"{str(exc).splitlines()[0]}") from None
    return model.to(map_location)

def _save(path: str | Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def _load(path: Path, what: str, blob: bytes | None = None) -> Any:
    """torch.load with weights_only=True (of ``blob``, the file's bytes, when given), every
    failure turned into one CheckpointError line."""
    try:
        return torch.load(io.BytesIO(blob) if blob is not None else path, map_location="cpu",
                          weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable normlab {what} ({first}); it is corrupt "
                              f"or unsafe: delete it to start that part again") from None


def save_training_state(path: str | Path, config: dict[str, Any], epoch: int, model: Net,
                        optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler,
                        generator: torch.Generator, history: dict[str, list[float]]) -> None:
    """Everything needed to continue training after ``epoch`` exactly as if never stopped."""
    rng = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    _save(path, {"format": "normlab-training-state-1", "config": config, "epoch": epoch,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng, "history": history})


def load_training_state(path: str | Path, config: dict[str, Any], model: Net,
                        optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler,
                        generator: torch.Generator, blob: bytes | None = None
                        ) -> tuple[int, dict[str, list[float]]]:
    """Restore a ``save_training_state`` file (or its bytes, ``blob``, as received from
    rank 0) into the given objects; (epoch, history).

    Refuses a checkpoint made for another configuration (variant, architecture, schedule,
    world size), naming what differs, rather than silently training a hybrid.
    """
    path = Path(path)
    state = _load(path, "training checkpoint", blob)
    if not isinstance(state, dict) or state.get("format") != "normlab-training-state-1":
        raise CheckpointError(f"{path}: not a normlab training checkpoint; delete it to start "
                              f"that variant again")
    saved = state["config"]
    differ = [k for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
    if differ:
        was = ", ".join(f"{k}={saved.get(k)}" for k in differ)
        now = ", ".join(f"{k}={config.get(k)}" for k in differ)
        raise CheckpointError(f"{path}: checkpoint is for {was} but this run has {now}; "
                              f"resume with the run's own settings or use a new --out")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["loader"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: checkpoint does not fit this model "
                              f"({str(exc).splitlines()[0][:160]}); delete it to start that "
                              f"variant again") from None
    return int(state["epoch"]), state["history"]
