"""The remedies study (``normlab remedies``): what fixes Batch Norm when each statistic covers
few images -- Batch Renorm, EvoNorm-B0, Weight Standardization, FRN, EvoNorm-S0, PreciseBN
and batch statistics at test -- in the per-device protocol of the statistics study.

The protocol is ``normlab statistics``': one optimiser setting (global batch 128, learning
rate, one-cycle schedule, steps, data order per seed); only the number of images per
statistic changes, by virtual batches inside one process. The batch-dependent variants
(``bn``, ``brn``, ``evob0``) are trained at each number of images per statistic; the
batch-independent ones (``gn``, ``gn+ws``, ``ln``, ``ln+ws``, ``frn``, ``evos0``) once per seed
as references. Every batch-dependent run is also evaluated with Batch Norm's inference
remedies (``normlab.evaluate``: PreciseBN over the whole batch and over the training
grouping, and batch statistics at test), which need no retraining. The report sets each
remedy against plain Batch Norm at the same size, paired by seed, and beside the papers'
numbers. Its record is remedies.json; the report and figure are drawn from it alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..checkpoint import atomic_write
from ..data import Data, shown_dataset
from ..errors import UsageError
from ..evaluate import DEFAULT_PRECISE_IMAGES
from ..model import Net, count_parameters
from ..norms import NORMS
from ..options import add_run_options, positive_int
from ..plots import draw_errors, with_note
from ..report import (
    GN_PAPER,
    cell,
    failed_lines,
    gn_paper_rows,
    protocol,
    provenance_lines,
    time_line,
)
from ..stats import paired_difference
from ..variants import VARIANTS
from .base import Run, Settings
from .decision import decided_lines
from .perdevice import PerDevice, add_protocol_options, inference_results, inference_summary
from .ranking import (
    MIN_RANKING_SEEDS,
    claim_lines,
    difference_lines,
    lr_check_lines,
    mechanism_lines,
    ranking_lines,
    share_cells,
    transfer_lines,
)
from .sweep import and_references

SWEPT = ("bn", "brn", "evob0")  # depend on the batch: trained at every size
REFERENCES = ("gn", "gn+ws", "ln", "ln+ws", "frn", "evos0")  # do not: once per seed
SIZES = (2, 4, 8, 32, 128)
INFERENCE = ("precise", "precise-grouped", "batch")  # no retraining (normlab.evaluate)
# Also recorded for every batch-dependent run since the ten-seed extension (seeds 1-3 of the
# committed records predate it): PreciseBN over augmented training batches, as fvcore does it.
RECORDED = (*INFERENCE, "precise-augmented")

# Published numbers to set the results beside (ImageNet top-1 error, %, unless stated).
PAPERS = [
    ("Wu & He 2018 (Group Norm), Table 2 and text", "ResNet-50, 4 images per GPU",
     "BN 27.3, Batch Renorm 26.3 (r_max 1.5, d_max 0.5), GN 24.2; at 32 per GPU BN 23.6"),
    ("Ioffe 2017 (Batch Renorm), Fig. 2", "Inception-v3, 4 images per batch (accuracy)",
     "BN 74.2 (210k steps), Batch Renorm 76.5 (130k); 78.3 with 32 per batch"),
    ("Qiao et al. 2019 (Weight Standardization), Table 1", "ResNet-50, 1 image per GPU",
     "GN 24.81 → GN+WS 23.72; LN 27.22 → 24.60; BN at 64 per GPU 24.30"),
    ("Wu & Johnson 2021 (Rethinking Batch in BatchNorm), figure", "normalization batch 2",
     "about 32.5 with population statistics at test, about 26 with mini-batch statistics "
     "at test; about 23.5 at 16 and more"),
    ("Singh & Krishnan 2020 (FRN)", "ResNetV2-50, 32 images per GPU",
     "BN 23.8, FRN 22.8"),
    ("Liu et al. 2020 (EvoNorm), Table 4 and text", "ResNet-50 and MobileNetV2, small batches",
     "EvoNorm-S0 reported ahead of BN-ReLU at small batches and of GN-ReLU"),
]


class Remedies(PerDevice):
    name = "remedies"
    record_name = "remedies.json"
    other_rates = True  # the learning-rate check
    position = 3
    help = ("what fixes Batch Norm at few images per statistic: Batch Renorm, EvoNorm, WS, "
            "FRN, PreciseBN, batch statistics at test, in the statistics study's protocol")
    description = ("Hold the optimiser fixed (global batch, learning rate, schedule, steps, "
                   "data order) and train the batch-dependent variants with their statistics "
                   "over each of the given numbers of images, the batch-independent ones once "
                   "per seed; evaluate every batch-dependent run also with PreciseBN and with "
                   "batch statistics at test. Writes remedies.json, remedies.png and report.md "
                   "into --out.")

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        batch_dependent = [v for v, x in VARIANTS.items() if NORMS[x.norm].batch_dependent
                           and not NORMS[x.norm].synchronized]
        p.add_argument("--variants", nargs="+", choices=batch_dependent, default=list(SWEPT),
                       metavar="VARIANT", help=f"batch-dependent variants, trained at every "
                       f"size (default: {' '.join(SWEPT)})")
        p.add_argument("--references", nargs="*", default=list(REFERENCES), metavar="VARIANT",
                       choices=[v for v, x in VARIANTS.items()
                                if not NORMS[x.norm].batch_dependent],
                       help=f"batch-independent variants, trained once per seed (default: "
                       f"{' '.join(REFERENCES)})")
        p.add_argument("--images-per-statistic", type=positive_int, nargs="+", metavar="B",
                       default=list(SIZES), help="each must divide --batch-size (default: "
                       "%(default)s)")
        add_protocol_options(p, groups="Group Norm and EvoNorm-S0",
                             epochs_note=", as the statistics study")
        p.add_argument("--precise-images", type=positive_int, metavar="N",
                       default=DEFAULT_PRECISE_IMAGES, help="training images PreciseBN "
                       "recomputes the statistics over (default: %(default)s)")
        add_run_options(p)

    def check(self) -> None:
        super().check()
        a = self.args
        if a.precise_images < a.batch_size:
            raise UsageError(f"--precise-images {a.precise_images} is below one batch of "
                             f"{a.batch_size} images; give at least {a.batch_size}")

    def swept(self) -> list[str]:
        return [v for v in self.args.variants if v not in self.args.references]

    def references(self) -> list[str]:
        return list(self.args.references)

    def more_config(self) -> dict[str, Any]:
        return {"precise_images": self.args.precise_images}

    def more_results(self, run: Run, model: Net, result: dict[str, Any], data: Data,
                     device: torch.device, s: Settings) -> dict[str, Any]:
        """A batch-dependent run's test error with each inference remedy."""
        ips = result["images_per_statistic"]
        if ips is None:
            return {}
        return inference_results(model, data, device, run, ips, s, self.args.dataset,
                                 self.args.precise_images, RECORDED)

    def announce(self, data: Data, device: torch.device, verb: str, out: Path) -> str:
        a = self.args
        return (f"normlab remedies: {' '.join(self.swept())} over "
                f"{' '.join(map(str, a.images_per_statistic))} images per statistic"
                f"{and_references(self.references())} x {len(a.seeds)} seed(s) = "
                f"{len(self.runs())} runs of {a.epochs} epoch(s), global batch {a.batch_size}, on "
                f"{len(data.train_labels):,} {shown_dataset(a.dataset)} {data.inputs}, "
                f"device {device}; {verb} {out}")

    def summary(self, result: dict[str, Any]) -> str:
        return inference_summary(result)

    @staticmethod
    def render(out: Path, record: dict[str, Any]) -> None:
        """remedies.png and report.md from remedies.json's contents (and the record it is
        set beside, if any: ``normlab report --beside``)."""
        figure(record, out / "remedies.png")
        report = render_report(record, beside_record(out, record))
        atomic_write(out / "report.md", report)
        print("\n".join(line for line in report.splitlines()[:24] if line.startswith("|")))
        print(f"\nreport: {out / 'report.md'}")


# -- what the record holds, by line of the table

def errors_by_size(record: dict[str, Any]) -> dict[str, dict[int, dict[int, float]]]:
    """line -> images per statistic -> seed -> test error, for every batch-dependent variant
    and each of its inference remedies ("bn", "bn precise", ...); failed runs left out."""
    lines: dict[str, dict[int, dict[int, float]]] = {}
    for r in _at_recipe(record).values():
        if "failed" in r or r.get("images_per_statistic") is None:
            continue
        ips = r["images_per_statistic"]
        lines.setdefault(r["variant"], {}).setdefault(ips, {})[r["seed"]] = r["test_error"]
        for mode, e in r.get("inference", {}).items():
            lines.setdefault(f"{r['variant']} {mode}", {}).setdefault(ips, {})[r["seed"]] = \
                e["test_error"]
    return lines


def reference_errors(record: dict[str, Any]) -> dict[str, dict[int, float]]:
    """reference variant -> seed -> test error."""
    table: dict[str, dict[int, float]] = {}
    for r in _at_recipe(record).values():
        if "failed" not in r and r.get("images_per_statistic") is None:
            table.setdefault(r["variant"], {})[r["seed"]] = r["test_error"]
    return table


def _at_recipe(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The runs at the study's own learning rate (a learning-rate check adds others)."""
    return {k: r for k, r in record["runs"].items()
            if r.get("lr", record["config"]["lr"]) == record["config"]["lr"]}


def _label(line: str) -> str:
    variant, _, mode = line.partition(" ")
    names = {"precise": "PreciseBN", "precise-grouped": "PreciseBN over the training grouping",
             "batch": "batch statistics at test",
             "precise-augmented": "PreciseBN over augmented training batches"}
    return f"{VARIANTS[variant].label} ({variant})" + (f", {names[mode]}" if mode else "")


def figure(record: dict[str, Any], path: Path | None = None) -> Figure:
    """Test error vs images per statistic, in two panels: what changes training (every
    batch-dependent variant a line, the batch-independent ones as flat bands), and what
    changes only the statistics at test (Batch Norm with each inference remedy)."""
    cfg = record["config"]
    lines = errors_by_size(record)
    references = {f"{_label(v)}, any grouping": list(e.values())
                  for v, e in reference_errors(record).items()}
    fig = Figure(figsize=(13, 6.8), layout="constrained")
    train_ax, test_ax = fig.subplots(1, 2)  # own scales: the right one reaches far higher
    xlabel = "images per statistic (log scale)"
    draw_errors(train_ax, {_label(line): _seeds(by) for line, by in lines.items()
                           if " " not in line}, xlabel,
                "Remedies in training (references: flat bands)", references,
                reference_alpha=0.05)  # six bands overlap
    sizes = {b for by in lines.values() for b in by}
    bn = {line: by for line, by in lines.items() if line.partition(" ")[0] == "bn"}
    complete = {line: by for line, by in bn.items() if set(by) == sizes}
    styles = {_label(line): dict(color=f"C{i}", linestyle="-" if i == 0 else "--")
              for i, line in enumerate(complete)}
    # A remedy measured at a few sizes only (a later addition) as points, not a line.
    points = [(_label(line), b, list(by[b].values())) for line, by in bn.items()
              if line not in complete for b in sorted(by)]
    draw_errors(test_ax, {_label(line): _seeds(by) for line, by in complete.items()}, xlabel,
                "Batch Norm's remedies at test (no retraining)", points=points, styles=styles)
    for ax in (train_ax, test_ax):
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2)
    fig.suptitle("What fixes Batch Norm at few images per statistic "
                 f"({shown_dataset(cfg['dataset'])})")
    seeds = cfg["seeds"]
    seeds = (f"{seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1))
             and len(seeds) > 2 else ", ".join(map(str, seeds)))
    counts = {len(s) for by in lines.values() for s in by.values()}
    fewer = " (fewer at some sizes)" if len(counts) > 1 else ""
    return with_note(fig, f"held fixed: global batch {cfg['batch_size']}, peak lr {cfg['lr']} "
                     f"(one-cycle), {cfg['epochs']} epoch(s) over {cfg['train_images']:,} "
                     f"images, data order; mean and min–max of seeds {seeds}{fewer}; PreciseBN "
                     f"over {cfg['precise_images']:,} training images", path)


def _seeds(by: dict[int, dict[int, float]]) -> dict[int, list[float]]:
    return {b: list(s.values()) for b, s in by.items()}


# -- the report

def beside_record(out: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The remedies record this one is set beside (``record["beside"]["folder"]``, relative
    to ``out``), or None."""
    if "beside" not in record:
        return None
    path = out / record["beside"]["folder"] / Remedies.record_name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"normlab remedies: {path} cannot be read; the report leaves out the "
              f"comparison with it")
        return None


def network_name(record: dict[str, Any]) -> str:
    """What trained a record's runs, in a few words."""
    model = record["config"].get("model")
    if model is None:
        return "normlab's small CNN"
    args = ", ".join(f"{k}={v}" for k, v in model.get("args", {}).items())
    return f"{model['spec'].rpartition('/')[2]}({args})"


def render_report(record: dict[str, Any], beside: dict[str, Any] | None = None) -> str:
    """report.md for the remedies study; ``beside``: another network's record, whose verdicts
    are checked on this one."""
    cfg = record["config"]
    lines_by = errors_by_size(record)
    references = reference_errors(record)
    sizes = sorted({b for by in lines_by.values() for b in by})
    seeds = cfg["seeds"]
    counts = {b: max(len(by.get(b, {})) for by in lines_by.values()) for b in sizes}
    heads = [f"{b} per statistic" + (f" ({counts[b]} seeds)" if len(set(counts.values())) > 1
                                     else "") for b in sizes]
    text = [
        "# normlab small-batch remedies study",
        "",
        f"The per-device protocol of the statistics study: {protocol(cfg)}; only the number "
        f"of images each batch statistic covers changes (virtual batches, as that many "
        f"devices would cut the batch). Batch-dependent variants are trained at every "
        f"size; batch-independent ones once per seed (any grouping). Every batch-dependent "
        f"run is also evaluated, without retraining, with PreciseBN (population statistics "
        f"recomputed with the final weights over {cfg['precise_images']:,} training images, "
        f"each statistic over a whole batch of {cfg['batch_size']}, or over the training "
        f"grouping) and with batch statistics at test (the test set in groups of the same "
        f"size). Test error (%) on all "
        f"{cfg['test_images']:,} test images, mean (min–max) over seeds "
        f"{', '.join(map(str, seeds))}" + (" (each column says how many it has; a cell with "
                                           "fewer says so in brackets)."
                                           if len(set(counts.values())) > 1 else "."),
        "",
        "| variant | " + " | ".join(heads) + " |",
        "| --- |" + " ---: |" * len(sizes),
    ]
    for line, by in lines_by.items():
        text.append(f"| {_label(line)} | " + " | ".join(
            _cell(list(by.get(b, {}).values()), counts[b]) for b in sizes) + " |")
    for v, e in references.items():
        text.append(f"| {_label(v)}, any grouping | "
                    + " | ".join(_cell(list(e.values()), counts[b]) for b in sizes) + " |")
    text += failed_lines(_at_recipe(record))
    text += ["", "![test error vs images per statistic](remedies.png)", ""]
    text += decided_lines(record, lines_by, references)
    text += difference_lines(lines_by, references, sizes, _label)
    text += ranking_lines(lines_by, references, sizes, _label)
    text += _recovered_lines(lines_by, references, sizes)
    text += mechanism_lines(lines_by, sizes, _label)
    text += claim_lines(lines_by, references, _label)
    text += lr_check_lines(record, _label)
    if beside is not None:
        text += transfer_lines((lines_by, references),
                               (errors_by_size(beside), reference_errors(beside)),
                               (network_name(record), network_name(beside)), _label)
    text += _paper_lines(lines_by, references, cfg)
    text += _parameter_lines(record)
    rates = len({r.get("lr", cfg["lr"]) for r in record["runs"].values()}) > 1
    text += [
        "## Every run",
        "",
        "| variant | images per statistic | seed | " + ("lr | " if rates else "")
        + "test error | " + " | ".join(RECORDED) + " | test loss | train loss | time |",
        "| --- | ---: | ---: |" + (" ---: |" if rates else "") + " ---: |"
        + " ---: |" * len(RECORDED) + " ---: | ---: | ---: |",
        *(_run_row(r, rates) for r in record["runs"].values()),
        "",
        *provenance_lines(record, Remedies.command_today(record)),
        time_line(record, sum(r["wall_time_s"] for r in record["runs"].values()))
        + " (each epoch's training and test evaluation; the inference remedies' evaluations "
        "not counted)",
        "",
    ]
    return "\n".join(text)


def _cell(values: list[float], seeds: int) -> str:
    return cell(values) + (f" [{len(values)} seeds]" if 1 < len(values) < seeds else "")


def _run_row(r: dict[str, Any], rates: bool) -> str:
    head = (f"| {r['variant']} | {r.get('images_per_statistic') or 'any'} | {r['seed']} | "
            + (f"{r['lr']} | " if rates else ""))
    if "failed" in r:
        return head + f"failed: {r['failed']} |" + " |" * (len(RECORDED) + 3)
    inference = r.get("inference", {})
    remedies = " | ".join(f"{inference[m]['test_error']:.2f}%" if m in inference else "–"
                          for m in RECORDED)
    return (head + f"{r['test_error']:.2f}% | {remedies} | {r['test_loss']:.4f} | "
            f"{r['train_loss']:.4f} | {r['wall_time_s']:.0f} s |")


def _mean(by: dict[int, float] | None) -> float | None:
    return float(np.mean(list(by.values()))) if by else None


def _recovered_lines(lines_by: dict[str, dict[int, dict[int, float]]],
                     references: dict[str, dict[int, float]], sizes: list[int]) -> list[str]:
    """How much of Batch Norm's loss at the fewest images each remedy wins back."""
    bn = lines_by.get("bn", {})
    small, large = min(sizes), max(sizes)
    if small == large or small not in bn or large not in bn:
        return []
    loss = paired_difference(bn[small], bn[large])
    text = [
        f"## How much of Batch Norm's loss at {small} images per statistic each remedy wins "
        f"back",
        "",
        f"Plain Batch Norm's test error at {small} images per statistic minus at {large}: "
        f"**{loss.mean:+.2f} points** ({loss.low:+.2f} to {loss.high:+.2f}, paired 95% "
        f"interval over {loss.n} seeds). The inference remedies change only the statistics "
        f"used at test (\"at test only\"), so what they win back is the train/test "
        f"inconsistency; what only a different training normalization wins back is the cost "
        f"of noisy statistics in training. Won back: plain Batch Norm's error at {small} minus "
        f"the remedy's, paired by seed. Share of the loss won back (100%: as good as Batch "
        f"Norm at {large}; negative: worse than plain Batch Norm at {small}) with its 95% "
        f"Fieller interval (the ratios a paired t-test does not reject) where at least "
        f"{MIN_RANKING_SEEDS} seeds have all three numbers; a ratio is uncertain where its "
        f"divisor is, so these intervals are wide:",
        "",
        "| remedy | kind | test error at " + str(small) + " | won back (points) | share |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    candidates = {line: by.get(small) for line, by in lines_by.items() if line != "bn"}
    candidates.update(references)
    for line, errors in candidates.items():
        if not errors or len(errors.keys() & bn[small].keys()) < 2:
            continue
        variant, _, mode = line.partition(" ")
        kind = ("training" if not mode else "at test only" if variant == "bn"
                else "training, and at test")
        won = paired_difference(bn[small], errors)
        text.append(f"| {_label(line)} | {kind} | {_mean(errors):.2f} | {won.mean:+.2f} "
                    f"({won.low:+.2f} to {won.high:+.2f}) | "
                    f"{share_cells(bn, small, large, errors)} |")
    return [*text, ""]


def _paper_lines(lines_by: dict[str, dict[int, dict[int, float]]],
                 references: dict[str, dict[int, float]], cfg: dict[str, Any]) -> list[str]:
    def here(line: str, size: int | None = None) -> str:
        by = lines_by.get(line, {}).get(size) if size else references.get(line)
        return f"{_mean(by):.2f}" if by else "–"

    sizes = GN_PAPER["images"]
    network = ("MNIST or Fashion-MNIST test errors of a 9.5k-parameter network"
               if "model" not in cfg else
               f"{cfg['dataset']} test errors of {network_name({'config': cfg})} "
               f"({cfg['model']['parameters'].get('bn', 0):,} parameters with Batch Norm)")
    text = [
        "## Beside the papers",
        "",
        "The published numbers are ImageNet top-1 error (or accuracy where stated) of much "
        f"larger networks trained for far longer; this study's are {network} after a few "
        "epochs. The scales differ by one to two orders of magnitude: compare the directions "
        "and the shapes, not the values.",
        "",
        "| source | setting | published | here (test error %) |",
        "| --- | --- | --- | --- |",
    ]
    mine = [
        f"at 4 per statistic: bn {here('bn', 4)}, brn {here('brn', 4)}, gn {here('gn')}; "
        f"bn at 32: {here('bn', 32)}",
        f"at 4 per statistic: bn {here('bn', 4)}, brn {here('brn', 4)}",
        f"gn {here('gn')} → gn+ws {here('gn+ws')}; ln {here('ln')} → ln+ws {here('ln+ws')}; "
        f"bn at 128 {here('bn', 128)}",
        f"at 2 per statistic: population statistics (PreciseBN) {here('bn precise', 2)}, "
        f"batch statistics at test {here('bn batch', 2)} (running {here('bn', 2)}); bn at 32: "
        f"{here('bn', 32)}",
        f"bn at 32 {here('bn', 32)}, at 128 {here('bn', 128)}; frn {here('frn')}",
        f"evos0 {here('evos0')}, evob0 at 2 {here('evob0', 2)}; bn at 2 {here('bn', 2)}, "
        f"gn {here('gn')}",
    ]
    text += [f"| {s} | {setting} | {published} | {m} |"
             for (s, setting, published), m in zip(PAPERS, mine, strict=True)]
    text += [
        "",
        "Wu & He (2018), Table 2, by images per GPU against this study by images per "
        "statistic:",
        "",
        *gn_paper_rows([here("bn", b) for b in sizes], [here("gn") for _ in sizes]),
        "",
    ]
    return text


def _parameter_lines(record: dict[str, Any]) -> list[str]:
    """Trainable parameters of every variant (FRN and EvoNorm add a vector per layer)."""
    cfg = record["config"]
    names = [*cfg["variants"], *cfg.get("references", [])]
    counts = cfg["model"]["parameters"] if "model" in cfg else {
        v: count_parameters(Net(VARIANTS[v].norm, num_groups=cfg["num_groups"],
                                weight_std=VARIANTS[v].weight_std))
        for v in names}
    return ["## Parameters", "",
            "| variant | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names),
            "| trainable parameters | " + " | ".join(f"{counts[v]:,}" for v in names) + " |",
            ""]
