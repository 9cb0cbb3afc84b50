"""The guide's decisions, generated from the committed records: "Which normalization should
I use?" (docs/guide.md) and its short version (README.md, docs/index.md) show, for every
network measured, each option's verdict from ``stats.decide`` with its interval, or "not
decided". Nothing in those blocks is written by hand.

    python tools/guide.py          # rewrite the blocks between the markers
    python tools/guide.py --check  # exit 1 if a committed block differs (the tests run it)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from normlab.experiments.decision import REPORT_MARGIN, decisions, label
from normlab.experiments.recommend import options_of
from normlab.experiments.remedies import errors_by_size, reference_errors

ROOT = Path(__file__).resolve().parent.parent
# The networks measured, one column each: (heading, record).
NETWORKS = [
    ("small CNN, Fashion-MNIST", "results/remedies/fashion-mnist/remedies.json"),
    ("ResNet-8, Fashion-MNIST", "results/remedies/resnet8/remedies.json"),
    ("small CNN, MNIST", "results/remedies/mnist/remedies.json"),
]
SIZES = (2, 128)  # the sizes every network has; 4, 8 and 32 are in the reports
# Where normlab recommend added seeds to a network at a size (sequentially, seeds 1-3 taken
# from the remedies record), its last look's decision replaces the remedies record's.
RECOMMEND = {("ResNet-8, Fashion-MNIST", 2): "results/recommend/resnet8-2/recommend.json",
             ("ResNet-8, Fashion-MNIST", 128): "results/recommend/resnet8-128/recommend.json"}
LONG = ("<!-- decisions:start (tools/guide.py writes this block) -->", "<!-- decisions:end -->")
SHORT = ("<!-- short:start (tools/guide.py writes this block) -->", "<!-- short:end -->")
PAGES = {"docs/guide.md": LONG, "README.md": SHORT, "docs/index.md": SHORT}


def load() -> list[tuple[str, dict[int, tuple[dict[str, Any], dict[str, list[float]]]]]]:
    measured = []
    for name, path in NETWORKS:
        record = json.loads((ROOT / path).read_text())
        found = decisions(record, errors_by_size(record), reference_errors(record))
        for size in SIZES:
            extended = RECOMMEND.get((name, size))
            if extended is not None and (ROOT / extended).is_file():  # once it is committed
                found[size] = last_look(json.loads((ROOT / extended).read_text()))
        measured.append((name, found))
    return measured


def last_look(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """A recommend record's last decision and the errors of the seeds it decided on."""
    last = record["decisions"][-1]
    return last, {o: [x for seed, x in e.items() if int(seed) <= last["seeds"]]
                  for o, e in options_of(record).items()}


def seeds(found: dict[int, tuple[dict[str, Any], dict[str, list[float]]]]) -> str:
    """The seeds behind a network's column: "3", or "3-8" where options got more."""
    counts = sorted({len(e) for _, errors in found.values() for e in errors.values()})
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def cell(last: dict[str, Any], option: str) -> str:
    """One option's verdict on one network, with its θ interval."""
    if option not in last["verdicts"]:
        return "not measured"
    low, high = last["intervals"][option]
    interval = f"θ {low:+.2f} to {high:+.2f}"
    verdict = last["verdicts"][option]
    if verdict == "best":
        return f"**lowest error**, {last['means'][option]:.2f} %"
    if verdict == "equivalent":
        return f"within {REPORT_MARGIN} of the best ({interval})"
    if verdict == "worse":
        return f"behind by ≥ {low:.2f} ({interval})"
    return f"not decided ({interval})"


def long_block(measured: list) -> str:
    heads = [f"{name} ({seeds(d)} seeds)" for name, d in measured]
    lines = []
    for size in SIZES:
        options = [o for o in measured[0][1][size][0]["verdicts"]]
        for _, d in measured[1:]:
            options += [o for o in d[size][0]["verdicts"] if o not in options]
        order = sorted(options, key=lambda o: measured[0][1][size][0]["means"].get(o, 99))
        lines += [f"**At {size} images per statistic** (θ: the option's test error minus the "
                  f"best other option's, points; simultaneous 95 % intervals):", "",
                  "| option | " + " | ".join(heads) + " |",
                  "| --- |" + " --- |" * len(heads)]
        lines += [f"| {label(o)} | " + " | ".join(cell(d[size][0], o) for _, d in measured)
                  + " |" for o in order]
        lines.append("")
    lines += ["**Must you retrain?** A Batch Norm network as trained, with PreciseBN's "
              "recomputed statistics (no retraining):", ""]
    lines += [f"- {name}, at {size} images per statistic: {retrain(d[size][0])}"
              for name, d in measured for size in SIZES]
    return "\n".join(lines).rstrip()


def retrain(last: dict[str, Any]) -> str:
    verdict = last["verdicts"].get("bn precise")
    low, high = last["intervals"]["bn precise"]
    return {"best": "no: it has the lowest error",
            "equivalent": f"no: within {REPORT_MARGIN} points of the best "
                          f"(θ {low:+.2f} to {high:+.2f})",
            "worse": f"yes: shown behind the best by at least {low:.2f} points",
            "undecided": f"not decided (θ {low:+.2f} to {high:+.2f})"}[verdict]


def summary(last: dict[str, Any]) -> str:
    """A network's decision at one size in a line."""
    verdicts = last["verdicts"]

    def named(verdict: str) -> str:
        return ", ".join(label(o) for o in sorted(verdicts, key=last["means"].__getitem__)
                         if verdicts[o] == verdict) or "none"

    best = next(o for o, v in verdicts.items() if v == "best")
    return (f"lowest: {label(best)} ({last['means'][best]:.2f} %); within {REPORT_MARGIN}: "
            f"{named('equivalent')}; behind: {named('worse')}; not decided: "
            f"{named('undecided')}")


def short_block(measured: list) -> str:
    lines = ["| images per statistic | " + " | ".join(name for name, _ in measured[:2]) + " |",
             "| --- |" + " --- |" * 2]
    for size in SIZES:
        lines.append(f"| {size} | " + " | ".join(summary(d[size][0]) for _, d in measured[:2])
                     + " |")
    return "\n".join(lines)


def rewrite(text: str, markers: tuple[str, str], block: str) -> str:
    start, end = markers
    if start not in text or end not in text:
        raise SystemExit(f"markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    measured = load()
    blocks = {LONG: long_block(measured), SHORT: short_block(measured)}
    stale = []
    for page, markers in PAGES.items():
        path = ROOT / page
        text = path.read_text()
        new = rewrite(text, markers, blocks[markers])
        if new != text:
            stale.append(page)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"generated blocks differ in {', '.join(stale)}: run python tools/guide.py")
        return 1
    print("up to date" if not stale else f"rewrote {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
