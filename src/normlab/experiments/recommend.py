"""``normlab recommend``: at your per-device batch, which normalization should *your* network
use, and must you retrain? A decision the user can act on, on their network and data.

The candidates: Batch Norm, the training remedies (Batch Renorm, EvoNorm-B0) at the given
images per statistic, the batch-independent layers, and, for the trained Batch Norm
network, the inference remedies (PreciseBN, batch statistics at test). Each is trained
in the remedies study's protocol, seed by seed, and decided by ``stats.decide``, a rule
fixed before the data: multiple comparisons with the best, its error spent over planned
looks. The study is sequential: the first look at 3 seeds, then seeds are added only to
the options whose verdict is still open, within ``--max-seeds`` and ``--budget``.

How it runs: each pass is an ordinary study run by ``normlab.runner`` (``--jobs``, resume,
checkpoints); after a pass, ``after`` decides and plans the next, and the CLI starts the
next pass on the same folder, as ``--resume`` would. Passes: the learning-rate grid on a
held-out split (``--tune-lr``, optional), one seed of each option (to measure what a run
costs before the budget is spent), then one pass per look.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed, modelspec
from ..checkpoint import atomic_write, write_json
from ..data import Data, load_data, shown_dataset
from ..errors import UsageError
from ..evaluate import DEFAULT_PRECISE_IMAGES
from ..folder import given
from ..model import Net
from ..norms import NORMS
from ..options import add_run_options, non_negative_float, positive_float, positive_int
from ..report import protocol, provenance_lines
from ..stats import Decision, decide, still_open
from ..variants import VARIANTS
from .base import Run, Settings
from .decision import (
    INFERENCE,
    answer,
    decision_record,
    decision_table,
    figure,
    label,
    promise_lines,
)
from .perdevice import PerDevice, add_protocol_options, inference_results, inference_summary
from .remedies import REFERENCES, SWEPT

LOOKS = (3, 5, 8)  # planned looks below --max-seeds, which is the last
MAX_GRID_EXTENSIONS = 2  # a learning rate chosen at the grid's edge extends it, this often


def parse_duration(text: str) -> float:
    """``3h``, ``90m``, ``2h30m``, ``45s`` or plain seconds, in seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*"
                         r"(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"expected a duration such as 3h, 90m or 2h30m, got "
                                         f"{text!r}")
    hours, minutes, seconds = (float(x or 0) for x in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def alpha_arg(text: str) -> float:
    value = positive_float(text)
    if value >= 0.5:
        raise argparse.ArgumentTypeError(f"must be below 0.5, got {text}")
    return value


def looks_for(max_seeds: int) -> list[int]:
    """The planned looks: 3, 5, 8 below ``max_seeds``, then ``max_seeds``."""
    return [n for n in LOOKS if n < max_seeds] + [max_seeds]


def options_of(record: dict[str, Any]) -> dict[str, dict[int, float]]:
    """option -> seed -> test error: each trained variant, and Batch Norm's inference
    remedies ("bn precise", "bn batch"), from the runs of the seeds phase."""
    table: dict[str, dict[int, float]] = {}
    for key, r in record["runs"].items():
        if key.startswith("tune/") or "failed" in r:
            continue
        table.setdefault(r["variant"], {})[r["seed"]] = r["test_error"]
        for mode, e in r.get("inference", {}).items():
            table.setdefault(f"{r['variant']} {mode}", {})[r["seed"]] = e["test_error"]
    order = list(record["config"]["options"])
    return {o: dict(sorted(table[o].items())) for o in order if o in table}




class Recommend(PerDevice):
    name = "recommend"
    record_name = "recommend.json"
    position = 4
    fixed = ("lambda_l1", "seeds", "phase", "plan", "rates", "tune_grid", "options", "looks",
             "images_per_statistic")
    help = ("which normalization should your network use at your per-device batch, and must "
            "you retrain: a decision fixed before the data, seeds added where it is open")
    description = ("Train the candidates (Batch Norm, Batch Renorm, EvoNorm-B0 at "
                   "--images-per-statistic; the batch-independent layers; PreciseBN and batch "
                   "statistics at test for the trained Batch Norm network) on your network and "
                   "data in the remedies study's protocol, and decide with "
                   "normlab.stats.decide which are best, which are shown within --margin "
                   "points of the best, and which are shown behind it; seeds are added only "
                   "where the verdict is open, at planned looks, within --max-seeds and "
                   "--budget. Writes recommend.json, recommend.png and report.md into --out.")

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        batch_dependent = [v for v, x in VARIANTS.items() if NORMS[x.norm].batch_dependent
                           and not NORMS[x.norm].synchronized]
        p.add_argument("--images-per-statistic", type=positive_int, default=2, metavar="B",
                       help="images each Batch Norm statistic covers: your per-device batch "
                       "(default: %(default)s); must divide --batch-size")
        p.add_argument("--variants", nargs="+", choices=batch_dependent, default=list(SWEPT),
                       metavar="VARIANT", help=f"batch-dependent candidates (default: "
                       f"{' '.join(SWEPT)})")
        p.add_argument("--references", nargs="*", default=list(REFERENCES), metavar="VARIANT",
                       choices=[v for v, x in VARIANTS.items()
                                if not NORMS[x.norm].batch_dependent],
                       help=f"batch-independent candidates (default: {' '.join(REFERENCES)})")
        p.add_argument("--margin", type=non_negative_float, default=0.5, metavar="POINTS",
                       help="an option within this many points of test error of the best "
                       "counts as equivalent, if shown (default: %(default)s)")
        p.add_argument("--alpha", type=alpha_arg, default=0.05,
                       help="the chance of any false claim, at most (default: %(default)s)")
        p.add_argument("--max-seeds", type=positive_int, default=10, metavar="N",
                       help="seeds per option at the most; looks at 3, 5, 8 below it and at N "
                       "(default: %(default)s)")
        p.add_argument("--budget", type=parse_duration, metavar="TIME",
                       help="stop before a look that would not finish within this time "
                       "(3h, 90m, 2h30m); a resume may give a new budget (default: none)")
        p.add_argument("--tune-lr", type=positive_float, nargs="+", metavar="LR",
                       help="choose each option's learning rate from these on a held-out part "
                       "of the training set (--holdout), never on the test set; a rate at the "
                       "grid's edge extends the grid")
        p.add_argument("--seeds-from", type=Path, nargs="+", default=[], metavar="FOLDER",
                       help="take the runs these remedies or recommend folders already "
                       "trained in the same protocol, network and data (refused where any "
                       "setting differs) as the first seeds, each with its own provenance")
        p.add_argument("--holdout", type=positive_int, default=10_000, metavar="N",
                       help="training images held out to choose the learning rate on "
                       "(default: %(default)s)")
        add_protocol_options(p, groups="Group Norm and EvoNorm-S0", seeds=False)
        p.add_argument("--precise-images", type=positive_int, metavar="N",
                       default=DEFAULT_PRECISE_IMAGES, help="training images PreciseBN "
                       "recomputes the statistics over (default: %(default)s)")
        add_run_options(p)

    # -- the plan: which runs this pass trains

    def check(self) -> None:
        a = self.args
        if distributed.from_env().distributed:
            raise UsageError("normlab recommend runs in one process and decides between its "
                             "passes; train its runs in parallel with --jobs, not torchrun")
        if getattr(a, "deadline", None) is None:  # this command's budget, from now
            a.deadline = time.time() + a.budget if a.budget else math.inf
        a.seeds = [1]  # the first seed's weights are kept (PerDevice.result)
        a.images_per_statistic = [a.images_per_statistic] \
            if isinstance(a.images_per_statistic, int) else a.images_per_statistic
        super().check()
        if a.resume is None and getattr(a, "phase", None) is None:  # a new study
            a.phase = "tune" if a.tune_lr else "seeds"
            a.plan = dict.fromkeys(self.trained(), 1)
            a.rates = {}
            a.tune_grid = {v: sorted(set(a.tune_lr)) for v in self.trained()} \
                if a.tune_lr else {}
            a.looks = looks_for(a.max_seeds)
            a.options = self.option_names()
        elif given(a, "--max-seeds"):
            raise UsageError(f"{a.resume} spends its error over the looks its --max-seeds "
                             f"fixed before its data; other looks would be a new study: "
                             f"start one with --out")

    def trained(self) -> list[str]:
        return [*self.swept(), *self.references()]

    def swept(self) -> list[str]:
        return [v for v in self.args.variants if v not in self.args.references]

    def references(self) -> list[str]:
        return list(self.args.references)

    def option_names(self) -> list[str]:
        inference = [f"bn {mode}" for mode in INFERENCE] if "bn" in self.swept() else []
        return [*self.swept(), *inference, *self.references()]

    def runs(self) -> list[Run]:
        a = self.args
        ips = a.images_per_statistic[0]

        def virtual(v: str) -> int | None:
            batch = NORMS[VARIANTS[v].norm].batch_dependent
            return ips if batch and ips < a.batch_size else None

        if a.phase == "tune":
            return [Run(v, 1, a.batch_size, lr, f"tune/{v}/lr{lr:g}", f"{v} lr {lr:g}",
                        virtual(v)) for v in self.trained() for lr in a.tune_grid[v]]
        return [Run(v, seed, a.batch_size, a.rates.get(v, a.lr), f"{v}/seed{seed}", v,
                    virtual(v))
                for seed in range(1, max(a.plan.values()) + 1) for v in self.trained()
                if seed <= a.plan.get(v, 0)]

    def result(self, run: Run, model: Net, history: dict[str, list[float]], data: Data,
               device: torch.device, s: Settings) -> dict[str, Any]:
        """A run's numbers; the learning-rate grid's runs keep no weights."""
        if run.key.startswith("tune/"):
            return {**super(PerDevice, self).result(run, model, history, data, device, s),
                    "history": history}
        return super().result(run, model, history, data, device, s)

    def load(self) -> Data:
        a = self.args
        return load_data(a.data_dir, a.dataset, a.limit_train, augment=a.augment,
                         holdout=a.holdout if a.phase == "tune" else None)

    def new_record(self, data: Data) -> dict[str, Any]:
        a = self.args
        record = super().new_record(data)
        if a.seeds_from:  # the first seeds, trained before in the same protocol
            record["runs"] = self.imported(data)
            for v in a.plan:
                have = {r["seed"] for r in record["runs"].values() if r["variant"] == v}
                a.plan[v] = max(next(n for n in range(1, len(have) + 2) if n not in have) - 1,
                                a.looks[0])
        record["config"].update(
            margin=a.margin, alpha=a.alpha, max_seeds=a.max_seeds, looks=a.looks,
            options=a.options, phase=a.phase, plan=a.plan, rates=a.rates,
            tune_lr=a.tune_lr, tune_grid=a.tune_grid, holdout=a.holdout,
            precise_images=a.precise_images, seeds_from=[str(f) for f in a.seeds_from])
        record["decisions"] = []
        return record

    def imported(self, data: Data) -> dict[str, dict[str, Any]]:
        """The runs of ``--seeds-from`` folders that this study would train itself: the
        same variant, images per statistic, learning rate, protocol, network and data."""
        a = self.args
        ips = a.images_per_statistic[0]
        spec = modelspec.from_args(a)
        mine = {"epochs": a.epochs, "batch_size": a.batch_size, "dataset": a.dataset,
                "precision": a.precision, "num_groups": a.num_groups,
                "limit_train": a.limit_train, "augment": a.augment,
                "model": spec and (spec.fingerprint, dict(spec.args)),
                "data": data.fingerprint() if data.source else None}
        found: dict[str, dict[str, Any]] = {}
        for folder in a.seeds_from:
            other = _other_record(folder)
            cfg = other["config"]
            theirs = {**{k: cfg.get(k) for k in mine}, "augment": cfg.get("augment"),
                      "model": cfg.get("model") and (cfg["model"]["fingerprint"],
                                                     cfg["model"].get("args", {})),
                      "data": (cfg.get("data") or {}).get("fingerprint")}
            differ = [k for k in mine if mine[k] != theirs[k]
                      and not (k == "data" and None in (mine[k], theirs[k]))]
            if differ:
                raise UsageError(f"--seeds-from {folder}: trained with other "
                                 f"{', '.join(differ)} ({', '.join(f'{theirs[k]}' for k in differ)}"
                                 f"; here {', '.join(f'{mine[k]}' for k in differ)}); give a "
                                 f"folder of the same protocol, network and data")
            env = other.get("environment", {})
            for r in other["runs"].values():
                v = r.get("variant")
                if v not in a.plan or "failed" in r or \
                        r.get("lr", cfg["lr"]) != a.rates.get(v, a.lr) or \
                        r.get("images_per_statistic") not in (None, ips) or \
                        (r.get("images_per_statistic") is None) != (v in self.references()):
                    continue
                found.setdefault(f"{v}/seed{r['seed']}", {
                    **r, "imported_from": {"folder": str(folder.resolve()),
                                           "git_revision": env.get("git_revision"),
                                           "cpu": env.get("cpu")}})
        print(f"taken from {', '.join(map(str, a.seeds_from))}: {len(found)} runs")
        return found

    def more_results(self, run: Run, model: Net, result: dict[str, Any], data: Data,
                     device: torch.device, s: Settings) -> dict[str, Any]:
        """The trained Batch Norm network with each inference remedy (seeds phase)."""
        ips = result["images_per_statistic"]
        if run.variant != "bn" or run.key.startswith("tune/") or ips is None:
            return {}
        return inference_results(model, data, device, run, ips, s, self.args.dataset,
                                 self.args.precise_images, list(INFERENCE))

    def announce(self, data: Data, device: torch.device, verb: str, out: Path) -> str:
        a = self.args
        what = ("choosing learning rates on the held-out split" if a.phase == "tune" else
                f"seeds up to {max(a.plan.values())} of {len(a.options)} options")
        return (f"normlab recommend at {a.images_per_statistic[0]} images per statistic, "
                f"margin {a.margin} points: {what}, {len(self.runs())} runs in all of "
                f"{a.epochs} epoch(s) on {len(data.train_labels):,} "
                f"{shown_dataset(a.dataset)} {data.inputs}, device {device}; {verb} {out}")

    # -- after a pass: decide, and plan the next

    more = False  # the CLI starts another pass when this is set

    def after(self, out: Path, record: dict[str, Any], data: Data, device: torch.device
              ) -> None:
        cfg = record["config"]
        if cfg["phase"] == "tune":
            self._after_tuning(cfg, record)
        else:
            self._after_seeds(cfg, record)
        write_json(out / self.record_name, record)

    def _after_tuning(self, cfg: dict[str, Any], record: dict[str, Any]) -> None:
        extended = False
        for v, grid in cfg["tune_grid"].items():
            errors = {lr: record["runs"][f"tune/{v}/lr{lr:g}"].get("test_error", math.inf)
                      for lr in grid}
            chosen = min(grid, key=lambda lr: (errors[lr], lr))
            edge = chosen in (grid[0], grid[-1]) and len(grid) > 1
            if edge and len(grid) - len(cfg["tune_lr"]) < MAX_GRID_EXTENSIONS:
                step = grid[1] / grid[0] if chosen == grid[0] else grid[-1] / grid[-2]
                grid.append(chosen / step if chosen == grid[0] else chosen * step)
                grid.sort()
                extended = True
            else:
                cfg["rates"][v] = chosen
        if extended:
            print("a chosen learning rate lies at the grid's edge: extending the grid")
        else:
            cfg["phase"] = "seeds"
            print("learning rates chosen on the held-out split: "
                  + ", ".join(f"{v} {lr:g}" for v, lr in cfg["rates"].items()))
        self.more = True

    def _after_seeds(self, cfg: dict[str, Any], record: dict[str, Any]) -> None:
        plan = cfg["plan"]
        if any(f"{v}/seed{seed}" not in record["runs"]  # planned, not trained yet
               for v, n in plan.items() for seed in range(1, n + 1)):
            self.more = True
            return
        seeds = max(plan.values())
        looks = cfg["looks"]
        if seeds in looks and not any(d["seeds"] == seeds for d in record["decisions"]):
            decision = self.decision(record)
            record["decisions"].append(decision_record(decision, seeds))
            open_ = still_open(decision)
            print(f"look at {seeds} seeds: " + "; ".join(
                f"{label(o)} {decision.verdicts[o]}" for o in decision.verdicts))
        else:
            open_ = list(cfg["options"])
        if not open_ or seeds >= looks[-1]:
            record["done"] = True
            self.more = False
            return
        after = next(n for n in looks if n > seeds)
        needed = {o.partition(" ")[0] for o in open_}
        cost = self.cost(record, {v: after - plan[v] for v in needed})
        left = getattr(self.args, "deadline", math.inf) - time.time()
        if not record.get("costs_said"):  # once the first runs have shown what one costs
            print(self.budget_line(record, left))
            record["costs_said"] = True
        if cost > left:
            record["stopped"] = (f"the look at {after} seeds needs about {cost / 60:.0f} min "
                                 f"and {max(left, 0) / 60:.0f} min of the budget are left")
            print(f"stopped: {record['stopped']}; continue with normlab recommend --resume "
                  f"{self.args.out} --budget TIME")
            self.more = False
            return
        for v in needed:
            plan[v] = after
        record.pop("stopped", None)
        self.more = True

    def decision(self, record: dict[str, Any]) -> Decision:
        cfg = record["config"]
        earlier = {o: v for d in record["decisions"] for o, v in d["verdicts"].items()
                   if v in ("worse", "equivalent")}
        errors = {o: list(e.values()) for o, e in options_of(record).items()}
        return decide(errors, margin=cfg["margin"], alpha=cfg["alpha"], looks=cfg["looks"],
                      earlier=earlier)

    def cost(self, record: dict[str, Any], new_seeds: dict[str, int]) -> float:
        """Seconds the next runs take, from each variant's runs so far, shared over jobs."""
        jobs = (record.get("parallel") or {}).get("jobs", 1)
        return sum(n * run_seconds(record, v) for v, n in new_seeds.items()) / max(jobs, 1)

    def budget_line(self, record: dict[str, Any], left: float) -> str:
        cfg = record["config"]
        per_run = {v: run_seconds(record, v) for v in cfg["plan"]}
        total = sum(per_run.values()) * (cfg["looks"][-1] - 1)
        jobs = max((record.get("parallel") or {}).get("jobs", 1), 1)
        seeds = int(left * jobs / max(sum(per_run.values()), 1)) if math.isfinite(left) else 0
        buys = ("no limit (no --budget)" if math.isinf(left) else
                f"{left / 60:.0f} min left, about {seeds} more seeds of every option")
        return (f"a run takes {min(per_run.values()) / 60:.1f}-{max(per_run.values()) / 60:.1f} "
                f"min; every option to {cfg['looks'][-1]} seeds would take about "
                f"{total / jobs / 60:.0f} min more, fewer as options are decided; the budget: "
                f"{buys}")

    def summary(self, result: dict[str, Any]) -> str:
        return inference_summary(result)

    @staticmethod
    def render(out: Path, record: dict[str, Any]) -> None:
        """report.md and recommend.png from recommend.json alone."""
        if record.get("decisions"):
            cfg, last = record["config"], record["decisions"][-1]
            figure(last, cfg["margin"], f"At {cfg['images_per_statistic'][0]} images per "
                   f"statistic, {last['seeds']} seeds: {network(cfg)}",
                   out / "recommend.png")
        report = render_report(record)
        atomic_write(out / "report.md", report)
        print(report.split("\n\n")[1] if record.get("decisions") else "")
        print(f"\nreport: {out / 'report.md'}")


def network(cfg: dict[str, Any]) -> str:
    """The network and data a record measured, in a few words (figure titles)."""
    model = cfg.get("model")
    name = model["spec"].rpartition(":")[2] if model else "normlab's CNN"
    args = ", ".join(f"{k}={v}" for k, v in (model or {}).get("args", {}).items())
    return f"{name}({args}) on {shown_dataset(cfg['dataset'])}" if model else \
        f"{name} on {shown_dataset(cfg['dataset'])}"


def _other_record(folder: Path) -> dict[str, Any]:
    for name in ("remedies.json", "recommend.json"):
        if (folder / name).exists():
            try:
                return json.loads((folder / name).read_text())
            except ValueError as exc:
                raise UsageError(f"--seeds-from {folder / name} is corrupt ({exc})") from None
    raise UsageError(f"--seeds-from {folder}: no remedies.json or recommend.json there; give "
                     f"a folder of normlab remedies or recommend")


def run_seconds(record: dict[str, Any], variant: str) -> float:
    """A run's mean training time, in seconds, over its finished seeds-phase runs."""
    times = [r["wall_time_s"] for k, r in record["runs"].items()
             if r.get("variant") == variant and not k.startswith("tune/") and "failed" not in r]
    return sum(times) / len(times) if times else 0.0


def render_report(record: dict[str, Any]) -> str:
    cfg = record["config"]
    ips = cfg["images_per_statistic"][0]
    lines = [f"# Which normalization at {ips} images per statistic?", ""]
    if not record.get("decisions"):
        lines += ["No look yet: the first decision comes at "
                  f"{cfg['looks'][0]} seeds.", ""]
        return "\n".join(lines + provenance_lines(record)) + "\n"
    last = record["decisions"][-1]
    # The seeds the last look decided on: seeds trained since wait for the next look.
    errors = {o: [x for seed, x in sorted(e.items()) if int(seed) <= last["seeds"]]
              for o, e in options_of(record).items()}
    lines += [answer(last, errors, cfg, record.get("stopped")), ""]
    lines += ["## The decision", ""]
    lines += decision_table(last, errors, cfg["alpha"], record["runs"], ips)
    lines += ["", "## What the verdicts promise", ""]
    lines += promise_lines(last, cfg["margin"], cfg["alpha"])
    lines += ["", "## Looks", "", "| seeds | error spent | decided there |",
              "| ---: | ---: | --- |"]
    seen: set[str] = set()
    for d in record["decisions"]:
        new = [o for o, v in d["verdicts"].items() if v in ("worse", "equivalent")
               and o not in seen]
        seen.update(new)
        lines.append(f"| {d['seeds']} | {d['level']:.4f} | "
                     f"{', '.join(label(o) for o in new) or '--'} |")
    if cfg.get("rates"):
        lines += ["", "## Learning rates", "", f"Chosen per option on {cfg['holdout']:,} "
                  f"training images held out (never the test set), from "
                  f"{', '.join(map(str, cfg['tune_lr']))}, extended where the choice was at "
                  f"the edge: " + ", ".join(f"{VARIANTS[v].label} {lr:g}"
                                             for v, lr in cfg["rates"].items()) + "."]
    lines += ["", "## Protocol", "", f"{protocol(cfg)}; {ips} images per statistic.", ""]
    lines += provenance_lines(record)
    return "\n".join(lines) + "\n"




