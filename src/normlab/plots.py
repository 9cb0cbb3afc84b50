"""Figures every experiment draws from: test curves for all variants together, a 5x2 grid of
misclassified digits, log-log error axes, a note of what was held fixed, and an atomic save.
Each experiment's own figures live with it in ``normlab.experiments``.

Built on matplotlib's object API (``Figure``, no pyplot state), so they render the same in
a headless run, a test and a notebook, and never open a window.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .checkpoint import atomic_write

if TYPE_CHECKING:  # the type only: plots imports nothing that trains
    from .engine import Misclassified

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
    last = max((len(run["test_acc"]) for runs in histories.values() for run in runs), default=1)
    start = max(1, last // 2)
    tail = [a for runs in histories.values() for run in runs for a in run["test_acc"][start - 1:]]
    # The interesting part of the accuracy curve is its last few percent: cut the axis at the
    # multiple of 10 below the second half's lowest value (90% on MNIST, 80% on Fashion).
    lowest = min((min(run["test_acc"]) for runs in histories.values() for run in runs),
                 default=100.0)
    cut = 10 * math.floor((min(tail, default=100.0) - 1) / 10)
    if lowest < cut:
        # Up to a point above the highest value, so that the curves' tail sits above the inset.
        highest = max(max(run["test_acc"]) for runs in histories.values() for run in runs)
        ax_acc.set_ylim(cut, min(100.0, math.ceil(highest + 1)))
        ax_acc.text(0.02, 0.02, f"y axis cut at {cut}% (lowest value {lowest:.1f}%)",
                    transform=ax_acc.transAxes, fontsize=8, color="gray")
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
        save_figure(fig, path)
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
        _show_image(ax, mis.images[i])
        ax.set_title(f"predicted {classes[mis.predicted[i]]} ({mis.confidence[i]:.0%})\n"
                     f"true {classes[mis.target[i]]}  ({split} #{mis.indices[i]})", fontsize=9)
    # Two lines: the figure is two images wide, and a variant's full name does not fit in one.
    fig.suptitle(f"{title}\n{len(mis.predicted)} misclassified {split} images")
    if path is not None:
        save_figure(fig, path)
    return fig


def drawable(shape: Sequence[int]) -> bool:
    """Whether inputs of ``shape`` (one input with its channels: (C, L), (C, H, W), ...) can
    be shown as the misclassified grid shows them: grayscale or RGB images."""
    return len(shape) == 3 and shape[0] in (1, 3)


def _show_image(ax, image: torch.Tensor) -> None:
    """A grayscale image dark on light (as digits on paper), an RGB image in its colours;
    float inputs scaled to their own range."""
    x = image.squeeze(0) if image.dim() == 3 and len(image) == 1 else image
    if x.dtype != torch.uint8:
        x = ((x - x.min()) / (x.max() - x.min()).clamp_min(1e-12) * 255).round().to(torch.uint8)
    if x.dim() == 2:
        ax.imshow(x.numpy(), cmap="gray_r", vmin=0, vmax=255)
    else:
        ax.imshow(x.permute(1, 2, 0).numpy())


def error_axes(ax, sizes: Sequence[int], xlabel: str, title: str) -> None:
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


def with_note(fig: Figure, note: str, path: str | Path | None) -> Figure:
    """``note`` (what was held fixed) in small print under the axes, so the title stays
    short enough to fit; saved when ``path`` is given."""
    if note:
        fig.supxlabel(note, fontsize=8, color="dimgray")
    if path is not None:
        save_figure(fig, path)
    return fig


# Every figure at one resolution: sharp when the site shows it at its column's width, and
# legible full size when clicked open.
DPI = 150


def save_figure(fig: Figure, path: str | Path) -> None:
    """PNG into memory, then one atomic write: a full disk never leaves half a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write(path, buffer.getvalue())


def plot_errors(lines: Mapping[str, Mapping[int, Sequence[float]]], xlabel: str, title: str,
                references: Mapping[str, Sequence[float]] | None = None,
                points: Sequence[tuple[str, int, Sequence[float]]] = (), note: str = "",
                path: str | Path | None = None, legend_size: float | None = None) -> Figure:
    """Test error against a power-of-two size (log-log), the figure of every grid experiment,
    drawn by ``draw_errors``; ``note`` (what was held fixed) goes under the axes in small
    print."""
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    draw_errors(ax, lines, xlabel, title, references, points)
    ax.legend(fontsize=legend_size)
    return with_note(fig, note, path)


def draw_errors(ax, lines: Mapping[str, Mapping[int, Sequence[float]]], xlabel: str, title: str,
                references: Mapping[str, Sequence[float]] | None = None,
                points: Sequence[tuple[str, int, Sequence[float]]] = (),
                styles: Mapping[str, Mapping[str, Any]] | None = None,
                reference_alpha: float = 0.12) -> None:
    """Onto ``ax``: each of ``lines`` (label -> size -> errors over seeds) as its mean with a
    min–max band over seeds; each of ``references`` (label -> errors over seeds), which do
    not depend on the size, as a flat dashed line with its band; and ``points`` (label,
    size, errors), e.g. multi-process runs or a line measured at a few sizes only, as
    separate markers with min–max bars (one colour and legend entry per label); on
    ``error_axes``. ``styles`` (label -> matplotlib line keywords) may give a line a colour
    and line style of its own; the references' colours follow the lines' distinct ones.
    ``reference_alpha``: the references' bands' opacity (lower where many overlap)."""
    styles = styles or {}
    colours = []
    for i, (label, by_size) in enumerate(lines.items()):
        sizes = np.array(sorted(by_size))
        values = [np.asarray(by_size[b], dtype=float) for b in sizes]
        style = {"color": f"C{i % 10}", **styles.get(label, {})}
        colours.append(style["color"])
        ax.plot(sizes, [v.mean() for v in values], marker="o", label=label, **style)
        if max(len(v) for v in values) > 1:
            ax.fill_between(sizes, [v.min() for v in values], [v.max() for v in values],
                            alpha=0.2, color=style["color"], linewidth=0)
    references = references or {}
    for i, (label, errors) in enumerate(references.items(), len(set(colours))):
        e = np.asarray(errors, dtype=float)
        ax.axhline(e.mean(), color=f"C{i % 10}", linestyle="--", label=label)
        ax.axhspan(e.min(), e.max(), color=f"C{i % 10}", alpha=reference_alpha, linewidth=0)
    first = len(set(colours)) + len(references)  # the points' colours follow the lines'
    labels: dict[str, int] = {}  # label -> its colour and marker, in order of appearance
    for label, x, errors in points:
        shown = label not in labels  # in the legend once; "_" hides the later markers
        i = labels.setdefault(label, len(labels))
        e = np.asarray(errors, dtype=float)
        ax.errorbar([x], [e.mean()], yerr=[[e.mean() - e.min()], [e.max() - e.mean()]],
                    marker="sD^v"[i % 4], markersize=8, linestyle="none", alpha=0.85,
                    color=f"C{(first + i) % 10}", capsize=4,
                    label=label if shown else f"_{label}")
    error_axes(ax, sorted({b for by_size in lines.values() for b in by_size}), xlabel, title)
