"""Your model on your data, end to end through the CLI: 1-D signals and 3-D volumes (npz,
generated here) with networks written here, through an experiment each with virtual batches,
an interrupted run resumed, torchrun with synchronized Batch Norm, evaluate and report;
colour images through the misclassified grid."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest

from conftest import finish, free_port, launch
from normlab import runner
from normlab.cli import main
from normlab.evaluate import evaluate_files
from test_data_formats import write_npz

MODELS = '''
    from torch import nn

    def net1d(in_channels=2, num_classes=3):
        return nn.Sequential(
            nn.Conv1d(in_channels, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def net3d(in_channels=1, num_classes=3):
        return nn.Sequential(
            nn.Conv3d(in_channels, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
            nn.Conv3d(8, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def net2d(in_channels=3, num_classes=3):
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


@pytest.fixture
def mine(tmp_path):
    """The networks (a file of the user's), and signals, volumes and colour images."""
    (tmp_path / "mine.py").write_text(textwrap.dedent(MODELS))
    write_npz(tmp_path / "signals.npz", (2, 40), n_train=96, n_test=48)
    write_npz(tmp_path / "volumes.npz", (1, 6, 6, 6), n_train=96, n_test=48)
    write_npz(tmp_path / "colour.npz", (3, 8, 8), n_train=96, n_test=48, dtype=np.uint8)
    return tmp_path


def _histories(record: dict) -> dict:
    return {v: [{k: x for k, x in r["history"].items() if k != "epoch_time"}
                for r in entry["runs"]] for v, entry in record["variants"].items()}


@pytest.mark.parametrize("kind, net", [("signal", "net1d"), ("volume", "net3d")])
def test_compare_trains_with_virtual_batches_resumes_evaluates_and_reports(
        mine, monkeypatch, capsys, kind, net):
    """A compare of a 1-D network on signals (a 3-D one on volumes), interrupted after the
    first epoch of its second variant, resumes to the uninterrupted run's histories bit for
    bit; its weights evaluate to the recorded accuracy; the report says what it shows
    instead of a grid of images."""
    common = ["compare", "--model", f"{mine / 'mine.py'}:{net}", "--dataset",
              f"npz:{mine / (kind + 's.npz')}", "--variants", "bn", "gn",
              "--virtual-batch-size", "4", "--batch-size", "16", "--epochs", "3",
              "--no-progress"]
    assert main([*common, "--out", str(mine / "whole")]) == 0
    whole = json.loads((mine / "whole" / "metrics.json").read_text())

    real = runner.EpochLines.after_epoch

    def stop_in_gn(self, trainer):
        real(self, trainer)
        if self.label == "gn" and trainer.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.EpochLines, "after_epoch", stop_in_gn)
    with pytest.raises(SystemExit) as stopped:
        main([*common, "--out", str(mine / "cut")])
    assert stopped.value.code == 130 and "resume with: normlab compare --resume" in \
        capsys.readouterr().err
    assert (mine / "cut" / "checkpoints" / "gn-seed1.ckpt").exists()
    monkeypatch.setattr(runner.EpochLines, "after_epoch", real)
    assert main(["compare", "--resume", str(mine / "cut"), "--no-progress"]) == 0
    resumed = json.loads((mine / "cut" / "metrics.json").read_text())
    assert _histories(resumed) == _histories(whole)
    assert resumed["config"]["data"]["kind"] == kind
    assert resumed["config"]["data"]["augment"] == "none"

    rows = evaluate_files([mine / "cut" / "bn-seed1.safetensors"], ["running", "batch"],
                          runner.select_device("cpu"))
    assert rows[0]["test_acc"] == rows[0]["recorded_acc"]
    assert rows[1]["images_per_statistic"] == 4  # the run's virtual batch
    report = (mine / "cut" / "report.md").read_text()
    assert f"## Misclassified test {kind}s" in report and "Not drawn" in report
    assert not list((mine / "cut").glob("misclassified_*.png"))


def test_volumes_through_the_remedies_study_and_report(mine, capsys):
    """A 3-D network on volumes through the remedies protocol: Batch Norm and Batch Renorm
    at 2 volumes per statistic and at the whole batch, Group and Layer Norm; PreciseBN and
    batch statistics at test on 3-D maps; the report renders from the record again."""
    out = mine / "remedies"
    assert main(["remedies", "--model", f"{mine / 'mine.py'}:net3d", "--dataset",
                 f"npz:{mine / 'volumes.npz'}", "--variants", "bn", "brn", "--references",
                 "gn", "ln", "--images-per-statistic", "2", "16", "--batch-size", "16",
                 "--seeds", "1", "2", "--epochs", "2", "--precise-images", "32",
                 "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "remedies.json").read_text())
    assert len(record["runs"]) == 2 * (2 * 2 + 2)
    bn = record["runs"]["bn/ips2/seed1"]
    assert set(bn["inference"]) == {"precise", "precise-grouped", "batch", "precise-augmented"}
    assert bn["images_per_statistic"] == 2 and "inference" not in record["runs"]["gn/seed1"]
    assert record["config"]["model"]["parameters"]["gn"] == \
        record["config"]["model"]["parameters"]["bn"]
    report = (out / "report.md").read_text()
    assert "npz:" in report and "Layer Norm" in report
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == report
    rows = evaluate_files([out / "bn_ips2_seed1.safetensors"], ["running", "precise"],
                          runner.select_device("cpu"), precise_images=32)
    assert rows[0]["test_acc"] == rows[0]["recorded_acc"]


def test_colour_images_are_drawn_in_colour(mine):
    out = mine / "colour"
    assert main(["compare", "--model", f"{mine / 'mine.py'}:net2d", "--dataset",
                 f"npz:{mine / 'colour.npz'}", "--variants", "gn", "--batch-size", "16",
                 "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["config"]["data"]["augment"] == "crop-flip"
    from matplotlib.image import imread

    grid = imread(out / "misclassified_gn.png")
    assert grid.shape[2] >= 3 and np.abs(grid[..., 0] - grid[..., 1]).max() > 0.1  # colour


@pytest.mark.parametrize("kind, net", [("signal", "net1d"), ("volume", "net3d")])
def test_torchrun_synchronized_batch_norm_equals_one_process(mine, kind, net):
    """Two processes with synchronized Batch Norm train a 1-D network on signals (a 3-D one
    on volumes) exactly as one process with plain Batch Norm (float64): the oracle for the
    data-parallel path."""
    env = {**os.environ, "NORMLAB_TEST_DATA": str(mine / "idx"), "NORMLAB_TEST_F64": "1"}
    common = ["compare", "--model", f"{mine / 'mine.py'}:{net}", "--dataset",
              f"npz:{mine / (kind + 's.npz')}", "--batch-size", "16", "--epochs", "2",
              "--device", "cpu", "--no-progress"]
    one = launch([*common, "--variants", "bn", "--out", str(mine / "one")], env)
    code, out, err = finish(one)
    assert code == 0, err
    two = launch([*common, "--variants", "sbn", "--out", str(mine / "two")], env, nproc=2,
                 torchrun=["--rdzv-backend", "c10d", "--rdzv-endpoint",
                           f"127.0.0.1:{free_port()}"])
    code, out, err = finish(two)
    assert code == 0, err
    h1 = json.loads((mine / "one" / "metrics.json").read_text())["variants"]["bn"]["runs"][0]
    h2 = json.loads((mine / "two" / "metrics.json").read_text())["variants"]["sbn"]["runs"][0]
    for key in ("train_loss", "test_loss", "test_acc", "train_acc"):
        np.testing.assert_allclose(h2["history"][key], h1["history"][key], rtol=1e-9,
                                   atol=1e-9)


def test_normlab_run_from_python_with_a_callable_and_a_path(mine, monkeypatch):
    """normlab.run: the model as a callable of an importable module, the data set as a
    path; it returns the record and folder the command line would write."""
    import sys

    import normlab

    monkeypatch.syspath_prepend(str(mine))
    import mine as user_models  # the user's own module

    record, folder = normlab.run("compare", model=user_models.net1d,
                                 dataset=mine / "signals.npz", variants=["gn"], epochs=1,
                                 batch_size=16, no_progress=True, out=mine / "api")
    assert folder == mine / "api" and record["variants"]["gn"]["runs"][0]["seed"] == 1
    assert record["config"]["model"]["spec"] == "mine:net1d"
    assert record["config"]["data"]["kind"] == "signal"
    assert record["command"].startswith("normlab compare --model mine:net1d --dataset npz:")

    def in_the_notebook(in_channels=2, num_classes=3):
        return user_models.net1d(in_channels, num_classes)

    with pytest.raises(normlab.api.UsageError, match="needs a model it can import again"):
        normlab.run("compare", model=in_the_notebook)
    with pytest.raises(normlab.api.UsageError, match="argument --epochs: must be positive"):
        normlab.run("compare", epochs=0)
    sys.modules.pop("mine", None)
