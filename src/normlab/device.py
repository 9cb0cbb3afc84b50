"""Where and in what precision a run computes: the device (``auto`` picks one) and bfloat16
autocast where the hardware has it natively."""

from __future__ import annotations

import torch

from .errors import UsageError


def select_device(name: str | None = None) -> torch.device:
    """``None``/"auto" picks cuda, then mps, then cpu; otherwise the named device, checked."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise UsageError(f"device {name!r} is not available here; use auto or cpu")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} does not exist: {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    return device


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (so autocast to it is a speed-up):
    CUDA GPUs that support it, and CPUs with AVX512-BF16 or AMX (read from /proc/cpuinfo;
    elsewhere we do not guess)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the hardware has it natively, else "fp32"; others as given."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of: "
                         f"{', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for the forward pass: convolutions in bfloat16, weights, optimiser
    state and losses stay float32. "fp32" disables it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bfloat16 outputs of autocast back to float32; float32 and float64 as they are (with
    ``torch.set_default_dtype(torch.float64)`` everything trains in double precision, which
    the multi-process tests use as an exact oracle)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
