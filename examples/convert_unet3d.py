"""Take a model you already have, give it normlab's normalization, train it data-parallel
with torchrun, and finish with PreciseBN statistics: the workflow of a 3-D medical model
that sees one or two volumes per GPU.

    pip install 'normlab[models]'        # MONAI, for its UNet
    torchrun --nproc-per-node 2 examples/convert_unet3d.py --norm syncbatch
    python examples/convert_unet3d.py --norm group --num-groups 4     # one process

Each process trains on its part of every global batch of synthetic volumes (a bright blob to
segment); with ``--norm syncbatch`` every Batch Norm layer computes its statistics over the
whole global batch, as one process would, on CPU (gloo) or GPU (nccl).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.networks.nets import UNet
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from normlab.norms import convert, precise_bn


def volumes(n: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy volumes with a bright ball each, and the ball as the label to segment."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij")).float()
    centres = torch.rand(n, 3, 1, 1, 1, generator=g) * side / 2 + side / 4
    ball = ((grid - centres).square().sum(1) < (side / 5) ** 2).long()  # (n, D, H, W)
    x = ball.unsqueeze(1) + 0.7 * torch.randn(n, 1, side, side, side, generator=g)
    return x.to(torch.get_default_dtype()), ball


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--norm", default="syncbatch", help="a normlab.norms name (default: "
                   "syncbatch: statistics over every process's volumes)")
    p.add_argument("--num-groups", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4, help="volumes per step, all processes")
    p.add_argument("--side", type=int, default=16, help="volume edge in voxels")
    p.add_argument("--float64", action="store_true", help="train in double precision")
    p.add_argument("--out", help="write the final weights here (safetensors)")
    args = p.parse_args()
    if args.float64:
        torch.set_default_dtype(torch.float64)

    # 1. the model you have, with Batch Norm in 3-D
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32),
                 strides=(2, 2), num_res_units=1, norm="batch")
    # 2. normlab's normalization in place of every BatchNorm3d (says what it replaced)
    model, replaced = convert(model, args.norm, num_groups=args.num_groups, report=True)

    # 3. data parallelism under torchrun: every rank its part of each global batch
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
        model = DistributedDataParallel(model)
    if rank == 0:
        print(f"{args.norm}: replaced {len(replaced)} layers, e.g. "
              f"{next(iter(replaced.items()))}; {world} process(es)")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.steps):
        x, y = volumes(args.batch, args.side, seed=step)  # the same global batch everywhere
        x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]  # this rank's part
        loss = F.cross_entropy(model(x), y)
        # DDP averages gradients over ranks: weight each rank's mean by its share of the
        # batch, so that the update is the global batch's mean even for unequal parts.
        (loss * world * len(x) / args.batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}")

    # 4. PreciseBN: population statistics with the final weights (all-reduced over ranks)
    net = model.module if world > 1 else model
    batches = (volumes(args.batch, args.side, seed=1000 + i)[0]
               .tensor_split(world)[rank] for i in range(8))
    try:
        precise_bn(net, batches)
    except ValueError as exc:  # e.g. --norm group: no running statistics to recompute
        if rank == 0:
            print(f"PreciseBN skipped: {exc}")
    if rank == 0 and args.out:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.out)
        print(f"wrote {args.out}")
    if world > 1:
        # every rank done (rank 0 has written its file) before the connections close: a rank
        # that tears gloo down while another still uses it can abort ("terminate called
        # without an active exception")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
