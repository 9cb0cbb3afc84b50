"""Decisions as the reports show them: a look of ``stats.decide`` in the record, the answer
in a user's words, every option's interval and verdict, and the figure of the intervals.
``normlab recommend`` and the remedies report both render their decisions here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from scipy import stats as sps

from ..plots import DPI
from ..stats import Decision, decide, look_levels
from ..variants import VARIANTS

INFERENCE = {"precise": "PreciseBN", "batch": "batch statistics at test"}


def label(option: str) -> str:
    variant, _, mode = option.partition(" ")
    return f"{VARIANTS[variant].label}" + (f" + {INFERENCE[mode]}" if mode else "")


def decision_record(decision: Decision, seeds: int) -> dict[str, Any]:
    """A look's decision as the record keeps it."""
    return dict(seeds=seeds, verdicts=decision.verdicts, best=decision.best,
                intervals={o: list(i) for o, i in decision.intervals.items()},
                means=decision.means, seeds_per_option=decision.seeds,
                signs={o: list(s) for o, s in decision.signs.items()},
                normality=decision.normality, family=decision.family,
                level=look_levels(decision.alpha, decision.looks or [seeds])[seeds]
                if decision.looks and seeds in decision.looks else decision.alpha)


def seeds_needed(errors: dict[str, list[float]], option: str, best: str, margin: float,
                 alpha: float, k: int, power: float = 0.8, most: int = 200) -> int | None:
    """About how many seeds would decide ``option`` against ``best`` at the level ``alpha``
    of the last look (its pair's Bonferroni share, one tail of k(k-1)), with ``power``:
    the smallest n with n ≥ ((t_{n-1}(1 - alpha / (k(k-1))) + t_{n-1}(power)) σ / Δ)², Δ
    the gap to 0 (to show it behind) or to the margin (to show it within), σ the spread of
    the paired differences so far. None when neither can be shown (no gap, no spread to go
    by) or more than ``most`` seeds would be needed."""
    m = min(len(errors[option]), len(errors[best]))
    if m < 2:
        return None
    d = [errors[option][i] - errors[best][i] for i in range(m)]
    mean = sum(d) / m
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (m - 1))
    gaps = [g for g in (mean, margin - mean) if g > 0]
    if not gaps or sd == 0:
        return None
    for n in range(max(m + 1, 3), most + 1):
        c = sps.t.ppf(1 - alpha / (k * (k - 1)), n - 1) + sps.t.ppf(power, n - 1)
        if n >= (c * sd / max(gaps)) ** 2:
            return n
    return None


def answer(last: dict[str, Any], errors: dict[str, list[float]], cfg: dict[str, Any],
           stopped: str | None) -> str:
    """The decision in a user's words: what to use, what is as good, what is behind."""
    verdicts, best = last["verdicts"], last["best"]
    means, margin = last["means"], cfg["margin"]

    def named(verdict: str) -> list[str]:
        return sorted((o for o, v in verdicts.items() if v == verdict), key=means.__getitem__)

    open_ = named("undecided")
    lead = (f"**Lowest error so far: {label(best)}**" if open_ else f"**Use {label(best)}**")
    text = [f"{lead} ({means[best]:.2f} % test error, mean of "
            f"{last['seeds_per_option'][best]} seeds)" + ("; it is not yet shown ahead of "
                                                           "the options not decided below."
                                                           if open_ else ".")]
    same = named("equivalent")
    if same:
        text.append(f"{_join(same)} {'is' if len(same) == 1 else 'are'} shown within "
                    f"{margin} points of the best.")
    for o in named("worse"):
        text.append(f"{label(o)} is shown behind the best by at least "
                    f"{last['intervals'][o][0]:.2f} points.")
    if open_:
        k = len(verdicts)
        looks = cfg.get("looks")
        level = look_levels(cfg["alpha"], looks)[looks[-1]] if looks else cfg["alpha"]
        need = {o: seeds_needed(errors, o, best, margin, level, k) for o in open_}
        said = ", ".join(f"{label(o)} (about {need[o]} seeds in all)" if need[o] else
                         f"{label(o)} (more than 200 seeds, or no gap to show)"
                         for o in open_)
        why = f" ({stopped})" if stopped else ""
        text.append(f"Not decided{why}: {said}.")
    if "bn precise" in verdicts:
        keep = {v: named(v) for v in ("worse", "equivalent")}
        if "bn precise" in keep["equivalent"] or best == "bn precise":
            text.append("**No retraining needed**: Batch Norm trained as it is, with PreciseBN "
                        "statistics, is among the best.")
        elif "bn precise" in keep["worse"]:
            text.append("**Retrain**: Batch Norm as it is, even with PreciseBN statistics, is "
                        "shown behind the best.")
        else:
            text.append("Whether Batch Norm as trained, with PreciseBN statistics (no "
                        "retraining), is among the best is not decided.")
    return " ".join(text)


def promise_lines(last: dict[str, Any], margin: float, alpha: float) -> list[str]:
    """The rule, its family and its guarantee, and what a verdict rests on."""
    lines = [
        f"- **Rule**, fixed in code before any data (`normlab.stats.decide`): multiple "
        f"comparisons with the best (Hsu 1984) from simultaneous paired intervals; family: "
        f"{last['family']}.",
        f"- **Guarantee**: the chance of any false claim -- \"behind\" for an option truly "
        f"among the best, \"within {margin}\" for one truly more than {margin} points "
        f"behind -- is at most {alpha}, over every look (checked by simulation in the tests, "
        f"with heavy-tailed noise and outlier seeds).",
        "- **Not decided** means not shown either way: it is never a claim that options are "
        "the same."]
    if last["normality"]:
        lines.append("- With fewer than 6 seeds, a verdict rests on the seed-to-seed "
                     "differences being roughly normal: no distribution-free test can decide "
                     "with so few.")
    return lines


def _join(options: list[str]) -> str:
    names = [label(o) for o in options]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def decision_table(last: dict[str, Any], errors: dict[str, list[float]], alpha: float,
                   runs: dict[str, dict[str, Any]], size: int | None = None) -> list[str]:
    """Every option's numbers, interval and verdict; the time per step from ``runs`` (at
    ``size`` images per statistic, for the batch-dependent options)."""
    lines = [f"θ = an option's mean test error minus the best other option's (negative: it is "
             f"the best); its interval is simultaneous over all options at level "
             f"{1 - alpha:.2f}.", "",
             "| option | seeds | test error (%) | θ interval (points) | verdict | seeds worse "
             "than the best | time per step (test included) |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for o in sorted(last["verdicts"], key=last["means"].__getitem__):
        low, high = last["intervals"][o]
        signs = last["signs"].get(o)
        lines.append(f"| {label(o)} (`{o}`) | {len(errors[o])} | {last['means'][o]:.2f} | "
                     f"{_bound(low)} to {_bound(high)} | {last['verdicts'][o]} | "
                     f"{f'{signs[0]} of {signs[1]}' if signs else '--'} | "
                     f"{_step_ms(runs, o.partition(' ')[0], size)} |")
    return lines


def _bound(x: float) -> str:
    return "−∞" if x == -math.inf else "∞" if x == math.inf else f"{x:+.2f}"


def _step_ms(runs: dict[str, dict[str, Any]], variant: str, size: int | None) -> str:
    chosen = [r for k, r in runs.items() if r.get("variant") == variant
              and not k.startswith("tune/") and "failed" not in r and r.get("steps")
              and r.get("images_per_statistic") in (None, size)]
    if not chosen:
        return "--"
    return f"{1000 * sum(r['wall_time_s'] / r['steps'] for r in chosen) / len(chosen):.1f} ms"


def figure(last: dict[str, Any], margin: float, title: str, path: Path) -> Figure:
    """Each option's interval for θ, coloured by its verdict, with 0 (the best) and the
    margin marked."""
    options = sorted(last["verdicts"], key=last["means"].__getitem__, reverse=True)
    colours = {"best": "C2", "equivalent": "C0", "worse": "C3", "undecided": "0.5"}
    fig = Figure(figsize=(6.9, 0.42 * len(options) + 1.7), layout="constrained")
    ax = fig.subplots()
    finite = [x for o in options for x in last["intervals"][o] if math.isfinite(x)]
    span = (min(finite + [0]) - 0.5, max(finite + [margin]) + 0.5)
    for y, o in enumerate(options):
        low, high = (min(max(x, span[0]), span[1]) for x in last["intervals"][o])
        colour = colours[last["verdicts"][o]]
        ax.plot([low, high], [y, y], color=colour, linewidth=3)
        others = min(m for p, m in last["means"].items() if p != o)
        ax.plot([last["means"][o] - others], [y], "o", color=colour)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvline(margin, color="black", linewidth=0.8, linestyle="--",
               label=f"margin {margin} points")
    ax.set_yticks(range(len(options)),
                  [f"{label(o)} ({last['verdicts'][o]})" for o in options])
    ax.set_xlim(*span)
    ax.set_xlabel("θ: test error minus the best other option's (points)\n"
                  "simultaneous 95 % intervals", fontsize=9)
    # The title on two lines at its colon, the legend below the axes: long option and
    # network names otherwise push both out of the figure.
    fig.suptitle(title.replace(": ", ":\n", 1), fontsize=10)
    fig.legend(loc="outside lower center", fontsize=8)
    fig.savefig(path, dpi=DPI)
    return fig


# The margin these reports decide equivalence with, in points of test error: declared
# before any decision was rendered, as normlab recommend's default.
REPORT_MARGIN = 0.5
REPORT_ALPHA = 0.05


def decisions(record: dict[str, Any], lines_by: dict[str, dict[int, dict[int, float]]],
              references: dict[str, dict[int, float]]
              ) -> dict[int, tuple[dict[str, Any], dict[str, list[float]]]]:
    """At each size with 3 or more seeds, every option (the batch-dependent variants at that
    size, Batch Norm's PreciseBN and batch statistics at test, the batch-independent layers)
    decided by ``stats.decide`` as ``normlab recommend`` decides, on the seeds every option
    has: size -> (the decision as a record keeps it, option -> per-seed errors). Seeds added
    to a record after its first seeds were seen count as a second look: the rule spends its
    error over looks at 3 and at all seeds. ``lines_by`` and ``references``: the record's
    errors (``remedies.errors_by_size``, ``remedies.reference_errors``)."""
    found = {}
    for b in sorted({b for by in lines_by.values() for b in by}):
        options = {line: by[b] for line, by in lines_by.items() if b in by
                   and (" " not in line or line.startswith("bn ")
                        and line.partition(" ")[2] in INFERENCE)}
        options.update(references)
        common = sorted(set.intersection(*(set(e) for e in options.values())))
        if len(common) < 3:
            continue
        errors = {o: [e[s] for s in common] for o, e in options.items()}
        looks = (3, len(common)) if record.get("extensions") and len(common) > 3 else None
        decision = decide(errors, margin=REPORT_MARGIN, alpha=REPORT_ALPHA, looks=looks)
        found[b] = (decision_record(decision, len(common)), errors)
    return found


def decided_lines(record: dict[str, Any], lines_by: dict[str, dict[int, dict[int, float]]],
                  references: dict[str, dict[int, float]]) -> list[str]:
    """Each size's decision: the answer, every option's interval and verdict, the rule."""
    text = []
    for b, (last, errors) in decisions(record, lines_by, references).items():
        seeds = len(next(iter(errors.values())))
        spent = (f" Seeds 4-{seeds} were added after seeds 1-3 had been seen, so this is the "
                 f"second of two looks (3 and {seeds} seeds)."
                 if record.get("extensions") and seeds > 3 else "")
        text += [f"## Decided at {b} images per statistic ({seeds} seeds, margin "
                 f"{REPORT_MARGIN} points)", "",
                 answer(last, errors, {"margin": REPORT_MARGIN, "alpha": REPORT_ALPHA},
                        None) + spent, "",
                 *decision_table(last, errors, REPORT_ALPHA, record["runs"], b), "",
                 *promise_lines(last, REPORT_MARGIN, REPORT_ALPHA), ""]
    return text
