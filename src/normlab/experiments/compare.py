"""The comparison (``normlab compare``): every variant trained once per seed on one batch
size, its curves, the images each model gets wrong, and the spread over seeds.

This is the study normlab grew from (Batch Norm + L1, Layer Norm, Group Norm; 20 epochs).
Its record, metrics.json, keeps every run's per-epoch history; the report and curves are
drawn from it alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import WEIGHTS_SUFFIX, atomic_write, save_model
from ..data import Data, DataError, load_data, make_loaders, shown_dataset
from ..engine import DEFAULTS, Misclassified, misclassified
from ..model import Net, count_parameters
from ..options import add_model_options, add_run_options, positive_float, positive_int
from ..plots import drawable, plot_curves, plot_misclassified
from ..report import (
    failed_runs,
    final_accuracies,
    good_runs,
    pair_rows,
    provenance_lines,
    seed_rows,
    seeds_of,
    summary_rows,
    time_line,
)
from ..stats import t_interval
from ..variants import STUDY_VARIANTS, VARIANTS
from .base import Experiment, Run, Settings


class Compare(Experiment):
    name = "compare"
    record_name = "metrics.json"
    position = 0
    help = "train the variants and write metrics, figures, report"
    description = ("Train each variant from the same seed(s) and write metrics.json, figures, "
                   "report.md and weights into --out.")
    epoch_lines = True

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        add_model_options(p, STUDY_VARIANTS)
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
                       help="for tuning: hold out the last N training images and evaluate on "
                       "them instead of the test set, which is then not touched")
        add_run_options(p)

    def runs(self) -> list[Run]:
        a = self.args
        several = len(a.seeds) > 1
        return [Run(name, seed, a.batch_size, a.lr, f"{name}-seed{seed}",
                    f"{name} seed {seed}" if several else name)
                for seed in a.seeds for name in a.variants]

    def load(self) -> Data:
        a = self.args
        return load_data(a.data_dir, a.dataset, a.limit_train, holdout=a.holdout,
                         augment=a.augment)

    def new_record(self, data: Data) -> dict[str, Any]:
        a = self.args
        return {"config": dict(variants=a.variants, epochs=a.epochs, seeds=a.seeds,
                               batch_size=a.batch_size, lr=a.lr, lambda_l1=a.l1,
                               num_groups=a.num_groups, dataset=a.dataset,
                               limit_train=a.limit_train, holdout=a.holdout,
                               eval_split=data.eval_split, precision=a.precision,
                               train_images=len(data.train_labels),
                               test_images=len(data.test_labels)),
                "variants": {}, "wall_time_s": 0.0}

    def finished(self, record: dict[str, Any], run: Run) -> bool:
        runs = record["variants"].get(run.variant, {}).get("runs", [])
        return any(r["seed"] == run.seed for r in runs)

    def result(self, run: Run, model: Net, history: dict[str, list[float]], data: Data,
               device: torch.device, s: Settings) -> dict[str, Any]:
        """The run's history; rank 0 also writes its weights and keeps the first ten test
        images it gets wrong (drawn for the first seed)."""
        record: dict[str, Any] = dict(seed=run.seed, wall_time_s=sum(history["epoch_time"]),
                                      history=history)
        if not s.writes:
            return record
        variant = VARIANTS[run.variant]
        save_model(model, s.out / f"{run.stem}{WEIGHTS_SUFFIX}", variant=run.variant,
                   seed=run.seed, test_acc=history["test_acc"][-1], eval_split=data.eval_split,
                   git_revision=s.revision, dataset=self.args.dataset,
                   batch_size=run.batch_size, holdout=self.args.holdout,
                   images_per_statistic=run.images_per_statistic(s), precision=s.precision)
        _, test_loader = make_loaders(data, run.batch_size, run.seed, device)
        wrong = misclassified(model, device, test_loader, n=10)
        if run.seed == self.args.seeds[0] and drawable(data.input_shape):
            plot_misclassified(wrong, f"{variant.label} ({run.variant}, seed {run.seed})",
                               data.spec.classes, s.out / f"misclassified_{run.variant}.png",
                               split=data.eval_split)
        record["misclassified"] = dict(index=wrong.indices, predicted=wrong.predicted,
                                       target=wrong.target, confidence=wrong.confidence)
        return record

    def keep(self, record: dict[str, Any], run: Run, result: dict[str, Any]) -> None:
        a, variant = self.args, VARIANTS[run.variant]
        entry = record["variants"].setdefault(run.variant, dict(
            label=variant.label, norm=variant.norm, lambda_l1=a.l1 if variant.l1 else 0.0,
            params=record["config"]["model"]["parameters"][run.variant]
            if "model" in record["config"]
            else count_parameters(Net(variant.norm, num_groups=a.num_groups)), runs=[]))
        entry["runs"].append(result)
        # --jobs finishes runs in any order; the record keeps the command line's order.
        entry["runs"].sort(key=lambda r: a.seeds.index(r["seed"]))
        record["variants"] = {v: record["variants"][v] for v in a.variants
                              if v in record["variants"]}
        record["wall_time_s"] = sum(r.get("wall_time_s", 0.0) for v in
                                    record["variants"].values() for r in v["runs"])

    def images_per_device(self, world_size: int) -> int | None:
        return self.args.batch_size // world_size

    def announce(self, data: Data, device: torch.device, verb: str, out: Path) -> str:
        a = self.args
        seeds = f" x {len(a.seeds)} seeds" if len(a.seeds) > 1 else ""
        return (f"normlab compare: {len(a.variants)} variants{seeds} x {a.epochs} epochs on "
                f"{len(data.train_labels):,} {shown_dataset(a.dataset)} {data.inputs}, "
                f"evaluated on the "
                f"{data.eval_split} set, device {device}; {verb} {out}")

    def summary(self, result: dict[str, Any]) -> str:
        return f"final {result['history']['test_acc'][-1]:.2f}%"

    @staticmethod
    def render(out: Path, record: dict[str, Any]) -> None:
        """The curves figure, report.md and a summary table, from metrics.json's contents."""
        split = record["config"].get("eval_split", "test")
        plot_curves({f"{v['label']} ({name})": [r["history"] for r in good_runs(v)]
                     for name, v in record["variants"].items() if good_runs(v)},
                    out / "curves.png", split=split)
        _redraw_misclassified(out, record)
        atomic_write(out / "report.md", render_report(record))
        accs = final_accuracies(record)
        print(f"\n{'variant':8s} {'params':>7s} {'seeds':>5s} {'final ' + split + ' acc':>19s} "
              f"{'95% CI':>15s}")
        for name, v in record["variants"].items():
            if name not in accs:
                print(f"{name:8s} {v['params']:7,d} {0:5d} {'failed':>19s}")
                continue
            iv = t_interval(list(accs[name].values()))
            ci = f"{iv.low:.2f}–{iv.high:.2f}%" if iv.n > 1 else "–"
            print(f"{name:8s} {v['params']:7,d} {iv.n:5d} {iv.mean:18.2f}% {ci:>15s}")
        print(f"\nreport: {out / 'report.md'}  ({record['wall_time_s']:.0f} s of training)")

    def exit_code(self, record: dict[str, Any]) -> int:
        return 1 if any(failed_runs(v) for v in record["variants"].values()) else 0


def _redraw_misclassified(out: Path, record: dict[str, Any]) -> None:
    """The first seed's misclassified grids that the folder lacks (a copied folder, say),
    drawn again from the record's indices, predictions and confidences and the evaluation
    images, when those can be read without a download."""
    firsts = {name: (v, good_runs(v)[0]) for name, v in record["variants"].items()
              if good_runs(v)}
    missing = {name: (v, run) for name, (v, run) in firsts.items()
               if "misclassified" in run and not (out / f"misclassified_{name}.png").exists()}
    if not missing:
        return
    cfg = record["config"]
    if not _drawn(cfg):
        return
    try:
        data = load_data(None, cfg["dataset"], holdout=cfg.get("holdout"),
                         download_missing=False)
    except (DataError, ValueError) as exc:
        print(f"normlab report: {', '.join(f'misclassified_{n}.png' for n in missing)} not "
              f"drawn: the {cfg['dataset']} images are not here ({exc})")
        return
    split = cfg.get("eval_split", "test")
    for name, (v, run) in missing.items():
        wrong = run["misclassified"]
        mis = Misclassified(data.test_images[torch.tensor(wrong["index"], dtype=torch.long)],
                            wrong["predicted"], wrong["target"], wrong["confidence"],
                            wrong["index"])
        plot_misclassified(mis, f"{v['label']} ({name}, seed {run['seed']})",
                           data.spec.classes, out / f"misclassified_{name}.png", split=split)


def _drawn(cfg: dict[str, Any]) -> bool:
    """Whether the run's inputs are images the misclassified grid can show."""
    return "data" not in cfg or drawable(cfg["data"]["input_shape"])


def _inputs(cfg: dict[str, Any]) -> str:
    return f"{cfg['data']['kind']}s" if "data" in cfg else "images"


def render_report(metrics: dict[str, Any]) -> str:
    """The markdown text of report.md for a finished (or partly finished) comparison."""
    cfg = metrics["config"]
    split = cfg.get("eval_split", "test")
    seeds = seeds_of(cfg)
    evaluated = (f"{cfg['test_images']:,} test images" if split == "test" else
                 f"{cfg['test_images']:,} validation images held out of the training set; "
                 f"the test set was not used")
    pairs = pair_rows(metrics)
    lines = [
        "# normlab comparison",
        "",
        f"{cfg['epochs']} epochs per variant on {cfg['dataset']} "
        f"({cfg['train_images']:,} training images, {evaluated}), batch {cfg['batch_size']}, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}."
        + (f" Batch Norm computes its training statistics over each "
           f"{cfg['virtual_batch_size']} images (--virtual-batch-size)."
           if cfg.get("virtual_batch_size") else ""),
        "",
        *summary_rows(metrics, split),
        "",
        f"Accuracy is on the full {split} set after the last epoch. The 95% confidence "
        "interval of the mean uses Student's t with n − 1 degrees of freedom (n seeds), so "
        "it is wide for few seeds." + (" Reference: the single-run MNIST study normlab grew "
                                       "from." if cfg["dataset"] == "mnist" else ""),
        "",
    ]
    if pairs:
        lines += [
            "## Is one variant really better than another?",
            "",
            "Differences of final accuracy, paired by seed (the same seed gives both variants "
            "the same data order and augmentation), with a paired-t 95% interval. A verdict "
            "needs the interval to exclude 0.",
            "",
            *pairs,
            "",
        ]
    lines += [
        "## Every run",
        "",
        *seed_rows(metrics, split),
        "",
        "\"best\" is the highest epoch, reported for information only (choosing it would be "
        f"peeking at the {split} set).",
        "",
        f"## {split.capitalize()} curves",
        "",
        f"![{split} loss and accuracy](curves.png)",
        "",
        f"## Misclassified {split} {_inputs(cfg)} (seed {seeds[0]})",
        "",
    ]
    if not _drawn(cfg):
        lines += [f"Not drawn: the grid shows grayscale or RGB images, and these are "
                  f"{_inputs(cfg)} of shape {tuple(cfg['data']['input_shape'])}. The record "
                  f"(metrics.json) keeps the first ten each variant gets wrong: their "
                  f"indices in the {split} split, predicted and true classes and "
                  f"confidences.", ""]
    for name, v in metrics["variants"].items():
        if good_runs(v) and _drawn(cfg):
            lines += [f"### {v['label']} ({name})", "", f"![{name}](misclassified_{name}.png)",
                      ""]
    lines += [
        *provenance_lines(metrics, Compare.command_today(metrics)),
        time_line(metrics, metrics.get("wall_time_s", 0)),
        "",
    ]
    return "\n".join(lines)
