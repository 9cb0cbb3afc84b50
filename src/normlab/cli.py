"""The ``normlab`` command: ``compare`` trains the variants and writes the report,
``summary`` prints each variant's layers, ``explain`` works the statistics by hand.

Every expected failure (bad argument, bad data, unwritable folder) ends in one line on
stderr and a non-zero exit, never a traceback; finished variants are on disk before the
next one starts, so an interruption loses at most the variant in progress.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import explain
from .checkpoint import CheckpointError, atomic_write, save_model, write_json
from .data import DATASETS, Data, DataError, Loader, load_data, make_loaders
from .engine import (
    DEFAULTS,
    PRECISIONS,
    STUDY_VARIANTS,
    VARIANTS,
    TrainingDiverged,
    misclassified,
    resolve_precision,
    select_device,
    train_model,
)
from .model import Net, count_parameters
from .plots import plot_curves, plot_misclassified, plot_sweep
from .report import (
    environment,
    failed_runs,
    final_accuracies,
    good_runs,
    render_report,
    render_sweep_report,
)
from .stats import t_interval
from .sweep import DEFAULT_BATCH_SIZES, error_table, run_sweep

SWEEP_VARIANTS = ("bn", "gn", "ln")
SWEEP_SAMPLES = 20000


class UsageError(Exception):
    """A problem with what the user asked for, reported as one line with exit code 2."""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__.split("\n\n")[0])
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
                       description="Train each variant at each batch size on the same number "
                       "of images, peak learning rate scaled linearly with the batch size; "
                       "write sweep.json, sweep.png and report.md into --out.")
    _add_model_options(p, SWEEP_VARIANTS)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", metavar="B",
                   default=list(DEFAULT_BATCH_SIZES))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], metavar="SEED")
    p.add_argument("--samples", type=positive_int, default=SWEEP_SAMPLES, metavar="N",
                   help="train on the first N training images (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=1,
                   help="epochs over those images (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"],
                   help="peak learning rate at batch 128, scaled linearly for other sizes "
                   "(default: %(default)s)")
    _add_run_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="re-draw the figures and report.md of a finished run "
                       "from its metrics.json or sweep.json (no training)")
    p.add_argument("run", type=Path, metavar="OUTDIR", help="a compare or sweep output folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("summary", help="print a torchinfo summary of each variant")
    _add_model_options(p)
    p.set_defaults(func=cmd_summary)

    explain.add_parser(sub)
    return parser


def build_models(variants: list[str], num_groups: int) -> dict[str, Net]:
    """One untrained model per variant; raises UsageError for an impossible combination."""
    try:
        return {name: Net(VARIANTS[name].norm, num_groups=num_groups) for name in variants}
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def prepare_out(out: Path | None, kind: str = "compare", record: str = "metrics.json") -> Path:
    """Create the output folder (a fresh one under runs/ by default) and prove it writable."""
    if out is None:
        out = Path("runs") / datetime.now().strftime(f"%Y%m%d-%H%M%S-{kind}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if (out / record).exists():
        raise UsageError(f"--out {out} already holds a run ({record}); continue it with "
                         f"--resume {out}, or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".normlab-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to --out {out} ({exc.strerror}); choose a writable "
                         f"folder") from None
    return out


def cmd_summary(args: argparse.Namespace) -> int:
    from torchinfo import summary

    for name, model in build_models(args.variants, args.num_groups).items():
        print(f"== {name}: {VARIANTS[name].label} ({count_parameters(model):,} parameters)")
        print(summary(model, input_size=(1, 1, 28, 28), verbose=0,
                      col_names=("output_size", "num_params")))
        print()
    return 0


def open_resume(args: argparse.Namespace, record: str = "metrics.json") -> dict[str, Any]:
    """Load ``record`` from the run folder ``args.resume`` and put its settings into ``args``.

    A resumed run uses the run's own settings, not this command line's defaults.
    """
    out = args.resume
    path = out / record
    if not out.is_dir():
        raise UsageError(f"--resume {out}: no such folder")
    if not path.exists():
        raise UsageError(f"--resume {out}: not a normlab {args.command} folder (no {record}); "
                         f"start a new run with --out")
    try:
        results = json.loads(path.read_text())
        config = results["config"]
        for key in ("variants", "epochs", "lambda_l1", "num_groups", "dataset"):
            config[key]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is corrupt ({type(exc).__name__}: {exc}); cannot resume "
                         f"from it: start a new run with --out") from None
    for key, value in config.items():
        setattr(args, {"lambda_l1": "l1", "seed": "seeds"}.get(key, key),
                    [value] if key == "seed" else value)  # records before --seeds had one
    return results


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` so that two runs never write into one folder."""
    try:
        import fcntl
    except ImportError:  # Windows has no fcntl: run without the lock
        yield
        return
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another normlab run is writing to {out}; wait for it to finish "
                             f"or choose another --out") from None
        yield


def new_metrics(args: argparse.Namespace, data: Data, device: torch.device) -> dict[str, Any]:
    return {
        "command": shlex.join(["normlab", *args.argv]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": dict(variants=args.variants, epochs=args.epochs, seeds=args.seeds,
                       batch_size=args.batch_size, lr=args.lr, lambda_l1=args.l1,
                       num_groups=args.num_groups, dataset=args.dataset,
                       limit_train=args.limit_train, holdout=args.holdout,
                       eval_split=data.eval_split, precision=args.precision,
                       train_images=len(data.train_labels),
                       test_images=len(data.test_labels)),
        "environment": environment(device),
        "variants": {},
        "wall_time_s": 0.0,
    }


def check_run_args(args: argparse.Namespace) -> torch.device:
    """Fail fast, before any data is read, on variants/groups that cannot be built or an
    unusable device."""
    build_models(args.variants, args.num_groups)
    try:
        device = select_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    args.precision = resolve_precision(args.precision, device)
    return device


def run_file(variant: str, seed: int, suffix: str) -> str:
    """One run's file name: weights ``.pt`` in the output folder, ``.ckpt`` in checkpoints/."""
    return f"{variant}-seed{seed}{suffix}"


def run_variant(name: str, seed: int, args: argparse.Namespace, data: Data,
                device: torch.device, out: Path, test_loader: Loader) -> dict[str, Any]:
    """Train one variant from one seed (resuming its checkpoint if any); write its weights,
    and its misclassified figure for the first seed. Returns the run's record."""
    variant = VARIANTS[name]
    lambda_l1 = args.l1 if variant.l1 else 0.0
    tag = f"{name} seed {seed}" if len(args.seeds) > 1 else name

    def log(epoch: int, row: dict[str, float]) -> None:
        tqdm.write(f"  {tag} epoch {epoch:2d}/{args.epochs}  lr {row['lr']:.4f}  "
                   f"train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
                   f"{data.eval_split} loss {row['test_loss']:.4f} acc {row['test_acc']:6.2f}%  "
                   f"{row['epoch_time']:5.1f}s")

    checkpoint = out / "checkpoints" / run_file(name, seed, ".ckpt")
    try:
        model, history = train_model(
            variant.norm, lambda_l1=lambda_l1, num_groups=args.num_groups, epochs=args.epochs,
            seed=seed, batch_size=args.batch_size, lr=args.lr, device=device, data=data,
            name=tag, progress=not args.no_progress, on_epoch=log, checkpoint=checkpoint,
            precision=args.precision)
    except TrainingDiverged as exc:
        print(f"normlab compare: error: {exc}; carrying on with the other runs",
              file=sys.stderr)
        return {"seed": seed, "failed": str(exc)}
    save_model(model, out / run_file(name, seed, ".pt"), variant=name, seed=seed,
               test_acc=history["test_acc"][-1], eval_split=data.eval_split)
    wrong = misclassified(model, device, test_loader, n=10)
    if seed == args.seeds[0]:
        plot_misclassified(wrong, f"{variant.label} ({name}, seed {seed})", data.spec.classes,
                           out / f"misclassified_{name}.png", split=data.eval_split)
    return dict(seed=seed, wall_time_s=sum(history["epoch_time"]), history=history,
                misclassified=dict(index=wrong.indices, predicted=wrong.predicted,
                                   target=wrong.target, confidence=wrong.confidence))


def cmd_compare(args: argparse.Namespace) -> int:
    metrics = open_resume(args) if args.resume else None
    device = check_run_args(args)
    out = args.resume or prepare_out(args.out)
    args.out = out  # named in the message if interrupted
    with run_lock(out):
        try:
            data = load_data(args.data_dir, args.dataset, args.limit_train,
                             holdout=args.holdout)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if metrics is None:
            metrics = new_metrics(args, data, device)
            write_json(out / "metrics.json", metrics)
        (out / "checkpoints").mkdir(exist_ok=True)
        verb = "resuming" if args.resume else "writing to"
        seeds = f" x {len(args.seeds)} seeds" if len(args.seeds) > 1 else ""
        print(f"normlab compare: {len(args.variants)} variants{seeds} x {args.epochs} epochs "
              f"on {len(data.train_labels):,} {args.dataset} images, evaluated on the "
              f"{data.eval_split} set, device {device}; {verb} {out}")
        _, test_loader = make_loaders(data, args.batch_size, args.seeds[0], device)
        jobs = [(seed, name) for seed in args.seeds for name in args.variants]
        for i, (seed, name) in enumerate(jobs, 1):
            variant = VARIANTS[name]
            record = metrics["variants"].setdefault(name, dict(
                label=variant.label, norm=variant.norm,
                lambda_l1=args.l1 if variant.l1 else 0.0,
                params=count_parameters(Net(variant.norm, num_groups=args.num_groups)),
                runs=[]))
            print(f"[{i}/{len(jobs)}] {name}: {variant.label}, seed {seed}", end="")
            if any(run["seed"] == seed for run in record["runs"]):
                print(" - finished earlier, kept")
                continue
            print()
            record["runs"].append(run_variant(name, seed, args, data, device, out, test_loader))
            metrics["wall_time_s"] = sum(r.get("wall_time_s", 0.0)
                                         for v in metrics["variants"].values()
                                         for r in v["runs"])
            write_json(out / "metrics.json", metrics)  # finished runs survive what follows
            (out / "checkpoints" / run_file(name, seed, ".ckpt")).unlink(missing_ok=True)
        if not any((out / "checkpoints").iterdir()):
            (out / "checkpoints").rmdir()
        finish(out, metrics)
    return 1 if any(failed_runs(v) for v in metrics["variants"].values()) else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Figures and report.md are pure functions of the run's JSON record: redraw them."""
    record = next((args.run / n for n in ("metrics.json", "sweep.json")
                   if (args.run / n).exists()), None)
    if record is None:
        raise UsageError(f"{args.run}: no metrics.json or sweep.json; give a compare or "
                         f"sweep output folder")
    try:
        results = json.loads(record.read_text())
        if record.name == "sweep.json":
            finish_sweep(args.run, results)
        else:
            finish(args.run, results)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{record} is corrupt ({type(exc).__name__}: {exc}); cannot draw "
                         f"a report from it") from None
    return 0


def finish_sweep(out: Path, results: dict[str, Any]) -> None:
    """sweep.png, report.md and the error table, from sweep.json's contents."""
    errors = {f"{VARIANTS[v].label} ({v})": by_batch
              for v, by_batch in error_table(results).items()}
    cfg = results["config"]
    seeds = f"; mean of {len(cfg['seeds'])} seeds, band min–max" if len(cfg["seeds"]) > 1 else ""
    plot_sweep(errors, f"Test error vs batch size on {cfg['dataset']}, "
               f"{cfg['train_images']:,} images per run{seeds}", out / "sweep.png")
    report = render_sweep_report(results, errors)
    atomic_write(out / "report.md", report)
    print("\n".join(line for line in report.splitlines() if line.startswith("|")))
    print(f"\nreport: {out / 'report.md'}")


def cmd_sweep(args: argparse.Namespace) -> int:
    results = open_resume(args, "sweep.json") if args.resume else None
    device = check_run_args(args)
    out = args.resume or prepare_out(args.out, "sweep", "sweep.json")
    args.out = out
    with run_lock(out):
        data = load_data(args.data_dir, args.dataset, args.samples)
        if results is None:
            results = {
                "command": shlex.join(["normlab", *args.argv]),
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
                "config": dict(variants=args.variants, batch_sizes=args.batch_sizes,
                               seeds=args.seeds, samples=args.samples, epochs=args.epochs,
                               lr=args.lr, lambda_l1=args.l1, num_groups=args.num_groups,
                               dataset=args.dataset, precision=args.precision,
                               train_images=len(data.train_labels),
                               test_images=len(data.test_labels)),
                "environment": environment(device),
                "runs": {},
            }
            write_json(out / "sweep.json", results)
        total = len(args.variants) * len(args.batch_sizes) * len(args.seeds)
        print(f"normlab sweep: {len(args.variants)} variants x {len(args.batch_sizes)} batch "
              f"sizes x {len(args.seeds)} seed(s) = {total} runs of {args.epochs} epoch(s) on "
              f"{len(data.train_labels):,} {args.dataset} images, device {device}; "
              f"{'resuming' if args.resume else 'writing to'} {out}")
        run_sweep(results, out / "sweep.json", data, args.variants, args.batch_sizes,
                  args.seeds, args.epochs, args.lr, args.l1, args.num_groups, device,
                  progress=not args.no_progress, log=tqdm.write, precision=args.precision)
        finish_sweep(out, results)
    return 0


def finish(out: Path, metrics: dict[str, Any]) -> None:
    """The curves figure, report.md and a summary table, from metrics.json's contents."""
    split = metrics["config"].get("eval_split", "test")
    plot_curves({f"{v['label']} ({name})": [r["history"] for r in good_runs(v)]
                 for name, v in metrics["variants"].items() if good_runs(v)},
                out / "curves.png", split=split)
    atomic_write(out / "report.md", render_report(metrics))
    accs = final_accuracies(metrics)
    print(f"\n{'variant':8s} {'params':>7s} {'seeds':>5s} {'final ' + split + ' acc':>19s} "
          f"{'95% CI':>15s}")
    for name, v in metrics["variants"].items():
        if name not in accs:
            print(f"{name:8s} {v['params']:7,d} {0:5d} {'failed':>19s}")
            continue
        iv = t_interval(list(accs[name].values()))
        ci = f"{iv.low:.2f}–{iv.high:.2f}%" if iv.n > 1 else "–"
        print(f"{name:8s} {v['params']:7,d} {iv.n:5d} {iv.mean:18.2f}% {ci:>15s}")
    print(f"\nreport: {out / 'report.md'}  ({metrics['wall_time_s']:.0f} s of training)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in metrics.json and the report, to reproduce the run
    try:
        return args.func(args)
    except UsageError as exc:
        parser.exit(2, f"normlab {args.command}: error: {exc}\n")
    except DataError as exc:
        parser.exit(1, f"normlab {args.command}: data error: {exc}\n")
    except CheckpointError as exc:
        parser.exit(1, f"normlab {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f"; resume with: normlab compare --resume {out}" if out else ""
        parser.exit(130, f"\nnormlab {args.command}: interrupted; every finished epoch is "
                         f"saved{hint}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
