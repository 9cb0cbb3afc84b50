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
from .engine import VARIANTS
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


def _reproduce_heading(record: dict[str, Any]) -> list[str]:
    """The "Reproduce" heading and the command that made the record."""
    return ["## Reproduce", "", "```", record["command"], "```", ""]


def parallel_line(record: dict[str, Any]) -> str:
    """How the runs were spread over processes (older records: one process), and how the
    runs of a resume that trained differently were."""
    line = _parallelism(record.get("parallel") or {}, record["environment"])
    for resumed in record.get("resumed_parallel", []):
        line += (f"; {len(resumed['runs'])} run(s) of a resume: "
                 f"{_parallelism(resumed['parallel'], record['environment'])}")
    return line


def _parallelism(p: dict[str, Any], environment: dict[str, Any]) -> str:
    threads = p.get("threads_per_process", environment.get("torch_threads"))
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
        *_reproduce_heading(metrics),
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
        lines.append(f"| {name} | " + " | ".join(_cell(by_batch.get(b, [])) for b in sizes)
                     + " |")
    failed = [r for r in results["runs"].values() if "failed" in r]
    lines += [f"- failed: {r['variant']}, batch {r['batch_size']}, seed {r['seed']}: "
              f"{r['failed']}" for r in failed]
    lines += [
        "",
        "![test error vs batch size](sweep.png)",
        "",
        *_reproduce_heading(results),
        f"- git revision: `{env['git_revision']}`",
        f"- machine: {env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch "
        f"threads), device `{env['device']}`",
        f"- parallelism: {parallel_line(results)}",
        f"- versions: normlab {env['normlab']}, Python {env['python']}, torch {env['torch']}",
        f"- total training time {sum(r['wall_time_s'] for r in results['runs'].values()):.0f} s",
        "",
    ]
    return "\n".join(lines)


# Wu & He (2018), Group Normalization, Table 2 / Figure 1: ImageNet ResNet-50 top-1 error (%)
# by images per GPU, i.e. per Batch Norm statistic.
GN_PAPER = {"images": (32, 16, 8, 4, 2), "bn": (23.6, 23.7, 24.8, 27.3, 34.7),
            "gn": (24.1, 24.2, 24.0, 24.2, 24.1)}


def _cell(values: list[float]) -> str:
    """One table cell: mean (min–max) over seeds, the value for one seed, "–" for none."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def statistics_table(results: dict[str, Any]) -> tuple[dict[int, list[float]],
                                                        dict[str, list[float]]]:
    """(Batch Norm's test errors by images per statistic, the references' errors by
    variant), over seeds in run order; failed runs left out (the report lists them)."""
    bn: dict[int, list[float]] = {}
    references: dict[str, list[float]] = {}
    for r in results["runs"].values():
        if "failed" in r:
            continue
        if r.get("images_per_statistic"):
            bn.setdefault(r["images_per_statistic"], []).append(r["test_error"])
        else:
            references.setdefault(r["variant"], []).append(r["test_error"])
    return dict(sorted(bn.items())), references


def render_statistics_report(results: dict[str, Any]) -> str:
    """report.md for the per-device statistics study."""
    cfg, env = results["config"], results["environment"]
    bn, references = statistics_table(results)
    sizes = list(bn)
    seeds = cfg["seeds"]
    over = f"mean (min–max) over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 \
        else f"seed {seeds[0]}"
    steps = cfg["epochs"] * -(-cfg["train_images"] // cfg["batch_size"])
    lines = [
        "# normlab per-device statistics study",
        "",
        f"Everything that matters to optimisation is held fixed: global batch "
        f"{cfg['batch_size']}, peak learning rate {cfg['lr']} (one-cycle with warm-up), "
        f"{cfg['epochs']} epoch(s) = {steps:,} steps over {cfg['train_images']:,} "
        f"{cfg['dataset']} images, the same data order and augmentation for a given seed. "
        f"Only the number of images each Batch Norm statistic is computed over changes "
        f"(`--virtual-batch-size`: each batch cut into parts as that many devices would cut "
        f"it). Group and Layer Norm normalise every image on its own, so their result does "
        f"not depend on the grouping: they are trained once per seed as references. "
        f"Test error (%) on all {cfg['test_images']:,} test images, {over}.",
        "",
        "| images per statistic | " + " | ".join(map(str, sizes)) + " |",
        "| --- |" + " ---: |" * len(sizes),
        "| Batch Norm (bn) | " + " | ".join(_cell(bn[b]) for b in sizes) + " |",
    ]
    for v, errors in references.items():
        lines.append(f"| {VARIANTS[v].label} ({v}), any grouping | "
                     + " | ".join(_cell(errors) for _ in sizes) + " |")
    failed = [r for r in results["runs"].values() if "failed" in r]
    lines += [f"- failed: {r['variant']}, {r.get('images_per_statistic') or 'any'} images per "
              f"statistic, seed {r['seed']}: {r['failed']}" for r in failed]
    lines += ["", "![test error vs images per statistic](statistics.png)", ""]
    lines += _two_process_lines(results)
    lines += _paper_lines(bn, references)
    lines += _seen_lines(results)
    config = ", ".join(f"{k}={v}" for k, v in cfg.items())
    lines += [
        "## Every run",
        "",
        "| variant | images per statistic | seed | test error | test loss | train loss | time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {r['variant']} | {r.get('images_per_statistic') or 'any'} | {r['seed']} | "
          + (f"failed: {r['failed']} | | | |" if "failed" in r else
             f"{r['test_error']:.2f}% | {r['test_loss']:.4f} | {r['train_loss']:.4f} | "
             f"{r['wall_time_s']:.0f} s |")
          for r in results["runs"].values()),
        "",
        *_reproduce_heading(results),
        f"- configuration: {config}",
        f"- git revision: `{env['git_revision']}`",
        f"- machine: {env['cpu']} ({env['cpu_count']} CPUs), device `{env['device']}`",
        f"- parallelism: {parallel_line(results)}",
        f"- versions: normlab {env['normlab']}, Python {env['python']}, torch {env['torch']}",
        f"- started {results['started']}; training time {_training_time(results)}",
        "",
    ]
    return "\n".join(lines)


def _training_time(results: dict[str, Any]) -> str:
    one = sum(r["wall_time_s"] for r in results["runs"].values())
    two = results.get("two_processes")
    if not two:
        return f"{one:.0f} s"
    more = sum(s["wall_time_s"] for v in two["runs"].values() for s in v.values())
    return f"{one:.0f} s in one process, {more:.0f} s on {two['processes']} processes"


def _two_process_lines(results: dict[str, Any]) -> list[str]:
    """The torchrun runs next to the one-process runs that compute the same statistics."""
    two = results.get("two_processes")
    if not two:
        return []
    seeds = [str(s) for s in results["config"]["seeds"]]
    one: dict[int, dict[str, float]] = {}  # images per statistic -> seed -> test error
    for r in results["runs"].values():
        if r.get("images_per_statistic") and "failed" not in r:
            one.setdefault(r["images_per_statistic"], {})[str(r["seed"])] = r["test_error"]
    p = two["processes"]
    lines = [
        f"## On {p} processes (torchrun, gloo)",
        "",
        f"The same runs data-parallel over {p} processes ({two['folder']}/, a `normlab "
        f"compare`): plain Batch Norm normalises over each process's "
        f"{two['images_per_statistic']['bn']} images, synchronized Batch Norm over all "
        f"{two['images_per_statistic']['sbn']}. Each should equal the one-process run with "
        f"the same images per statistic: in exact arithmetic they are the same computation "
        f"(the float64 tests in tests/test_distributed.py agree to 1e-15); in float32 the two "
        f"orders of summation round differently, and those differences grow over thousands "
        f"of steps, so per seed they agree only to within seed-to-seed noise.",
        "",
        "| run | images per statistic | test error | one process, same statistics | "
        "per-seed difference (points) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name in ("sbn", "bn"):
        runs = two["runs"].get(name, {})
        ips = two["images_per_statistic"][name]
        mine = [runs[s]["test_error"] for s in seeds if s in runs]
        match = one.get(ips, {})
        diffs = ", ".join(f"{runs[s]['test_error'] - match[s]:+.2f}" for s in seeds
                          if s in runs and s in match)
        lines.append(f"| {name} on {p} processes | {ips}{' per process' if name == 'bn' else ''}"
                     f" | {_cell(mine)} | {_cell(list(match.values()))} | {diffs or '–'} |")
    return [*lines, ""]


def _paper_lines(bn: dict[int, list[float]], references: dict[str, list[float]]) -> list[str]:
    sizes = GN_PAPER["images"]
    gn = references.get("gn", [])
    return [
        "## Next to the Group Norm paper",
        "",
        "Wu & He (2018), Table 2 / Figure 1: ImageNet top-1 error (%) of ResNet-50 by images "
        "per GPU (= per Batch Norm statistic), against this study's MNIST test error (%). "
        "The scales differ by two orders of magnitude; compare the shapes.",
        "",
        "| images per statistic | " + " | ".join(map(str, sizes)) + " |",
        "| --- |" + " ---: |" * len(sizes),
        "| BN, ImageNet (paper) | " + " | ".join(f"{e}" for e in GN_PAPER["bn"]) + " |",
        "| GN, ImageNet (paper) | " + " | ".join(f"{e}" for e in GN_PAPER["gn"]) + " |",
        "| BN, MNIST (here) | " + " | ".join(f"{np.mean(bn[b]):.2f}" if b in bn else "–"
                                            for b in sizes) + " |",
        "| GN, MNIST (here) | " + " | ".join(f"{np.mean(gn):.2f}" if gn else "–"
                                            for _ in sizes) + " |",
        "",
    ]


def _seen_lines(results: dict[str, Any]) -> list[str]:
    seen = results.get("bn_statistics")
    if not seen or not seen.get("by_images"):
        return []
    by = seen["by_images"]
    sizes = sorted(by, key=int)
    lines = [
        "## Why: what Batch Norm normalises with in training, and at test time",
        "",
        f"The seed-{seen['seed']} Batch Norm models, in training mode, on "
        f"{seen['batches']} training batches: the mean and variance that channel "
        f"{seen['channel']} of the last Batch Norm layer ({seen['layer']}) normalises "
        f"with, computed over the first {' or '.join(sizes)} images of each batch, against "
        f"the running estimates that the same layer uses at test time.",
        "",
        "![per-batch statistics vs running estimates](bn_statistics.png)",
        "",
        "Every Batch Norm layer, medians over its channels: the spread of a batch's mean "
        "(in running standard deviations) and variance (as a fraction of the running "
        "variance) from batch to batch, and the average batch variance over the running "
        "variance (1 = training and test normalise alike).",
        "",
        "| layer | " + " | ".join(f"mean spread, {s} images | variance spread, {s} | "
                                   f"variance ratio, {s}" for s in sizes) + " |",
        "| --- |" + " ---: |" * (3 * len(sizes)),
    ]
    for layer in by[sizes[0]]["layers"]:
        cells = []
        for s in sizes:
            x = by[s]["layers"][layer]
            cells += [f"{x['mean_noise']:.3f}", f"{x['var_noise']:.3f}", f"{x['var_ratio']:.3f}"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return [*lines, ""]

