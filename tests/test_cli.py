import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_error
from normlab import engine
from normlab.checkpoint import load_model
from normlab.cli import main
from normlab.data import load_data, make_loaders
from normlab.engine import Misclassified
from normlab.model import Net, count_parameters
from normlab.plots import plot_curves, plot_misclassified

STUDY = ("bn+l1", "ln", "gn")




def test_compare_writes_every_artefact(tiny_mnist, tmp_path, capsys):
    spec, folder = tiny_mnist
    out = tmp_path / "run"
    code = main(["compare", "--epochs", "2", "--batch-size", "32", "--data-dir", str(folder),
                 "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert names == {"metrics.json", "report.md", "curves.png",
                     *(f"misclassified_{v}.png" for v in STUDY),
                     *(f"{v}-seed1.safetensors" for v in STUDY)}
    printed = capsys.readouterr().out
    for v in STUDY:  # one summary line per epoch per variant
        assert printed.count(f"  {v} epoch ") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["variants"]) == list(STUDY)
    assert metrics["config"]["epochs"] == 2 and metrics["config"]["train_images"] == 256
    assert metrics["variants"]["bn+l1"]["lambda_l1"] > 0 == metrics["variants"]["gn"]["lambda_l1"]
    for key in ("torch", "python", "git_revision", "cpu", "device"):
        assert key in metrics["environment"]
    report = (out / "report.md").read_text()
    assert "| bn+l1 | Batch Norm + L1 |" in report and "| bn+l1 | 1 |" in report
    assert "– (one seed)" in report and "![" in report
    assert "Is one variant really better" not in report  # needs two seeds or more
    assert "normlab compare" in report and metrics["environment"]["git_revision"] in report

    # The saved weights reproduce the recorded final accuracy exactly.
    data = load_data(folder, spec)
    _, test_loader = make_loaders(data, 32, 1)
    for v in STUDY:
        model = load_model(out / f"{v}-seed1.safetensors")
        loss, acc = engine.test(model, torch.device("cpu"), test_loader,
                                precision=metrics["config"]["precision"])
        assert acc == metrics["variants"][v]["runs"][0]["history"]["test_acc"][-1]


def test_compare_refuses_to_overwrite_a_finished_run(tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    args = ["compare", "--epochs", "1", "--variants", "gn", "--data-dir", str(folder),
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 0
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert "already holds a run" in capsys.readouterr().err




@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "argument --epochs: must be positive, got 0"),
    (["--batch-size", "-4"], "argument --batch-size: must be positive"),
    (["--l1", "-0.1"], "argument --l1: must be >= 0"),
    (["--lr", "fast"], "argument --lr: expected a number"),
    (["--variants", "bn", "wn"], "argument --variants: invalid choice: 'wn'"),
    (["--num-groups", "3"], "layer conv1: num_groups=3 does not divide 8 channels"),
    (["--num-groups", "0"], "argument --num-groups: must be positive"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys, tmp_path):
    code, line = cli_error(["compare", "--out", str(tmp_path / "o"), *args], capsys)
    assert code == 2 and message in line


def test_output_path_that_is_a_file_or_unwritable(tmp_path, capsys, tiny_mnist):
    f = tmp_path / "file"
    f.write_text("")
    code, line = cli_error(["compare", "--out", str(f)], capsys)
    assert code == 2 and "is a file" in line
    code, line = cli_error(["compare", "--out", str(f / "below")], capsys)
    assert code == 2 and "cannot write to --out" in line


def test_bad_data_gives_one_line_and_exit_1(tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    code, line = cli_error(["compare", "--data-dir", str(folder), "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 1 and "train-labels-idx1-ubyte.gz" in line and "gzip" in line


def test_summary_prints_each_variant(capsys):
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    for v in STUDY:
        assert f"== {v}:" in out
    n = count_parameters(Net("group"))
    assert n <= 10_000  # the study's budget
    assert out.count(f"{n:,} parameters") == 3 and f"Total params: {n:,}" in out


def test_misclassified_figure_is_a_5x2_grid():
    mis = Misclassified(torch.zeros(10, 28, 28, dtype=torch.uint8), list(range(10)),
                        [(i + 1) % 10 for i in range(10)], [0.5] * 10, list(range(10)))
    fig = plot_misclassified(mis, "Group Norm", tuple("0123456789"))
    axes = fig.get_axes()
    assert len(axes) == 10
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in axes} == {(5, 2)}
    assert axes[3].get_title().startswith("predicted 3 (50%)\ntrue 4")
    assert "Group Norm" in fig._suptitle.get_text()


def test_curves_figure_has_two_labelled_panels_with_a_legend():
    h = dict(test_loss=[0.1, 0.05], test_acc=[98.0, 99.0])
    h2 = dict(test_loss=[0.2, 0.1], test_acc=[97.0, 98.5])
    fig = plot_curves({"BN": [h], "GN": [h, h2]})
    loss_ax, acc_ax = fig.get_axes()
    (zoom_ax,) = acc_ax.child_axes
    assert loss_ax.get_title() == "Test loss" and acc_ax.get_title() == "Test accuracy"
    assert acc_ax.get_xlabel() == "epoch" and "%" in acc_ax.get_ylabel()
    labels = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert labels == ["BN: final 99.00%",
                      "GN: final 98.75%, mean of 2 seeds (band: min–max)"]
    # The band spans the seeds: GN's shaded area reaches from 98.5 to 99.0 at epoch 2.
    band = acc_ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(97.0) and band[:, 1].max() == pytest.approx(99.0)
    # The inset zooms onto the last half of the epochs.
    assert zoom_ax.get_title().startswith("zoom: epochs 1–2")
    assert plot_curves({"BN": [h]}, split="validation").get_axes()[1].get_title() == \
        "Validation accuracy"


@pytest.mark.parametrize("accuracies, limits", [
    ([60.0, 98.0, 99.0, 99.4], (90, 100)),   # MNIST-like: the last percents, up to 100
    ([70.0, 86.0, 89.0, 91.2], (80, 93)),    # Fashion-like: the curves stay in view
    ([95.0, 98.0, 99.0, 99.4], None),        # nothing below the cut: the axis is not cut
])
def test_the_accuracy_axis_is_cut_where_the_curves_are(accuracies, limits):
    h = dict(test_loss=[1.0] * 4, test_acc=accuracies)
    acc_ax = plot_curves({"BN": [h]}).get_axes()[1]
    cut = [t.get_text() for t in acc_ax.texts]
    if limits is None:
        assert not cut and acc_ax.get_ylim()[0] < 95.0
    else:
        assert acc_ax.get_ylim() == pytest.approx(limits)
        assert cut == [f"y axis cut at {limits[0]}% (lowest value {accuracies[0]:.1f}%)"]


@pytest.mark.slow
def test_one_epoch_of_bn_l1_on_real_mnist_reaches_98_percent(mnist_dir):
    from normlab.engine import train_model

    _, history = train_model("batch", lambda_l1=1e-5, epochs=1, data_dir=str(mnist_dir),
                             device="cpu", progress=False)
    assert history["test_acc"][-1] >= 98.0


@pytest.mark.slow
def test_command_line_end_to_end_on_real_mnist(mnist_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "NORMLAB_DATA": str(mnist_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "normlab", "compare", "--epochs", "2", "--limit-train", "2000",
         "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "report: " in result.stdout and (out / "report.md").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["test_images"] == 10000
    for v in metrics["variants"].values():
        loss = v["runs"][0]["history"]["train_loss"]
        assert len(loss) == 2 and loss[1] < loss[0]


def test_report_redraws_figures_and_report_from_the_record(tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    out = tmp_path / "run"
    assert main(["compare", "--epochs", "1", "--variants", "gn", "ln", "--data-dir",
                 str(folder), "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "curves.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report and (out / "curves.png").exists()
    code, line = cli_error(["report", str(tmp_path)], capsys)
    assert code == 2 and ("no metrics.json, sweep.json, statistics.json, remedies.json or "
                          "recommend.json") in line


@pytest.mark.slow
@pytest.mark.parametrize("variant", STUDY)
def test_committed_weights_reproduce_the_reported_accuracy(mnist_dir, variant):
    """results/compare: re-evaluate one committed run per variant on the real test set."""
    results = Path(__file__).resolve().parents[1] / "results" / "compare"
    metrics = json.loads((results / "metrics.json").read_text())
    run = metrics["variants"][variant]["runs"][-1]  # the last seed
    model = load_model(results / f"{variant}-seed{run['seed']}.safetensors")
    _, test_loader = make_loaders(load_data(mnist_dir), 128, 1)
    _, acc = engine.test(model, torch.device("cpu"), test_loader,
                         precision=metrics["config"]["precision"])
    assert acc == pytest.approx(run["history"]["test_acc"][-1],
                                abs=0.011)  # at most one test image of floating-point slack


def test_several_seeds_give_intervals_pairwise_differences_and_a_band(tiny_mnist, tmp_path,
                                                                      capsys):
    _, folder = tiny_mnist
    out = tmp_path / "run"
    assert main(["compare", "--variants", "gn", "ln", "--seeds", "1", "2", "3", "--epochs", "1",
                 "--batch-size", "64", "--data-dir", str(folder), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["seeds"] == [1, 2, 3]
    for v in ("gn", "ln"):
        assert [r["seed"] for r in metrics["variants"][v]["runs"]] == [1, 2, 3]
        for seed in (1, 2, 3):
            assert (out / f"{v}-seed{seed}.safetensors").exists()
    # Different seeds really are different runs.
    accs = {v: [r["history"]["train_loss"][-1] for r in metrics["variants"][v]["runs"]]
            for v in ("gn", "ln")}
    assert len(set(accs["gn"])) == 3
    report = (out / "report.md").read_text()
    from normlab.report import final_accuracies
    from normlab.stats import paired_difference, t_interval

    finals = final_accuracies(metrics)
    gn = t_interval(list(finals["gn"].values()))
    assert "| gn | Group Norm | " in report and f"{gn.low:.2f}–{gn.high:.2f}%" in report
    diff = paired_difference(finals["gn"], finals["ln"])
    assert "## Is one variant really better than another?" in report
    assert f"| gn − ln | 3 | {diff.mean:+.3f} | {diff.low:+.3f} to {diff.high:+.3f} |" in report
    assert "seeds 1, 2, 3" in report
    assert f"{gn.mean:18.2f}%" in printed  # the summary printed at the end
    # The curves figure, as drawn from the record: each variant's mean accuracy with a band
    # from its lowest to its highest seed.
    fig = plot_curves({name: [r["history"] for r in v["runs"]]
                       for name, v in metrics["variants"].items()})
    acc_ax = fig.get_axes()[1]
    for band, name in zip(acc_ax.collections, ("gn", "ln"), strict=True):
        final = [r["history"]["test_acc"][-1] for r in metrics["variants"][name]["runs"]]
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() <= min(final) and max(final) <= ys.max()
    assert (out / "curves.png").stat().st_size > 0


def test_holdout_tunes_on_training_images_and_never_reads_the_test_set(tiny_mnist, tmp_path,
                                                                       monkeypatch, capsys):
    from normlab import data as D

    _, folder = tiny_mnist
    real = D.load_split

    def no_test_split(split, *args, **kwargs):
        assert split != "test", "the test set was read during tuning"
        return real(split, *args, **kwargs)

    monkeypatch.setattr(D, "load_split", no_test_split)
    out = tmp_path / "tune"
    assert main(["compare", "--variants", "gn", "--holdout", "56", "--epochs", "1",
                 "--data-dir", str(folder), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = metrics["config"]
    assert (cfg["train_images"], cfg["test_images"], cfg["eval_split"]) == (200, 56, "validation")
    report = (out / "report.md").read_text()
    assert "56 validation images held out of the training set" in report
    assert "final validation acc" in report and "final test acc" not in report
    gn_row = next(line for line in report.splitlines() if line.startswith("| gn | Group Norm"))
    assert gn_row.endswith("| – |")  # the reference study's test accuracy is not comparable
    assert "validation loss" in capsys.readouterr().out
    code, line = cli_error(["compare", "--holdout", "256", "--data-dir", str(folder),
                            "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "holdout must be between 1 and 255" in line


def test_precision_option_is_recorded_and_checked(tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    out = tmp_path / "run"
    assert main(["compare", "--variants", "gn", "--precision", "fp32", "--epochs", "1",
                 "--data-dir", str(folder), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["precision"] == "fp32"
    code, line = cli_error(["compare", "--precision", "fp8", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "argument --precision: invalid choice: 'fp8'" in line


def test_report_redraws_sweep_and_statistics_folders_and_refuses_a_corrupt_record(tmp_path,
                                                                                  capsys):
    from test_sweep import _record

    sweep = _record(("bn", 128, 1, 99.3), ("gn", 128, 1, 98.9), ("gn", 2, 1, 90.0))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(sweep))
    assert main(["report", str(tmp_path / "sweep")]) == 0
    assert "| Group Norm (gn) | 10.00 | 1.10 |" in (tmp_path / "sweep" / "report.md").read_text()
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0

    statistics = json.loads(json.dumps(sweep))  # a statistics record: images per statistic
    statistics["config"].update(images_per_statistic=[2, 128], batch_size=128, processes=1,
                                variants=["bn", "gn"])
    statistics["started"] = "2026-01-01T00:00:00+00:00"
    statistics["runs"] = {
        f"bn/ips{ips}/seed1": dict(variant="bn", images_per_statistic=ips, seed=1,
                                   test_error=e, test_loss=0.1, train_loss=0.1,
                                   wall_time_s=1.0) for ips, e in ((2, 1.5), (128, 0.6))}
    statistics["runs"]["gn/seed1"] = dict(variant="gn", images_per_statistic=None, seed=1,
                                          test_error=0.7, test_loss=0.1, train_loss=0.1,
                                          wall_time_s=1.0)
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "statistics.json").write_text(json.dumps(statistics))
    assert main(["report", str(tmp_path / "stats")]) == 0
    text = (tmp_path / "stats" / "report.md").read_text()
    assert "| Batch Norm (bn) | 1.50 | 0.60 |" in text
    assert "| Group Norm (gn), any grouping | 0.70 | 0.70 |" in text
    assert (tmp_path / "stats" / "statistics.png").stat().st_size > 0

    del statistics["runs"]["gn/seed1"]["test_error"]  # a record missing a number
    (tmp_path / "stats" / "statistics.json").write_text(json.dumps(statistics))
    code, line = cli_error(["report", str(tmp_path / "stats")], capsys)
    assert code == 2 and line.endswith("statistics.json is corrupt (KeyError: 'test_error'); "
                                       "cannot draw a report from it")
    (tmp_path / "sweep" / "sweep.json").write_text("{ half a record")
    code, line = cli_error(["report", str(tmp_path / "sweep")], capsys)
    assert code == 2 and "sweep.json is corrupt (JSONDecodeError" in line


def test_report_draws_missing_misclassified_grids_again_from_the_record(mnist_dir, tmp_path,
                                                                        monkeypatch):
    """A copied folder without its misclassified figures gets them back, pixel for pixel,
    from the record's indices and predictions and the test images."""
    from matplotlib.image import imread

    results = Path(__file__).resolve().parents[1] / "results" / "compare"
    copy = tmp_path / "compare"
    copy.mkdir()
    for name in ("metrics.json", "curves.png"):
        (copy / name).write_bytes((results / name).read_bytes())
    monkeypatch.setenv("NORMLAB_DATA", str(mnist_dir))
    assert main(["report", str(copy)]) == 0
    for variant in ("bn+l1", "ln", "gn"):
        drawn, committed = (imread(d / f"misclassified_{variant}.png") for d in (copy, results))
        assert (drawn == committed).all(), variant


def test_every_subcommand_prints_its_help(capsys):
    """Each subcommand's --help renders (argparse formats help texts with %: a stray one
    breaks that subcommand's help and the CLI reference)."""
    from normlab.cli import build_parser, main

    commands = list(build_parser()._subparsers._group_actions[0].choices)
    assert {"compare", "remedies", "recommend", "report", "explain"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0, command
        assert f"usage: normlab {command}" in capsys.readouterr().out
