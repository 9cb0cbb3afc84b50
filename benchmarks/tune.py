"""Screen training settings on held-out training images, never on the test set.

Each call trains one configuration with ``normlab.engine.train_model`` on the first 50,000
MNIST training images and scores it on the last 10,000 (``load_data(holdout=10000)``: the
test files are not even read), then appends one JSON line to ``--log``. docs/tuning.md
summarises the log and says what was chosen and why.

    python benchmarks/tune.py --variant ln --epochs 10 --lr 0.02
    python benchmarks/tune.py --variant gn --arch 8,16,p,8t,12,16,16,20 --dropout 0.05
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from normlab.data import load_data
from normlab.engine import DEFAULTS, VARIANTS, Hook, Trainer, train_model
from normlab.model import ARCHITECTURE, count_parameters
from normlab.provenance import git_revision


def parse_arch(text: str) -> tuple[tuple[str, int, int], ...]:
    """"8,16,p,8t,12" -> 3x3 convs of 8 and 16 channels, a 2x2 max-pool, a 1x1 conv of 8..."""
    layers = []
    for i, token in enumerate(text.split(","), 1):
        if token == "p":
            layers.append(("pool", 0, 2))
        elif token.endswith("t"):
            layers.append((f"trans{i}", int(token[:-1]), 1))
        else:
            layers.append((f"conv{i}", int(token), 3))
    return tuple(layers)


def format_arch(arch) -> str:
    return ",".join("p" if n == "pool" else f"{c}t" if k == 1 else str(c) for n, c, k in arch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="gn", choices=list(VARIANTS))
    p.add_argument("--arch", default=format_arch(ARCHITECTURE))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--dropout", type=float, default=DEFAULTS["dropout"])
    p.add_argument("--l1", type=float, default=DEFAULTS["lambda_l1"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--holdout", type=int, default=10000)
    p.add_argument("--data-dir")
    p.add_argument("--log", type=Path, default=Path("results/tuning/screen.jsonl"))
    args = p.parse_args()

    class ValidationLine(Hook):
        def after_epoch(self, trainer: Trainer) -> None:
            print(f"  epoch {trainer.epoch:2d} validation acc {trainer.row['test_acc']:.2f}%",
                  flush=True)

    variant = VARIANTS[args.variant]
    arch = parse_arch(args.arch)
    data = load_data(args.data_dir, holdout=args.holdout)
    start = time.perf_counter()
    model, history = train_model(
        variant.norm, lambda_l1=args.l1 if variant.l1 else 0.0, epochs=args.epochs,
        seed=args.seed, batch_size=args.batch_size, lr=args.lr, dropout=args.dropout,
        weight_decay=args.weight_decay, data=data, architecture=arch, progress=False,
        hooks=[ValidationLine()])
    record = dict(variant=args.variant, arch=args.arch, params=count_parameters(model),
                  epochs=args.epochs, seed=args.seed, lr=args.lr,
                  weight_decay=args.weight_decay, dropout=args.dropout,
                  l1=args.l1 if variant.l1 else 0.0, batch_size=args.batch_size,
                  validation_images=len(data.test_labels),
                  final_val_acc=history["test_acc"][-1], val_acc=history["test_acc"],
                  seconds=round(time.perf_counter() - start, 1), revision=git_revision())
    print(json.dumps(record))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
