"""The ``normlab`` command: it parses arguments and turns failures into one line.

``compare`` trains the variants and writes the report, ``sweep`` trains them across batch
sizes, ``statistics`` varies only the images per Batch Norm statistic (and runs synchronized
Batch Norm under torchrun), ``report`` redraws a finished run, ``summary`` prints each
variant's layers, ``explain`` works the statistics by hand. The work itself is in
``study`` (running studies, also as --jobs or under torchrun) and the modules it calls.

Every expected failure (bad argument, bad data, unwritable folder, a failed rank) ends in
one line on stderr and a non-zero exit, never a traceback; finished runs are on disk before
the next one starts, and every finished epoch is checkpointed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, distributed, explain
from .checkpoint import convert_weights
from .data import DATASETS
from .engine import DEFAULTS, PRECISIONS, STUDY_VARIANTS, VARIANTS
from .model import count_parameters
from .report import git_revision
from .study import (
    Statistics,
    Study,
    Sweep,
    UsageError,
    build_models,
    error_line,
    redraw,
    run_study,
)
from .sweep import DEFAULT_BATCH_SIZES, DEFAULT_EPOCHS, DEFAULT_LR

SWEEP_VARIANTS = ("bn", "gn", "ln")
# Epochs per run of the statistics study: chosen so that its 33 runs (27 in one process, 6 on
# two) fit in about 45 minutes on the project's 2-core machine with --jobs 2; the time taken
# and the accuracies reached are in results/statistics/report.md.
STATISTICS_EPOCHS = 5


def jobs_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or auto, got "
                                         f"{text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _add_model_options(p: argparse.ArgumentParser, default: tuple[str, ...] = STUDY_VARIANTS
                       ) -> None:
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(default),
                   metavar="VARIANT", help=f"which variants (default: {' '.join(default)}; "
                   f"choices: {', '.join(VARIANTS)})")
    p.add_argument("--num-groups", type=positive_int, default=DEFAULTS["num_groups"],
                   help="groups for Group Norm; must divide every layer's channels (default: 4)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options every training command shares: data, output, device, L1, resume."""
    p.add_argument("--l1", type=non_negative_float, default=DEFAULTS["lambda_l1"],
                   metavar="LAMBDA", help="L1 weight for variants with L1 (default: %(default)s)")
    p.add_argument("--dataset", choices=list(DATASETS), default="mnist")
    p.add_argument("--data-dir", help="folder with the four IDX files (default: $NORMLAB_DATA "
                   "for mnist, $NORMLAB_FASHION_MNIST_DATA or Debian's dataset-fashion-mnist "
                   "for fashion-mnist, else a per-user cache; missing files are downloaded)")
    p.add_argument("--out", type=Path, help="output folder (default: a new folder under runs/)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS["precision"],
                   help="fp32, bf16 (bfloat16 mixed precision: faster, but Group Norm lost "
                   "0.07 points over 3 seeds), or auto: bf16 where the hardware has it "
                   "(CUDA, CPUs with AVX512-BF16 or AMX), else fp32 (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", type=Path, metavar="OUTDIR",
                   help="continue the run in OUTDIR with its own settings: finished work is "
                   "kept, the interrupted model continues from its last finished epoch")
    p.add_argument("--virtual-batch-size", type=positive_int, metavar="B",
                   help="Batch Norm computes its training statistics over each B images of "
                   "a batch, as batch/B devices would (ghost batch norm); B must divide the "
                   "batch per process")
    p.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="log every run's per-epoch losses, accuracies and learning rate to "
                   "DIR, one TensorBoard run per variant and seed (needs normlab[tensorboard]; "
                   "view with: tensorboard --logdir DIR)")
    p.add_argument("--jobs", type=jobs_arg, default="auto", metavar="N",
                   help="train N independent runs at a time in separate processes, each "
                   "with max(1, cores // N) threads; auto: one run per core on a CPU when "
                   "several runs train batches under 64 images (where that measured faster), "
                   "else one at a time (default: auto)")
    p.add_argument("--threads", type=positive_int, metavar="T",
                   help="torch threads per process (default: all cores for one process; "
                   "cores // N for --jobs N; cores // processes per machine under torchrun)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__.split("\n\n")[0])
    revision = git_revision()
    parser.add_argument("--version", action="version", version=f"normlab {__version__}"
                        + (f" (git {revision})" if revision != "unknown" else ""))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compare", help="train the variants and write metrics, figures, report",
                       description="Train each variant from the same seed(s) and write "
                       "metrics.json, figures, report.md and weights into --out.")
    _add_model_options(p, STUDY_VARIANTS)
    p.add_argument("--epochs", type=positive_int, default=DEFAULTS["epochs"])
    p.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+",
                   default=[DEFAULTS["seed"]], metavar="SEED",
                   help="train every variant once per seed; with several seeds the report "
                   "gives mean, spread and 95%% confidence intervals (default: 1)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"],
                   help="peak learning rate of the one-cycle schedule (default: %(default)s)")
    p.add_argument("--limit-train", type=positive_int, metavar="N",
                   help="train on the first N training images only (quick runs)")
    p.add_argument("--holdout", type=positive_int, metavar="N",
                   help="for tuning: hold out the last N training images and evaluate on them "
                   "instead of the test set, which is then not touched")
    _add_run_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="train variants across batch sizes (where BN breaks down)",
                       description="Train each variant at each batch size for the same number "
                       "of epochs over the training set, peak learning rate scaled linearly "
                       "with the batch size (one-cycle, with warm-up); write sweep.json, "
                       "sweep.png and report.md into --out.")
    _add_model_options(p, SWEEP_VARIANTS)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", metavar="B",
                   default=list(DEFAULT_BATCH_SIZES))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], metavar="SEED")
    p.add_argument("--samples", type=positive_int, metavar="N",
                   help="train on the first N training images only (default: all)")
    p.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                   help="epochs over the training images, the same at every batch size "
                   "(default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=DEFAULT_LR,
                   help="peak learning rate at batch 128, scaled linearly for other sizes "
                   "(default: %(default)s)")
    _add_run_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("statistics", help="vary only the images per Batch Norm statistic at "
                       "a fixed global batch (the per-device effect), with GN/LN references",
                       description="Hold the optimiser fixed (global batch, learning rate, "
                       "schedule, steps, data order) and train Batch Norm with its statistics "
                       "over each of the given numbers of images, Group and Layer Norm once "
                       "per seed as references; then synchronized and plain Batch Norm under "
                       "torchrun on --processes processes. Writes statistics.json, "
                       "statistics.png, bn_statistics.png and report.md into --out.")
    p.add_argument("--images-per-statistic", type=positive_int, nargs="+", metavar="B",
                   default=list(DEFAULT_BATCH_SIZES),
                   help="Batch Norm's statistic sizes; each must divide --batch-size "
                   "(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], metavar="SEED")
    p.add_argument("--epochs", type=positive_int, default=STATISTICS_EPOCHS,
                   help="epochs per run (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"],
                   help="the global batch, the same for every run (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"],
                   help="peak learning rate of the one-cycle schedule (default: %(default)s)")
    p.add_argument("--num-groups", type=positive_int, default=DEFAULTS["num_groups"],
                   help="groups for Group Norm (default: 4)")
    p.add_argument("--processes", type=positive_int, default=2, metavar="P",
                   help="train sbn and bn data-parallel on P processes with torchrun after "
                   "the one-process runs; 1 skips that part (default: %(default)s)")
    p.add_argument("--limit-train", type=positive_int, metavar="N",
                   help="train on the first N training images only (quick runs)")
    _add_run_options(p)
    p.set_defaults(func=cmd_statistics)

    p = sub.add_parser("report", help="re-draw the figures and report.md of a finished run "
                       "from its metrics.json, sweep.json or statistics.json (no training)")
    p.add_argument("run", type=Path, metavar="OUTDIR",
                   help="a compare, sweep or statistics output folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("convert", help="rewrite older .pt weights files as .safetensors",
                       description="Rewrite every normlab .pt weights file in the given folders "
                       "(or the given files) as .safetensors beside it, with the run's git "
                       "revision from its metrics.json; each new file is checked to hold the "
                       "same tensors before the old one is removed.")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("summary", help="print a torchinfo summary of each variant")
    _add_model_options(p)
    p.set_defaults(func=cmd_summary)

    explain.add_parser(sub)
    return parser


def cmd_summary(args: argparse.Namespace) -> int:
    from torchinfo import summary

    for name, model in build_models(args.variants, args.num_groups).items():
        print(f"== {name}: {VARIANTS[name].label} ({count_parameters(model):,} parameters)")
        print(summary(model, input_size=(1, 1, 28, 28), verbose=0,
                      col_names=("output_size", "num_params")))
        print()
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    return run_study(Study(args))


def cmd_sweep(args: argparse.Namespace) -> int:
    return run_study(Sweep(args))


def cmd_statistics(args: argparse.Namespace) -> int:
    if args.virtual_batch_size is not None:
        raise UsageError("normlab statistics sets the images per statistic itself: use "
                         "--images-per-statistic instead of --virtual-batch-size")
    try:
        under_torchrun = distributed.from_env().distributed
    except ValueError:  # a broken torchrun environment is still not one process
        under_torchrun = True
    if under_torchrun:
        raise UsageError("run normlab statistics as one process: it starts its "
                         "multi-process part with torchrun itself (--processes)")
    for ips in args.images_per_statistic:
        if args.batch_size % ips:
            raise UsageError(f"--images-per-statistic {ips} does not divide --batch-size "
                             f"{args.batch_size}; choose divisors of the batch")
    if args.processes > 1 and args.batch_size % args.processes:
        raise UsageError(f"--processes {args.processes} does not divide --batch-size "
                         f"{args.batch_size}")
    args.variants = ["bn", *Statistics.references]
    return run_study(Statistics(args))


def cmd_convert(args: argparse.Namespace) -> int:
    files = [f for p in args.paths for f in (sorted(p.glob("*.pt")) if p.is_dir() else [p])]
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    if not files:
        print("nothing to convert: no .pt weights files there")
    for path in files:
        record = path.parent / "metrics.json"
        revision = (json.loads(record.read_text())["environment"]["git_revision"]
                    if record.exists() else None)
        target = convert_weights(path, **({"git_revision": revision} if revision else {}))
        print(f"{path} -> {target.name}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    redraw(args.run)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in metrics.json and the report, to reproduce the run
    try:
        ranks = distributed.from_env()
    except ValueError:
        ranks = distributed.Ranks()
    me = f"normlab {args.command}: " + (f"rank {ranks.rank}: " if ranks.distributed else "")
    try:
        return args.func(args)
    except distributed.RankFailed as exc:
        parser.exit(exc.exit_code, f"{me}stopped: rank {exc.rank} failed with {exc.line}\n")
    except (distributed.Stopped, RuntimeError) as exc:
        if not (ranks.distributed and distributed.is_comm_failure(exc)):
            raise
        lost = distributed.lost_ranks(ranks)
        who = (f"rank {', '.join(map(str, lost))} stopped or lost contact" if lost else
               f"another rank stopped or lost contact ({str(exc).splitlines()[0][:120]})")
        parser.exit(1, f"{me}error: {who}; every finished epoch is saved{_resume(args, ranks)}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\n{me}interrupted; every finished epoch is saved"
                         f"{_resume(args, ranks)}\n")
    except Exception as exc:
        line = error_line(exc)
        if line is None:
            raise
        hint = _resume(args, ranks, " it") if isinstance(exc, OSError) else ""
        parser.exit(line[0], f"{me}{line[1]}{hint}\n")
    return 0


def _resume(args: argparse.Namespace, ranks: distributed.Ranks, lead: str = "; resume") -> str:
    """How to continue an interrupted run, as the user launched it."""
    out = getattr(args, "out", None)
    if out is None or args.command not in ("compare", "sweep", "statistics"):
        return ""
    if ranks.nodes > 1:
        return f"{lead} by running the same torchrun commands with: {args.command} --resume {out}"
    launch = (f"torchrun --nproc-per-node {ranks.world_size} -m normlab"
              if ranks.distributed else "normlab")
    return f"{lead} with: {launch} {args.command} --resume {out}"


if __name__ == "__main__":
    sys.exit(main())
