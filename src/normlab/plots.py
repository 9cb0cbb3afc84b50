"""Figures: test curves for all variants together, and a 5x2 grid of misclassified digits.

Built on matplotlib's object API (``Figure``, no pyplot state), so they render the same in
a headless run, a test and a notebook, and never open a window.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .checkpoint import atomic_write
from .engine import VARIANTS, Misclassified
from .report import statistics_table

History = Mapping[str, Sequence[float]]


def plot_curves(histories: Mapping[str, Sequence[History]], path: str | Path | None = None,
                split: str = "test") -> Figure:
    """Test (or validation) loss and accuracy per epoch, one line per variant, in two panels.

    ``histories`` maps a variant's label to its runs (one history per seed). With several
    seeds the line is the mean and the band spans the lowest to the highest seed.
    """
    fig = Figure(figsize=(12, 5.8), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    # The last epochs, where variants differ by hundredths of a percent, get a zoomed inset.
    ax_zoom = ax_acc.inset_axes((0.38, 0.1, 0.58, 0.48))
    for label, runs in histories.items():
        seeds = f", mean of {len(runs)} seeds (band: min–max)" if len(runs) > 1 else ""
        for ax, key, fmt in ((ax_loss, "test_loss", "{:.4f}"), (ax_acc, "test_acc", "{:.2f}%")):
            values = np.array([run[key] for run in runs], dtype=float)
            epochs = np.arange(1, values.shape[1] + 1)
            mean = values.mean(0)
            # The final value goes into the legend: annotations at the line ends collide
            # when the variants finish within hundredths of a percent of each other.
            (line,) = ax.plot(epochs, mean, marker="o", markersize=3,
                              label=f"{label}: final {fmt.format(mean[-1])}{seeds}")
            axes = (ax, ax_zoom) if key == "test_acc" else (ax,)
            if key == "test_acc":
                ax_zoom.plot(epochs, mean, marker="o", markersize=2, color=line.get_color())
            if len(runs) > 1:
                for a in axes:
                    a.fill_between(epochs, values.min(0), values.max(0), alpha=0.2,
                                   color=line.get_color(), linewidth=0)
    ax_loss.set(title=f"{split.capitalize()} loss", xlabel="epoch",
                ylabel="mean NLL per image (nats, log scale)", yscale="log")
    ax_acc.set(title=f"{split.capitalize()} accuracy", xlabel="epoch", ylabel="accuracy (%)")
    # The interesting part of the accuracy curve is the last few percent.
    lowest = min((min(run["test_acc"]) for runs in histories.values() for run in runs),
                 default=90.0)
    if lowest < 90:
        ax_acc.set_ylim(90, 100)
        ax_acc.text(0.02, 0.02, f"y axis cut at 90% (lowest value {lowest:.1f}%)",
                    transform=ax_acc.transAxes, fontsize=8, color="gray")
    last = max((len(run["test_acc"]) for runs in histories.values() for run in runs), default=1)
    start = max(1, last // 2)
    tail = [a for runs in histories.values() for run in runs for a in run["test_acc"][start - 1:]]
    if tail:
        ax_zoom.set_xlim(start - 0.3, last + 0.3)
        ax_zoom.set_ylim(min(tail) - 0.05, min(100.0, max(tail) + 0.05))
    ax_zoom.set_title(f"zoom: epochs {start}–{last}", fontsize=8)
    ax_zoom.tick_params(labelsize=7)
    ax_zoom.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        # Below the panel, where it hides no curve.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13))
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"Batch vs Layer vs Group Normalization: {split}-set curves (final values in "
                 f"the legends)")
    if path is not None:
        save_figure(fig, path, dpi=110)
    return fig


def plot_misclassified(mis: Misclassified, title: str, classes: Sequence[str],
                       path: str | Path | None = None, rows: int = 5, cols: int = 2,
                       split: str = "test") -> Figure:
    """The misclassified digits as a rows x cols grid, each captioned predicted vs true."""
    fig = Figure(figsize=(2.6 * cols, 2.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(mis.predicted):
            ax.set_axis_off()
            continue
        ax.imshow(mis.images[i].numpy(), cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"predicted {classes[mis.predicted[i]]} ({mis.confidence[i]:.0%})\n"
                     f"true {classes[mis.target[i]]}  ({split} #{mis.indices[i]})", fontsize=9)
    fig.suptitle(f"{title}: {len(mis.predicted)} misclassified {split} images")
    if path is not None:
        save_figure(fig, path, dpi=100)
    return fig


def plot_sweep(errors: Mapping[str, Mapping[int, Sequence[float]]], title: str,
               path: str | Path | None = None, note: str = "") -> Figure:
    """Test error vs batch size (log scale), one line per variant: mean over seeds, with the
    lowest-to-highest seed as a band when there are several. ``note`` (what was held fixed)
    goes under the axes in small print, so the title stays short enough to fit."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    for label, by_batch in errors.items():
        sizes = np.array(sorted(by_batch))
        values = [np.asarray(by_batch[b], dtype=float) for b in sizes]
        mean = np.array([v.mean() for v in values])
        (line,) = ax.plot(sizes, mean, marker="o", label=label)
        if max(len(v) for v in values) > 1:
            ax.fill_between(sizes, [v.min() for v in values], [v.max() for v in values],
                            alpha=0.2, color=line.get_color(), linewidth=0)
    _error_axes(ax, sorted({b for by_batch in errors.values() for b in by_batch}),
                "batch size (images per step, log scale)", title)
    ax.legend()
    return _finish(fig, note, path, dpi=110)


def _error_axes(ax, sizes: Sequence[int], xlabel: str, title: str) -> None:
    """Test error against a power-of-two size, both on log axes: errors span from tenths of
    a percent to tens of percent, and a log axis keeps both readable."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.get_xaxis().set_major_formatter("{x:.0f}")
    ax.set_yscale("log")
    ax.get_yaxis().set_major_formatter("{x:g}")
    ax.get_yaxis().set_minor_formatter("{x:g}")
    ax.set(xlabel=xlabel, ylabel="test error (%, log scale)", title=title)
    ax.grid(alpha=0.3, which="both")


def _finish(fig: Figure, note: str, path: str | Path | None, dpi: int) -> Figure:
    """``note`` (what was held fixed) in small print under the axes, so the title stays
    short enough to fit; saved when ``path`` is given."""
    if note:
        fig.supxlabel(note, fontsize=8, color="dimgray")
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int) -> None:
    """PNG into memory, then one atomic write: a full disk never leaves half a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, buffer.getvalue())


def plot_statistics(bn: Mapping[int, Sequence[float]],
                    references: Mapping[str, Sequence[float]],
                    points: Sequence[tuple[str, int, Sequence[float]]], title: str,
                    note: str = "", path: str | Path | None = None) -> Figure:
    """Test error vs images per Batch Norm statistic (log-log): Batch Norm as a line over
    the sizes (mean, band min–max over seeds); the references (Group / Layer Norm, whose
    computation does not depend on the grouping) as flat lines with their seed bands; and
    separate ``points`` (label, images per statistic, errors), e.g. the multi-process runs."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    sizes = np.array(sorted(bn))
    values = [np.asarray(bn[b], dtype=float) for b in sizes]
    (line,) = ax.plot(sizes, [v.mean() for v in values], marker="o", color="C0",
                      label="Batch Norm, one process (--virtual-batch-size)")
    ax.fill_between(sizes, [v.min() for v in values], [v.max() for v in values], alpha=0.2,
                    color=line.get_color(), linewidth=0)
    for i, (label, errors) in enumerate(references.items(), 1):
        e = np.asarray(errors, dtype=float)
        ax.axhline(e.mean(), color=f"C{i}", linestyle="--", label=f"{label} (any grouping)")
        ax.axhspan(e.min(), e.max(), color=f"C{i}", alpha=0.12, linewidth=0)
    markers = "sD^v"
    for i, (label, x, errors) in enumerate(points):
        e = np.asarray(errors, dtype=float)
        ax.errorbar([x], [e.mean()], yerr=[[e.mean() - e.min()], [e.max() - e.mean()]],
                    marker=markers[i % len(markers)], markersize=8, linestyle="none", alpha=0.85,
                    color=f"C{len(references) + 1 + i}", capsize=4, label=label)
    _error_axes(ax, sizes, "images per Batch Norm statistic (log scale)", title)
    ax.legend(fontsize=8)
    return _finish(fig, note, path, dpi=110)


def statistics_figures(results: Mapping[str, Any]) -> tuple[Figure | None, Figure | None]:
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
        f"Test error vs images per Batch Norm statistic ({cfg['dataset']})", held) if bn else None
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
    return _finish(fig, note, path, dpi=100)
