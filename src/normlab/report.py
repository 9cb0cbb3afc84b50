"""The pieces every experiment's report is built from: seed tables with means, confidence
intervals and paired differences, and the provenance lines (command, configuration,
revision, machine, parallelism, versions) drawn from the record's ``environment``.

A number without its command, seed, versions and git revision cannot be reproduced, so every
report carries all of them, taken from its record (the single source of truth). Each
experiment's own report lives with it in ``normlab.experiments``.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from .provenance import environment  # noqa: F401 - the notebook imports it from here
from .stats import paired_difference, t_interval

# Final-epoch test accuracy of the study normlab grew from (MNIST, single run, 20 epochs).
REFERENCE_ACC = {"bn+l1": 99.27, "ln": 99.02, "gn": 99.25}


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


def seed_rows(metrics: dict[str, Any], split: str) -> list[str]:
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


def summary_rows(metrics: dict[str, Any], split: str) -> list[str]:
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


def pair_rows(metrics: dict[str, Any]) -> list[str]:
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


def reproduce_heading(record: dict[str, Any]) -> list[str]:
    """The "Reproduce" heading and the command that made the record."""
    return ["## Reproduce", "", "```", shown_command(record["command"]), "```", ""]


def shown_command(command: str, width: int = 80) -> str:
    """``command`` as a reader can run it: an absolute ``--out`` folder, which names the
    machine that made the record, becomes ``OUTDIR``; relative folders stay. Lines longer
    than ``width`` break before an option, with a shell continuation, so that the code
    block fits the page's column."""
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word == "--out" and Path(words[i + 1]).is_absolute():
            words[i + 1] = "OUTDIR"
    groups: list[str] = []  # the program, then each option with its values
    for word in map(shlex.quote, words):
        if groups and not word.startswith("--"):
            groups[-1] += f" {word}"
        else:
            groups.append(word)
    lines = [groups[0]]
    for group in groups[1:]:
        if len(lines[-1]) + 1 + len(group) > width - 2:  # room for " \\"
            lines.append("    " + group)
        else:
            lines[-1] += f" {group}"
    return " \\\n".join(lines)


def local(text: str) -> str:
    """``text`` with the folder it is rendered from left out of its paths: a record keeps
    a ``--model`` file's absolute path (so that any folder can resume it), which names the
    machine; a report run from the checkout shows ``examples/resnet.py``."""
    return text.replace(f"{Path.cwd()}{os.sep}", "")


def parallel_line(record: dict[str, Any]) -> str:
    """How the runs were spread over processes (older records: one process), and how the
    runs of a resume that trained differently were."""
    line = _parallelism(record.get("parallel") or {}, record["environment"])
    for resumed in record.get("resumed_parallel", []):
        line += (f"; {len(resumed['runs'])} run(s) of a resume: "
                 f"{_parallelism(resumed['parallel'], record['environment'])}")
    return line


def _parallelism(p: dict[str, Any], env: dict[str, Any]) -> str:
    threads = p.get("threads_per_process", env.get("torch_threads"))
    if p.get("world_size", 1) > 1:
        per_device = (f", {p['images_per_device']} images per device"
                      if p.get("images_per_device") else "")
        return (f"data-parallel over {p['world_size']} processes on {p['nodes']} machine(s) "
                f"({p['backend']}){per_device}, {threads} thread(s) each")
    if p.get("jobs", 1) > 1:
        return f"{p['jobs']} runs at a time in separate processes, {threads} thread(s) each"
    return f"one process, {threads} thread(s)"




def provenance_lines(record: dict[str, Any], today: str | None = None) -> list[str]:
    """The "Reproduce" section: the command (and ``today``, the same run under today's
    defaults, where they changed), then the configuration, git revision, machine,
    parallelism and versions the record was made with."""
    env = record["environment"]
    # An extended record (report --add) keeps the configuration its own command ran with.
    config = local(", ".join(f"{k}={v}" for k, v in
                             record.get("config_as_run", record["config"]).items()))
    lines = reproduce_heading(record)
    if today is not None:
        lines += ["The command as run; normlab's defaults have changed since, and today the "
                  "same run is:", "", "```", shown_command(today), "```", ""]
    return [
        *lines,
        f"- configuration: {config}",
        *_environment_lines(env, parallel_line(record)),
        *extension_lines(record),
    ]


def _environment_lines(env: dict[str, Any], parallelism: str) -> list[str]:
    return [
        f"- git revision: `{env['git_revision']}`",
        f"- machine: {env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch "
        f"threads), device `{env['device']}`" + (f", {env['gpu']}" if "gpu" in env else ""),
        f"- parallelism: {parallelism}",
        f"- versions: normlab {env['normlab']}, Python {env['python']}, torch {env['torch']}, "
        f"numpy {env['numpy']} on {env['platform']}",
    ]


def extension_lines(record: dict[str, Any]) -> list[str]:
    """One paragraph per extension (``normlab report --add``): its own command, grid,
    revision, machine and parallelism, since its runs were made there and not here."""
    lines = []
    for ext in record.get("extensions", []):
        env, grid = ext["environment"], ext["config"]
        lines += [
            "", f"Extended by {ext['runs']} run(s) of another command (started "
            f"{ext['started']}):", "",
            "```", shown_command(ext["command"]), "```", "",
            "- its grid: " + ", ".join(f"{k}={v}" for k, v in grid.items()),
            *_environment_lines(env, _parallelism(ext.get("parallel") or {}, env)),
        ]
    return lines


def cell(values: list[float]) -> str:
    """One table cell: mean (min–max) over seeds, the value for one seed, "–" for none."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def time_line(record: dict[str, Any], seconds: float, where: str = "") -> str:
    """When the record was started and how long its runs trained: the sum over runs, which
    is not the wall-clock time when several ran at a time."""
    jobs = (record.get("parallel") or {}).get("jobs", 1)
    at_once = f"; {jobs} ran at a time, so the wall-clock time was shorter" if jobs > 1 else ""
    return (f"- started {record['started']}; training time{where} {seconds:.0f} s, the sum "
            f"over runs{at_once}")


# -- pieces of the per-device studies' reports (statistics, remedies)

def training_steps(epochs: int, images: int, batch_size: int) -> int:
    """Optimiser steps of a run: every epoch ends with a partial batch if one is left."""
    return epochs * -(-images // batch_size)


def protocol(cfg: dict[str, Any]) -> str:
    """The per-device protocol in one phrase, as both per-device reports state it."""
    steps = training_steps(cfg["epochs"], cfg["train_images"], cfg["batch_size"])
    network = ""
    if "model" in cfg:  # a network of the user's (--model)
        model = cfg["model"]
        args = ", ".join(f"{k}={v}" for k, v in model.get("args", {}).items())
        network = (f"; the network {local(model['spec'])}({args}), its norms converted to "
                   f"each variant's")
    return (f"global batch {cfg['batch_size']}, peak learning rate {cfg['lr']} (one-cycle with "
            f"warm-up), {cfg['epochs']} epoch(s) = {steps:,} steps over "
            f"{cfg['train_images']:,} {cfg['dataset']} images, the same data order and "
            f"augmentation for a given seed{network}")


def failed_lines(runs: dict[str, Any]) -> list[str]:
    """One bullet per run of a per-device study that diverged."""
    return [f"- failed: {r['variant']}, {r.get('images_per_statistic') or 'any'} images per "
            f"statistic, seed {r['seed']}: {r['failed']}" for r in runs.values() if "failed" in r]


# Wu & He (2018), Group Normalization, Table 2 / Figure 1: ImageNet ResNet-50 top-1 error (%)
# by images per GPU, i.e. per Batch Norm statistic.
GN_PAPER = {"images": (32, 16, 8, 4, 2), "bn": (23.6, 23.7, 24.8, 27.3, 34.7),
            "gn": (24.1, 24.2, 24.0, 24.2, 24.1)}


def gn_paper_rows(bn: list[str], gn: list[str], here: str = " (here)") -> list[str]:
    """Wu & He's table by images per GPU, with this study's BN and GN errors (formatted, one
    per size of ``GN_PAPER["images"]``) below it."""
    sizes = GN_PAPER["images"]
    return [
        "| images per statistic | " + " | ".join(map(str, sizes)) + " |",
        "| --- |" + " ---: |" * len(sizes),
        "| BN, ImageNet (paper) | " + " | ".join(f"{e}" for e in GN_PAPER["bn"]) + " |",
        "| GN, ImageNet (paper) | " + " | ".join(f"{e}" for e in GN_PAPER["gn"]) + " |",
        f"| BN{here} | " + " | ".join(bn) + " |",
        f"| GN{here} | " + " | ".join(gn) + " |",
    ]
