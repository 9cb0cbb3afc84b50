"""The worked example as text (what ``normlab explain`` prints), JSON and the Markdown tables
that docs/normalization.md quotes (a test checks the docs hold exactly this text)."""

from __future__ import annotations

import json

import torch

from .compute import AFFINE_NOTE, EPS, GROUPS, explain_all, stat_counts


def _num(value: float) -> str:
    """Integers as integers, everything else with the 6 decimals the tests hold us to."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6f}"


def counts_rows(x: torch.Tensor, groups: int) -> list[list[str]]:
    """How many means and variances each technique computes: the table of the text, the
    Markdown and the workbook's README sheet."""
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
        *_table(counts_rows(x, groups)),
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
                lines += [f"  set {s.label}: {s.describe()}",  # lines fit 80 columns
                          f"    mean = {s.mean:.6f}, variance = {s.variance:.6f}"]
                for start in range(0, len(s.members), h * w):  # one feature map per line
                    mn, mc = s.members[start][:2]
                    values = " ".join(f"{_num(v):>2}" for v in s.values[start:start + h * w])
                    outputs = " ".join(f"{v:9.6f}" for v in s.normalised[start:start + h * w])
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
        *_md_table(counts_rows(x, groups)),
    ]
    return "\n".join(lines) + "\n"
