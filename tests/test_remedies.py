"""The remedies study (``normlab remedies``): its runs against the compare runs that compute
the same thing, its inference remedies against ``normlab evaluate`` on its saved weights,
its report's paired differences against a recomputation from the record, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_error
from normlab import evaluate
from normlab.cli import main
from normlab.data import load_data
from normlab.experiments.remedies import errors_by_size, render_report
from normlab.stats import paired_difference

GRID = ["--variants", "bn", "brn", "--references", "gn", "--images-per-statistic", "2", "16",
        "--batch-size", "16", "--epochs", "1", "--seeds", "1", "2", "--precise-images", "64",
        "--device", "cpu", "--no-progress"]


def test_remedies_study_end_to_end(tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    out = tmp_path / "remedies"
    assert main(["remedies", *GRID, "--data-dir", str(folder), "--out", str(out)]) == 0
    record = json.loads((out / "remedies.json").read_text())
    runs = record["runs"]
    assert list(runs) == [f"{k}/seed{s}" for s in (1, 2)
                          for k in ("bn/ips2", "bn/ips16", "brn/ips2", "brn/ips16", "gn")]
    assert [runs[k]["images_per_statistic"] for k in list(runs)[:5]] == [2, 16, 2, 16, None]
    assert set(runs["bn/ips2/seed1"]["inference"]) == {"precise", "precise-grouped", "batch",
                                                       "precise-augmented"}
    assert "inference" not in runs["gn/seed1"]

    # Oracle 1: each run is the compare run with the same statistics, bit for bit.
    ref = tmp_path / "compare"
    assert main(["compare", "--variants", "brn", "--batch-size", "16", "--epochs", "1",
                 "--virtual-batch-size", "2", "--device", "cpu", "--no-progress",
                 "--data-dir", str(folder), "--out", str(ref)]) == 0
    compare = json.loads((ref / "metrics.json").read_text())["variants"]["brn"]["runs"][0]
    assert runs["brn/ips2/seed1"]["test_acc"] == compare["history"]["test_acc"][-1]

    # Oracle 2: the inference remedies are normlab evaluate's on the saved weights.
    model, how = evaluate.load_trained(out / "bn_ips2_seed1.safetensors", torch.device("cpu"))
    assert (how.images_per_statistic, how.batch_size) == (2, 16)
    data = load_data(folder)
    for mode, result in runs["bn/ips2/seed1"]["inference"].items():
        _, acc = evaluate.evaluate_model(model, data, how, mode, torch.device("cpu"), 64)
        assert result["test_acc"] == acc, mode
    assert not (out / "bn_ips2_seed2.safetensors").exists()  # the first seed's only

    # The report: the table from the record, the paired differences recomputed here.
    report = (out / "report.md").read_text()
    assert report == render_report(record)
    lines = errors_by_size(record)
    d = paired_difference(lines["brn"][2], lines["bn"][2])
    assert f"| Batch Renorm (brn) | {d.mean:+.2f} ({d.low:+.2f} to {d.high:+.2f})" in \
        report.replace("**", "")
    precise = [runs[f"bn/ips16/seed{s}"]["inference"]["precise"]["test_error"] for s in (1, 2)]
    assert f"{sum(precise) / 2:.2f} ({min(precise):.2f}–{max(precise):.2f})" in report
    assert "| Wu & He 2018 (Group Norm), Table 2 and text |" in report
    assert "| trainable parameters | 9,530 | 9,530 | 9,530 |" in report
    assert (out / "remedies.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "precise" in printed and "report: " in printed
    assert "normlab remedies: bn brn over 2 16 images per statistic and gn x 2 seed(s)" in printed


@pytest.mark.parametrize("args, message", [
    (["--images-per-statistic", "3"], "--images-per-statistic 3 does not divide --batch-size "
                                      "128"),
    (["--precise-images", "64"], "--precise-images 64 is below one batch of 128 images"),
    (["--virtual-batch-size", "4"], "use --images-per-statistic instead of "
                                    "--virtual-batch-size"),
    (["--variants", "gn"], "argument --variants: invalid choice: 'gn' (choose from 'bn+l1', "
                           "'bn', 'brn', 'bn+ws', 'evob0')"),
    (["--references", "bn"], "argument --references: invalid choice: 'bn'"),
])
def test_remedies_refuses_impossible_settings_in_one_line(args, message, capsys, tmp_path):
    code, line = cli_error(["remedies", *args, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and message in line, line
