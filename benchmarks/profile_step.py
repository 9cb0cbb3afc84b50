"""Where a training step's time goes: torch.profiler over normlab's own ``train``.

    python benchmarks/profile_step.py --variant gn --precision bf16 --steps 30

Prints the operators that took the most time (self CPU time) over ``--steps`` batches of
real MNIST after a warm-up, so that optimisation starts from a measurement.
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from normlab.data import Loader, load_data
from normlab.engine import (
    DEFAULTS,
    VARIANTS,
    make_optimizer,
    resolve_precision,
    select_device,
    train,
)
from normlab.model import Net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="gn", choices=list(VARIANTS))
    p.add_argument("--precision", default=DEFAULTS["precision"],
                   choices=["auto", "fp32", "bf16"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--data-dir")
    args = p.parse_args()

    device = select_device("cpu")
    variant, batch = VARIANTS[args.variant], DEFAULTS["batch_size"]
    data = load_data(args.data_dir)
    model = Net(variant.norm, num_groups=DEFAULTS["num_groups"], dropout=DEFAULTS["dropout"])
    optimizer, scheduler = make_optimizer(model, DEFAULTS["lr"], 1, 10 + args.steps)
    lambda_l1 = DEFAULTS["lambda_l1"] if variant.l1 else 0.0
    images, labels = data.train_images, data.train_labels
    loaders = [Loader(images[a * batch:b * batch], labels[a * batch:b * batch], batch,
                      shuffle=True, augment=True, mean=data.spec.mean, std=data.spec.std)
               for a, b in ((0, 10), (10, 10 + args.steps))]  # warm-up, then profiled
    precision = resolve_precision(args.precision, device)
    train(model, device, loaders[0], optimizer, lambda_l1, scheduler, progress=False,
          precision=precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(model, device, loaders[1], optimizer, lambda_l1, scheduler, progress=False,
              precision=precision)
    print(f"{args.variant}, {precision}, {args.steps} steps of batch {batch}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
