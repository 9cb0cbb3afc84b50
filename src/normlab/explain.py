"""Batch, Layer, Group and Instance Norm worked through on a tiny example, every number checked.

The reference study explained the normalizations with a hand-made spreadsheet whose counts
were partly wrong. This module rebuilds that explanation from code, so the numbers cannot
drift: ``normlab explain`` prints them, ``--json`` / ``--markdown`` / ``--xlsx`` / ``--figure``
export them, and the tests compare all of them with torch.

The example is two layers of activations, each shaped (N=3 samples, C=4 channels, H=2, W=2).
All four techniques compute ``y = (x - mean) / sqrt(variance + eps)`` -- with the population
(biased) variance and eps = 1e-5, as torch does, and no affine transform (gamma = 1,
beta = 0). They differ only in which values share one mean and variance (a "set"):

    BN  per channel c,            over (n, h, w)
    LN  per sample n,             over (c, h, w)
    GN  per sample n and group g, over (the C/G channels of g, h, w)
    IN  per sample n and channel c, over (h, w)

One routine, ``_reduce``, serves all four: it views the activations as (N, C, H, W), or as
(N, G, C/G, H, W) for GN, and averages over that technique's axes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from openpyxl import Workbook
from openpyxl.styles import Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

EPS = 1e-5  # torch's default for every normalization layer
LAYERS, N, C, H, W = 2, 3, 4, 2, 2  # the example's shape
GROUPS = 2  # GN groups in the example: 4 channels -> 2 groups of 2
DEFAULT_SEED = 0
AFFINE_NOTE = "no affine transform: gamma = 1, beta = 0"
DECIMALS = "0.000000"  # how the workbook shows its formulas' results

# Workbook cell map: (sheet, layer index from 0, quantity, index) -> "Sheet!A1". Quantities:
# "x" (inputs, index (n, c, h, w)), "eps", and per technique "mean", "variance", "std" (index
# of the set, shaped like ``Explanation.means``) and "normalised" (index (n, c, h, w)).
CellMap = dict[tuple[str, int, str, tuple[int, ...]], str]


# --------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Technique:
    """What one normalization averages over, as axes of a view of the (N, C, H, W) input."""

    key: str
    name: str
    axes: tuple[int, ...]  # reduced axes of the view
    grouped: bool = False  # view as (N, G, C/G, H, W) instead of (N, C, H, W)

    def axis_names(self) -> tuple[str, ...]:
        """Names of the view's axes, e.g. ("n", "g", "c", "h", "w") for GN."""
        return ("n", "g", "c", "h", "w") if self.grouped else ("n", "c", "h", "w")

    def view_shape(self, shape: Sequence[int], groups: int) -> tuple[int, ...]:
        """The shape the (N, C, H, W) input is viewed as before averaging."""
        n, c, h, w = shape
        return (n, groups, c // groups, h, w) if self.grouped else (n, c, h, w)

    def kept_axes(self) -> tuple[int, ...]:
        """The view's axes that are *not* averaged over: one set per combination of them."""
        return tuple(a for a in range(len(self.axis_names())) if a not in self.axes)

    def stat_shape(self, shape: Sequence[int], groups: int) -> tuple[int, ...]:
        """Shape of the means (and variances): the sizes of the kept axes."""
        view = self.view_shape(shape, groups)
        return tuple(view[a] for a in self.kept_axes())

    def describe(self) -> str:
        """What shares one mean and variance, e.g. "per (n, g), over (channels of g, h, w)"."""
        names = self.axis_names()
        kept = [names[a] for a in self.kept_axes()]
        over = [names[a] for a in self.axes]
        if self.grouped:  # the reduced "c" is the channels of one group
            over = ["channels of g" if name == "c" else name for name in over]
        per = kept[0] if len(kept) == 1 else f"({', '.join(kept)})"
        return f"per {per}, over ({', '.join(over)})"


TECHNIQUES: dict[str, Technique] = {
    t.key: t
    for t in (
        Technique("BN", "Batch Norm", axes=(0, 2, 3)),
        Technique("LN", "Layer Norm", axes=(1, 2, 3)),
        Technique("GN", "Group Norm", axes=(2, 3, 4), grouped=True),
        Technique("IN", "Instance Norm", axes=(2, 3)),
    )
}


def _check_groups(channels: int, groups: int) -> None:
    if groups < 1 or channels % groups:
        raise ValueError(f"groups={groups} must be a positive divisor of C={channels}")


def _reduce(x: torch.Tensor, technique: Technique, groups: int, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, population variance and normalised output of ``x`` (N, C, H, W) for one technique.

    The only place anything is computed: every technique is "view, then average over axes".
    """
    view = x.reshape(technique.view_shape(x.shape, groups))
    variance, mean = torch.var_mean(view, dim=technique.axes, correction=0, keepdim=True)
    normalised = ((view - mean) / torch.sqrt(variance + eps)).reshape(x.shape)
    return mean.squeeze(technique.axes), variance.squeeze(technique.axes), normalised


@dataclass(frozen=True)
class NormSet:
    """One set of values that share a mean and a variance, listed for reading."""

    index: tuple[int, ...]  # the set's index into ``Explanation.means``
    label: str  # e.g. "n=0, g=1"
    members: list[tuple[int, int, int, int]]  # (n, c, h, w) of every value, in order
    values: list[float]
    mean: float
    variance: float
    normalised: list[float]  # same order as ``values``

    def describe(self) -> str:
        """The set as a slice of x, e.g. "x[n=0, c=2..3, h=0..1, w=0..1] (8 values)"."""
        parts = []
        for name, coords in zip("nchw", zip(*self.members, strict=True), strict=True):
            low, high = min(coords), max(coords)
            parts.append(f"{name}={low}" if low == high else f"{name}={low}..{high}")
        return f"x[{', '.join(parts)}] ({len(self.members)} values)"


@dataclass(frozen=True)
class Explanation:
    """One technique applied to one layer: its sets, their statistics, and the output.

    ``means`` and ``variances`` are shaped like the sets: BN (C,), LN (N,), GN (N, G) and
    IN (N, C); ``normalised`` is shaped like ``x``.
    """

    technique: Technique
    x: torch.Tensor
    groups: int
    eps: float
    means: torch.Tensor
    variances: torch.Tensor
    normalised: torch.Tensor

    @cached_property
    def sets(self) -> list[NormSet]:
        """Every set with its members, found by pushing flat indices through the same view."""
        t, shape = self.technique, tuple(self.x.shape)
        flat = np.arange(self.x.numel()).reshape(t.view_shape(shape, self.groups))
        rows = flat.transpose(*t.kept_axes(), *t.axes).reshape(self.means.numel(), -1)
        coords = np.stack(np.unravel_index(rows, shape), axis=-1).tolist()  # (set, member, 4)
        names = [t.axis_names()[a] for a in t.kept_axes()]
        x, y = self.x.flatten().tolist(), self.normalised.flatten().tolist()
        indices = itertools.product(*map(range, self.means.shape))
        return [
            NormSet(
                index=index,
                label=", ".join(f"{name}={i}" for name, i in zip(names, index, strict=True)),
                members=[tuple(member) for member in members],
                values=[x[i] for i in row],
                mean=self.means[index].item(),
                variance=self.variances[index].item(),
                normalised=[y[i] for i in row],
            )
            for index, row, members in zip(indices, rows.tolist(), coords, strict=True)
        ]


def build_example(seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The worked example: 2 layers x (N=3, C=4, H=2, W=2) of small integers, as float64.

    Integers 0..9 keep every mean and variance checkable by hand; float64 keeps the
    comparison with torch exact to far below the printed 6 decimals.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (LAYERS, N, C, H, W), generator=generator).to(torch.float64)


def explain(x: torch.Tensor, technique: str, groups: int = GROUPS, eps: float = EPS
            ) -> Explanation:
    """Normalise one layer ``x`` (N, C, H, W) with ``technique`` (BN, LN, GN or IN).

    Returns the statistics as tensors for checking and ``.sets`` for reading. ``groups`` only
    matters for GN but must always divide C, so one call signature fits all techniques.
    """
    if x.dim() != 4:
        raise ValueError(f"expected one layer shaped (N, C, H, W), got shape {tuple(x.shape)}")
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown technique {technique!r}; choose one of {', '.join(TECHNIQUES)}")
    _check_groups(x.shape[1], groups)
    t = TECHNIQUES[technique]
    x = x if x.is_floating_point() else x.to(torch.float64)
    return Explanation(t, x, groups, eps, *_reduce(x, t, groups, eps))


def stat_counts(n: int, c: int, groups: int = GROUPS, layers: int = LAYERS
                ) -> dict[str, dict[str, int | str]]:
    """How many means and variances each technique computes, per layer and over all layers.

    Derived from the same shapes ``explain`` uses (one mean and one variance per set), not
    typed in, because the reference study's hand-typed counts were wrong. Assumes every layer
    has the same N and C; otherwise add the per-layer counts. H and W never matter: every
    technique averages over them.
    """
    _check_groups(c, groups)
    counts: dict[str, dict[str, int | str]] = {}
    for key, t in TECHNIQUES.items():
        per_layer = math.prod(t.stat_shape((n, c, 1, 1), groups))
        formula = " * ".join(t.axis_names()[a].upper() for a in t.kept_axes())
        counts[key] = {"formula": formula, "means_per_layer": per_layer,
                       "variances_per_layer": per_layer, "means_total": per_layer * layers,
                       "variances_total": per_layer * layers}
    return counts


def explain_all(x: torch.Tensor, groups: int = GROUPS) -> list[dict[str, Explanation]]:
    """Every technique for every layer of ``x`` (layers, N, C, H, W): ``[layer][technique]``."""
    if x.dim() != 5:
        raise ValueError(f"expected (layers, N, C, H, W), got shape {tuple(x.shape)}")
    return [{key: explain(layer, key, groups) for key in TECHNIQUES} for layer in x]


# --------------------------------------------------------------------------------------------
# Text, JSON and Markdown
# --------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    """Integers as integers, everything else with the 6 decimals the tests hold us to."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6f}"


def _counts_rows(x: torch.Tensor, groups: int) -> list[list[str]]:
    layers, n, c = x.shape[:3]
    rows = [["technique", "number of sets", "means + variances per layer",
             f"over all {layers} layers"]]
    for key, count in stat_counts(n, c, groups, layers).items():
        rows.append([key, str(count["formula"]),
                     f"{count['means_per_layer']} + {count['variances_per_layer']}",
                     f"{count['means_total']} + {count['variances_total']}"])
    return rows


def format_text(x: torch.Tensor, groups: int = GROUPS, seed: int | None = None) -> str:
    """The report ``normlab explain`` prints: inputs, counts, then every set of every layer.

    Each set lists the feature maps it is made of (``x[n=.., c=..]`` with its H*W values in
    row-major order), its mean and variance, and the normalised values of those maps.
    """
    layers, n, c, h, w = x.shape
    seeded = "" if seed is None else f", seed {seed}"
    lines = [
        f"Example: {layers} layers x (N={n} samples, C={c} channels, H={h}, W={w}){seeded}.",
        f"Every technique computes y = (x - mean) / sqrt(variance + eps) with eps = {EPS:g},",
        f"the population (biased) variance, and {AFFINE_NOTE}.",
        f"Indices n, c, h, w count from 0; layers from 1. GN uses G = {groups} groups of "
        f"{c // groups} channels.",
        "",
        "Means and variances computed:",
        *_table(_counts_rows(x, groups)),
    ]
    for number, (layer, results) in enumerate(zip(x, explain_all(x, groups), strict=True), 1):
        lines += ["", f"Layer {number} input (each row one sample; each channel's {h}x{w} map "
                  "flattened row by row):"]
        lines += [f"  n={i}: " + " | ".join(" ".join(f"{v:>2}" for v in map(_num, ch.flatten()))
                                            for ch in sample) for i, sample in enumerate(layer)]
        for key, result in results.items():
            t = result.technique
            sets = result.sets
            lines += ["", f"Layer {number}, {key} ({t.name}): one mean and variance "
                      f"{t.describe()}; {len(sets)} sets of {len(sets[0].values)} values"]
            for s in sets:
                lines.append(f"  set {s.label}: {s.describe()}: mean = {s.mean:.6f}, "
                             f"variance = {s.variance:.6f}")
                for start in range(0, len(s.members), h * w):  # one feature map per line
                    mn, mc = s.members[start][:2]
                    values = " ".join(f"{_num(v):>2}" for v in s.values[start:start + h * w])
                    outputs = " ".join(f"{v:10.6f}" for v in s.normalised[start:start + h * w])
                    lines.append(f"    x[n={mn}, c={mc}] = {values}  ->  y = {outputs}")
    return "\n".join(lines) + "\n"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            .rstrip() for row in rows]


def to_json(x: torch.Tensor, groups: int = GROUPS, seed: int | None = None) -> str:
    """Everything ``format_text`` shows, machine-readably, for checking in other tools.

    Per layer and technique: the sets (members as [n, c, h, w], values, mean, variance,
    normalised values) and the same statistics as arrays shaped like torch's.
    """
    layers, n, c = x.shape[:3]
    doc = {
        "example": {"seed": seed, "shape": list(x.shape), "axes": ["layer", "n", "c", "h", "w"],
                    "groups": groups, "eps": EPS, "variance": "population (biased)",
                    "affine": AFFINE_NOTE, "inputs": x.tolist()},
        "counts": stat_counts(n, c, groups, layers),
        "layers": [
            {key: {"name": r.technique.name, "over": r.technique.describe(),
                   "means": r.means.tolist(), "variances": r.variances.tolist(),
                   "normalised": r.normalised.tolist(),
                   "sets": [{"label": s.label, "index": list(s.index), "values_are": s.describe(),
                             "members": [list(m) for m in s.members], "values": s.values,
                             "mean": s.mean, "variance": s.variance,
                             "normalised": s.normalised} for s in r.sets]}
             for key, r in results.items()}
            for results in explain_all(x, groups)
        ],
    }
    return json.dumps(doc, indent=1) + "\n"


def _md_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return out + ["| " + " | ".join(row) + " |" for row in rows[1:]]


def to_markdown(x: torch.Tensor, groups: int = GROUPS, seed: int | None = None) -> str:
    """The example's tables for docs/normalization.md, so the docs quote real output.

    A test checks that the docs contain exactly this text for the default seed.
    """
    layers, n, c, h, w = x.shape
    results = explain_all(x, groups)
    regen = "normlab explain --markdown -" + ("" if seed is None else f" --seed {seed}")
    lines = [f"<!-- generated by `{regen}`; do not edit by hand -->", ""]
    for number, layer in enumerate(x, 1):
        lines += [f"**Layer {number} input** x[n, c] (each {h}x{w} map written row by row, rows "
                  "separated by `/`):", ""]
        rows = [["", *(f"c={i}" for i in range(c))]]
        rows += [[f"n={i}", *(" / ".join(" ".join(map(_num, r)) for r in ch.tolist())
                              for ch in sample)] for i, sample in enumerate(layer)]
        lines += [*_md_table(rows), ""]
    lines += ["**Statistics of layer 1** (population variance; outputs are "
              f"(x - mean) / sqrt(variance + {EPS:g})):", ""]
    for key, result in results[0].items():
        rows = [[f"{key} set", "values in the set", "mean", "variance"]]
        rows += [[s.label, f"`{s.describe()}`", f"{s.mean:.6f}", f"{s.variance:.6f}"]
                 for s in result.sets]
        lines += [f"*{key} ({result.technique.name}): one mean and variance "
                  f"{result.technique.describe()}*", "",
                  *_md_table(rows), ""]
    s = results[0]["BN"].sets[0]
    total = sum(s.values)
    squares = sum((v - s.mean) ** 2 for v in s.values)
    lines += [
        f"**By hand: BN, layer 1, set {s.label}.** The {len(s.values)} values are "
        f"{', '.join(map(_num, s.values))}. Their sum is {_num(total)}, so the mean is "
        f"{_num(total)} / {len(s.values)} = {s.mean:.6f}; the squared deviations sum to "
        f"{squares:.6f}, so the variance is {squares:.6f} / {len(s.values)} = "
        f"{s.variance:.6f}. The first value normalises to ({_num(s.values[0])} - {s.mean:.6f})"
        f" / sqrt({s.variance:.6f} + {EPS:.5f}) = {s.normalised[0]:.6f}.", "",
        f"**How many means and variances** (N = {n}, C = {c}, G = {groups}, {layers} layers of "
        "the same shape):", "",
        *_md_table(_counts_rows(x, groups)),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Excel workbook with live formulas
# --------------------------------------------------------------------------------------------


def _input_cell(layer: int, index: tuple[int, int, int, int], shape: Sequence[int]
                ) -> tuple[int, int]:
    """(row, column), 1-based, of x[layer][n, c, h, w] on the Inputs sheet.

    Each layer is a block with one row per sample and, per channel, H*W adjacent columns, so
    the set of every technique is one rectangle (the N x C x (H*W) picture of the figure).
    """
    n, c, h, w = index
    return _block_top(layer, shape) + 3 + n, _column(c, h, w, shape)


def _column(c: int, h: int, w: int, shape: Sequence[int]) -> int:
    """Column of channel c, position (h, w): after the label column, H*W columns a channel."""
    _, _, height, width = shape
    return 2 + (c * height + h) * width + w


def _block_top(layer: int, shape: Sequence[int]) -> int:
    """First row of a layer's block (title row); blocks are N + 5 rows apart."""
    return 5 + layer * (shape[0] + 5)


def _write_grid_header(ws: Worksheet, top: int, title: str, shape: Sequence[int]) -> None:
    """Title and two header rows (channel, then position) above an N x (C*H*W) grid."""
    _, channels, height, width = shape
    ws.cell(top, 1, title).font = Font(bold=True)
    ws.cell(top + 1, 1, "sample \\ channel")
    ws.cell(top + 2, 1, "sample \\ (h, w)")
    for c, h, w in itertools.product(range(channels), range(height), range(width)):
        column = _column(c, h, w, shape)
        if h == w == 0:
            ws.cell(top + 1, column, f"c={c}").font = Font(bold=True)
        ws.cell(top + 2, column, f"({h}, {w})")


def _address(row: int, column: int, sheet: str | None = None, absolute: bool = False) -> str:
    """"B8", "$B$8" or "Inputs!B8": a cell as a formula refers to it."""
    dollar = "$" if absolute else ""
    cell = f"{dollar}{get_column_letter(column)}{dollar}{row}"
    return cell if sheet is None else f"{sheet}!{cell}"


def write_xlsx(x: torch.Tensor, path: str | Path, groups: int = GROUPS, seed: int | None = None
               ) -> CellMap:
    """Write the example as an Excel workbook whose statistics are live formulas.

    Sheets: README, Inputs (the values and eps -- edit them), then BN, LN, GN and IN, each
    with an AVERAGE / VAR.P / SQRT per set and a normalised-output grid referencing Inputs,
    so a reader can change an input and watch it flow. Returns where every number lives.
    """
    layers, n, c, h, w = x.shape
    shape = (n, c, h, w)
    editable = PatternFill("solid", fgColor="FFF2CC")
    bold = Font(bold=True)
    cells: CellMap = {}
    wb = Workbook()

    readme = wb.active
    readme.title = "README"
    notes = [
        "Batch, Layer, Group and Instance Norm on a small example (generated by "
        f"`normlab explain --xlsx`{'' if seed is None else f', seed {seed}'}).",
        f"Shape: {layers} layers x (N={n} samples, C={c} channels, H={h}, W={w}); "
        f"GN uses G={groups} groups.",
        "Every technique computes y = (x - mean) / SQRT(variance + eps) with the population "
        f"variance (VAR.P) and {AFFINE_NOTE}.",
        "They differ only in which input values share one mean and variance (a 'set'):",
        *(f"  {key} ({t.name}): one mean and variance {t.describe()}"
          for key, t in TECHNIQUES.items()),
        "Edit the yellow cells on the Inputs sheet (values or eps): every mean, variance and "
        "output on the technique sheets is a formula and recomputes.",
        "Indices n, c, h, w count from 0, as in torch; layers count from 1.",
        "",
        "Means and variances computed:",
    ]
    for row, text in enumerate(notes, 1):
        readme.cell(row, 1, text)
    readme["A1"].font = bold
    for row, values in enumerate(_counts_rows(x, groups), len(notes) + 1):
        for column, value in enumerate(values, 1):
            readme.cell(row, column, value).font = bold if values[0] == "technique" else Font()
    readme.column_dimensions["A"].width = 12

    inputs = wb.create_sheet("Inputs")
    inputs["A1"] = "Inputs: edit any yellow cell; the BN, LN, GN and IN sheets recompute."
    inputs["A1"].font = bold
    inputs["A3"] = "eps"
    inputs["B3"] = EPS
    inputs["B3"].fill = editable
    inputs["C3"] = "added to the variance before the square root, as in torch"
    eps_ref = _address(3, 2, "Inputs", absolute=True)
    cells[("inputs", 0, "eps", ())] = "Inputs!B3"
    for layer in range(layers):
        _write_grid_header(inputs, _block_top(layer, shape),
                           f"Layer {layer + 1} input x[n, c, h, w]", shape)
        for index in itertools.product(range(n), range(c), range(h), range(w)):
            row, column = _input_cell(layer, index, shape)
            if index[1:] == (0, 0, 0):
                inputs.cell(row, 1, f"n={index[0]}")
            inputs.cell(row, column, x[layer][index].item()).fill = editable
            cells[("inputs", layer, "x", index)] = _address(row, column, "Inputs")
    inputs.column_dimensions["A"].width = 16

    header = ["set", "values in the set", "input cells", "mean", "variance (VAR.P)",
              "SQRT(variance + eps)"]
    for key, t in TECHNIQUES.items():
        ws = wb.create_sheet(key)
        ws["A1"] = f"{key} ({t.name}): one mean and variance {t.describe()}."
        ws["A1"].font = bold
        ws["A2"] = (f"y = (x - mean) / SQRT(variance + eps), eps = {eps_ref}; {AFFINE_NOTE}. "
                    "All numbers below are formulas on the Inputs sheet.")
        row = 4
        for layer in range(layers):
            sets = explain(x[layer], key, groups).sets
            ws.cell(row, 1, f"Layer {layer + 1}: {len(sets)} sets, one mean and variance "
                    "each").font = bold
            for column, text in enumerate(header, 1):
                ws.cell(row + 1, column, text).font = bold
            std_of: dict[tuple[int, int, int, int], tuple[str, str]] = {}
            for r, s in enumerate(sets, row + 2):
                corners = [_input_cell(layer, s.members[i], shape) for i in (0, -1)]
                (r0, c0), (r1, c1) = corners
                assert (r1 - r0 + 1) * (c1 - c0 + 1) == len(s.members), "set is not a rectangle"
                box = ":".join(_address(*corner, absolute=True) for corner in corners)
                shown = ":".join(_address(*corner) for corner in corners)
                mean, var, std = (_address(r, col, absolute=True) for col in (4, 5, 6))
                for column, value in enumerate(
                        [s.label, s.describe(), f"Inputs!{shown}", f"=AVERAGE(Inputs!{box})",
                         f"=_xlfn.VAR.P(Inputs!{box})", f"=SQRT({var}+{eps_ref})"], 1):
                    ws.cell(r, column, value).number_format = DECIMALS
                for quantity, column in (("mean", 4), ("variance", 5), ("std", 6)):
                    cells[(key, layer, quantity, s.index)] = _address(r, column, key)
                std_of.update({member: (mean, std) for member in s.members})
            row += len(sets) + 3
            # The output grid mirrors the Inputs block, so y sits where its x sits.
            offset = row - _block_top(layer, shape)
            _write_grid_header(ws, row, f"Layer {layer + 1} normalised output y[n, c, h, w]",
                               shape)
            for index, (mean, std) in std_of.items():
                in_row, column = _input_cell(layer, index, shape)
                if index[1:] == (0, 0, 0):
                    ws.cell(in_row + offset, 1, f"n={index[0]}")
                ws.cell(in_row + offset, column,
                        f"=({_address(in_row, column, 'Inputs')}-{mean})/{std}"
                        ).number_format = DECIMALS
                cells[(key, layer, "normalised", index)] = _address(in_row + offset, column, key)
            row += n + 5
        ws.column_dimensions["A"].width = 16
        ws.column_dimensions["B"].width = 36
        ws.column_dimensions["C"].width = 16
        for column in "DEF":
            ws.column_dimensions[column].width = 20
    wb.save(path)
    return cells


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------


def draw_figure(path: str | Path | None = None, shape: Sequence[int] = (N, C, H, W),
                groups: int = GROUPS) -> Figure:
    """The N x C x (H*W) block diagram of Wu & He (2018, Fig. 2), one panel per technique.

    Blue cubes are one set: the values that share a mean and variance. The shading comes from
    ``explain``'s own sets, so the picture cannot disagree with the numbers.
    """
    n, c, h, w = shape
    fig = Figure(figsize=(14, 4.4), layout="constrained")
    x = torch.zeros(n, c, h, w, dtype=torch.float64)
    for position, (key, t) in enumerate(TECHNIQUES.items(), 1):
        # voxel axes: x = C (across), y = N (depth), z = H*W (up), as in the paper
        shaded = np.zeros((c, n, h * w), dtype=bool)
        for mn, mc, mh, mw in explain(x, key, groups).sets[0].members:
            shaded[mc, mn, mh * w + mw] = True
        ax = fig.add_subplot(1, len(TECHNIQUES), position, projection="3d")
        ax.voxels(np.ones_like(shaded), facecolors=np.where(shaded, "#4a86c5", "#ffffff"),
                  edgecolor="#555555", linewidth=0.4)
        ax.set(xlabel="C (channels)", ylabel="N (samples)", zlabel="H, W (positions)",
               xticks=[], yticks=[], zticks=[])
        ax.set_box_aspect((c, n, h * w), zoom=0.8)
        ax.view_init(elev=20, azim=-60)
        suffix = f", G={groups}" if t.grouped else ""
        ax.set_title(f"{t.name} ({key}{suffix})\n{t.describe()}", fontsize=9)
    fig.suptitle(f"Which values share one mean and variance (blue), for N={n}, C={c}, "
                 f"H*W={h * w}", fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

# flag -> (help, allowed suffixes, may be "-" for stdout)
_OUTPUTS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "json": ("write every number as JSON ('-' for stdout)", (".json",), True),
    "markdown": ("write the tables used in docs/normalization.md ('-' for stdout)",
                 (".md",), True),
    "xlsx": ("write an Excel workbook whose statistics are live formulas", (".xlsx",), False),
    "figure": ("draw the N x C x (H*W) block diagram (png, svg or pdf)",
               (".png", ".svg", ".pdf"), False),
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `explain` subcommand; sets `func=run` as default."""
    parser = subparsers.add_parser(
        "explain", help="work BN, LN, GN and IN through a small example, every number shown",
        description="Work Batch, Layer, Group and Instance Norm through a small example "
                    "(2 layers x N=3, C=4, H=2, W=2 integer activations): which values form "
                    "each set, its mean and variance, the normalised outputs, and how many "
                    "statistics each technique computes.")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed for the example's integers (default {DEFAULT_SEED})")
    parser.add_argument("--groups", type=int, default=GROUPS,
                        help=f"GN groups; must divide C={C} (default {GROUPS})")
    for flag, (text, _, _) in _OUTPUTS.items():
        parser.add_argument(f"--{flag}", metavar="PATH", help=text)
    parser.set_defaults(func=run)
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


def run(args: argparse.Namespace) -> int:
    """Print the explanation and write the requested files; 2 with one error line if not."""
    outputs = {flag: getattr(args, flag, None) for flag in _OUTPUTS}
    outputs = {flag: path for flag, path in outputs.items() if path}
    try:
        _check_groups(C, args.groups)
        for flag, path in outputs.items():
            _check_output(flag, path)
        if list(outputs.values()).count("-") > 1:
            raise ValueError("only one of --json and --markdown can write to stdout ('-')")
    except ValueError as err:
        return _fail(str(err))
    x = build_example(args.seed)
    writers: dict[str, Callable[[str], object]] = {
        "json": lambda path: _write_text(path, to_json(x, args.groups, args.seed)),
        "markdown": lambda path: _write_text(path, to_markdown(x, args.groups, args.seed)),
        "xlsx": lambda path: write_xlsx(x, path, args.groups, args.seed),
        "figure": lambda path: draw_figure(path, tuple(x.shape[1:]), args.groups),
    }
    if "-" not in outputs.values():
        sys.stdout.write(format_text(x, args.groups, args.seed))
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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m normlab.explain [options]`: the subcommand without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="normlab")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["explain", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
