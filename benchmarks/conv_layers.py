"""Where a training step's convolution time goes, layer by layer, and whether the largest
layer's gradients are cheaper another way -- the profile that limits issue 15's targets.

    python benchmarks/conv_layers.py --out benchmarks/results/conv-layers-cpu.json

Times oneDNN's forward, input-gradient and weight-gradient kernels for every convolution of
``Net`` at batch 128 (medians over calls), then, for the layer with the most multiply-adds,
the same gradients computed as other operations: the input gradient as a padded forward
convolution with flipped weights (or ``conv_transpose2d``), the weight gradient as a
convolution over the batch, as ``unfold`` + batched matrix products, or as nine shifted
matrix products. Each alternative is checked against oneDNN's result before it is timed.
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
import torch.nn.functional as F
from torch import nn

from normlab.model import Net
from normlab.provenance import cpu_name, git_revision

BATCH = 128


def ms(fn: Callable[[], object], calls: int) -> float:
    """Median milliseconds per call, after a warm-up call."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def gradients(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, data: bool, weight: bool
              ) -> tuple[torch.Tensor | None, ...]:
    """oneDNN's input and weight gradients (what autograd calls for a convolution)."""
    return torch.ops.aten.convolution_backward(g, x, w, None, (1, 1), (0, 0), (1, 1), False,
                                               (0, 0), 1, (data, weight, False))[:2]


def layers() -> list[tuple[str, int, int, int, int]]:
    """(name, in channels, out channels, kernel, input side) of each convolution of ``Net``
    before its classifier, read off the model on a 1x28x28 input."""
    model, rows = Net(), []
    for (name, _, _), block in zip(model.architecture, model.features, strict=True):
        if isinstance(block, nn.Sequential):  # conv -> norm -> ReLU; the rest are pools
            block[0].register_forward_pre_hook(
                lambda conv, args, name=name: rows.append(
                    (name, conv.in_channels, conv.out_channels, conv.kernel_size[0],
                     args[0].shape[-1])))
    model(torch.zeros(1, 1, 28, 28))
    return rows


def layer_times(name: str, cin: int, cout: int, k: int, side: int, calls: int, first: bool
                ) -> dict:
    """Median times of one convolution's kernels; ``first``: its input is the image, which
    needs no gradient."""
    x, w = torch.randn(BATCH, cin, side, side), torch.randn(cout, cin, k, k)
    g = torch.randn(BATCH, cout, side - k + 1, side - k + 1)
    return {"layer": name, "in": cin, "out": cout, "kernel": k, "input_side": side,
            "mmacs_per_image": round((side - k + 1) ** 2 * cout * cin * k * k / 1e6, 4),
            "forward_ms": round(ms(lambda: F.conv2d(x, w), calls), 3),
            "input_grad_ms": None if first else round(
                ms(lambda: gradients(g, x, w, True, False), calls), 3),
            "weight_grad_ms": round(ms(lambda: gradients(g, x, w, False, True), calls), 3)}


def alternatives(name: str, calls: int) -> dict[str, float]:
    """The largest layer's gradients computed as other operations, each checked first."""
    _, cin, cout, k, side = next(row for row in layers() if row[0] == name)
    x, w = torch.randn(BATCH, cin, side, side), torch.randn(cout, cin, k, k)
    out = side - k + 1
    g = torch.randn(BATCH, cout, out, out)
    data, weight = gradients(g, x, w, True, True)

    def shifted() -> torch.Tensor:
        rows = g.transpose(0, 1).reshape(cout, -1)
        return torch.stack([rows @ x[:, :, i:i + out, j:j + out].transpose(0, 1)
                            .reshape(cin, -1).T for i in range(k) for j in range(k)], -1
                           ).view(cout, cin, k, k)

    ways: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {
        "input_grad: oneDNN backward": (lambda: gradients(g, x, w, True, False)[0], data),
        "input_grad: padded forward conv, flipped weights": (
            lambda: F.conv2d(g, w.flip(2, 3).transpose(0, 1), padding=k - 1), data),
        "input_grad: conv_transpose2d": (lambda: F.conv_transpose2d(g, w), data),
        "weight_grad: oneDNN backward": (lambda: gradients(g, x, w, False, True)[1], weight),
        "weight_grad: conv over the batch": (
            lambda: F.conv2d(x.transpose(0, 1), g.transpose(0, 1)).transpose(0, 1), weight),
        "weight_grad: unfold + bmm": (
            lambda: torch.bmm(g.flatten(2), F.unfold(x, k).transpose(1, 2)).sum(0)
            .view(cout, cin, k, k), weight),
        "weight_grad: nine shifted matmuls": (shifted, weight),
    }
    timings = {}
    for label, (fn, expected) in ways.items():
        torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-2)
        timings[label] = round(ms(fn, calls), 3)
    return timings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = [layer_times(*layer, args.calls, first=i == 0) for i, layer in enumerate(layers())]
    for r in rows:
        grad = "-" if r["input_grad_ms"] is None else f"{r['input_grad_ms']:.3f}"
        print(f"{r['layer']:6s} {r['in']:2d}->{r['out']:2d} {r['kernel']}x{r['kernel']} on "
              f"{r['input_side']:2d}x{r['input_side']:<2d} {r['mmacs_per_image']:.3f} M MAC/img:"
              f" forward {r['forward_ms']:.3f}, input grad {grad}, weight grad "
              f"{r['weight_grad_ms']:.3f} ms", flush=True)
    total = sum(r["forward_ms"] + (r["input_grad_ms"] or 0) + r["weight_grad_ms"] for r in rows)
    largest = max(rows, key=lambda r: r["mmacs_per_image"])["layer"]
    print(f"all convolutions of one step: {total:.2f} ms; alternatives for {largest}:")
    ways = alternatives(largest, args.calls)
    for label, t in ways.items():
        print(f"  {label:50s} {t:.3f} ms", flush=True)
    if args.out:
        record = {"command": " ".join(["python", *sys.argv]), "git_revision": git_revision(),
                  "cpu": cpu_name(), "torch": torch.__version__,
                  "python": platform.python_version(), "threads": torch.get_num_threads(),
                  "batch": BATCH, "calls": args.calls, "layers": rows,
                  "step_total_ms": round(total, 3), "largest": largest,
                  "alternatives_ms": ways}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
