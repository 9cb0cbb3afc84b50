"""The per-device statistics study (``normlab statistics``): its runs against the compare
runs that compute the same thing, its torchrun part, its resume, the measurement behind its
"why" figure against PyTorch's Batch Norm, and its figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import cli_error, finish, launch
from normlab.checkpoint import read_weights
from normlab.cli import main
from normlab.experiments import statistics
from normlab.experiments.statistics import plot_statistics, plot_statistics_seen
from normlab.norms import BatchNorm2d, statistics_seen

GRID = ["--images-per-statistic", "2", "16", "--batch-size", "16", "--limit-train", "256",
        "--epochs", "1", "--device", "cpu", "--no-progress"]


def _final_test_acc(out):
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["variants"]["bn"]["runs"][0]["history"]["test_acc"][-1]


def _torchrun_on_the_tiny_data(folder: Path):
    """launch_torchrun for the tiny dataset: torchrun starts tests/dist_driver.py, which
    writes the same synthetic data on each rank and runs the real CLI."""
    def launch_torchrun(processes: int, argv: list[str]) -> int:
        env = {**os.environ, "NORMLAB_TEST_DATA": str(folder), "NORMLAB_TEST_TRAIN": "256",
               "NORMLAB_TEST_TEST": "128", "OMP_NUM_THREADS": "1"}
        return finish(launch(argv, env, processes))[0]
    return launch_torchrun


def test_statistics_study_end_to_end_with_its_torchrun_part_and_resume(tiny_mnist, tmp_path,
                                                                       capsys, monkeypatch):
    """On the tiny synthetic data (its torchrun part too), so that the study's every step
    runs in seconds."""
    _, folder = tiny_mnist
    monkeypatch.setattr(statistics, "launch_torchrun",
                        _torchrun_on_the_tiny_data(tmp_path / "ranks"))
    out = tmp_path / "stats"
    data = ["--data-dir", str(folder)]
    assert main(["statistics", *GRID, "--seeds", "1", "2", *data, "--out", str(out)]) == 0
    record = json.loads((out / "statistics.json").read_text())
    runs = record["runs"]
    assert list(runs) == [f"{k}/seed{s}" for s in (1, 2) for k in ("bn/ips2", "bn/ips16",
                                                                     "gn", "ln")]
    assert [runs[k]["images_per_statistic"] for k in list(runs)[:4]] == [2, 16, None, None]
    assert all(r["batch_size"] == 16 and r["steps"] == 16 for r in runs.values())

    # Oracle: each point is the compare run with the same statistics, bit for bit (the same
    # arithmetic in the same process): 16 images = plain Batch Norm, 2 = virtual batches.
    for ips, extra in ((16, []), (2, ["--virtual-batch-size", "2"])):
        ref = tmp_path / f"compare{ips}"
        assert main(["compare", "--variants", "bn", "--seeds", "1", "--batch-size", "16",
                     "--limit-train", "256", "--epochs", "1", "--device", "cpu",
                     "--no-progress", *data, "--out", str(ref), *extra]) == 0
        assert runs[f"bn/ips{ips}/seed1"]["test_acc"] == _final_test_acc(ref)

    # The torchrun part: sbn over all 16 images, bn over each process's 8.
    two = record["two_processes"]
    assert two["images_per_statistic"] == {"sbn": 16, "bn": 8}
    assert {v: sorted(r) for v, r in two["runs"].items()} == {"sbn": ["1", "2"],
                                                              "bn": ["1", "2"]}
    part = json.loads((out / "two-processes" / "metrics.json").read_text())
    assert part["config"]["world_size"] == 2 and part["parallel"]["backend"] == "gloo"

    # The "why" figure's numbers: every full training batch, the layer's own running values.
    seen = record["bn_statistics"]
    assert sorted(seen["by_images"], key=int) == ["2", "16"] and seen["batches"] == 16
    for ips, s in seen["by_images"].items():
        assert len(s["mean"]) == len(s["var"]) == 16
        _, state, _ = read_weights(out / f"bn_ips{ips}_seed1.safetensors")
        last = [k for k in state if k.endswith("running_mean")][-1]
        assert s["running_mean"] == pytest.approx(float(state[last][0]), abs=1e-6)
        assert s["test_error"] == runs[f"bn/ips{ips}/seed1"]["test_error"]
    # With 2 images a batch's mean strays further from the running mean than with 16.
    spread = {ips: torch.tensor(s["mean"]).std() for ips, s in seen["by_images"].items()}
    assert spread["2"] > spread["16"]

    report = (out / "report.md").read_text()
    bn = [runs[f"bn/ips2/seed{s}"]["test_error"] for s in (1, 2)]
    assert f"| Batch Norm (bn) | {sum(bn) / 2:.2f} ({min(bn):.2f}–{max(bn):.2f}) |" in report
    assert "| sbn on 2 processes | 16 |" in report and "| bn on 2 processes | 8 per process |" \
        in report
    assert "| BN, ImageNet (paper) | 23.6 | 23.7 | 24.8 | 27.3 | 34.7 |" in report
    assert (out / "statistics.png").stat().st_size and (out / "bn_statistics.png").stat().st_size

    # Resume: only the missing run trains; the finished torchrun part is not launched again.
    before = json.loads(json.dumps(record))
    del record["runs"]["gn/seed2"], record["bn_statistics"]
    (out / "statistics.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["statistics", "--resume", str(out), *data, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("test error") == 1 and "gn seed 2" in printed
    assert "torchrun ... compare" not in printed
    after = json.loads((out / "statistics.json").read_text())
    assert after["runs"]["gn/seed2"]["test_acc"] == before["runs"]["gn/seed2"]["test_acc"]
    assert after["bn_statistics"] == before["bn_statistics"]


@pytest.mark.parametrize("args, message", [
    (["--images-per-statistic", "3"], "--images-per-statistic 3 does not divide --batch-size "
                                      "128"),
    (["--virtual-batch-size", "4"], "use --images-per-statistic instead of "
                                    "--virtual-batch-size"),
    (["--processes", "3"], "--processes 3 does not divide --batch-size 128"),
])
def test_statistics_refuses_impossible_settings_in_one_line(args, message, capsys, tmp_path):
    code, line = cli_error(["statistics", *args, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and message in line


def test_statistics_refuses_to_run_under_torchrun(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, line = cli_error(["statistics", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "run normlab statistics as one process" in line


def test_a_failed_torchrun_part_is_one_line_and_keeps_the_finished_runs(tiny_mnist, tmp_path,
                                                                        capsys, monkeypatch):
    import normlab.runner

    _, folder = tiny_mnist
    monkeypatch.setattr(normlab.runner.sys, "executable", "/bin/false")  # the launch fails
    out = tmp_path / "stats"
    code, line = cli_error(["statistics", "--images-per-statistic", "16", "--batch-size", "16",
                            "--limit-train", "64", "--epochs", "1", "--seeds", "1",
                            "--device", "cpu", "--no-progress", "--data-dir", str(folder),
                            "--out", str(out)], capsys)
    assert code == 1
    assert f"the 2-process part (torchrun, in {out / 'two-processes'}) failed with exit code 1" \
        in line and f"resume with normlab statistics --resume {out}" in line
    runs = json.loads((out / "statistics.json").read_text())["runs"]
    assert sorted(runs) == ["bn/ips16/seed1", "gn/seed1", "ln/seed1"]


def test_statistics_seen_is_what_batch_norm_normalises_each_part_with():
    """Oracle: PyTorch's Batch Norm run on the first part alone with momentum 1 holds that
    part's mean and unbiased variance in its running buffers (rtol 1e-5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4, virtual_batches=4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3), BatchNorm2d(5, virtual_batches=4))
    model[1].running_mean.uniform_()  # running values distinct from any batch's
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 3, 9, 9) * 2 + 1 for _ in range(3)]
    seen = statistics_seen(model.eval(), batches, images_per_statistic=2)
    assert list(seen) == ["1", "4"] and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    for i, x in enumerate(batches):
        oracle = nn.BatchNorm2d(4, momentum=1.0)
        oracle(model[0](x[:2]))
        n = 2 * 7 * 7
        torch.testing.assert_close(seen["1"]["mean"][i], oracle.running_mean, rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(seen["1"]["var"][i], oracle.running_var * (n - 1) / n,
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(seen["1"]["running_mean"], model[1].running_mean)
    assert seen["4"]["mean"].shape == (3, 5)


def test_statistics_figures_are_labelled():
    fig = plot_statistics({2: [5.0, 6.0], 128: [0.6, 0.7]}, {"Group Norm (gn)": [0.8, 0.9]},
                          [("synchronized Batch Norm, 2 processes (torchrun)", 128, [0.65])],
                          "Test error vs images per statistic", "held fixed: batch 128")
    (ax,) = fig.get_axes()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "images per Batch Norm statistic (log scale)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["Batch Norm, one process (--virtual-batch-size)",
                      "Group Norm (gn) (any grouping)",
                      "synchronized Batch Norm, 2 processes (torchrun)"]
    assert fig.get_supxlabel() == "held fixed: batch 128"

    seen = {str(ips): dict(mean=[0.1, 0.5, 0.9], var=[0.01, 0.2, 3.0], running_mean=0.5,
                           running_var=0.4, test_error=1.0) for ips in (2, 128)}
    fig = plot_statistics_seen(seen, "What Batch Norm normalises with")
    axes = fig.get_axes()
    assert len(axes) == 4 and axes[1].get_xscale() == "log"
    assert axes[0].get_title() == "2 images per statistic: mean (test error 1.00%)"
    assert any("running estimate, used at test time: 0.5" in t.get_text()
               for t in axes[0].get_legend().get_texts())
