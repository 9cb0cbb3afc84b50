"""The remedies report's inference: which differences hold once a table's comparisons are
corrected for their number, how much of Batch Norm's loss each remedy wins back, which
layers tolerate batch statistics at test, and whether one learning rate was fair to all.

Every comparison is paired by seed (the same seed gives both variants the same data order
and augmentation) and tested with a paired t-test; the p-values of one table are
Holm-adjusted over that table (its *family*), and only what survives is printed in bold.
Holm rather than Benjamini-Hochberg: the guide turns each bold cell into a recommendation,
so every one of them should hold (family-wise error), not merely most of them (false
discovery rate); and Holm needs no assumption about how the tests depend on each other,
while ours share a baseline and seeds. The intervals beside the p-values are the plain 95 %
paired-t intervals of each difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..stats import Interval, fieller_share, holm, paired_difference, paired_p_value

Lines = dict[str, dict[int, dict[int, float]]]  # line -> images per statistic -> seed -> error
Errors = dict[int, float]  # seed -> test error
Label = Callable[[str], str]  # a line's name in the report
Option = tuple[str, int | None]  # (variant, images per statistic; None: any)
Pair = tuple[Errors, Errors]  # a comparison: the first minus the second, paired by seed
ALPHA = 0.05
MIN_RANKING_SEEDS = 5  # a ranking needs seeds; the three-seed sizes get none


def errors_at(lines: Lines, references: dict[str, Errors], line: str, size: int) -> Errors:
    """seed -> error of a line at a size; a reference is the same at every size."""
    return references[line] if line in references else lines.get(line, {}).get(size, {})


def corrected(pairs: Sequence[Pair]) -> list[tuple[Interval | None, float]]:
    """(paired interval of a - b, Holm-adjusted p) for each pair; (None, NaN) where fewer
    than two seeds are shared. The family is ``pairs``."""
    intervals = [paired_difference(a, b) if len(a.keys() & b.keys()) >= 2 else None
                 for a, b in pairs]
    p = holm([paired_p_value(a, b) if d is not None else math.nan
              for (a, b), d in zip(pairs, intervals, strict=True)])
    return list(zip(intervals, p, strict=True))


def difference_cell(d: Interval | None, p: float) -> str:
    """"+4.82 (+3.53 to +6.11), p 0.001", in bold where Holm's p is below 0.05."""
    if d is None:
        return "–"
    text = f"{d.mean:+.2f} ({d.low:+.2f} to {d.high:+.2f}), p {_p(p)}"
    return f"**{text}**" if p < ALPHA else text


def _p(p: float) -> str:
    return "–" if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def family_note(m: int) -> str:
    return (f"p: paired t-test, Holm-adjusted over this table's {m} comparisons; **bold**: "
            f"significant at 5 % after that correction. The interval is the plain 95 % "
            f"paired-t interval of the difference (points). Exploratory: the tables were "
            f"chosen after the data were seen; the decisions above carry the guarantee.")


def defined(results: Sequence[tuple[Interval | None, float]]) -> int:
    """The comparisons a table's family counts: those with a p-value (two seeds or more,
    and some spread)."""
    return sum(not math.isnan(p) for _, p in results)


def _size_table(heading: str, intro: str, corner: str, rows: dict[str, list[Pair]],
                sizes: list[int], label: Label) -> list[str]:
    """A table of paired differences, a row per line and a column per size, the whole
    table one family."""
    results = corrected([pair for pairs in rows.values() for pair in pairs])
    m = defined(results)
    text = [heading, "", intro + " " + family_note(m), "",
            f"| {corner} | " + " | ".join(f"{b} per statistic" for b in sizes) + " |",
            "| --- |" + " ---: |" * len(sizes)]
    for i, row in enumerate(rows):
        cells = results[i * len(sizes):(i + 1) * len(sizes)]
        text.append(f"| {label(row)} | " + " | ".join(difference_cell(d, p) for d, p in cells)
                    + " |")
    return [*text, ""]


def difference_lines(lines: Lines, references: dict[str, Errors], sizes: list[int],
                     label: Label) -> list[str]:
    """Every remedy minus plain Batch Norm at the same size; one family for the table."""
    if "bn" not in lines:
        return []
    rows = {r: [(errors_at(lines, references, r, b), lines["bn"].get(b, {})) for b in sizes]
            for r in [*(line for line in lines if line != "bn"), *references]}
    return _size_table(
        "## Each remedy against plain Batch Norm at the same size",
        "Test error of the remedy minus that of plain Batch Norm (running statistics), in "
        "points; negative: the remedy has the lower error.", "remedy − bn", rows, sizes, label)


def ranking_lines(lines: Lines, references: dict[str, Errors], sizes: list[int],
                  label: Label) -> list[str]:
    """At each size with enough seeds: every option by mean error, each against the best;
    those not worse than the best after the correction are tied for first."""
    text = []
    for b in sizes:
        if len(lines.get("bn", {}).get(b, {})) < MIN_RANKING_SEEDS:
            continue
        options = {line: by[b] for line, by in lines.items() if len(by.get(b, {})) > 1}
        options.update(references)
        ranked = sorted(options, key=lambda o: float(np.mean(list(options[o].values()))))
        best = ranked[0]
        results = corrected([(options[o], options[best]) for o in ranked[1:]])
        text += [
            f"## Ranking at {b} images per statistic",
            "",
            f"Every option at {b} images per statistic, by mean test error, each against the "
            f"lowest ({label(best)}), paired by seed. " + family_note(defined(results))
            + " Plain rows are not shown worse than the first (not shown: never the same).",
            "",
            "| rank | option | seeds | test error % | − the first |",
            "| ---: | --- | ---: | ---: | ---: |",
            f"| 1 | {label(best)} | {len(options[best])} | "
            f"{_mean_range(options[best])} | |",
        ]
        for rank, (o, (d, p)) in enumerate(zip(ranked[1:], results, strict=True), 2):
            text.append(f"| {rank} | {label(o)} | {len(options[o])} | "
                        f"{_mean_range(options[o])} | {difference_cell(d, p)} |")
        text.append("")
    return text


def _mean_range(e: Errors) -> str:
    values = list(e.values())
    return f"{np.mean(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def mechanism_lines(lines: Lines, sizes: list[int], label: Label) -> list[str]:
    """Batch statistics at test minus running statistics, per batch-dependent variant: the
    train-mode / eval-mode gap, which says which layers tolerate batch statistics."""
    rows = {v: [(lines[f"{v} batch"].get(b, {}), lines[v].get(b, {})) for b in sizes]
            for v in lines if " " not in v and f"{v} batch" in lines}
    if not rows:
        return []
    return _size_table(
        "## The mechanism: which layers tolerate batch statistics at test",
        "Test error with batch statistics at test (train mode: each group of test images "
        "normalised by its own statistics, groups as large as in training) minus with the "
        "layer's running statistics (eval mode), same trained weights. A layer whose "
        "running statistics match what it saw in training shows no gap; Batch Renorm trains "
        "its weights against *corrected* batch statistics, so plain batch statistics at test "
        "are not what it learnt.", "batch − running", rows, sizes, label)


def claim_lines(lines: Lines, references: dict[str, Errors], label: Label) -> list[str]:
    """The comparisons the papers make and the text cites, as one family."""
    def e(line: str, size: int = 0) -> Errors:
        return errors_at(lines, references, line, size)

    def name(line: str, size: int = 0) -> str:
        return label(line) + (f" at {size}" if line not in references else "")

    wanted = [("gn+ws", 0, "gn", 0), ("ln+ws", 0, "ln", 0), ("evos0", 0, "gn", 0),
              *(("bn precise", b, "bn", b) for b in (2, 128)),
              *(("bn batch", b, "bn precise", b) for b in (2, 4, 8, 32, 128)),
              *(("bn precise-augmented", b, "bn precise", b) for b in (2, 128)),
              ("brn", 4, "bn", 4), ("gn", 0, "brn", 4), ("brn", 2, "bn", 2),
              ("gn", 0, "brn", 2), ("evob0", 2, "brn", 2), ("frn", 0, "bn", 128),
              ("gn+ws", 0, "bn", 128), ("gn", 0, "bn", 32)]
    found = [(a, sa, b, sb) for a, sa, b, sb in wanted
             if len(e(a, sa).keys() & e(b, sb).keys()) >= 2]
    if not found:
        return []
    results = corrected([(e(a, sa), e(b, sb)) for a, sa, b, sb in found])
    text = ["## The comparisons the papers make", "",
            "Each row: the first minus the second, test error in points, over the seeds both "
            "have; negative: the first is better. " + family_note(defined(results)), "",
            "| comparison | seeds | difference |", "| --- | ---: | ---: |"]
    for (a, sa, b, sb), (d, p) in zip(found, results, strict=True):
        text.append(f"| {name(a, sa)} − {name(b, sb)} | {d.n} | {difference_cell(d, p)} |")
    return [*text, ""]


def share_cells(bn: dict[int, Errors], small: int, large: int, errors: Errors) -> str:
    """"71% (52 to 95%)": the share of Batch Norm's loss won back with its Fieller interval
    (a percentile bootstrap over 5-10 seeds under-covers: ``normlab.simulate``), or the
    share alone where fewer than five seeds have all three values."""
    share, low, high = fieller_share(bn[small], bn[large], errors)
    if math.isnan(share):
        return "–"
    seeds = len(bn[small].keys() & bn[large].keys() & errors.keys())
    if seeds < MIN_RANKING_SEEDS:
        return f"{100 * share:.0f}%"
    if math.isinf(low):
        return f"{100 * share:.0f}% (unbounded: the loss itself is not significant)"
    return f"{100 * share:.0f}% ({100 * low:.0f} to {100 * high:.0f}%)"


def lr_check_lines(record: dict[str, Any], label: Label) -> list[str]:
    """Each variant at the learning rates of the check, and the options re-ranked at each
    one's own best rate beside the one recipe (same seeds)."""
    cfg = record["config"]
    # The check's seeds: those trained at another rate (the grid may have more).
    seeds = sorted({r["seed"] for r in record["runs"].values()
                    if r.get("lr", cfg["lr"]) != cfg["lr"]})
    table: dict[Option, dict[float, Errors]] = {}
    failed: dict[Option, dict[float, int]] = {}
    for r in record["runs"].values():
        key, lr = (r["variant"], r.get("images_per_statistic")), r.get("lr", cfg["lr"])
        if "failed" in r:
            if r["seed"] in seeds:
                failed.setdefault(key, {}).setdefault(lr, 0)
                failed[key][lr] += 1
            continue
        table.setdefault(key, {}).setdefault(lr, {})[r["seed"]] = r["test_error"]
    rates = sorted({lr for by in table.values() for lr in by})
    if len(rates) < 2:
        return []
    checked = {k: by for k, by in table.items() if len(by) > 1}
    complete = {k: {lr: {s: e[s] for s in seeds} for lr, e in by.items()
                    if set(seeds) <= e.keys()} for k, by in checked.items()}

    def mean(e: Errors) -> float:
        return float(np.mean(list(e.values())))

    # A rate at which a seed diverged is not a candidate for the best.
    best = {k: min(by, key=lambda lr: mean(by[lr])) for k, by in complete.items() if by}
    text = [
        "## A fair recipe: the learning-rate check",
        "",
        f"Every option trained again at peak learning rates {', '.join(map(str, rates))} "
        f"(the study's one recipe: {cfg['lr']}), seeds {', '.join(map(str, seeds))}, all "
        f"else held fixed. Mean test error (%) over those seeds; the lowest per row in bold. "
        f"The best rate is chosen on the test set with the same seeds it is then compared "
        f"on, which flatters every option a little and equally.",
        "",
        "| option | " + " | ".join(f"lr {lr}" for lr in rates) + " | best |",
        "| --- |" + " ---: |" * len(rates) + " ---: |",
    ]
    for k, by in complete.items():
        cells = []
        for lr in rates:
            n = failed.get(k, {}).get(lr, 0)
            value = ("–" if lr not in by else f"**{mean(by[lr]):.2f}**" if lr == best.get(k)
                     else f"{mean(by[lr]):.2f}")
            cells.append(value + (f" ({n} failed)" if n else ""))
        text.append(f"| {_option(k, label)} | " + " | ".join(cells)
                    + f" | {best.get(k, '–')} |")
    text.append("")
    text += _rerank_lines(complete, best, cfg["lr"], label)
    return text


def _option(key: Option, label: Label) -> str:
    line, size = key
    return label(line) + (f" at {size}" if size else ", any grouping")


def _rerank_lines(complete: dict[Option, dict[float, Errors]], best: dict[Option, float],
                  one: float, label: Label) -> list[str]:
    """Per size: the first under one recipe and at each option's own best rate, with the
    options tied for first (Holm over each ranking's comparisons)."""
    sizes = sorted({size for _, size in complete if size})
    text = ["Under one recipe and at each option's own best rate, the options tied for "
            "first at each size (not shown worse than the lowest mean after Holm's "
            "correction over that ranking's comparisons):", "",
            "| images per statistic | recipe | first | tied for first |",
            "| ---: | --- | --- | --- |"]
    for b in sizes:
        keys = [k for k in complete if k[1] in (b, None)]
        for recipe, rates in (("one recipe", dict.fromkeys(keys, one)), ("own best rate", best)):
            options = {k: complete[k][rates[k]] for k in keys if rates.get(k) in complete[k]}
            ranked = sorted(options, key=lambda k: float(np.mean(list(options[k].values()))))
            results = corrected([(options[k], options[ranked[0]]) for k in ranked[1:]])
            tied = [k for k, (_, p) in zip(ranked[1:], results, strict=True) if not p < ALPHA]
            text.append(f"| {b} | {recipe} | {_option(ranked[0], label)} | "
                        + (", ".join(_option(k, label) for k in tied) or "none") + " |")
    return [*text, ""]


# The comparisons whose verdicts a second network is checked against: Batch Norm's loss at
# few images, each option against Batch Norm at 2 and at 128, and the papers' comparisons.
_TRANSFER = [("bn", 2, "bn", 128), ("brn", 2, "bn", 2), ("evob0", 2, "bn", 2),
             *((r, 0, "bn", b) for b in (2, 128) for r in ("gn", "gn+ws", "ln", "ln+ws",
                                                            "frn", "evos0")),
             ("brn", 128, "bn", 128), ("evob0", 128, "bn", 128),
             ("gn+ws", 0, "gn", 0), ("ln+ws", 0, "ln", 0), ("evos0", 0, "gn", 0),
             ("gn", 0, "brn", 2), ("evob0", 2, "brn", 2),
             *(("bn precise", b, "bn", b) for b in (2, 128))]


def transfer_lines(mine: tuple[Lines, dict[str, Errors]], other: tuple[Lines, dict[str, Errors]],
                   names: tuple[str, str], label: Label) -> list[str]:
    """The other network's verdicts checked on this one: each comparison of ``_TRANSFER``
    that both records can make, tested on each record over its own seeds, each record's
    comparisons one Holm family; a difference is shown on both where both are significant
    the same way."""
    def e(record: tuple[Lines, dict[str, Errors]], line: str, size: int) -> Errors:
        return errors_at(*record, line, size)

    def name(line: str, size: int) -> str:
        return label(line) + (f" at {size}" if size else "")

    rows = [c for c in _TRANSFER
            if all(len(e(r, c[0], c[1]).keys() & e(r, c[2], c[3]).keys()) >= 2
                   for r in (mine, other))]
    if not rows:
        return []
    ours, theirs = ([results for results in corrected([(e(r, a, sa), e(r, b, sb))
                                                       for a, sa, b, sb in rows])]
                    for r in (mine, other))
    text = [f"## Beside {names[1]}: which differences are shown on {names[0]} too", "",
            f"Each row: the first minus the second, test error in points, paired by seed, on "
            f"each network over its own seeds; negative: the first is better. Each network's "
            f"{len(rows)} comparisons are one family, Holm-adjusted; **bold**: significant at "
            f"5 % after that correction. *shown on both*: significant on both, the same way; "
            f"*opposite*: significant on both, opposite ways; *not shown here*: significant "
            f"on {names[1]} only (not shown is not absent: fewer seeds here); *new here*: on "
            f"{names[0]} only. Exploratory: the families were chosen after the data.", "",
            f"| comparison | {names[1]} | {names[0]} | verdict |", "| --- | ---: | ---: | --- |"]
    for (a, sa, b, sb), (d1, p1), (d2, p2) in zip(rows, ours, theirs, strict=True):
        text.append(f"| {name(a, sa)} − {name(b, sb)} | {difference_cell(d2, p2)} "
                    f"[{d2.n}] | {difference_cell(d1, p1)} [{d1.n}] | "
                    f"{_verdict(d1, p1, d2, p2)} |")
    return [*text, "", "[n]: seeds.", ""]


def _verdict(mine: Interval, p_mine: float, other: Interval, p_other: float) -> str:
    here, there = p_mine < ALPHA, p_other < ALPHA
    if here and there:
        return "shown on both" if (mine.mean > 0) == (other.mean > 0) else "**opposite**"
    return "not shown here" if there else "new here" if here else "shown on neither"
