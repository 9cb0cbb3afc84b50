"""One epoch of the default study, normlab's way against the reference notebook's way,
side by side (issue 15's yardstick).

The study is bn+l1, ln and gn one after another, each trained for one epoch over all 60,000
training images and then evaluated on the full test set.

* normlab: ``normlab compare --epochs 1`` in a fresh process, the command a user runs.
* reference: the notebook's way, in a fresh process: one per-sample Pillow ``DataLoader``
  (``throughput.reference_loaders``: random rotation, ``ToTensor``, ``Normalize``, batch 128,
  shuffled, 2 workers) shared by the three models, each trained with the same optimiser and
  one-cycle schedule (``throughput.reference_train_step``) and evaluated under ``no_grad``.

Both are timed from launch to exit ("wall": start-up, data loading and, for normlab, the
report and figures count) and by their training + evaluation time alone. The two
alternate round by round; the speed-ups are medians of the per-round ratios, since absolute
speeds drift on a shared machine while side-by-side ratios do not.

    python benchmarks/study_epoch.py --out benchmarks/results/study-epoch-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from throughput import reference_loaders, reference_train_step  # beside this file

from normlab.data import load_data
from normlab.engine import DEFAULTS, STUDY_VARIANTS, VARIANTS, make_optimizer
from normlab.model import Net
from normlab.provenance import cpu_name, git_revision


def reference_study(data_dir: str | None, limit_train: int | None, workers: int
                    ) -> dict[str, Any]:
    """The reference notebook's way: per variant, one epoch of training and an evaluation;
    returns each variant's seconds (training + evaluation) and test accuracy."""
    data = load_data(data_dir, limit_train=limit_train)
    train_loader, test_loader = reference_loaders(data, workers, pin=False)
    seconds, accuracy = {}, {}
    for name in STUDY_VARIANTS:
        v = VARIANTS[name]
        torch.manual_seed(1)
        model = Net(v.norm, num_groups=DEFAULTS["num_groups"])
        optimizer, scheduler = make_optimizer(model, DEFAULTS["lr"], 1, len(train_loader))
        start = time.perf_counter()
        model.train()
        for x, y in train_loader:
            reference_train_step(model, optimizer, scheduler, x, y,
                                 DEFAULTS["lambda_l1"] if v.l1 else 0.0, torch.device("cpu"))
        model.eval()
        correct, loss = 0, 0.0
        with torch.no_grad():
            for x, y in test_loader:
                output = model(x)
                loss += float(F.nll_loss(output, y, reduction="sum"))
                correct += int((output.argmax(1) == y).sum())
        seconds[name] = time.perf_counter() - start
        accuracy[name] = 100.0 * correct / len(data.test_labels)
    return dict(seconds=seconds, test_acc=accuracy)


def timed(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd`` to completion; (wall seconds, stdout). A failure ends the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"study_epoch: {' '.join(cmd[:4])} ... failed:\n{done.stderr.strip()[-2000:]}")
    return wall, done.stdout


def measure_reference(args: argparse.Namespace) -> dict[str, Any]:
    wall, out = timed([sys.executable, __file__, "--child", "--workers", str(args.workers),
                       *_data_args(args)])
    return dict(wall_s=wall, **json.loads(out.strip().splitlines()[-1]))


def measure_normlab(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        wall, _ = timed([sys.executable, "-m", "normlab", "compare", "--epochs", "1",
                         "--no-progress", "--out", str(out), *_data_args(args)])
        metrics = json.loads((out / "metrics.json").read_text())
    runs = {name: v["runs"][0]["history"] for name, v in metrics["variants"].items()}
    return dict(wall_s=wall, seconds={n: h["epoch_time"][0] for n, h in runs.items()},
                test_acc={n: h["test_acc"][0] for n, h in runs.items()})


def _data_args(args: argparse.Namespace) -> list[str]:
    return [*(["--data-dir", args.data_dir] if args.data_dir else []),
            *(["--limit-train", str(args.limit_train)] if args.limit_train else [])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    p.add_argument("--data-dir", help="MNIST folder (default: as normlab finds it)")
    p.add_argument("--limit-train", type=int, help="first N training images (quick checks)")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(reference_study(args.data_dir, args.limit_train, args.workers)))
        return

    rounds = []
    for r in range(1, args.rounds + 1):
        ref, ours = measure_reference(args), measure_normlab(args)
        row = dict(reference=ref, normlab=ours,
                   wall_ratio=ref["wall_s"] / ours["wall_s"],
                   train_ratio=sum(ref["seconds"].values()) / sum(ours["seconds"].values()))
        rounds.append(row)
        print(f"round {r}/{args.rounds}: wall reference {ref['wall_s']:6.1f} s, normlab "
              f"{ours['wall_s']:6.1f} s ({row['wall_ratio']:.2f}x); training + evaluation "
              f"reference {sum(ref['seconds'].values()):6.1f} s, normlab "
              f"{sum(ours['seconds'].values()):6.1f} s ({row['train_ratio']:.2f}x)", flush=True)
    summary = {key: statistics.median(r[key] for r in rounds)
               for key in ("wall_ratio", "train_ratio")}
    print(f"\nnormlab is {summary['wall_ratio']:.2f}x faster launch to exit and "
          f"{summary['train_ratio']:.2f}x in training + evaluation (medians of the per-round "
          f"ratios over {args.rounds} rounds; one epoch of bn+l1, ln, gn each)")
    if args.out:
        record = dict(command=" ".join(["python", *sys.argv]), git_revision=git_revision(),
                      cpu=cpu_name(), torch_threads=torch.get_num_threads(),
                      torch=torch.__version__, python=platform.python_version(),
                      settings=dict(rounds=args.rounds, workers=args.workers,
                                    limit_train=args.limit_train),
                      summary=summary, rounds=rounds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
