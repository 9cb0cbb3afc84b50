"""How to use this machine's cores for the study: one process with all threads, independent
runs as --jobs, or data-parallel ranks under torchrun -- timed side by side on one study.

    python benchmarks/parallel_study.py --out benchmarks/results/parallel-cpu.json

runs ``normlab compare`` (the default 3-variant study unless ``--args`` says otherwise) in
each mode, the modes alternating within each of ``--rounds`` rounds on a quiet machine, and
records each mode's wall times (launch to exit, so process start-up counts), the median
over rounds of its speed-up against one process, the training time the run recorded, and
the final accuracies, with the command, git revision and machine. The modes change the low bits
(thread counts) or, for Batch Norm under torchrun, the statistics (per device), so their
accuracies are shown but not expected to be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from normlab.provenance import cpu_name, git_revision
from normlab.runner import cores

MODES = {
    "1 process x all threads": ["{normlab}", "compare"],
    "--jobs (one run per core)": ["{normlab}", "compare", "--jobs", "{cores}"],
    "torchrun (one rank per core)": [sys.executable, "-m", "torch.distributed.run",
                                     "--standalone", "--nproc-per-node", "{cores}",
                                     "-m", "normlab", "compare"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--args", default="", help="extra normlab compare arguments")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of all modes (default 1)")
    parser.add_argument("--out", type=Path, help="write the record here (JSON)")
    parser.add_argument("--keep", type=Path, help="keep each run's output folder under KEEP "
                        "(default: temporary)")
    args = parser.parse_args()
    normlab = str(Path(sys.executable).with_name("normlab"))
    record = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "git_revision": git_revision(), "cpu": cpu_name(), "cores": cores(),
              "normlab_args": args.args, "rounds": args.rounds, "modes": {}}
    walls: dict[str, list[float]] = {name: [] for name in MODES}
    for round_ in range(1, args.rounds + 1):
        for name, template in MODES.items():  # modes alternate within a round
            with tempfile.TemporaryDirectory() as tmp:
                out = (args.keep / f"round{round_}-mode{list(MODES).index(name) + 1}"
                       if args.keep else Path(tmp) / "run")
                command = [part.format(normlab=normlab, cores=cores()) for part in template]
                command += [*shlex.split(args.args), "--no-progress", "--out", str(out)]
                print(f"== round {round_}, {name}: {shlex.join(command)}", flush=True)
                start = time.perf_counter()
                subprocess.run(command, check=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
                walls[name].append(round(time.perf_counter() - start, 1))
                metrics = json.loads((out / "metrics.json").read_text())
            record["modes"][name] = dict(
                command=shlex.join(command[:-2]), wall_s=walls[name],
                training_s=round(metrics["wall_time_s"], 1), parallel=metrics["parallel"],
                final_test_acc={v: [r["history"]["test_acc"][-1] for r in e["runs"]]
                                for v, e in metrics["variants"].items()})
    base = walls["1 process x all threads"]
    for name, mode in record["modes"].items():
        # median over rounds of the per-round ratio: each ratio is measured side by side
        mode["speed_up"] = round(statistics.median(b / w for b, w in zip(base, walls[name],
                                                                          strict=True)), 2)
        print(f"{name:30s} {statistics.median(walls[name]):7.1f} s  {mode['speed_up']:.2f}x  "
              f"{mode['final_test_acc']}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
