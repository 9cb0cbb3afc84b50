"""One command timed at two git revisions, side by side: did a change make it faster?

    python benchmarks/ab.py --base 40bf882 --rounds 3 --out benchmarks/results/sync-bn-ab.json \
        -- python -m torch.distributed.run --standalone --nproc-per-node 2 \
           -m normlab compare --variants sbn --epochs 1 --no-progress --out {out}

Each revision is checked out in a temporary git worktree and put first on PYTHONPATH, so
``python -m normlab`` (and torchrun's workers) import that revision's code. The revisions
alternate within every round, each run in a fresh folder (``{out}`` in the command is a
folder in it), and the record holds every wall time (launch to exit) and the median over
rounds of base / head: on a shared machine absolute times drift, side-by-side ratios do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from normlab.provenance import cpu_name

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def timed_run(command: list[str], src: Path, folder: Path) -> float:
    """Seconds from launch to exit of ``command`` importing normlab from ``src``."""
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(src), *filter(None, [os.environ.get("PYTHONPATH")])])}
    argv = [part.replace("{out}", str(folder / "out")) for part in command]
    start = time.perf_counter()
    subprocess.run(argv, cwd=folder, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the revision before the change")
    p.add_argument("--head", default="HEAD", help="the revision after it (default HEAD)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the record (JSON) here")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="after --: the command; {out} becomes a fresh folder per run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to time after --")
    try:
        revisions = {name: git("rev-parse", "--verify", "--short=12", f"{rev}^{{commit}}")
                     for name, rev in (("base", args.base), ("head", args.head))}
    except subprocess.CalledProcessError as exc:
        p.error(f"not a revision of this repository: {exc.cmd[-1].removesuffix('^{commit}')!r}")
    times: dict[str, list[float]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="normlab-ab-") as tmp:
        trees = {name: Path(tmp) / name for name in revisions}
        for name, rev in revisions.items():
            git("worktree", "add", "--detach", str(trees[name]), rev)
        try:
            for r in range(1, args.rounds + 1):
                for name in ("base", "head") if r % 2 else ("head", "base"):
                    try:
                        seconds = timed_run(command, trees[name] / "src",
                                            Path(tmp) / f"run-{name}-{r}")
                    except subprocess.CalledProcessError as exc:
                        print(f"ab.py: the command failed at {name} ({revisions[name]}) with "
                              f"exit code {exc.returncode}; its error output is above",
                              file=sys.stderr)
                        return 1
                    times[name].append(seconds)
                    print(f"round {r}: {name} ({revisions[name]}) {seconds:.1f} s", flush=True)
        finally:
            for tree in trees.values():
                git("worktree", "remove", "--force", str(tree))
    ratio = statistics.median(b / h for b, h in zip(times["base"], times["head"], strict=True))
    print(f"base / head, median of {args.rounds} rounds: {ratio:.3f}x")
    if args.out:
        record = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]),
                  "timed": shlex.join(command), "revisions": revisions,
                  "wall_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
                  "speed_up": round(ratio, 3), "cpu": cpu_name(),
                  "cpu_count": os.cpu_count(), "torch": torch.__version__,
                  "python": platform.python_version()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
