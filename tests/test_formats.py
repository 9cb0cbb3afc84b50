"""The ecosystem's formats: safetensors weights (readable without normlab), converting
older weights, and ``normlab --version``."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_error
from normlab import __version__
from normlab.checkpoint import CheckpointError, load_model, read_weights, save_model
from normlab.cli import main
from normlab.model import Net


def test_weights_are_safetensors_that_anyone_can_load_with_their_config(tmp_path):
    torch.manual_seed(0)
    model = Net("group", num_groups=2)
    path = tmp_path / "gn-seed3.safetensors"
    save_model(model, path, variant="gn", seed=3, test_acc=99.5, git_revision="abc123")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle anywhere
    # What a user without normlab's loader does: safetensors + Net(**config).
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    rebuilt = Net(**json.loads(meta["config"]))
    rebuilt.load_state_dict(load_file(path))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert (meta["variant"], meta["seed"], meta["test_acc"]) == ("gn", "3", "99.5")
    assert (meta["norm"], meta["num_groups"], meta["git_revision"]) == ("group", "2", "abc123")
    assert json.loads(meta["architecture"])[0] == ["conv1", 8, 3]
    torch.testing.assert_close(load_model(path)(x), model(x), rtol=0, atol=0)


def test_convert_rewrites_pt_weights_as_identical_safetensors(tmp_path, capsys):
    torch.manual_seed(1)
    model = Net("batch")
    model.features[0][1].running_mean.uniform_()
    old = tmp_path / "bn-seed1.pt"
    torch.save({"config": dict(norm="batch", num_groups=4, dropout=0.0,
                               architecture=[list(a) for a in model.architecture]),
                "meta": {"variant": "bn", "seed": 1}, "state_dict": model.state_dict()}, old)
    (tmp_path / "metrics.json").write_text(json.dumps({"environment": {"git_revision": "r1"}}))
    assert main(["convert", str(tmp_path)]) == 0
    assert "bn-seed1.pt -> bn-seed1.safetensors" in capsys.readouterr().out
    assert not old.exists()
    _, state, meta = read_weights(tmp_path / "bn-seed1.safetensors")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert meta["git_revision"] == "r1" and meta["variant"] == "bn"
    assert main(["convert", str(tmp_path)]) == 0  # nothing left to do
    code, line = cli_error(["convert", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no such file or folder" in line


def test_corrupt_safetensors_gives_one_line(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_model(Net("layer"), path)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match="not a loadable normlab weights file"):
        load_model(path)


def test_version_names_the_release(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"normlab {__version__}")


def test_tensorboard_logs_every_epoch_of_every_run(tiny_mnist, tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    _, folder = tiny_mnist
    out, board = tmp_path / "run", tmp_path / "board"
    assert main(["compare", "--variants", "gn", "bn", "--seeds", "1", "2", "--epochs", "2",
                 "--batch-size", "64", "--data-dir", str(folder), "--out", str(out),
                 "--no-progress", "--tensorboard", str(board)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(p.name for p in board.iterdir()) == ["bn-seed1", "bn-seed2", "gn-seed1",
                                                       "gn-seed2"]
    for name, variant in metrics["variants"].items():
        for run in variant["runs"]:
            events = event_accumulator.EventAccumulator(str(board / f"{name}-seed{run['seed']}"))
            events.Reload()
            history = run["history"]
            for tag, key in (("loss/train", "train_loss"), ("loss/test", "test_loss"),
                             ("accuracy/train", "train_acc"), ("accuracy/test", "test_acc"),
                             ("learning_rate", "lr")):
                scalars = events.Scalars(tag)
                assert [e.step for e in scalars] == [1, 2]
                assert [e.value for e in scalars] == pytest.approx(history[key], rel=1e-6)


def test_tensorboard_without_the_extra_is_one_line(tiny_mnist, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    _, folder = tiny_mnist
    code, line = cli_error(["compare", "--data-dir", str(folder), "--out", str(tmp_path / "r"),
                            "--tensorboard", str(tmp_path / "tb")], capsys)
    assert code == 2
    assert line == ("normlab compare: error: --tensorboard needs the tensorboard package: pip "
                    "install 'normlab[tensorboard]'")
