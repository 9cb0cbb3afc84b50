"""Saving and loading results: atomic writes, and weights that load without running code.

Every file is written to a temporary name and renamed into place, so a kill at any
instant, or a full disk, leaves either the old or the new version, never half a file.

Final weights are safetensors files (no pickle at all; Hugging Face's format, readable by
most of the ecosystem) whose metadata header holds what rebuilds the model, so anyone can
load one with ``safetensors.torch.load_file`` and ``Net(**json.loads(meta["config"]))``.
Weights of normlab 0.2 and earlier (``.pt``) still load, with
``torch.load(weights_only=True)``, which refuses pickled code; so do training checkpoints,
which hold optimiser and random-number state and stay torch files.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import __version__, distributed
from .errors import CheckpointError, UsageError, disk_full, first_line  # noqa: F401
from .model import Net

WEIGHTS_SUFFIX = ".safetensors"
WEIGHTS_FORMAT = "normlab-weights-1"

# The conv stack of normlab 0.1, whose weight files do not name their architecture.
ARCHITECTURE_0_1 = (("conv1", 8, 3), ("conv2", 12, 3), ("conv3", 16, 3), ("pool", 0, 2),
                    ("trans", 8, 1), ("conv4", 12, 3), ("conv5", 16, 3), ("conv6", 20, 3))


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's files are private; results are not
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None  # name the file
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def save_model(model: Net, path: str | Path, **meta: Any) -> None:
    """Save the weights as safetensors with what rebuilds the model (norm, groups, dropout
    and the conv stack, so that a file outlives a change of the default architecture) and
    ``meta`` (variant, seed, accuracy, revision ...) in the metadata header, as strings.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "gn.safetensors"
        >>> save_model(Net("group"), path, variant="gn", seed=1)
        >>> model, meta = load_model_and_meta(path)
        >>> model.norm, meta["variant"], meta["seed"]
        ('group', 'gn', '1')
    """
    config = getattr(model, "normlab_config", None)  # a --model network
    if config is None:
        config = dict(norm=model.norm, num_groups=model.num_groups, dropout=model.dropout,
                      architecture=[list(layer) for layer in model.architecture])
        if model.virtual_batches > 1:
            config["virtual_batches"] = model.virtual_batches
        if model.weight_std:
            config["weight_std"] = True
    header = {"format": WEIGHTS_FORMAT, "normlab": __version__, "config": json.dumps(config),
              "norm": config["norm"], "num_groups": str(config["num_groups"]),
              **({"architecture": json.dumps(config["architecture"])}
                 if "architecture" in config else {}),
              **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, safetensors_bytes(tensors, metadata=header))


def read_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                             dict[str, str]]:
    """(config, state_dict, metadata) of a weights file, safetensors or normlab's older
    ``.pt``; never unpickles arbitrary objects."""
    path = Path(path)
    if _is_safetensors(path):
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
            config = json.loads(meta["config"])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a loadable normlab weights file "
                                  f"({first_line(exc, 160)}); it "
                                  f"is corrupt or not normlab's: delete or replace it") from None
        return config, state, meta
    blob = _load(path, "weights file")
    if not isinstance(blob, dict) or not {"config", "state_dict"} <= blob.keys():
        raise CheckpointError(f"{path}: not a normlab weights file (no config/state_dict)")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in blob.get("meta", {}).items()}
    # Files written before weights recorded their architecture (normlab 0.1) used this one.
    return {"architecture": ARCHITECTURE_0_1, **blob["config"]}, blob["state_dict"], meta


def _is_safetensors(path: Path) -> bool:
    """By content, not name: 8 bytes of header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror})") from None
    return len(head) == 9 and head[8:9] == b"{"


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Net:
    """Rebuild a ``Net`` saved by ``save_model`` (or an older ``.pt`` weights file)."""
    return load_model_and_meta(path, map_location)[0]


def load_model_and_meta(path: str | Path, map_location: str | torch.device = "cpu"
                        ) -> tuple[Net, dict[str, str]]:
    """``load_model``, and the file's metadata (variant, seed, test_acc, how it trained)."""
    config, state, meta = read_weights(path)
    model = rebuild(config, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        built = config["model"]["spec"] if "model" in config else f"Net({config})"
        raise CheckpointError(f"{path}: weights do not fit {built}: "
                              f"{first_line(exc, joined=True)}") from None
    return model.to(map_location), meta


def rebuild(config: dict[str, Any], path: str | Path = "<weights>") -> nn.Module:
    """An untrained model as a weights file's ``config`` describes it: normlab's ``Net``, or
    the ``--model`` network it was trained as (rebuilt from its spec, which must import)."""
    if "model" not in config:
        return Net(**config)
    from .modelspec import ModelSpec  # imports convert: only where a --model is rebuilt

    try:
        spec = ModelSpec.from_description(config["model"])
        model = spec.variant(config["norm"], config["num_groups"],
                             config.get("virtual_batches", 1), config.get("weight_std", False),
                             config["in_channels"], config["num_classes"])
    except UsageError as exc:
        raise CheckpointError(f"{path}: its model cannot be rebuilt ({exc})") from None
    model.normlab_config = config  # as saved (the spec's fingerprint then)
    return model


def convert_weights(path: str | Path, **meta: Any) -> Path:
    """Rewrite an older ``.pt`` weights file as ``.safetensors`` beside it (``meta`` added to
    its metadata), check that the new file holds the same tensors, and remove the old one."""
    path = Path(path)
    config, state, old_meta = read_weights(path)
    model = Net(**config)
    model.load_state_dict(state)
    target = path.with_suffix(WEIGHTS_SUFFIX)
    save_model(model, target, **{**{k: _plain(v) for k, v in old_meta.items()}, **meta})
    _, written, _ = read_weights(target)
    if written.keys() != state.keys() or not all(torch.equal(written[k], state[k])
                                                  for k in state):
        target.unlink()
        raise CheckpointError(f"{path}: the converted weights differ; nothing was changed")
    path.unlink()
    return target


def _plain(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


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
    except Exception as exc:  # garbage bytes make the (weights-only, so safe) unpickler
        # raise almost anything: KeyError for a memo entry never stored, for one
        raise CheckpointError(f"{path}: not a loadable normlab {what} "
                              f"({first_line(exc, 160)}); it is corrupt "
                              f"or unsafe: delete it to start that part again") from None


def save_training_state(path: str | Path, config: dict[str, Any], epoch: int, model: Net,
                        optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler,
                        generator: torch.Generator, history: dict[str, list[float]],
                        hooks: list[dict[str, Any]] | None = None) -> None:
    """Everything needed to continue training after ``epoch`` exactly as if never stopped,
    with the training hooks' states (``engine.Hook.state_dict``), one per hook in order."""
    rng = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    _save(path, {"format": "normlab-training-state-1", "config": config, "epoch": epoch,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng, "history": history,
                 "hooks": hooks or []})


def load_training_state(path: str | Path, config: dict[str, Any], model: Net,
                        optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler,
                        generator: torch.Generator, blob: bytes | None = None
                        ) -> tuple[int, dict[str, list[float]], list[dict[str, Any]]]:
    """Restore a ``save_training_state`` file (or its bytes, ``blob``, as received from
    rank 0) into the given objects; (epoch, history, the hooks' states: none in a
    checkpoint older than them).

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
                              f"({first_line(exc, joined=True)}); delete it to start that "
                              f"variant again") from None
    return int(state["epoch"]), state["history"], state.get("hooks", [])


def read_for_ranks(path: str | Path | None, rank: int, world: int) -> bytes | None:
    """The checkpoint's bytes on every rank, or None without one: rank 0 reads the file
    (only it writes files) and sends it to the others, who may be on other machines."""
    if path is None:
        return None
    blob = Path(path).read_bytes() if rank == 0 and Path(path).exists() else None
    if world > 1:
        blob = distributed.broadcast_bytes(blob) or None
    return blob
