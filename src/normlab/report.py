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
from .stats import paired_difference, t_interval

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


def good_runs(variant: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a variant that finished (a run that diverged has no history)."""
    return [run for run in variant.get("runs", []) if "history" in run]


def failed_runs(variant: dict[str, Any]) -> list[str]:
    """Messages of the runs of a variant that diverged (older records keep one per variant)."""
    legacy = [variant["failed"]] if "failed" in variant else []
    return legacy + [run["failed"] for run in variant.get("runs", []) if "failed" in run]


def final_accuracies(metrics: dict[str, Any]) -> dict[str, dict[int, float]]:
    """variant -> {seed: final-epoch accuracy} over its finished runs."""
    return {name: {run["seed"]: run["history"]["test_acc"][-1] for run in good_runs(v)}
            for name, v in metrics["variants"].items() if good_runs(v)}


def seeds_of(config: dict[str, Any]) -> list[int]:
    """The seeds of a run (records made before --seeds name a single ``seed``)."""
    return list(config["seeds"]) if "seeds" in config else [config["seed"]]


def _seed_rows(metrics: dict[str, Any], split: str) -> list[str]:
    """One row per (variant, seed): the raw numbers every summary is computed from."""
    rows = [f"| variant | seed | params | final {split} acc | best {split} acc (epoch) "
            f"| final {split} loss | wall time |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in metrics["variants"].items():
        for message in failed_runs(v):
            rows.append(f"| {name} | | {v['params']:,} | **failed**: {message} | | | |")
        for run in good_runs(v):
            h = run["history"]
            best = int(np.argmax(h["test_acc"]))
            rows.append(f"| {name} | {run['seed']} | {v['params']:,} | {h['test_acc'][-1]:.2f}% "
                        f"| {h['test_acc'][best]:.2f}% ({best + 1}) | {h['test_loss'][-1]:.4f} "
                        f"| {run['wall_time_s']:.0f} s |")
    return rows


def _summary_rows(metrics: dict[str, Any], split: str) -> list[str]:
    """Per variant: mean ± std, 95% t-interval, min and max of the final accuracy."""
    reference = REFERENCE_ACC if metrics["config"]["dataset"] == "mnist" and \
        split == "test" else {}
    rows = [f"| variant | normalization | params | seeds | final {split} acc, mean ± std "
            f"| 95% CI | min | max | reference study |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, accs in final_accuracies(metrics).items():
        v, iv = metrics["variants"][name], t_interval(list(accs.values()))
        spread = f" ± {iv.std:.2f}" if iv.n > 1 else ""
        ci = f"{iv.low:.2f}–{iv.high:.2f}%" if iv.n > 1 else "– (one seed)"
        ref = f"{reference[name]:.2f}%" if name in reference else "–"
        rows.append(f"| {name} | {v['label']} | {v['params']:,} | {iv.n} "
                    f"| **{iv.mean:.2f}%**{spread} | {ci} | {min(accs.values()):.2f}% "
                    f"| {max(accs.values()):.2f}% | {ref} |")
    return rows


def _pair_rows(metrics: dict[str, Any]) -> list[str]:
    """Every pair of variants: the mean per-seed difference with its paired 95% interval."""
    accs = final_accuracies(metrics)
    rows = ["| A − B | seeds | mean difference (points) | 95% CI | test images | verdict |",
            "| --- | ---: | ---: | ---: | ---: | --- |"]
    names = list(accs)
    test_images = metrics["config"]["test_images"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if len(accs[a].keys() & accs[b].keys()) < 2:
                continue
            d = paired_difference(accs[a], accs[b])
            verdict = (f"{a if d.mean > 0 else b} better" if d.excludes_zero()
                       else "not distinguishable")
            rows.append(f"| {a} − {b} | {d.n} | {d.mean:+.3f} | {d.low:+.3f} to {d.high:+.3f} "
                        f"| {d.mean * test_images / 100:+.1f} | {verdict} |")
    return rows if len(rows) > 2 else []


def parallel_line(record: dict[str, Any]) -> str:
    """How the runs were spread over processes (older records: one process)."""
    p = record.get("parallel") or {}
    threads = p.get("threads_per_process", record["environment"].get("torch_threads"))
    if p.get("world_size", 1) > 1:
        per_device = (f", {p['images_per_device']} images per device"
                      if p.get("images_per_device") else "")
        return (f"data-parallel over {p['world_size']} processes on {p['nodes']} machine(s) "
                f"({p['backend']}){per_device}, {threads} thread(s) each")
    if p.get("jobs", 1) > 1:
        return f"{p['jobs']} runs at a time in separate processes, {threads} thread(s) each"
    return f"one process, {threads} thread(s)"


def render_report(metrics: dict[str, Any]) -> str:
    """The markdown text of report.md for a finished (or partly finished) comparison."""
    cfg, env = metrics["config"], metrics["environment"]
    split = cfg.get("eval_split", "test")
    seeds = seeds_of(cfg)
    evaluated = (f"{cfg['test_images']:,} test images" if split == "test" else
                 f"{cfg['test_images']:,} validation images held out of the training set; "
                 f"the test set was not used")
    pairs = _pair_rows(metrics)
    lines = [
        "# normlab comparison",
        "",
        f"{cfg['epochs']} epochs per variant on {cfg['dataset']} "
        f"({cfg['train_images']:,} training images, {evaluated}), batch {cfg['batch_size']}, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}."
        + (f" Batch Norm computes its training statistics over each "
           f"{cfg['virtual_batch_size']} images (--virtual-batch-size)."
           if cfg.get("virtual_batch_size") else ""),
        "",
        *_summary_rows(metrics, split),
        "",
        f"Accuracy is on the full {split} set after the last epoch. The 95% confidence "
        "interval of the mean uses Student's t with n − 1 degrees of freedom (n seeds), so "
        "it is wide for few seeds." + (" Reference: the single-run MNIST study normlab grew "
                                       "from." if cfg["dataset"] == "mnist" else ""),
        "",
    ]
    if pairs:
        lines += [
            "## Is one variant really better than another?",
            "",
            "Differences of final accuracy, paired by seed (the same seed gives both variants "
            "the same data order and augmentation), with a paired-t 95% interval. A verdict "
            "needs the interval to exclude 0.",
            "",
            *pairs,
            "",
        ]
    lines += [
        "## Every run",
        "",
        *_seed_rows(metrics, split),
        "",
        "\"best\" is the highest epoch, reported for information only (choosing it would be "
        f"peeking at the {split} set).",
        "",
        f"## {split.capitalize()} curves",
        "",
        f"![{split} loss and accuracy](curves.png)",
        "",
        f"## Misclassified {split} images (seed {seeds[0]})",
        "",
    ]
    for name, v in metrics["variants"].items():
        if good_runs(v):
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
        f"- parallelism: {parallel_line(metrics)}",
        f"- versions: normlab {env['normlab']}, Python {env['python']}, torch {env['torch']}, "
        f"numpy {env['numpy']} on {env['platform']}",
        f"- started {metrics['started']}, total wall time {metrics.get('wall_time_s', 0):.0f} s",
        "",
    ]
    return "\n".join(lines)


SANITY_ACC = 98.5  # every variant must reach this at batch 128, or the sweep under-trains


def _sanity_lines(results: dict[str, Any]) -> list[str]:
    """Whether every variant trained properly at the reference batch of 128 (the batch the
    20-epoch comparison uses): a sweep whose large batches are starved of steps measures
    under-training, not normalization."""
    at_128 = [r for r in results["runs"].values() if r.get("batch_size") == 128]
    if not at_128:
        return []
    worst = min(at_128, key=lambda r: r.get("test_acc", -1.0))
    if any("failed" in r for r in at_128) or worst["test_acc"] < SANITY_ACC:
        return [f"**Sanity check failed**: at batch 128, {worst['variant']} seed "
                f"{worst['seed']} reached {worst.get('test_acc', float('nan')):.2f}% "
                f"(< {SANITY_ACC}%): this protocol under-trains; use more --epochs.", ""]
    return [f"Sanity check: at batch 128 every run reached at least {SANITY_ACC}% "
            f"(lowest: {worst['variant']} seed {worst['seed']}, {worst['test_acc']:.2f}%).", ""]


def render_sweep_report(results: dict[str, Any], errors: dict[str, dict[int, list[float]]]
                        ) -> str:
    """report.md for a batch-size sweep: the protocol, the error table and provenance."""
    cfg, env = results["config"], results["environment"]
    sizes = sorted({b for by_batch in errors.values() for b in by_batch})
    seeds = len(cfg["seeds"])
    images = (f"all {cfg['train_images']:,}" if not cfg.get("samples")
              else f"the first {cfg['train_images']:,}")
    lines = [
        "# normlab batch-size sweep",
        "",
        f"Test error (%) on the full {cfg['dataset']} test set after {cfg['epochs']} epoch(s) "
        f"over {images} training images at every batch size (a batch of b takes 128 / b times "
        f"the steps of a batch of 128); the peak learning rate is {cfg['lr']} × batch / 128 "
        f"(linear scaling) under a one-cycle schedule whose first 30% is a linear warm-up; "
        f"Batch Norm's statistics are over the whole batch; "
        f"{'mean (min–max) over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'}.",
        "",
    ]
    lines += _sanity_lines(results)
    lines += [
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
        f"- parallelism: {parallel_line(results)}",
        f"- versions: normlab {env['normlab']}, Python {env['python']}, torch {env['torch']}",
        f"- total training time {sum(r['wall_time_s'] for r in results['runs'].values()):.0f} s",
        "",
    ]
    return "\n".join(lines)
