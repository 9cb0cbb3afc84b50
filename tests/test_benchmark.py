"""The throughput benchmark keeps working: its reference pipeline is faithful, its FLOP count
matches a hand count, and both pipelines measure on the real data (a few steps only)."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput  # noqa: E402

from normlab.data import MNIST  # noqa: E402
from normlab.model import ARCHITECTURE  # noqa: E402


def _digits(n=4):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8), torch.arange(n)


def test_reference_dataset_is_totensor_then_normalize_per_sample():
    images, labels = _digits()
    x, y = throughput.PerSampleMNIST(images, labels, rotate=False)[2]
    assert x.shape == (1, 28, 28) and y == 2
    expected = (images[2].float() / 255 - MNIST.mean) / MNIST.std
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)


def test_reference_rotation_is_nearest_neighbour_with_black_fill():
    images, labels = _digits()
    torch.manual_seed(3)
    x, _ = throughput.PerSampleMNIST(images, labels, rotate=True)[1]
    pixels = np.rint((x[0].numpy() * MNIST.std + MNIST.mean) * 255).astype(int)
    # Nearest neighbour only moves pixels: every output value is an input value or the fill.
    assert set(np.unique(pixels)) <= set(images[1].numpy().ravel().tolist()) | {0}
    assert not np.array_equal(pixels, images[1].numpy())  # and it did rotate


def test_flop_count_matches_a_hand_count_of_the_convolutions():
    macs, size, channels = 0, 28, 1
    for name, out_ch, kernel in ARCHITECTURE:
        if name == "pool":
            size //= kernel
            continue
        size -= kernel - 1
        macs += size * size * out_ch * channels * kernel * kernel
        channels = out_ch
    macs += channels * 10  # the 1x1 classifier on the pooled features
    flops = throughput.flops_per_image("gn")
    assert flops["forward"] == pytest.approx(2 * macs)
    # Backward: a weight gradient for every layer, an input gradient for all but the first.
    assert 2 * flops["forward"] < flops["train"] < 3 * flops["forward"]


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["reference", "normlab"])
def test_both_pipelines_measure_on_real_mnist(mnist_dir, pipeline):
    r = throughput.measure(pipeline, "bn+l1", warmup=1, steps=2, workers=0, precision="auto",
                           data_dir=str(mnist_dir))
    assert r["pipeline"] == pipeline and r["variant"] == "bn+l1"
    assert r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0
    assert r["peak_rss_mb"] > 50  # the process holds MNIST and torch at least


def test_tune_architecture_strings_round_trip():
    import tune

    assert tune.parse_arch(tune.format_arch(ARCHITECTURE)) == tuple(
        (f"{'trans' if k == 1 else 'conv'}{i}" if n != "pool" else "pool", c, k)
        for i, (n, c, k) in enumerate(ARCHITECTURE, 1))
    assert tune.format_arch(ARCHITECTURE) == "8,16,p,8t,12,16,16,20"


def _run_script(monkeypatch, name: str, *args: str) -> None:
    """Run benchmarks/<name>.py's main() with ``args`` as its command line."""
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    module.main()


@pytest.mark.slow
def test_tune_screens_on_held_out_training_images(mnist_dir, tmp_path, monkeypatch):
    log = tmp_path / "screen.jsonl"
    _run_script(monkeypatch, "tune", "--variant", "gn", "--epochs", "1", "--holdout", "59000",
                "--data-dir", str(mnist_dir), "--log", str(log))
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["validation_images"] == 59000 and record["variant"] == "gn"
    assert len(record["val_acc"]) == 1 and 10 < record["final_val_acc"] <= 100


@pytest.mark.slow
def test_study_epoch_times_both_ways_of_running_the_study(mnist_dir, tmp_path, monkeypatch):
    out = tmp_path / "study.json"
    _run_script(monkeypatch, "study_epoch", "--rounds", "1", "--workers", "0", "--limit-train",
                "512", "--data-dir", str(mnist_dir), "--out", str(out))
    record = json.loads(out.read_text())
    (row,) = record["rounds"]
    for side in ("reference", "normlab"):  # the same three models, trained and evaluated
        assert set(row[side]["seconds"]) == {"bn+l1", "ln", "gn"}
        assert all(0 <= acc <= 100 for acc in row[side]["test_acc"].values())
        assert row[side]["wall_s"] > sum(row[side]["seconds"].values()) > 0
    assert record["summary"]["train_ratio"] == pytest.approx(
        sum(row["reference"]["seconds"].values()) / sum(row["normlab"]["seconds"].values()))


@pytest.mark.slow
def test_fast_batchnorm_benchmark_times_the_layer_and_whole_steps(mnist_dir, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "fast.json"
    _run_script(monkeypatch, "fast_batchnorm", "--rounds", "1", "--steps", "2", "--calls", "1",
                "--variants", "bn", "bn@16", "--data-dir", str(mnist_dir), "--out", str(out))
    record = json.loads(out.read_text())
    # every Batch Norm input of the model, largest map first, both layers timed
    assert [row["shape"] for row in record["layers"]][:2] == [[128, 8, 26, 26],
                                                              [128, 16, 24, 24]]
    assert len(record["layers"]) == 7
    assert all(row[k] > 0 for row in record["layers"] for k in row if k.endswith("_ms"))
    assert set(record["steps"]) == {"bn", "bn@16"}
    for r in record["steps"].values():
        assert r["speed_up"] == pytest.approx(r["pytorch_ms_per_step"][0]
                                              / r["fast_ms_per_step"][0], rel=5e-3)


def test_remedy_layers_times_every_variant_beside_group_norm(mnist_dir, tmp_path, monkeypatch):
    out = tmp_path / "remedies.json"
    _run_script(monkeypatch, "remedy_layers", "--rounds", "2", "--steps", "2", "--variants",
                "frn", "brn@2", "--data-dir", str(mnist_dir), "--out", str(out))
    record = json.loads(out.read_text())
    assert list(record["variants"]) == ["gn", "frn", "brn@2"]  # the reference first
    assert record["variants"]["gn"]["over_gn"] == 1.0
    for r in record["variants"].values():  # a ratio is the median of per-round ratios
        assert len(r["ms_per_step"]) == 2 and all(t > 0 for t in r["ms_per_step"])
    frn, gn = record["variants"]["frn"]["ms_per_step"], record["variants"]["gn"]["ms_per_step"]
    assert record["variants"]["frn"]["over_gn"] == pytest.approx(
        (frn[0] / gn[0] + frn[1] / gn[1]) / 2, abs=1e-3)
    assert record["git_revision"] and record["threads"] == 1


needs_git = pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / ".git").exists(),
                               reason="needs the git checkout")


@needs_git
def test_ab_times_one_command_at_each_revision_from_its_own_worktree(tmp_path, capfd):
    import ab

    out = tmp_path / "ab.json"
    which = "import sys, normlab; print('imported', normlab.__file__, file=sys.stderr)"
    assert ab.main(["--base", "HEAD", "--rounds", "2", "--out", str(out), "--",
                    sys.executable, "-c", which]) == 0
    record = json.loads(out.read_text())
    assert record["revisions"]["base"] == record["revisions"]["head"] == ab.git(
        "rev-parse", "--short=12", "HEAD")
    assert [len(t) for t in record["wall_s"].values()] == [2, 2]
    assert record["speed_up"] > 0
    # each run imported normlab from that revision's worktree, not from this checkout
    imported = [line.split()[1] for line in capfd.readouterr().err.splitlines()
                if line.startswith("imported")]
    assert len(imported) == 4
    assert all("normlab-ab-" in path and "/src/normlab/" in path for path in imported)
    assert {Path(p).parts[-4] for p in imported} == {"base", "head"}
    assert "normlab-ab-" not in ab.git("worktree", "list")  # and they are gone


@needs_git
@pytest.mark.parametrize("args, line", [
    (["--base", "HEAD"], "ab.py: error: give the command to time after --"),
    (["--base", "no-such-rev", "--", "true"],
     "ab.py: error: not a revision of this repository: 'no-such-rev'"),
])
def test_ab_refuses_a_missing_command_or_an_unknown_revision_in_one_line(args, line, capsys,
                                                                         monkeypatch):
    import ab

    monkeypatch.setattr(sys, "argv", ["ab.py"])
    with pytest.raises(SystemExit) as exit_:
        ab.main(args)
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == line


@needs_git
def test_ab_stops_in_one_line_when_the_command_fails_and_removes_its_worktrees(capfd):
    import ab

    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    assert ab.main(["--base", "HEAD", "--rounds", "2", "--", *failing]) == 1
    head = ab.git("rev-parse", "--short=12", "HEAD")
    assert capfd.readouterr().err.splitlines()[-1] == (
        f"ab.py: the command failed at base ({head}) with exit code 3; its error output is "
        "above")
    assert "normlab-ab-" not in ab.git("worktree", "list")


def test_conv_layers_times_every_convolution_and_checked_alternatives(tmp_path, monkeypatch):
    out = tmp_path / "conv.json"
    _run_script(monkeypatch, "conv_layers", "--calls", "1", "--out", str(out))
    record = json.loads(out.read_text())
    convs = [(n, c, k) for n, c, k in ARCHITECTURE if n != "pool"]
    assert [r["layer"] for r in record["layers"]] == [n for n, _, _ in convs]
    assert [r["out"] for r in record["layers"]] == [c for _, c, _ in convs]
    # the multiply-adds add up to the hand count of the FLOP test (less the classifier)
    assert sum(r["mmacs_per_image"] for r in record["layers"]) * 2e6 == pytest.approx(
        throughput.flops_per_image("gn")["forward"] - 2 * 20 * 10, rel=1e-3)
    assert record["layers"][0]["input_grad_ms"] is None  # the input needs no gradient
    assert record["largest"] == "conv2" and len(record["alternatives_ms"]) == 7
