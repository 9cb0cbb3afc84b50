"""The run's record: environment capture and the markdown report written next to the figures.

A number without its command, seed, versions and git revision cannot be reproduced, so the
report carries all of them, taken from ``metrics.json`` (the single source of truth).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__

# Final-epoch test accuracy of the study normlab grew from (MNIST, single run, 20 epochs).
REFERENCE_ACC = {"bn+l1": 99.27, "ln": 99.02, "gn": 99.25}


def git_revision(cwd: str | Path | None = None) -> str:
    """The checked-out commit (with "-dirty" if there are uncommitted changes), or "unknown"."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=where,
                             capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and machine facts that the numbers depend on."""
    env = dict(normlab=__version__, python=platform.python_version(), torch=torch.__version__,
               numpy=np.__version__, platform=platform.platform(), cpu=cpu_name(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               device=str(device), git_revision=git_revision())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _summary_rows(metrics: dict[str, Any]) -> list[str]:
    rows = ["| variant | normalization | params | final test acc | best test acc (epoch) "
            "| final test loss | reference study | wall time |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in metrics["variants"].items():
        if "failed" in v:
            rows.append(f"| {name} | {v['label']} | {v['params']:,} | **failed**: {v['failed']} "
                        f"| | | | |")
        for run in v.get("runs", []):
            h = run["history"]
            best = int(np.argmax(h["test_acc"]))
            # The reference study's numbers are for MNIST only.
            ref = REFERENCE_ACC.get(name) if metrics["config"]["dataset"] == "mnist" else None
            rows.append(
                f"| {name} (seed {run['seed']}) | {v['label']} | {v['params']:,} "
                f"| {h['test_acc'][-1]:.2f}% | {h['test_acc'][best]:.2f}% ({best + 1}) "
                f"| {h['test_loss'][-1]:.4f} | {f'{ref:.2f}%' if ref else '–'} "
                f"| {run['wall_time_s']:.0f} s |")
    return rows


def render_report(metrics: dict[str, Any]) -> str:
    """The markdown text of report.md for a finished (or partly finished) comparison."""
    cfg, env = metrics["config"], metrics["environment"]
    lines = [
        "# normlab comparison",
        "",
        f"{cfg['epochs']} epochs per variant on {cfg['dataset']} "
        f"({cfg['train_images']:,} training images, {cfg['test_images']:,} test images), "
        f"batch {cfg['batch_size']}, seed {cfg['seed']}.",
        "",
        *_summary_rows(metrics),
        "",
        "Accuracy is on the full test set after the last epoch; \"best\" is the highest "
        "epoch, which is reported for information only (choosing it would be peeking at "
        "the test set)." + (" Reference: the single-run MNIST study normlab grew from."
                            if cfg["dataset"] == "mnist" else ""),
        "",
        "## Test curves",
        "",
        "![test loss and accuracy](curves.png)",
        "",
        "## Misclassified test images",
        "",
    ]
    for name, v in metrics["variants"].items():
        if "runs" in v:
            lines += [f"### {v['label']} ({name})", "", f"![{name}](misclassified_{name}.png)",
                      ""]
    config = ", ".join(f"{k}={v}" for k, v in cfg.items())
    lines += [
        "## Reproduce",
        "",
        "```",
        metrics["command"],
        "```",
        "",
        f"- configuration: {config}",
        f"- git revision: `{env['git_revision']}`",
        f"- machine: {env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch "
        f"threads), device `{env['device']}`{', ' + env['gpu'] if 'gpu' in env else ''}",
        f"- versions: normlab {env['normlab']}, Python {env['python']}, torch {env['torch']}, "
        f"numpy {env['numpy']} on {env['platform']}",
        f"- started {metrics['started']}, total wall time {metrics.get('wall_time_s', 0):.0f} s",
        "",
    ]
    return "\n".join(lines)


def render_sweep_report(results: dict[str, Any], errors: dict[str, dict[int, list[float]]]
                        ) -> str:
    """report.md for a batch-size sweep: the protocol, the error table and provenance."""
    cfg, env = results["config"], results["environment"]
    sizes = sorted({b for by_batch in errors.values() for b in by_batch})
    seeds = len(cfg["seeds"])
    lines = [
        "# normlab batch-size sweep",
        "",
        f"Test error (%) on the full {cfg['dataset']} test set after {cfg['epochs']} epoch(s) "
        f"over the first {cfg['train_images']:,} training images, for each batch size; the "
        f"peak learning rate is {cfg['lr']} × batch / 128 (linear scaling), one-cycle schedule; "
        f"{'mean (min–max) over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'}.",
        "",
        "| variant | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "| --- |" + " ---: |" * len(sizes),
    ]
    for name, by_batch in errors.items():
        cells = []
        for b in sizes:
            v = by_batch.get(b)
            if not v:
                cells.append("–")
            elif len(v) == 1:
                cells.append(f"{v[0]:.2f}")
            else:
                cells.append(f"{np.mean(v):.2f} ({min(v):.2f}–{max(v):.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    failed = [r for r in results["runs"].values() if "failed" in r]
    lines += [f"- failed: {r['variant']}, batch {r['batch_size']}, seed {r['seed']}: "
              f"{r['failed']}" for r in failed]
    lines += [
        "",
        "![test error vs batch size](sweep.png)",
        "",
        "## Reproduce",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- git revision: `{env['git_revision']}`",
        f"- machine: {env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch "
        f"threads), device `{env['device']}`",
        f"- versions: normlab {env['normlab']}, Python {env['python']}, torch {env['torch']}",
        f"- total training time {sum(r['wall_time_s'] for r in results['runs'].values()):.0f} s",
        "",
    ]
    return "\n".join(lines)
