"""Check that the committed results still reproduce: run each results folder's one-epoch
check at the revision it was last checked at and at another (HEAD by default), and compare
every number the records keep, bit for bit.

A change to the code that trains (model, engine, data, norms, defaults) can move the
committed numbers; re-running every study takes days, a one-epoch run of each folder's
variants at two revisions on one CPU takes minutes and shows whether the computation
changed. Each revision is checked out into its own worktree and run with this Python;
``--write`` then adds the new revision to each folder's ``"reproduced_at"`` with a sentence
in ``"reproduction_checks"`` saying what was run.

    python tools/reproduce.py                 # base revisions below vs HEAD, 2 at a time
    python tools/reproduce.py --write         # and record it in results/*/...json
    python tools/reproduce.py --only compare  # one check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE = "39de92d3381c"  # the last revision every small-CNN folder was checked at
RESNET_BASE = "d7d01f7"  # where the ResNet-8 runs were trained
RESNET = ["--dataset", "fashion-mnist", "--model", "examples/resnet.py:resnet",
          "--model-arg", "depth=8", "--seeds", "1", "--epochs", "1", "--limit-train",
          "12800"]

# name -> (base revision, command after "normlab", results records it checks)
CHECKS: dict[str, tuple[str, list[str], list[str]]] = {
    "compare": (BASE, ["compare", "--variants", "bn+l1", "ln", "gn"],
                ["results/compare/metrics.json"]),
    "bf16": (BASE, ["compare", "--precision", "bf16", "--variants", "bn+l1", "gn"],
             ["results/compare-bf16/metrics.json"]),
    "fashion": (BASE, ["compare", "--dataset", "fashion-mnist", "--variants", "gn"],
                ["results/fashion-mnist/metrics.json"]),
    "virtual": (BASE, ["compare", "--variants", "bn", "--virtual-batch-size", "2"],
                ["results/statistics/statistics.json"]),
    "sweep": (BASE, ["sweep", "--variants", "ln", "--batch-sizes", "128", "--seeds", "2"],
              ["results/sweep/sweep.json", "results/sweep/control-3-epochs/sweep.json",
               "results/sweep/control-lr-0.02/sweep.json"]),
    "remedies-fashion": (BASE, ["remedies", "--dataset", "fashion-mnist", "--variants",
                                "evob0", "--images-per-statistic", "2", "--references"],
                         ["results/remedies/fashion-mnist/remedies.json"]),
    "remedies-mnist": (BASE, ["remedies", "--variants", "bn", "--images-per-statistic", "2",
                              "--references"], ["results/remedies/mnist/remedies.json"]),
    "torchrun": (BASE, ["compare", "--variants", "sbn", "bn"],
                 ["results/statistics/two-processes/metrics.json"]),
    "resnet8": (RESNET_BASE, ["remedies", *RESNET, "--variants", "bn", "evob0", "brn",
                              "--images-per-statistic", "2", "--references", "gn+ws", "frn",
                              "evos0"], ["results/remedies/resnet8/remedies.json",
                                         "results/recommend/resnet8-2/recommend.json"]),
    "resnet8-128": (RESNET_BASE, ["remedies", *RESNET, "--variants", "bn",
                                  "--images-per-statistic", "128", "--references", "gn",
                                  "ln+ws"], ["results/remedies/resnet8/remedies.json",
                                             "results/recommend/resnet8-2/recommend.json"]),
}
SEEDED = ("--seeds",)  # checks that name their own seeds; the others run seed 1


def command(name: str) -> list[str]:
    """The check's command line after ``normlab``: one epoch, one thread, no bars."""
    args = CHECKS[name][1]
    extra = [] if any(a in args for a in SEEDED) else ["--seeds", "1"]
    if "--epochs" not in args:
        extra += ["--epochs", "1"]
    return [*args, *extra, "--threads", "1", "--no-progress"]


def numbers(value: Any, path: str = "") -> dict[str, float]:
    """Every number a record keeps of its runs, by its path in the record, but times
    (which vary)."""
    key = path.rpartition("/")[2]
    if "time" in key or key in ("started", "finished"):
        return {}
    if isinstance(value, dict):
        return {p: x for k, v in value.items() for p, x in numbers(v, f"{path}/{k}").items()}
    if isinstance(value, list):
        return {p: x for i, v in enumerate(value)
                for p, x in numbers(v, f"{path}[{i}]").items()}
    if isinstance(value, bool) or not isinstance(value, int | float):
        return {}
    return {path: float(value)}


def compare(theirs: dict[str, float], mine: dict[str, float]) -> tuple[bool, int, int]:
    """(identical, numbers both records keep, numbers only the newer one keeps: a field
    added since, such as another inference remedy)."""
    both = theirs.keys() & mine.keys()
    same = bool(both) and theirs.keys() <= mine.keys() and \
        all(theirs[k] == mine[k] for k in both)
    return same, len(both), len(mine.keys() - theirs.keys())


def run_check(name: str, revision: str, work: Path) -> dict[str, float]:
    """Check out ``revision`` (once) and run the check there; the numbers of its runs."""
    tree = work / revision
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                        revision], check=True, capture_output=True)
    out = work / f"{name}-{revision}"
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "normlab", *command(name), "--out", str(out)]
    if name == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "normlab", *command(name)[:-3],
                "--no-progress", "--out", str(out)]
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} at {revision} failed: {done.stderr.strip()[-500:]}")
    record = next(p for p in out.glob("*.json"))
    data = json.loads(record.read_text())
    return numbers(data.get("runs", data.get("variants")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", default="HEAD", help="the revision to check (default HEAD)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--jobs", type=int, default=2, help="checks at a time (one thread each)")
    parser.add_argument("--write", action="store_true",
                        help="record the result in each folder's JSON")
    args = parser.parse_args()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", args.head],
                          check=True, capture_output=True, text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="normlab-reproduce-"))
    tasks = [(n, rev) for n in args.only for rev in (CHECKS[n][0], head)]
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = dict(zip(tasks, pool.map(lambda t: run_check(*t, work), tasks),
                               strict=True))
    finally:
        for tree in {rev for _, rev in tasks}:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(work / tree)], capture_output=True)
    same, counts = {}, {}
    for name in args.only:
        base = CHECKS[name][0]
        same[name], counts[name], added = compare(results[(name, base)], results[(name, head)])
        print(f"{name}: {counts[name]} numbers at {base} and {head}: "
              f"{'identical' if same[name] else 'DIFFERENT'}"
              + (f" ({added} more kept at {head} only)" if added else ""))
    if args.write:  # a folder is marked only where every check of it was identical
        for path in {p for n in args.only for p in CHECKS[n][2]}:
            names = [n for n in args.only if path in CHECKS[n][2]]
            if all(same[n] for n in names):
                record(path, [(n, counts[n]) for n in names], head)
    return 0 if all(same.values()) else 1


def record(path: str, checks: list[tuple[str, int]], head: str) -> None:
    """Add ``head`` to the record's reproduced_at, with what was run."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "") if Path("/proc/cpuinfo").exists() \
        else ""
    ran = "; ".join(f"`normlab {' '.join(command(n))}` ({count} numbers)"
                    for n, count in checks)
    base = CHECKS[checks[0][0]][0]
    line = (f"{head}: {ran}, at {base} and at {head}, on a 2-core "
            f"{cpu or platform.machine()}, gave identical results bit for bit (losses, "
            f"accuracies, each epoch's history and, where kept, the inference remedies; "
            f"tools/reproduce.py). A one-epoch run at two revisions on one CPU, not the "
            f"record's own runs: it checks that the code since {base} did not change the "
            f"computation.")
    file = ROOT / path
    data = json.loads(file.read_text())
    if head not in data.setdefault("reproduced_at", []):
        data["reproduced_at"].append(head)
    if line not in data.setdefault("reproduction_checks", []):
        data["reproduction_checks"].append(line)
    file.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
