"""Data-parallel training on ``torch.distributed``, as launched by ``torchrun``.

torchrun (one machine or many) starts one process per device and tells each who it is
through the environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT);
normlab reads that and nothing else, so every torchrun flag (``--nnodes``, ``--node-rank``,
``--rdzv-backend c10d``, ``--rdzv-endpoint``) works as documented by PyTorch.

What lives here: starting and ending the process group, moving bytes from rank 0 (only rank 0
touches files), agreeing on failures so that every rank stops with the same one-line error,
averaging Batch Norm's per-device running statistics (timm's ``distribute_bn``), and finding
out which rank was lost when one dies.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import UsageError

TIMEOUT_ENV = "NORMLAB_DIST_TIMEOUT"  # seconds a collective may wait for a hung rank
DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank among ``world_size``, and on its own machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that reads and writes the output folder."""
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


class RankFailed(Exception):
    """Another rank failed; ``line`` is its one-line error and ``exit_code`` its exit code."""

    def __init__(self, rank: int, exit_code: int, line: str) -> None:
        super().__init__(f"rank {rank} failed: {line}")
        self.rank, self.exit_code, self.line = rank, exit_code, line


class Stopped(Exception):
    """This process was asked to stop (SIGTERM, as torchrun sends when another rank fails)."""


def from_env(environ: dict[str, str] | None = None) -> Ranks:
    """The torchrun variables, checked; a plain process is rank 0 of 1."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return Ranks()
    try:
        values = {k: int(env[k]) for k in ("RANK", "WORLD_SIZE")}
        values["local_rank"] = int(env.get("LOCAL_RANK", values["RANK"]))
        values["local_world_size"] = int(env.get("LOCAL_WORLD_SIZE", values["WORLD_SIZE"]))
    except (KeyError, ValueError) as exc:
        raise UsageError(f"bad torch.distributed environment ({exc}); launch with torchrun, "
                         f"which sets RANK, WORLD_SIZE and LOCAL_RANK") from None
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise UsageError(f"RANK={values['RANK']} is outside WORLD_SIZE={values['WORLD_SIZE']}")
    return Ranks(values["RANK"], values["WORLD_SIZE"], values["local_rank"],
                 values["local_world_size"])


def start(ranks: Ranks, device: torch.device) -> Ranks:
    """Join the process group (gloo on CPU, nccl with one GPU per local rank) and return
    ``ranks`` with its backend. SIGTERM becomes ``Stopped`` so that a rank stopped by
    torchrun still says why, in one line."""
    if not ranks.distributed:
        return ranks
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend, timeout=timeout)
    signal.signal(signal.SIGTERM, _raise_stopped)
    return Ranks(ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size, backend)


def _raise_stopped(signum, frame) -> None:
    raise Stopped("stopped by a signal from the launcher (another rank failed)")


def all_done() -> None:
    """Every rank waits here once its last collective is over (the runs trained, before rank
    0 writes the report), so that no rank heads for the exit while another's gloo threads
    are still finishing the last collectives (see ``close``)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close() -> None:
    """Leave the process group while Python is fully alive.

    gloo's worker threads drop a collective's tensors a moment after the collective returns,
    and dropping a tensor that Python also holds takes the GIL. If that moment falls inside
    Python's shutdown the thread is ended mid-C++ and the process aborts ("terminate called
    without an active exception", SIGABRT): 6 in 30 two-rank launches of a script that ends
    on an all-reduce after DDP did so here. So: a pause that hands those threads the GIL,
    then the group destroyed, and the garbage it leaves collected before shutdown begins.
    """
    if dist.is_available() and dist.is_initialized():
        time.sleep(0.05)  # releases the GIL: a worker waiting for it drops its tensors now
        dist.destroy_process_group()
        gc.collect()


def _device() -> torch.device:
    """Where collectives' tensors must live: the GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """Send ``data`` from rank ``src`` to every rank (its length first, then the bytes):
    how rank 0's files reach ranks on other machines, with no pickle involved."""
    device = _device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
              if dist.get_rank() == src and size.item() else
              torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    if size.item():
        dist.broadcast(buffer, src)
    return bytes(buffer.cpu().numpy())


def agree(failure: tuple[int, str] | None) -> None:
    """Every rank calls this after a step that may fail on some ranks only (reading data on
    each machine, rank 0 preparing the output folder): if any rank passes a failure
    (exit code, one-line message), every other rank raises ``RankFailed`` with the lowest
    failing rank's message. The failing rank itself goes on to report its own error."""
    ranks = dist.get_world_size()
    first = torch.tensor([dist.get_rank() if failure else ranks], device=_device())
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    culprit = int(first.item())
    if culprit == ranks:
        return
    payload = json.dumps(failure).encode() if dist.get_rank() == culprit else None
    code, line = json.loads(broadcast_bytes(payload, src=culprit))
    if dist.get_rank() != culprit:
        raise RankFailed(culprit, code, line)


def sum_over_ranks(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """All-reduced sums (one collective), for epoch totals such as losses and counts."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).to(_device())
    dist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view_as(t).to(t.device, t.dtype))
        start += t.numel()
    return out


def first_over_ranks(index: torch.Tensor) -> torch.Tensor:
    """The smallest non-negative ``index`` over ranks, or -1 where no rank has one."""
    none = torch.iinfo(torch.long).max
    value = torch.where(index < 0, none, index).to(_device(), torch.long)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return torch.where(value == none, -1, value).to(index.device)


@torch.no_grad()
def average_running_stats(model: nn.Module) -> None:
    """Make every rank's running statistics the mean over ranks (timm's ``distribute_bn``).
    Under DDP, the batch-dependent layers (plain Batch Norm, Batch Renorm, EvoNorm-B0)
    normalise with each device's own batch and keep their own running averages (DDP is
    built with ``broadcast_buffers=False`` so that no rank silently overwrites the others');
    averaging them once an epoch, before evaluation, makes the evaluated and saved model
    independent of which rank holds it. Synchronized layers already agree and are left
    alone."""
    buffers = [b for m in model.modules()
               if isinstance(getattr(m, "running_var", None), torch.Tensor)
               and not getattr(m, "sync", False)
               for b in (getattr(m, "running_mean", None), m.running_var) if b is not None]
    if not buffers or not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    flat = torch.cat([b.reshape(-1) for b in buffers]).to(_device())
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    start = 0
    for b in buffers:
        b.copy_(flat[start:start + b.numel()].view_as(b))
        start += b.numel()


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer died, hung or vanished
    (gloo raises these as plain RuntimeErrors)."""
    if isinstance(exc, dist.DistError | Stopped):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "Connection closed", "Connection reset", "NCCL", "timed out",
                            "Timed out", "Socket Timeout"))


def lost_ranks(ranks: Ranks, wait_s: float = 3.0) -> list[int] | None:
    """After a collective failed: which ranks are gone? Each survivor marks itself in the
    launcher's key-value store (torchrun's agent hosts it, so it outlives a dead rank) and
    waits ``wait_s`` for the others; the ranks never marked are the lost ones. None when
    the store cannot be reached (e.g. its host was the lost machine)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's stop must not cut this
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=wait_s))
        prefix = f"normlab/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store.set(prefix + str(ranks.rank), "1")
        keys = [prefix + str(r) for r in range(ranks.world_size)]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not store.check(keys):
            time.sleep(0.1)
        return [r for r, k in enumerate(keys) if not store.check([k])]
    except (KeyError, ValueError, RuntimeError, OSError):
        return None
