"""Every small-batch remedy's training step against Group Norm's, side by side in one
process: normlab's ``train`` on real MNIST batches of 128, one variant after the other in
each round, at the thread count the remedies study trains with (1 per run under --jobs 2).

    python benchmarks/remedy_layers.py --out benchmarks/results/remedy-layers-cpu.json

The figure of merit is each variant's time per step over Group Norm's, the median of
per-round ratios (absolute speeds drift on a shared machine, side-by-side ratios do not);
issue 23 aims at 1.5x or less.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from normlab.data import load_data, make_loaders
from normlab.engine import DEFAULTS, VARIANTS, make_optimizer, train
from normlab.model import Net
from normlab.provenance import cpu_name, git_revision

BATCH = DEFAULTS["batch_size"]
DEFAULT_VARIANTS = ("gn", "bn", "bn@2", "brn", "brn@2", "evob0", "evob0@2", "gn+ws", "ln+ws",
                    "frn", "evos0")


def step_ms(spec: str, batches, rounds: int) -> list[float]:
    """Milliseconds per training step of ``spec`` (NAME or NAME@B: B images per statistic)
    over one pass of ``batches``, once per round after a warm-up pass."""
    name, _, ips = spec.partition("@")
    v = VARIANTS[name]
    model = Net(v.norm, num_groups=DEFAULTS["num_groups"], weight_std=v.weight_std,
                virtual_batches=BATCH // int(ips) if ips else 1)
    optimizer, scheduler = make_optimizer(model, DEFAULTS["lr"], 1, len(batches) * (rounds + 1))
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        train(model, torch.device("cpu"), batches, optimizer, 0.0, scheduler, progress=False)
        times.append((time.perf_counter() - start) / len(batches) * 1e3)
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help="NAME, or NAME@B for B images per statistic; gn is the reference")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="training batches per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches, _ = make_loaders(load_data(args.data_dir, limit_train=args.steps * BATCH), BATCH,
                              seed=0)
    variants = ["gn", *(v for v in args.variants if v != "gn")]
    ms: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # variants side by side within each round
        for v in variants:
            ms[v] += step_ms(v, batches, 1)
    results = {}
    for v in variants:
        ratios = [a / b for a, b in zip(ms[v], ms["gn"], strict=True)]
        results[v] = {"ms_per_step": [round(t, 2) for t in ms[v]],
                      "median_ms": round(statistics.median(ms[v]), 2),
                      "over_gn": round(statistics.median(ratios), 3)}
        print(f"{v:9s} {results[v]['median_ms']:7.2f} ms per step   {results[v]['over_gn']:.2f}x "
              f"Group Norm's", flush=True)
    if args.out:
        record = {"command": " ".join(["python", *sys.argv]), "git_revision": git_revision(),
                  "cpu": cpu_name(), "torch": torch.__version__,
                  "python": platform.python_version(), "threads": args.threads,
                  "rounds": args.rounds, "steps_per_round": args.steps, "batch": BATCH,
                  "variants": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
