"""The ``normlab`` command: it parses arguments and turns failures into one line.

One subcommand per experiment of ``normlab.experiments`` (``compare`` trains the variants and
writes the report, ``sweep`` trains them across batch sizes, ``statistics`` varies only the
images per Batch Norm statistic), each executed by ``normlab.runner`` (also as --jobs or
under torchrun); and the tools around them: ``report`` redraws a finished run, ``convert``
rewrites older weights, ``summary`` prints each variant's layers, ``explain`` works the
statistics by hand (``normlab.explain``).

Every expected failure (bad argument, bad data, unwritable folder, a failed rank) ends in
one line on stderr and a non-zero exit, never a traceback; finished runs are on disk before
the next one starts, and every finished epoch is checkpointed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed, evaluate, explain, modelspec
from .checkpoint import WEIGHTS_SUFFIX, convert_weights, write_json
from .device import select_device
from .errors import UsageError, error_line, first_line
from .experiments import registry
from .experiments.sweep import Sweep, extend_record
from .folder import run_lock
from .model import count_parameters
from .options import add_model_options, add_model_spec_options, positive_int
from .provenance import git_revision
from .runner import build_models, run_experiment
from .variants import STUDY_VARIANTS, VARIANTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab", description="Train and compare normalization layers (Batch, Layer, "
        "Group Norm and the small-batch remedies) on MNIST, Fashion-MNIST, CIFAR or your own "
        "data, with normlab's small CNN or your own network (--model), and redraw, evaluate "
        "or explain the results. Every study writes a JSON record, figures and a report into "
        "its output folder.")
    revision = git_revision()
    parser.add_argument("--version", action="version", version=f"normlab {__version__}"
                        + (f" (git {revision})" if revision != "unknown" else ""))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, experiment in registry().items():
        p = sub.add_parser(name, help=experiment.help, description=experiment.description)
        experiment.add_arguments(p)
        p.set_defaults(func=cmd_experiment, experiment=experiment)

    records = " or ".join(cls.record_name for cls in registry().values())
    p = sub.add_parser("report", help="re-draw the figures and report.md of a finished run "
                       f"from its {records} (no training)")
    p.add_argument("run", type=Path, metavar="OUTDIR",
                   help=f"an output folder of {' or '.join(registry())}")
    p.add_argument("--add", type=Path, nargs="+", default=[], metavar="OTHER",
                   help="first add the runs of these output folders of the same grid study "
                   "(more seeds, sizes or variants, or the grid at another --lr) to OUTDIR's "
                   "record; each keeps its own command, revision and machine")
    p.add_argument("--beside", type=Path, metavar="OTHER",
                   help="remedies only: set OUTDIR beside OTHER, the same study of another "
                   "network, and check OTHER's verdicts on OUTDIR's (kept in the record)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("convert", help="rewrite older .pt weights files as .safetensors",
                       description="Rewrite every normlab .pt weights file in the given folders "
                       "(or the given files) as .safetensors beside it, with the run's git "
                       "revision from its metrics.json; each new file is checked to hold the "
                       "same tensors before the old one is removed.")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("evaluate", help="re-evaluate saved weights, also with Batch Norm's "
                       "inference remedies (PreciseBN, batch statistics at test)",
                       description=evaluate.__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("weights", type=Path, nargs="+", metavar="WEIGHTS",
                   help=".safetensors files normlab wrote, or folders holding them; the "
                   "dataset and settings come from each file's header or its folder's record")
    p.add_argument("--bn-stats", nargs="+", choices=evaluate.BN_STATS, default=["running"],
                   metavar="MODE", help="which statistics the batch-dependent layers use: "
                   "running (as saved), precise (PreciseBN: recomputed over the first "
                   "--precise-images training images, each over a whole batch), "
                   "precise-grouped (the same over the run's images per statistic), "
                   "precise-augmented (PreciseBN over shuffled, augmented training batches, as "
                   "fvcore's update_bn_stats), batch "
                   "(the test set in groups of the run's images per statistic, as in "
                   "training); several at once (default: running)")
    p.add_argument("--precise-images", type=positive_int, metavar="N",
                   default=evaluate.DEFAULT_PRECISE_IMAGES,
                   help="training images for the precise modes (default: "
                   "%(default)s)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--data-dir", help="folder with the dataset's four IDX files (default as "
                   "for compare)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("summary", help="print a torchinfo summary of each variant")
    add_model_options(p, STUDY_VARIANTS)
    add_model_spec_options(p)
    p.add_argument("--input-shape", type=shape_arg, default=(1, 28, 28), metavar="C,...",
                   help="one input's shape: channels then length, H,W or D,H,W "
                   "(default: 1,28,28)")
    p.add_argument("--num-classes", type=positive_int, default=10,
                   help="classes the --model callable is built for (default: 10)")
    p.add_argument("--depth", type=positive_int, metavar="N",
                   help="module levels to show (default: all, so every norm layer of a "
                   "nested network is listed)")
    p.set_defaults(func=cmd_summary)

    add_explain_parser(sub)
    return parser


def shape_arg(text: str) -> tuple[int, ...]:
    """``C,L``, ``C,H,W`` or ``C,D,H,W``, each a positive integer."""
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if not 2 <= len(shape) <= 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers C,L or "
                                         f"C,H,W or C,D,H,W, e.g. 3,32,32")
    return shape


def cmd_summary(args: argparse.Namespace) -> int:
    from torchinfo import summary

    spec = modelspec.from_args(args)
    if spec is None:
        if args.input_shape != (1, 28, 28):
            raise UsageError("normlab's CNN takes 1x28x28 images; --input-shape is for a "
                             "--model")
        models = build_models(args.variants, args.num_groups)
    else:  # checked as a study checks it, on two zero inputs of the given shape
        example = torch.zeros(2, *args.input_shape)
        variants = modelspec.variant_layers(args.variants)
        spec, _ = modelspec.check(spec, variants, args.num_groups, example, args.num_classes)
        models = {v: spec.variant(norm, args.num_groups, 1, std, args.input_shape[0],
                                  args.num_classes) for v, (norm, std) in variants.items()}
    for name, model in models.items():
        print(f"== {name}: {VARIANTS[name].label} ({count_parameters(model):,} parameters)")
        print(summary(model, input_size=(1, *args.input_shape), verbose=0,
                      col_names=("output_size", "num_params"),
                      depth=args.depth or _depth(model), mode="eval"))
        print()
    return 0


def _depth(model: torch.nn.Module) -> int:
    """How deep its modules nest (torchinfo's default of 3 stops above a nested network's
    norm layers)."""
    return max(name.count(".") + 1 for name, _ in model.named_modules())


def cmd_evaluate(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.weights if not p.exists()]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    files = [f for p in args.weights
             for f in (sorted(p.glob("*" + WEIGHTS_SUFFIX)) if p.is_dir() else [p])]
    if not files:
        raise UsageError(f"no {WEIGHTS_SUFFIX} weights files in "
                         f"{', '.join(map(str, args.weights))}")
    try:
        device = select_device(args.device)
        rows = evaluate.evaluate_files(files, args.bn_stats, device, args.precise_images,
                                       args.data_dir)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print("\n".join(evaluate.table(rows)))
    if args.json is not None:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Run the experiment; one that decides between passes (recommend) asks for another
    pass into the same folder, run as its --resume would be."""
    experiment = args.experiment(args)
    code = run_experiment(experiment)
    while code == 0 and experiment.more:
        argv = [args.command, "--resume", str(experiment.args.out),
                *(["--no-progress"] if args.no_progress else [])]
        again = build_parser().parse_args(argv)
        again.argv, again.deadline = argv, getattr(experiment.args, "deadline", None)
        experiment = again.experiment(again)
        code = run_experiment(experiment)
    return code


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
    """Figures and report.md are a pure function of a run's JSON record: redraw them."""
    found = [cls for cls in registry().values() if (args.run / cls.record_name).exists()]
    if not found:
        names = [cls.record_name for cls in registry().values()]
        raise UsageError(f"{args.run}: no {', '.join(names[:-1])} or {names[-1]}; give an "
                         f"output folder of {', '.join(list(registry())[:-1])} or "
                         f"{list(registry())[-1]}")
    path = args.run / found[0].record_name
    record = _read_record(path)
    if args.add:
        if not issubclass(found[0], Sweep):
            raise UsageError(f"--add extends grid studies (sweep, statistics, remedies); "
                             f"{path.name} is not one")
        with run_lock(args.run):
            for other in args.add:
                record = extend_record(record, _read_record(other / found[0].record_name),
                                       found[0].other_rates)
            write_json(path, record)
        print(f"{path}: {len(record['runs'])} runs after adding {len(args.add)} folder(s)")
    if args.beside is not None:
        _set_beside(args, found[0], path, record)
    try:
        found[0].render(args.run, record)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is corrupt ({type(exc).__name__}: {exc}); cannot draw "
                         f"a report from it") from None
    return 0


def _set_beside(args: argparse.Namespace, study: type, path: Path, record: dict[str, Any]
                ) -> None:
    """Record, relative to the run's folder, the folder whose verdicts its report checks."""
    if study.name != "remedies":
        raise UsageError(f"--beside compares remedies studies; {path.name} is not one")
    _read_record(args.beside / study.record_name)  # it must be one
    with run_lock(args.run):
        record["beside"] = {"folder": os.path.relpath(args.beside, args.run)}
        write_json(path, record)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; give an output folder of the same "
                         f"study") from None
    except ValueError as exc:
        raise UsageError(f"{path} is corrupt ({type(exc).__name__}: {exc}); cannot draw a "
                         f"report from it") from None
    except OSError as exc:
        raise UsageError(f"{path} cannot be read ({exc}); restore it from a copy") from None


# -- explain

# flag -> (help, allowed suffixes, may be "-" for stdout)
_OUTPUTS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "json": ("write every number as JSON ('-' for stdout)", (".json",), True),
    "markdown": ("write the tables used in docs/normalization.md ('-' for stdout)",
                 (".md",), True),
    "xlsx": ("write an Excel workbook whose statistics are live formulas", (".xlsx",), False),
    "figure": ("draw the N x C x (H*W) block diagram (png, svg or pdf)",
               (".png", ".svg", ".pdf"), False),
}


def add_explain_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `explain` subcommand; sets `func=run` as default."""
    parser = subparsers.add_parser(
        "explain", help="work BN, LN, GN and IN through a small example, every number shown",
        description="Work Batch, Layer, Group and Instance Norm through a small example "
                    "(2 layers x N=3, C=4, H=2, W=2 integer activations): which values form "
                    "each set, its mean and variance, the normalised outputs, and how many "
                    "statistics each technique computes.")
    parser.add_argument("--seed", type=int, default=explain.DEFAULT_SEED,
                        help="seed for the example's integers (default "
                        f"{explain.DEFAULT_SEED})")
    parser.add_argument("--groups", type=int, default=explain.GROUPS,
                        help=f"GN groups; must divide C={explain.C} (default {explain.GROUPS})")
    for flag, (text, _, _) in _OUTPUTS.items():
        parser.add_argument(f"--{flag}", metavar="PATH", help=text)
    parser.set_defaults(func=cmd_explain)
    return parser


def _check_output(flag: str, path: str) -> None:
    """Refuse a path we cannot write before writing anything, so no half-done outputs."""
    suffixes, stdout_ok = _OUTPUTS[flag][1:]
    if path == "-":
        if not stdout_ok:
            raise ValueError(f"--{flag} cannot write to stdout; give a file name such as "
                             f"normalization{suffixes[0]}")
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--{flag} {path} is a directory; give a file name such as "
                         f"{target / ('normalization' + suffixes[0])}")
    if target.suffix.lower() not in suffixes:
        raise ValueError(f"--{flag} {path} should end in {' or '.join(suffixes)}")
    parent = target.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ValueError(f"--{flag} {path}: {parent} {what}; create the directory first")


def _fail(message: str) -> int:
    print(f"normlab explain: error: {message}", file=sys.stderr)
    return 2


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the explanation and write the requested files; 2 with one error line if not."""
    outputs = {flag: getattr(args, flag, None) for flag in _OUTPUTS}
    outputs = {flag: path for flag, path in outputs.items() if path}
    try:
        explain.check_groups(explain.C, args.groups)
        for flag, path in outputs.items():
            _check_output(flag, path)
        if list(outputs.values()).count("-") > 1:
            raise ValueError("only one of --json and --markdown can write to stdout ('-')")
    except ValueError as err:
        return _fail(str(err))
    x = explain.build_example(args.seed)
    writers: dict[str, Callable[[str], object]] = {
        "json": lambda path: _write_text(path, explain.to_json(x, args.groups, args.seed)),
        "markdown": lambda path: _write_text(path, explain.to_markdown(x, args.groups,
                                                                       args.seed)),
        "xlsx": lambda path: explain.write_xlsx(x, path, args.groups, args.seed),
        "figure": lambda path: explain.draw_figure(path, tuple(x.shape[1:]), args.groups),
    }
    if "-" not in outputs.values():
        sys.stdout.write(explain.format_text(x, args.groups, args.seed))
    for flag, path in outputs.items():
        try:
            writers[flag](path)
        except OSError as err:
            return _fail(f"--{flag} {path}: cannot write ({err.strerror or err}); "
                         "choose a writable location")
        if path != "-":
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _write_text(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text, encoding="utf-8")


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
               f"another rank stopped or lost contact ({first_line(exc, 120)})")
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
    if out is None or args.command not in registry():
        return ""
    if ranks.nodes > 1:
        return f"{lead} by running the same torchrun commands with: {args.command} --resume {out}"
    launch = (f"torchrun --nproc-per-node {ranks.world_size} -m normlab"
              if ranks.distributed else "normlab")
    return f"{lead} with: {launch} {args.command} --resume {out}"


if __name__ == "__main__":
    sys.exit(main())
