"""The per-device statistics study (``normlab statistics``): one optimiser setting, and
Batch Norm's statistics computed over fewer and fewer of the batch's images.

Everything that matters to optimisation is held fixed (global batch, learning rate,
schedule, steps, data order); only the number of images per Batch Norm statistic changes
(``--virtual-batch-size`` inside one process, as that many devices would cut the batch).
Group and Layer Norm, which do not depend on the grouping, are trained once per seed as
references. Then the same under torchrun on 2 processes: plain Batch Norm (statistics per
device) and synchronized Batch Norm (over the global batch). Last, what Batch Norm
normalised with in training against the running estimates it uses at test time (the "why"
figure). Its record is statistics.json; the report and figures are drawn from it alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .. import distributed
from ..checkpoint import WEIGHTS_SUFFIX, atomic_write, load_model, write_json
from ..data import Data, make_loaders, shown_dataset
from ..errors import UsageError, WorkerDied
from ..modelspec import model_argv
from ..norms import statistics_seen
from ..options import add_run_options, positive_int
from ..plots import plot_errors, save_figure, with_note
from ..report import (
    GN_PAPER,
    cell,
    failed_lines,
    gn_paper_rows,
    good_runs,
    protocol,
    provenance_lines,
    time_line,
)
from ..runner import launch_torchrun
from ..variants import VARIANTS
from .perdevice import PerDevice, add_protocol_options
from .sweep import DEFAULT_BATCH_SIZES, and_references

TWO_PROCESSES = "two-processes"
TWO_PROCESS_VARIANTS = ("sbn", "bn")
STATISTICS_BATCHES = 300  # "a few hundred training batches" for the statistics figure


class Statistics(PerDevice):
    """The per-device statistics study: one optimiser setting (global batch, learning rate,
    schedule, steps, data order), and Batch Norm's statistics computed over 2 ... 128 of the
    batch's images (``--virtual-batch-size``), with Group and Layer Norm, which do not depend
    on the grouping, as references. Then the same under torchrun on 2 processes: plain Batch
    Norm (statistics per device) and synchronized Batch Norm (over the global batch)."""

    name = "statistics"
    record_name = "statistics.json"
    position = 2
    help = ("vary only the images per Batch Norm statistic at a fixed global batch (the "
            "per-device effect), with GN/LN references")
    description = ("Hold the optimiser fixed (global batch, learning rate, schedule, steps, "
                   "data order) and train Batch Norm with its statistics over each of the given "
                   "numbers of images, Group and Layer Norm once per seed as references; then "
                   "synchronized and plain Batch Norm under torchrun on --processes processes. "
                   "Writes statistics.json, statistics.png, bn_statistics.png and report.md "
                   "into --out.")
    REFERENCES = ("gn", "ln")

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        p.add_argument("--images-per-statistic", type=positive_int, nargs="+", metavar="B",
                       default=list(DEFAULT_BATCH_SIZES),
                       help="Batch Norm's statistic sizes; each must divide --batch-size "
                       "(default: %(default)s)")
        add_protocol_options(p)
        p.add_argument("--processes", type=positive_int, default=2, metavar="P",
                       help="train sbn and bn data-parallel on P processes with torchrun after "
                       "the one-process runs; 1 skips that part (default: %(default)s)")
        add_run_options(p)

    def check(self) -> None:
        super().check()
        a = self.args
        try:
            under_torchrun = distributed.from_env().distributed
        except ValueError:  # a broken torchrun environment is still not one process
            under_torchrun = True
        if under_torchrun:
            raise UsageError("run normlab statistics as one process: it starts its "
                             "multi-process part with torchrun itself (--processes)")
        if a.processes > 1 and a.batch_size % a.processes:
            raise UsageError(f"--processes {a.processes} does not divide --batch-size "
                             f"{a.batch_size}")

    def swept(self) -> list[str]:
        return ["bn"]

    def references(self) -> list[str]:
        return list(self.REFERENCES)

    def recorded_variants(self) -> dict[str, list[str]]:
        return {"variants": self.variants()}

    def more_config(self) -> dict[str, Any]:
        return {"processes": self.args.processes}

    def announce(self, data: Data, device: torch.device, verb: str, out: Path) -> str:
        a = self.args
        total = len(self.runs())
        two = (f", then sbn and bn on {a.processes} processes (torchrun)"
               if a.processes > 1 else "")
        return (f"normlab statistics: Batch Norm over {' '.join(map(str, a.images_per_statistic))} "
                f"images per statistic{and_references(self.references())} x {len(a.seeds)} "
                f"seed(s) = {total} runs of {a.epochs} epoch(s), global batch {a.batch_size}, "
                f"on {len(data.train_labels):,} {shown_dataset(a.dataset)} {data.inputs}, "
                f"device {device}{two}; "
                f"{verb} {out}")

    def after(self, out: Path, record: dict[str, Any], data: Data, device: torch.device
              ) -> None:
        a = self.args
        if a.processes > 1:
            record["two_processes"] = self._two_processes(out)
            write_json(out / self.record_name, record)
        if "bn_statistics" not in record:
            record["bn_statistics"] = self._statistics_seen(out, record, data, device)
            write_json(out / self.record_name, record)

    def _two_processes(self, out: Path) -> dict[str, Any]:
        """Train sbn and bn with ``torchrun --nproc-per-node P`` (a compare in out/two-processes,
        resumed if it was interrupted) and return what the statistics report needs of it."""
        a, part = self.args, out / TWO_PROCESSES
        record = part / "metrics.json"
        metrics = json.loads(record.read_text()) if record.exists() else None
        if metrics is None or not _complete(metrics, a.seeds):
            data_dir = ["--data-dir", str(a.data_dir)] if a.data_dir else []
            args = ["--resume", str(part), *data_dir] if metrics is not None else [
                "--variants", *TWO_PROCESS_VARIANTS, "--seeds", *map(str, a.seeds),
                "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                "--lr", str(a.lr), "--num-groups", str(a.num_groups), "--dataset", a.dataset,
                "--precision", a.precision, "--device", "cpu", "--no-progress",
                "--out", str(part), *data_dir, *model_argv(a.model, a.model_arg),
                *(["--augment", a.augment] if a.augment else []),
                *(["--limit-train", str(a.limit_train)] if a.limit_train else [])]
            print(f"normlab statistics: sbn and bn on {a.processes} processes: "
                  f"torchrun ... compare {shlex.join(args)}", flush=True)
            code = launch_torchrun(a.processes, ["compare", *args])
            if code != 0:
                raise WorkerDied(f"the {a.processes}-process part (torchrun, in {part}) "
                                 f"failed with exit code {code}, its error is above; the "
                                 f"finished runs are saved: resume with normlab statistics "
                                 f"--resume {out}")
            metrics = json.loads(record.read_text())
        per_device = a.batch_size // a.processes
        return {"folder": TWO_PROCESSES, "command": metrics["command"],
                "git_revision": metrics["environment"]["git_revision"],
                "processes": a.processes,
                "images_per_statistic": {"sbn": a.batch_size, "bn": per_device},
                "runs": {name: {str(r["seed"]): {"test_acc": r["history"]["test_acc"][-1],
                                                 "test_error": 100 - r["history"]["test_acc"][-1],
                                                 "wall_time_s": r["wall_time_s"]}
                                for r in good_runs(v)}
                         for name, v in metrics["variants"].items()}}

    def _statistics_seen(self, out: Path, record: dict[str, Any], data: Data,
                         device: torch.device) -> dict[str, Any]:
        """For the first seed's Batch Norm models at the fewest and the most images per
        statistic: what each Batch Norm layer normalised with over STATISTICS_BATCHES
        training batches, against the running estimates it uses at test time. Kept in full
        for channel 0 of the last layer (the figure), summarised for every layer."""
        a = self.args
        seed = a.seeds[0]
        seen: dict[str, Any] = {"seed": seed, "channel": 0, "by_images": {}}
        train_loader, _ = make_loaders(data, a.batch_size, seed, device)
        batches = [x for x, _ in islice(train_loader, STATISTICS_BATCHES)
                   if len(x) == a.batch_size]  # the same batches for every model
        for ips in sorted({min(a.images_per_statistic), max(a.images_per_statistic)}):
            weights = out / f"bn_ips{ips}_seed{seed}{WEIGHTS_SUFFIX}"
            result = record["runs"].get(f"bn/ips{ips}/seed{seed}", {})
            if not weights.exists() or "failed" in result:
                continue
            model = load_model(weights, device)
            stats = statistics_seen(model, batches, ips)
            names = {name: f"after {model.architecture[int(name.split('.')[1])][0]}"
                     if hasattr(model, "architecture") else name  # a --model network's own
                     for name in stats}
            last = stats[list(stats)[-1]]
            seen.update(batches=len(batches), layer=names[list(stats)[-1]])
            seen["by_images"][str(ips)] = {
                "test_error": result["test_error"],
                "mean": last["mean"][:, 0].tolist(), "var": last["var"][:, 0].tolist(),
                "running_mean": float(last["running_mean"][0]),
                "running_var": float(last["running_var"][0]),
                # Per layer, medians over its channels: how far one batch's statistics stray
                # from the running ones (standard deviation over batches, in running standard
                # deviations for the mean and as a fraction of the running variance), and the
                # average batch variance over the running variance (1: no train/test shift).
                "layers": {names[name]: {
                    "mean_noise": float((st["mean"].std(0) / st["running_var"].sqrt()).median()),
                    "var_noise": float((st["var"].std(0) / st["running_var"]).median()),
                    "var_ratio": float((st["var"].mean(0) / st["running_var"]).median())}
                    for name, st in stats.items()}}
        return seen

    def summary(self, result: dict[str, Any]) -> str:
        return f"test error {result['test_error']:5.2f}%  {result['wall_time_s']:5.1f}s"

    @staticmethod
    def render(out: Path, record: dict[str, Any]) -> None:
        """statistics.png, bn_statistics.png and report.md, from statistics.json's contents."""
        errors, seen = figures(record)
        if errors is not None:
            save_figure(errors, out / "statistics.png")
        if seen is not None:
            save_figure(seen, out / "bn_statistics.png")
        report = render_report(record)
        atomic_write(out / "report.md", report)
        print("\n".join(line for line in report.splitlines()[:12] if line.startswith("|")))
        print(f"\nreport: {out / 'report.md'}")


def _complete(metrics: dict[str, Any], seeds: list[int]) -> bool:
    """Whether a compare record holds a finished run of every variant for every seed."""
    variants = metrics["variants"]
    return all(v in variants and {r["seed"] for r in variants[v].get("runs", [])} >= set(seeds)
               for v in TWO_PROCESS_VARIANTS)


def statistics_table(results: dict[str, Any]) -> tuple[dict[int, list[float]],
                                                        dict[str, list[float]]]:
    """(Batch Norm's test errors by images per statistic, the references' errors by
    variant), over seeds in run order; failed runs left out (the report lists them)."""
    bn: dict[int, list[float]] = {}
    references: dict[str, list[float]] = {}
    for r in results["runs"].values():
        if "failed" in r:
            continue
        if r.get("images_per_statistic"):
            bn.setdefault(r["images_per_statistic"], []).append(r["test_error"])
        else:
            references.setdefault(r["variant"], []).append(r["test_error"])
    return dict(sorted(bn.items())), references


def render_report(results: dict[str, Any]) -> str:
    """report.md for the per-device statistics study."""
    cfg = results["config"]
    bn, references = statistics_table(results)
    sizes = list(bn)
    seeds = cfg["seeds"]
    over = f"mean (min–max) over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 \
        else f"seed {seeds[0]}"
    lines = [
        "# normlab per-device statistics study",
        "",
        f"Everything that matters to optimisation is held fixed: {protocol(cfg)}. "
        f"Only the number of images each Batch Norm statistic is computed over changes "
        f"(`--virtual-batch-size`: each batch cut into parts as that many devices would cut "
        f"it). Group and Layer Norm normalise every image on its own, so their result does "
        f"not depend on the grouping: they are trained once per seed as references. "
        f"Test error (%) on all {cfg['test_images']:,} test images, {over}.",
        "",
        "| images per statistic | " + " | ".join(map(str, sizes)) + " |",
        "| --- |" + " ---: |" * len(sizes),
        "| Batch Norm (bn) | " + " | ".join(cell(bn[b]) for b in sizes) + " |",
    ]
    for v, errors in references.items():
        lines.append(f"| {VARIANTS[v].label} ({v}), any grouping | "
                     + " | ".join(cell(errors) for _ in sizes) + " |")
    lines += failed_lines(results["runs"])
    lines += ["", "![test error vs images per statistic](statistics.png)", ""]
    lines += _two_process_lines(results)
    lines += _paper_lines(bn, references)
    lines += _seen_lines(results)
    lines += [
        "## Every run",
        "",
        "| variant | images per statistic | seed | test error | test loss | train loss | time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {r['variant']} | {r.get('images_per_statistic') or 'any'} | {r['seed']} | "
          + (f"failed: {r['failed']} | | | |" if "failed" in r else
             f"{r['test_error']:.2f}% | {r['test_loss']:.4f} | {r['train_loss']:.4f} | "
             f"{r['wall_time_s']:.0f} s |")
          for r in results["runs"].values()),
        "",
        *provenance_lines(results, Statistics.command_today(results)),
        *_time_lines(results),
        "",
    ]
    return "\n".join(lines)


def _time_lines(results: dict[str, Any]) -> list[str]:
    lines = [time_line(results, sum(r["wall_time_s"] for r in results["runs"].values()),
                       " in one process")]
    two = results.get("two_processes")
    if two:
        more = sum(s["wall_time_s"] for v in two["runs"].values() for s in v.values())
        lines.append(f"- the {two['processes']}-process part ({two['folder']}/): training time "
                     f"{more:.0f} s, the sum over runs, at git revision "
                     f"`{two.get('git_revision', 'see its metrics.json')}`")
    return lines


def _two_process_lines(results: dict[str, Any]) -> list[str]:
    """The torchrun runs next to the one-process runs that compute the same statistics."""
    two = results.get("two_processes")
    if not two:
        return []
    seeds = [str(s) for s in results["config"]["seeds"]]
    one: dict[int, dict[str, float]] = {}  # images per statistic -> seed -> test error
    for r in results["runs"].values():
        if r.get("images_per_statistic") and "failed" not in r:
            one.setdefault(r["images_per_statistic"], {})[str(r["seed"])] = r["test_error"]
    p = two["processes"]
    lines = [
        f"## On {p} processes (torchrun, gloo)",
        "",
        f"The same runs data-parallel over {p} processes ({two['folder']}/, a `normlab "
        f"compare`): plain Batch Norm normalises over each process's "
        f"{two['images_per_statistic']['bn']} images, synchronized Batch Norm over all "
        f"{two['images_per_statistic']['sbn']}. Each should equal the one-process run with "
        f"the same images per statistic: in exact arithmetic they are the same computation "
        f"(tests/test_distributed.py asserts that they agree to 1e-9 in float64); in float32 "
        f"the two orders of summation round differently, and those differences grow over "
        f"thousands of steps, so per seed they agree only to within seed-to-seed noise.",
        "",
        "| run | images per statistic | test error | one process, same statistics | "
        "per-seed difference (points) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name in ("sbn", "bn"):
        runs = two["runs"].get(name, {})
        ips = two["images_per_statistic"][name]
        mine = [runs[s]["test_error"] for s in seeds if s in runs]
        match = one.get(ips, {})
        diffs = ", ".join(f"{runs[s]['test_error'] - match[s]:+.2f}" for s in seeds
                          if s in runs and s in match)
        lines.append(f"| {name} on {p} processes | {ips}{' per process' if name == 'bn' else ''}"
                     f" | {cell(mine)} | {cell(list(match.values()))} | {diffs or '–'} |")
    return [*lines, ""]


def _paper_lines(bn: dict[int, list[float]], references: dict[str, list[float]]) -> list[str]:
    sizes = GN_PAPER["images"]
    gn = references.get("gn", [])
    return [
        "## Next to the Group Norm paper",
        "",
        "Wu & He (2018), Table 2 / Figure 1: ImageNet top-1 error (%) of ResNet-50 by images "
        "per GPU (= per Batch Norm statistic), against this study's MNIST test error (%). "
        "The scales differ by two orders of magnitude; compare the shapes.",
        "",
        *gn_paper_rows([f"{np.mean(bn[b]):.2f}" if b in bn else "–" for b in sizes],
                       [f"{np.mean(gn):.2f}" if gn else "–" for _ in sizes], ", MNIST (here)"),
        "",
    ]


def _seen_lines(results: dict[str, Any]) -> list[str]:
    seen = results.get("bn_statistics")
    if not seen or not seen.get("by_images"):
        return []
    by = seen["by_images"]
    sizes = sorted(by, key=int)
    lines = [
        "## Why: what Batch Norm normalises with in training, and at test time",
        "",
        f"The seed-{seen['seed']} Batch Norm models, in training mode, on "
        f"{seen['batches']} training batches: the mean and variance that channel "
        f"{seen['channel']} of the last Batch Norm layer ({seen['layer']}) normalises "
        f"with, computed over the first {' or '.join(sizes)} images of each batch, against "
        f"the running estimates that the same layer uses at test time.",
        "",
        "![per-batch statistics vs running estimates](bn_statistics.png)",
        "",
        "Every Batch Norm layer, medians over its channels: the spread of a batch's mean "
        "(in running standard deviations) and variance (as a fraction of the running "
        "variance) from batch to batch, and the average batch variance over the running "
        "variance (1 = training and test normalise alike).",
        "",
        "| layer | " + " | ".join(f"mean spread, {s} images | variance spread, {s} | "
                                   f"variance ratio, {s}" for s in sizes) + " |",
        "| --- |" + " ---: |" * (3 * len(sizes)),
    ]
    for layer in by[sizes[0]]["layers"]:
        cells = []
        for s in sizes:
            x = by[s]["layers"][layer]
            cells += [f"{x['mean_noise']:.3f}", f"{x['var_noise']:.3f}", f"{x['var_ratio']:.3f}"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_statistics(bn: Mapping[int, Sequence[float]],
                    references: Mapping[str, Sequence[float]],
                    points: Sequence[tuple[str, int, Sequence[float]]], title: str,
                    note: str = "", path: str | Path | None = None) -> Figure:
    """Test error vs images per Batch Norm statistic (log-log): Batch Norm as a line over
    the sizes (mean, band min–max over seeds); the references (Group / Layer Norm, whose
    computation does not depend on the grouping) as flat lines with their seed bands; and
    separate ``points`` (label, images per statistic, errors), e.g. the multi-process runs."""
    return plot_errors({"Batch Norm, one process (--virtual-batch-size)": bn},
                       "images per Batch Norm statistic (log scale)", title,
                       {f"{label} (any grouping)": e for label, e in references.items()},
                       points, note, path, legend_size=8)


def figures(results: Mapping[str, Any]) -> tuple[Figure | None, Figure | None]:
    """The statistics study's two figures from its record (statistics.json): test error vs
    images per statistic, and what Batch Norm normalises with (None where the record has
    nothing to draw yet)."""
    cfg = results["config"]
    bn, references = statistics_table(results)
    two = results.get("two_processes")
    points = []
    for name, label in (("sbn", "synchronized Batch Norm"), ("bn", "Batch Norm")):
        errors = [r["test_error"] for r in (two or {}).get("runs", {}).get(name, {}).values()]
        if errors:
            points.append((f"{label}, {two['processes']} processes (torchrun)",
                           two["images_per_statistic"][name], errors))
    seeds = cfg["seeds"]
    held = (f"held fixed: global batch {cfg['batch_size']}, peak lr {cfg['lr']} (one-cycle), "
            f"{cfg['epochs']} epoch(s) over {cfg['train_images']:,} images, data order; "
            + (f"mean and min–max of seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
               else f"seed {seeds[0]}"))
    errors_figure = plot_statistics(
        bn, {f"{VARIANTS[v].label} ({v})": e for v, e in references.items()}, points,
        f"Test error vs images per Batch Norm statistic ({shown_dataset(cfg['dataset'])})",
        held) if bn else None
    seen = results.get("bn_statistics", {})
    seen_figure = plot_statistics_seen(
        seen["by_images"], f"What Batch Norm normalises with: {seen['layer']}, channel "
        f"{seen['channel']}", f"seed-{seen['seed']} models in training mode on "
        f"{seen['batches']} training batches of {cfg['batch_size']}; each statistic over the "
        f"first N images of a batch; red: the running estimate eval mode uses"
    ) if seen.get("by_images") else None
    return errors_figure, seen_figure


def plot_statistics_seen(seen: Mapping[str, Mapping[str, object]], title: str, note: str = "",
                         path: str | Path | None = None) -> Figure:
    """For one Batch Norm channel: histograms of the per-batch mean and variance it was
    normalised with in training (one row per number of images per statistic), with the
    running estimate that eval mode uses marked -- the noise and the train/test mismatch."""
    rows = sorted(seen, key=int)
    fig = Figure(figsize=(10, 2.6 * len(rows) + 1.2), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    # Shared bins per column, so that the rows compare at a glance; variances on a log axis
    # (with 2 images they span orders of magnitude).
    means = np.concatenate([np.asarray(seen[r]["mean"]) for r in rows])
    variances = np.concatenate([np.asarray(seen[r]["var"]) for r in rows])
    positive = variances[variances > 0]
    floor = positive.min() if positive.size else 1e-6
    bins = {"mean": np.linspace(means.min(), means.max(), 41),
            "var": np.geomspace(floor, max(variances.max(), floor * 10), 41)}
    for row, ips in zip(axes, rows, strict=True):
        s = seen[ips]
        for ax, key, running, what in ((row[0], "mean", s["running_mean"], "mean"),
                                       (row[1], "var", s["running_var"], "variance")):
            v = np.clip(np.asarray(s[key], dtype=float), bins[key][0], None)
            ax.hist(v, bins=bins[key], color="C0", alpha=0.75,
                    label=f"{len(v)} training batches (spread: std {np.std(v):.3g})")
            ax.axvline(running, color="C3", linewidth=2,
                       label=f"running estimate, used at test time: {running:.3g}")
            ax.axvline(np.mean(v), color="k", linestyle=":",
                       label=f"average over the batches: {np.mean(v):.3g}")
            if key == "var":
                ax.set_xscale("log")
            ax.set(xlabel=f"per-batch {what} of the channel (log scale)" if key == "var"
                   else f"per-batch {what} of the channel", ylabel="batches")
            ax.set_title(f"{ips} images per statistic: {what} "
                         f"(test error {s['test_error']:.2f}%)", fontsize=10)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.45)  # room for the legend above the bars
            ax.legend(fontsize=7, loc="upper left")
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    return with_note(fig, note, path)
