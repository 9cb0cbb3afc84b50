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
