"""Batch Norm with fast statistics (``norms.BatchNorm2d(fast=True)``) against PyTorch's kernel,
side by side in one process: the layer alone on every Batch Norm input of the model at batch
128, and whole training steps of normlab's ``train`` on real MNIST batches.

    python benchmarks/fast_batchnorm.py --out benchmarks/results/fast-batchnorm-cpu.json

Layer times are medians over rounds of many calls; step speed-ups are medians of per-round
ratios (PyTorch's layer and the fast one alternate round by round on the same batches), since
absolute speeds drift on a shared machine while side-by-side ratios do not.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from normlab.data import Loader, load_data, make_loaders
from normlab.engine import DEFAULTS, VARIANTS, make_optimizer, train
from normlab.model import Net
from normlab.norms import BatchNorm2d
from normlab.provenance import cpu_name, git_revision

BATCH = DEFAULTS["batch_size"]


def set_fast(model: nn.Module, fast: bool) -> None:
    for layer in model.modules():
        if isinstance(layer, BatchNorm2d):
            layer.fast = fast


def seconds(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def layer_ms(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor, calls: int
             ) -> tuple[float, float]:
    """Milliseconds per training forward, and per forward + backward."""
    return (1e3 * seconds(lambda: layer(x), calls),
            1e3 * seconds(lambda: (layer(x) * upstream).sum().backward(), calls))


def step_ms(model: nn.Module, fast: bool, batches: Loader, optimizer, scheduler,
            lambda_l1: float) -> float:
    """Milliseconds per training step over one pass of ``batches``."""
    set_fast(model, fast)
    start = time.perf_counter()
    train(model, torch.device("cpu"), batches, optimizer, lambda_l1, scheduler, progress=False)
    return (time.perf_counter() - start) / len(batches) * 1e3


def bn_inputs() -> list[torch.Size]:
    """The shape of every Batch Norm input of ``Net`` at batch 128."""
    model, shapes = Net("batch"), []
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.register_forward_pre_hook(lambda _m, args: shapes.append(args[0].shape))
    model(torch.randn(BATCH, 1, 28, 28))
    return shapes


def layer_times(rounds: int, calls: int) -> list[dict]:
    rows = []
    for shape in bn_inputs():
        x = torch.randn(shape).requires_grad_()
        upstream = torch.randn(shape)
        timings: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, layer in (("pytorch", nn.BatchNorm2d(shape[1])),
                                ("fast", BatchNorm2d(shape[1], fast=True))):
                forward, both = layer_ms(layer, x, upstream, calls)
                timings.setdefault(f"{name}_forward_ms", []).append(forward)
                timings.setdefault(f"{name}_forward_backward_ms", []).append(both)
        rows.append({"shape": list(shape),
                     **{k: round(statistics.median(v), 4) for k, v in timings.items()}})
    return rows


def step_speedups(variants: list[str], rounds: int, steps: int, data_dir: str | None
                  ) -> dict[str, dict]:
    batches, _ = make_loaders(load_data(data_dir, limit_train=steps * BATCH), BATCH, seed=0)
    results = {}
    for spec in variants:
        name, _, vbs = spec.partition("@")  # "bn@16": Batch Norm over 16-image parts
        v = VARIANTS[name]
        model = Net(v.norm, num_groups=DEFAULTS["num_groups"],
                    virtual_batches=BATCH // int(vbs) if vbs else 1)
        optimizer, scheduler = make_optimizer(model, DEFAULTS["lr"], 1, steps * (2 * rounds + 1))
        step = (batches, optimizer, scheduler, DEFAULTS["lambda_l1"] if v.l1 else 0.0)
        step_ms(model, False, *step)  # warm-up
        ms: dict[str, list[float]] = {"pytorch": [], "fast": []}
        for _ in range(rounds):
            for fast in (False, True):
                ms["fast" if fast else "pytorch"].append(step_ms(model, fast, *step))
        ratios = [a / b for a, b in zip(ms["pytorch"], ms["fast"], strict=True)]
        results[spec] = {"pytorch_ms_per_step": [round(t, 2) for t in ms["pytorch"]],
                         "fast_ms_per_step": [round(t, 2) for t in ms["fast"]],
                         "speed_up": round(statistics.median(ratios), 3)}
        print(f"{spec:8s} step {statistics.median(ms['pytorch']):6.2f} ms (PyTorch's BN) -> "
              f"{statistics.median(ms['fast']):6.2f} ms (fast): {results[spec]['speed_up']}x",
              flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["bn+l1", "bn", "bn@16"],
                   help="Batch Norm variants; NAME@B for B images per statistic")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="training batches per round")
    p.add_argument("--calls", type=int, default=50, help="layer calls per round")
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    layers = layer_times(args.rounds, args.calls)
    for row in layers:
        print(f"{str(row['shape']):>20s} forward {row['pytorch_forward_ms']:.3f} -> "
              f"{row['fast_forward_ms']:.3f} ms, forward+backward "
              f"{row['pytorch_forward_backward_ms']:.3f} -> "
              f"{row['fast_forward_backward_ms']:.3f} ms", flush=True)
    steps = step_speedups(args.variants, args.rounds, args.steps, args.data_dir)
    if args.out:
        record = {"command": " ".join(["python", *sys.argv]), "git_revision": git_revision(),
                  "cpu": cpu_name(), "torch": torch.__version__,
                  "python": platform.python_version(), "threads": torch.get_num_threads(),
                  "rounds": args.rounds, "steps_per_round": args.steps, "layers": layers,
                  "steps": steps}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
