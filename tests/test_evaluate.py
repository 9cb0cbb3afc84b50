"""``normlab evaluate``: saved weights re-evaluated with the running statistics (the recorded
accuracy, also for the committed results), with PreciseBN and with batch statistics at test,
each against an oracle built here from the model's layers; and its bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import cli_error
from normlab import evaluate
from normlab.cli import main
from normlab.data import Loader, load_data, make_loaders
from normlab.engine import test as evaluate_on

CPU = torch.device("cpu")
RESULTS = Path(__file__).resolve().parents[1] / "results"


def assert_same_evaluation(got: tuple[float, float], want: tuple[float, float]) -> None:
    """(loss, accuracy): the accuracy exactly, the mean loss to float32 rounding."""
    assert got[1] == want[1]
    assert got[0] == pytest.approx(want[0], rel=1e-5)


@pytest.fixture
def trained(tiny_mnist, tmp_path):
    """A compare run of bn (statistics over 8-image virtual batches) and gn, 2 epochs."""
    _, folder = tiny_mnist
    out = tmp_path / "run"
    assert main(["compare", "--variants", "bn", "gn", "--epochs", "2", "--batch-size", "32",
                 "--virtual-batch-size", "8", "--data-dir", str(folder), "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    return out, folder


def test_running_statistics_give_the_recorded_accuracy_and_the_header_says_how_it_trained(
        trained, capsys):
    out, folder = trained
    model, how = evaluate.load_trained(out / "bn-seed1.safetensors", CPU)
    assert (how.dataset, how.batch_size, how.images_per_statistic, how.precision) == \
        ("mnist", 32, 8, "fp32")
    assert evaluate.load_trained(out / "gn-seed1.safetensors", CPU)[1].images_per_statistic \
        is None
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data-dir", str(folder), "--json",
                 str(out / "eval.json")]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "eval.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["variants"]
    for row in rows:
        variant = Path(row["file"]).name.split("-")[0]
        recorded = metrics[variant]["runs"][0]["history"]["test_acc"][-1]
        assert row["test_acc"] == row["recorded_acc"] == recorded
    assert printed.count("(same)") == 2


def test_precise_and_batch_statistics_against_oracles_built_from_the_layers(trained):
    out, folder = trained
    model, how = evaluate.load_trained(out / "bn-seed1.safetensors", CPU)
    data = load_data(folder)
    _, test_loader = make_loaders(data, 32, 0)
    before = copy.deepcopy(model.state_dict())
    running = evaluate.evaluate_model(model, data, how, "running", CPU)
    assert running == evaluate_on(model, CPU, test_loader)
    # precise: running statistics := the average over the first 128 training images'
    # 32-image batches of each batch's statistics, every layer in training mode in turn
    got = evaluate.evaluate_model(model, data, how, "precise", CPU, precise_images=128)
    oracle = copy.deepcopy(model)
    layers = [m for m in oracle.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in layers:
        m.reset_running_stats()
        m.momentum, m.virtual_batches = None, 1  # cumulative: equal weight per batch
        m.train()
    train = Loader(data.train_images[:128], data.train_labels[:128], 32, mean=data.spec.mean,
                   std=data.spec.std)
    with torch.no_grad():
        for x, _ in train:
            oracle(x)
    # The accuracy exactly; the mean loss to rounding (the oracle's layers sum in another
    # order on some CPUs: 1.2e-7 apart on an Intel Xeon, equal on an AMD EPYC).
    assert_same_evaluation(got, evaluate_on(oracle, CPU, test_loader))
    assert got != running  # the remedy changed the statistics
    # precise-grouped: the same over 8-image groups, i.e. batches of 8
    grouped = evaluate.evaluate_model(model, data, how, "precise-grouped", CPU, 128)
    for m in layers:
        m.reset_running_stats()
        m.train()  # evaluating the oracle above put it in eval mode
    with torch.no_grad():
        for x, _ in train:
            for part in x.split(8):
                oracle(part)
    assert_same_evaluation(grouped, evaluate_on(oracle, CPU, test_loader))
    # precise-augmented: as fvcore does it, the first 128 images the training loader
    # yields (shuffled and augmented with a fixed seed), in batches of the run's 32
    augmented = evaluate.evaluate_model(model, data, how, "precise-augmented", CPU, 128)
    for m in layers:
        m.reset_running_stats()
        m.train()
    loader = Loader(data.train_images, data.train_labels, 32, shuffle=True, augment=True,
                    seed=evaluate.PRECISE_SEED, mean=data.spec.mean, std=data.spec.std)
    with torch.no_grad():
        for _, (x, _) in zip(range(4), loader, strict=False):
            oracle(x)
    assert_same_evaluation(augmented, evaluate_on(oracle, CPU, test_loader))
    assert augmented != got  # other images, augmented: other statistics
    # batch: every 8 consecutive test images normalised with their own statistics
    batch = evaluate.evaluate_model(model, data, how, "batch", CPU)
    train_mode = copy.deepcopy(model)
    for m in train_mode.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
            m.virtual_batches = 1
    with torch.no_grad():
        x = torch.cat([b for b, _ in test_loader])
        y = torch.cat([t for _, t in test_loader])
        output = torch.cat([train_mode(part) for part in x.split(8)])
    assert batch[1] == pytest.approx(100 * (output.argmax(1) == y).float().mean().item())
    assert batch[0] == pytest.approx(F.nll_loss(output, y).item(), rel=1e-5)
    for key, value in model.state_dict().items():  # the model itself was not changed
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("args, code, message", [
    (["--precise-images", "16", "--bn-stats", "precise"], 2,
     "--precise-images 16 is below one batch of 32 images (the run's batch size); give at "
     "least 32"),
    (["--bn-stats", "ema"], 2, "argument --bn-stats: invalid choice: 'ema'"),
])
def test_bad_evaluate_arguments_give_one_line(trained, capsys, args, code, message):
    out, folder = trained
    got, line = cli_error(["evaluate", str(out / "bn-seed1.safetensors"), "--data-dir",
                           str(folder), *args], capsys)
    assert got == code and message in line, line


def test_evaluate_refuses_files_it_cannot_use_in_one_line(trained, tmp_path, capsys):
    out, folder = trained
    code, line = cli_error(["evaluate", str(tmp_path / "none.safetensors")], capsys)
    assert code == 2 and "no such file or folder" in line
    alien = tmp_path / "alien.safetensors"  # a safetensors file normlab did not write
    save_file({"w": torch.zeros(2)}, alien)
    code, line = cli_error(["evaluate", str(alien)], capsys)
    assert code == 1 and f"{alien}: not a loadable normlab weights file" in line
    lone = tmp_path / "lone"  # normlab's weights away from its record: header says enough
    lone.mkdir()
    (lone / "bn.safetensors").write_bytes((out / "bn-seed1.safetensors").read_bytes())
    assert evaluate.load_trained(lone / "bn.safetensors", CPU)[1].batch_size == 32
    (folder / "test-images-idx3-ubyte.gz").unlink()
    code, line = cli_error(["evaluate", str(out), "--data-dir", str(folder)], capsys)
    assert code == 1 and line.startswith("normlab evaluate: data error: ")


@pytest.mark.slow
@pytest.mark.parametrize("weights", [
    "compare/bn+l1-seed2.safetensors", "compare-bf16/bn+l1-seed1.safetensors",
    "fashion-mnist/bn+l1-seed3.safetensors", "statistics/bn_ips4_seed1.safetensors",
    "statistics/two-processes/sbn-seed2.safetensors"])
def test_committed_batch_norm_weights_reproduce_their_accuracy(weights, mnist_dir):
    """One Batch Norm file per committed folder (the closing notes list every file). The
    folders were trained on two kinds of CPU; on another, a last-bit difference may flip one
    borderline test image, so one image (0.01 points) of slack, as for results/compare."""
    path = RESULTS / weights
    if "fashion" in weights and not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    model, how = evaluate.load_trained(path, CPU)
    data = load_data(mnist_dir if how.dataset == "mnist" else None, how.dataset)
    _, acc = evaluate.evaluate_model(model, data, how, "running", CPU)
    assert how.test_acc is not None and abs(acc - how.test_acc) <= 0.011
