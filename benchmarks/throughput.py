"""Training and evaluation throughput: normlab's pipeline against the conventional one.

The conventional ("reference") pipeline is what the study normlab grew from did, and what most
MNIST tutorials do: a ``torch.utils.data.DataLoader`` over a per-sample dataset whose every
image goes through Pillow (``RandomRotation(±7°)`` with torchvision's defaults: nearest
neighbour, no expansion, fill 0), ``ToTensor`` and ``Normalize``; batch 128, shuffled, two
worker processes; the model in float32, eval under ``torch.no_grad`` at batch 1000.
normlab's pipeline is ``normlab.engine.train`` / ``test`` exactly as ``normlab compare`` runs
them. Both train the same ``Net`` with the same optimiser (SGD, Nesterov momentum, one-cycle
schedule) and batch size, on the real MNIST training set.

Every measurement runs in a fresh child process (so peak memory is per pipeline, and one
pipeline's worker processes or allocator state cannot slow the other); reference and normlab
alternate, round after round, and the medians of the per-round *ratios* are reported, since
absolute speeds drift on a shared machine while side-by-side ratios do not.

    python benchmarks/throughput.py                 # 3 rounds, bn+l1 ln gn, writes nothing
    python benchmarks/throughput.py --out benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from normlab.data import MNIST, Loader, load_data, make_loaders
from normlab.engine import (
    DEFAULTS,
    VARIANTS,
    graph_step,
    l1_penalty,
    make_optimizer,
    resolve_precision,
    select_device,
    test,
    train,
)
from normlab.model import Net
from normlab.provenance import cpu_name, git_revision

BATCH = DEFAULTS["batch_size"]


# --- the conventional pipeline --------------------------------------------------------------
class PerSampleMNIST(torch.utils.data.Dataset):
    """MNIST as the reference study fed it: one PIL image at a time through the transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, rotate: bool) -> None:
        self.images, self.labels, self.rotate = images.numpy(), labels.numpy(), rotate

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img = Image.fromarray(self.images[i], mode="L")
        if self.rotate:  # torchvision RandomRotation(7): uniform angle, NEAREST, fill 0
            angle = float(torch.empty(1).uniform_(-7.0, 7.0).item())
            img = img.rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=0)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).unsqueeze(0).float().div(255)
        return (x - MNIST.mean) / MNIST.std, int(self.labels[i])  # ToTensor, Normalize


def reference_loaders(data, workers: int, pin: bool) -> tuple[Any, Any]:
    train_ds = PerSampleMNIST(data.train_images, data.train_labels, rotate=True)
    test_ds = PerSampleMNIST(data.test_images, data.test_labels, rotate=False)
    return (torch.utils.data.DataLoader(train_ds, batch_size=BATCH, shuffle=True,
                                        num_workers=workers, persistent_workers=workers > 0,
                                        pin_memory=pin),
            torch.utils.data.DataLoader(test_ds, batch_size=1000, num_workers=workers,
                                        pin_memory=pin))


def reference_train_step(model, optimizer, scheduler, x, y, lambda_l1: float,
                         device: torch.device) -> None:
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    optimizer.zero_grad()
    loss = F.nll_loss(model(x), y)
    if lambda_l1:
        loss = loss + lambda_l1 * l1_penalty(model)
    loss.backward()
    optimizer.step()
    scheduler.step()


# --- one measurement, in a child process ----------------------------------------------------
def measure(pipeline: str, variant: str, warmup: int, steps: int, workers: int,
            precision: str, data_dir: str | None = None, device_name: str = "cpu"
            ) -> dict[str, Any]:
    """Training images/s over ``steps`` batches after ``warmup`` batches, then evaluation
    images/s over the 10,000 test images (after one warm-up pass), and peak memory."""
    random.seed(0)
    torch.manual_seed(0)
    device = select_device(device_name)

    def sync() -> None:  # GPU work is asynchronous: wait for it before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    v = VARIANTS[variant]
    lambda_l1 = DEFAULTS["lambda_l1"] if v.l1 else 0.0
    data = load_data(data_dir)
    model = Net(v.norm, num_groups=DEFAULTS["num_groups"], dropout=DEFAULTS["dropout"])
    model.to(device)
    optimizer, scheduler = make_optimizer(model, DEFAULTS["lr"], epochs=1,
                                          steps_per_epoch=warmup + steps + 1)
    if pipeline == "reference":
        precision = "fp32"
        train_loader, test_loader = reference_loaders(data, workers, device.type == "cuda")
        batches = iter(train_loader)
        model.train()
        for _ in range(warmup):
            reference_train_step(model, optimizer, scheduler, *next(batches), lambda_l1, device)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            reference_train_step(model, optimizer, scheduler, *next(batches), lambda_l1, device)
        sync()
        train_s = time.perf_counter() - start

        def evaluate() -> None:
            model.eval()
            with torch.no_grad():
                for x, y in test_loader:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    F.nll_loss(model(x), y, reduction="sum")
            sync()
    else:
        precision = resolve_precision(precision, device)
        split = dict(batch_size=BATCH, shuffle=True, augment=True, seed=0, device=device,
                     mean=data.spec.mean, std=data.spec.std)
        images, labels = data.train_images, data.train_labels
        warm = Loader(images[:warmup * BATCH], labels[:warmup * BATCH], **split)
        timed = Loader(images[warmup * BATCH:(warmup + steps) * BATCH],
                       labels[warmup * BATCH:(warmup + steps) * BATCH], **split)
        _, test_loader = make_loaders(data, BATCH, 0, device)
        graph = graph_step(model, lambda_l1, device, precision)  # as train_model does
        train(model, device, warm, optimizer, lambda_l1, scheduler, progress=False,
              precision=precision, graph=graph)
        start = time.perf_counter()
        train(model, device, timed, optimizer, lambda_l1, scheduler, progress=False,
              precision=precision, graph=graph)
        train_s = time.perf_counter() - start

        def evaluate() -> None:
            test(model, device, test_loader, precision=precision)
    evaluate()
    start = time.perf_counter()
    evaluate()
    eval_s = time.perf_counter() - start
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    worker_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return dict(pipeline=pipeline, variant=variant, precision=precision, device=str(device),
                train_images_per_s=steps * BATCH / train_s,
                eval_images_per_s=len(data.test_labels) / eval_s,
                peak_rss_mb=kib / 1024, largest_worker_rss_mb=worker_kib / 1024,
                peak_gpu_mb=gpu_mb)


# --- the model's arithmetic and the machine's -----------------------------------------------
def flops_per_image(variant: str) -> dict[str, float]:
    """Forward and training (forward + backward) FLOPs per image, counted by PyTorch's
    FlopCounterMode over convolutions and matrix products (norms and ReLUs are not counted:
    they are memory-bound, not arithmetic-bound)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = Net(VARIANTS[variant].norm, num_groups=DEFAULTS["num_groups"])
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    with FlopCounterMode(display=False) as fwd:
        model(x)
    with FlopCounterMode(display=False) as step:
        F.nll_loss(model(x), y).backward()
    return dict(forward=fwd.get_total_flops() / BATCH, train=step.get_total_flops() / BATCH)


def gemm_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10
                ) -> float:
    """Achieved GFLOP/s of a large square matrix product: a practical peak for the device."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


# --- the driver -----------------------------------------------------------------------------
def run_child(args: argparse.Namespace, pipeline: str, variant: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", pipeline, "--variants", variant,
           "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--workers", str(args.workers), "--precision", args.precision,
           "--device", args.device,
           *(["--data-dir", args.data_dir] if args.data_dir else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"throughput: the {pipeline} measurement of {variant} failed:\n"
                 f"{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["bn+l1", "ln", "gn"], choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10, help="batches before timing starts")
    p.add_argument("--steps", type=int, default=60, help="timed training batches")
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    p.add_argument("--precision", default=DEFAULTS["precision"],
                   help="normlab's precision: fp32 (the default), bf16 or auto")
    p.add_argument("--data-dir", help="MNIST folder (default: as normlab finds it)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--child", choices=["reference", "normlab"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.variants[0], args.warmup, args.steps,
                                 args.workers, args.precision, args.data_dir, args.device)))
        return

    rows: dict[str, list[dict[str, Any]]] = {}
    for r in range(1, args.rounds + 1):
        for variant in args.variants:
            ref, ours = (run_child(args, kind, variant) for kind in ("reference", "normlab"))
            rows.setdefault(variant, []).append(dict(reference=ref, normlab=ours))
            print(f"round {r}/{args.rounds} {variant:6s} train img/s: reference "
                  f"{ref['train_images_per_s']:7.0f}, normlab {ours['train_images_per_s']:7.0f} "
                  f"({ours['train_images_per_s'] / ref['train_images_per_s']:.2f}x); eval "
                  f"img/s: normlab {ours['eval_images_per_s']:7.0f}", flush=True)

    device = select_device(args.device)
    peak = {"fp32": gemm_gflops(torch.float32, device),
            "bf16": gemm_gflops(torch.bfloat16, device)}
    summary = {}
    print(f"\n{'variant':7s} {'ref train':>10s} {'normlab':>9s} {'ratio':>6s} {'eval':>8s} "
          f"{'eval/train':>10s} {'ref eval':>9s} {'RSS MB':>7s} {'GFLOP/img':>9s} "
          f"{'GFLOP/s':>8s}")
    for variant, pairs in rows.items():
        def med(f, pairs=pairs) -> float:
            return statistics.median(f(p) for p in pairs)
        flops = flops_per_image(variant)
        s = dict(
            reference_train=med(lambda p: p["reference"]["train_images_per_s"]),
            normlab_train=med(lambda p: p["normlab"]["train_images_per_s"]),
            train_ratio=med(lambda p: p["normlab"]["train_images_per_s"]
                            / p["reference"]["train_images_per_s"]),
            normlab_eval=med(lambda p: p["normlab"]["eval_images_per_s"]),
            reference_eval=med(lambda p: p["reference"]["eval_images_per_s"]),
            eval_over_train=med(lambda p: p["normlab"]["eval_images_per_s"]
                                / p["normlab"]["train_images_per_s"]),
            normlab_peak_rss_mb=max(p["normlab"]["peak_rss_mb"] for p in pairs),
            reference_peak_rss_mb=max(p["reference"]["peak_rss_mb"] for p in pairs),
            reference_worker_rss_mb=max(p["reference"]["largest_worker_rss_mb"] for p in pairs),
            flops_forward=flops["forward"], flops_train=flops["train"],
            precision=pairs[0]["normlab"]["precision"])
        s["achieved_train_gflops"] = s["normlab_train"] * flops["train"] / 1e9
        summary[variant] = s
        print(f"{variant:7s} {s['reference_train']:10.0f} {s['normlab_train']:9.0f} "
              f"{s['train_ratio']:5.2f}x {s['normlab_eval']:8.0f} {s['eval_over_train']:9.1f}x "
              f"{s['reference_eval']:9.0f} {s['normlab_peak_rss_mb']:7.0f} "
              f"{flops['train'] / 1e9:9.4f} {s['achieved_train_gflops']:8.1f}")
    print(f"\nimages/s are medians over {args.rounds} rounds; ratio = median of per-round "
          f"normlab/reference. GFLOP/img counts forward + backward convolutions. The {device} "
          f"practical peak (2048x2048 matrix product): {peak['fp32']:.0f} GFLOP/s float32, "
          f"{peak['bf16']:.0f} GFLOP/s bfloat16.")
    if args.out:
        record = dict(command=" ".join(["python", *sys.argv]), git_revision=git_revision(),
                      cpu=cpu_name(), torch_threads=torch.get_num_threads(),
                      device=str(device),
                      gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                      torch=torch.__version__, python=platform.python_version(),
                      settings=dict(rounds=args.rounds, warmup=args.warmup, steps=args.steps,
                                    workers=args.workers, batch=BATCH),
                      gemm_peak_gflops=peak, summary=summary, rounds=rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
