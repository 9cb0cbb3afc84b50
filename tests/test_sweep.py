import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from normlab import data as D
from normlab.cli import main
from normlab.engine import Misclassified
from normlab.experiments.sweep import DEFAULT_LR, error_table, plot_sweep, scaled_lr
from normlab.experiments.sweep import render_report as render_sweep_report
from normlab.plots import plot_misclassified


def _sweep(folder, out, *extra):
    return main(["sweep", "--variants", "bn", "gn", "--batch-sizes", "4", "16", "--samples", "64",
                 "--epochs", "1", "--seeds", "1", "2", "--data-dir", str(folder), "--out", str(out),
                 "--no-progress", "--device", "cpu", *extra])


def test_sweep_writes_results_figure_and_report(tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    out = tmp_path / "sweep"
    assert _sweep(folder, out) == 0
    results = json.loads((out / "sweep.json").read_text())
    runs = results["runs"]
    assert len(runs) == 2 * 2 * 2
    r = runs["bn/bs4/seed1"]
    assert DEFAULT_LR == 0.02 and results["config"]["lr"] == DEFAULT_LR  # the sweep's own default
    assert r["lr"] == pytest.approx(scaled_lr(0.02, 4)) == pytest.approx(0.02 * 4 / 128)
    assert r["steps"] == 16 and runs["gn/bs16/seed2"]["steps"] == 4  # same images, more steps
    assert r["test_error"] == pytest.approx(100 - r["test_acc"])
    assert results["config"]["train_images"] == 64 and results["config"]["test_images"] == 128
    assert (out / "sweep.png").exists() and not (out / "checkpoints").exists()
    report = (out / "report.md").read_text()
    assert "| variant | batch 4 | batch 16 |" in report
    bn4 = [runs[f"bn/bs4/seed{s}"]["test_error"] for s in (1, 2)]
    cell = f"{sum(bn4) / 2:.2f} ({min(bn4):.2f}–{max(bn4):.2f})"
    assert f"| Batch Norm (bn) | {cell} |" in report
    assert capsys.readouterr().out.count(" steps  test error ") == 8


def test_sweep_resumes_only_the_missing_runs(tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    out = tmp_path / "sweep"
    assert _sweep(folder, out) == 0
    before = json.loads((out / "sweep.json").read_text())
    partial = json.loads(json.dumps(before))
    for key in ("gn/bs4/seed2", "gn/bs16/seed2"):
        del partial["runs"][key]
    (out / "sweep.json").write_text(json.dumps(partial))
    capsys.readouterr()
    resume = ["sweep", "--resume", str(out), "--data-dir", str(folder), "--no-progress"]
    assert main(resume) == 0
    printed = capsys.readouterr().out
    assert printed.count(" steps  test error ") == 2 and "[7/8] gn " in printed
    after = json.loads((out / "sweep.json").read_text())
    for key in before["runs"]:
        b, a = before["runs"][key], after["runs"][key]
        assert {k: v for k, v in a.items() if k != "wall_time_s"} == \
               {k: v for k, v in b.items() if k != "wall_time_s"}
    assert after["parallel"] == before["parallel"] and "resumed_parallel" not in after

    # A resume that trains in another way: the record still says how the sweep was trained
    # and names the runs trained otherwise; one that trains nothing changes neither.
    del after["runs"]["bn/bs4/seed2"]
    (out / "sweep.json").write_text(json.dumps(after))
    for _ in range(2):
        assert main([*resume, "--jobs", "2"]) == 0
        again = json.loads((out / "sweep.json").read_text())
        assert again["parallel"] == before["parallel"] and before["parallel"]["jobs"] == 1
        assert again["resumed_parallel"] == [{
            "parallel": {**before["parallel"], "jobs": 2, "threads_per_process": 1},
            "runs": ["bn/bs4/seed2"]}]
    assert (f"- parallelism: one process, {before['parallel']['threads_per_process']} "
            "thread(s); 1 run(s) of a resume: 2 runs at a time in separate processes, "
            "1 thread(s) each") in (out / "report.md").read_text()


def test_sweep_refuses_an_existing_sweep_folder(tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    out = tmp_path / "sweep"
    assert _sweep(folder, out) == 0
    with pytest.raises(SystemExit) as exit_:
        _sweep(folder, out)
    assert exit_.value.code == 2 and "already holds a run (sweep.json)" in capsys.readouterr().err


def _record(*runs):
    """A sweep.json with the given (variant, batch size, seed, accuracy) runs."""
    config = dict(dataset="mnist", epochs=2, train_images=60000, test_images=10000, lr=0.05,
                  seeds=[1], samples=None)
    environment = dict(git_revision="abc", cpu="cpu", cpu_count=2, torch_threads=2,
                       device="cpu", normlab="0", python="3", torch="2", numpy="2",
                       platform="Linux")
    return dict(config=config, environment=environment, command="normlab sweep",
                started="2026-01-01T00:00:00+00:00",
                runs={f"{v}/bs{b}/seed{s}": dict(variant=v, batch_size=b, seed=s, test_acc=acc,
                                                  test_error=100 - acc, wall_time_s=1.0)
                      for v, b, s, acc in runs})


def test_sweep_report_checks_that_batch_128_trained_properly():
    ok = _record(("bn", 128, 1, 99.3), ("gn", 128, 1, 98.9), ("gn", 2, 1, 90.0))
    text = render_sweep_report(ok, error_table(ok))
    assert "every run reached at least 98.5% (lowest: gn seed 1, 98.90%)" in text
    assert "all 60,000 training images" in text
    bad = _record(("bn", 128, 1, 99.3), ("gn", 128, 1, 97.9))
    text = render_sweep_report(bad, error_table(bad))
    assert "**Sanity check failed**: at batch 128, gn seed 1 reached 97.90%" in text


def test_error_table_groups_seeds_and_skips_failed_runs():
    runs = {"a": dict(variant="gn", batch_size=8, seed=1, test_error=1.0),
            "b": dict(variant="gn", batch_size=8, seed=2, test_error=3.0),
            "c": dict(variant="gn", batch_size=2, seed=1, test_error=2.0),
            "d": dict(variant="bn", batch_size=2, seed=1, failed="NaN")}
    assert error_table({"runs": runs}) == {"gn": {2: [2.0], 8: [1.0, 3.0]}}


def test_sweep_figure_is_labelled_with_a_log_batch_axis():
    fig = plot_sweep({"BN": {2: [5.0], 128: [1.0]}, "GN": {2: [1.5, 1.7], 128: [1.1, 1.2]}},
                     "Test error vs batch size")
    (ax,) = fig.get_axes()
    assert ax.get_xscale() == "log" and "batch size" in ax.get_xlabel()
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "test error (%, log scale)"
    assert ax.get_title() == "Test error vs batch size"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["BN", "GN"]


# -------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_is_found_in_the_debian_folder(tmp_path, monkeypatch):
    spec = D.get_spec("fashion-mnist")
    monkeypatch.delenv(spec.env_var, raising=False)
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))  # MNIST's variable must not redirect it
    system = tmp_path / "debian"
    system.mkdir()
    for name, _ in spec.files.values():
        (system / f"{name}.gz").touch()
    local = replace(spec, system_dirs=(str(tmp_path / "absent"), str(system)))
    assert D.resolve_data_dir(None, local) == system
    monkeypatch.setenv(spec.env_var, str(tmp_path / "mine"))
    assert D.resolve_data_dir(None, local) == tmp_path / "mine"


def test_real_fashion_mnist_passes_its_checksums():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install "
                    "dataset-fashion-mnist)")
    images, labels = D.load_split("test", folder, "fashion-mnist", download_missing=False)
    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels).tolist() == [1000] * 10


def test_fashion_class_names_caption_the_misclassified_grid():
    classes = D.get_spec("fashion-mnist").classes
    mis = Misclassified(torch.zeros(2, 28, 28, dtype=torch.uint8), [9, 0], [5, 6], [0.9, 0.6],
                        [3, 7])
    fig = plot_misclassified(mis, "Group Norm", classes)
    titles = [ax.get_title() for ax in fig.get_axes()[:2]]
    assert titles[0].startswith("predicted Ankle boot (90%)\ntrue Sandal")
    assert titles[1].startswith("predicted T-shirt/top (60%)\ntrue Shirt")


def test_a_start_line_names_the_references_only_when_there_are_some():
    from normlab.experiments.sweep import and_references

    assert and_references(["gn", "ln"]) == " and gn ln"
    assert and_references([]) == ""
