"""Your model in any study (``--model``): the oracle (normlab's own Net through the new path
trains bit for bit as the built-in variant), every refusal as one line before training, the
record, resume and weights files of a user's network."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

from conftest import cli_error
from normlab.cli import main
from normlab.data import load_data
from normlab.engine import TrainConfig, train_model
from normlab.evaluate import evaluate_files
from normlab.modelspec import ModelSpec, parse_model_args
from normlab.norms import StdConv2d, convert, standardize_weights
from normlab.variants import VARIANTS

CPU = torch.device("cpu")
NET = ModelSpec.parse("normlab.model:Net")  # Net(norm="batch"), converted to each variant


# The variants whose layers the conversion of Net("batch") matches exactly. Not "none": Net
# then gives its convolutions a bias, which converting a Batch Norm away cannot add.
@pytest.mark.parametrize("variant, kwargs", [
    ("bn", {}), ("bn+l1", {}), ("gn", {}), ("ln", {}), ("in", {}), ("brn", {}), ("frn", {}),
    ("evos0", {}), ("gn+ws", {}), ("ln+ws", {}), ("bn+ws", {}),
    ("bn", {"virtual_batch_size": 8}), ("evob0", {"virtual_batch_size": 8}),
])
def test_net_through_model_and_convert_trains_bit_for_bit_as_the_built_in_variant(
        tiny, variant, kwargs):
    """The oracle for the --model path: ``convert(Net("batch"), norm)`` (and
    ``standardize_weights`` for +ws) from the same seed gives the same initial weights and
    the same training as ``Net(norm)``: history and final state, bit for bit."""
    spec, folder = tiny
    data = load_data(folder, spec)
    v = VARIANTS[variant]
    config = TrainConfig(v.norm, lambda_l1=1e-3 if v.l1 else 0.0, weight_std=v.weight_std,
                         epochs=2, seed=3, batch_size=32, **kwargs)
    built, history = train_model(config, device=CPU, data=data, progress=False)
    converted, again = train_model(config, device=CPU, data=data, progress=False, model=NET)
    assert {k: x for k, x in again.items() if k != "epoch_time"} == \
        {k: x for k, x in history.items() if k != "epoch_time"}
    mine = [t for t in converted.state_dict().values() if t.dtype.is_floating_point]
    theirs = [t for t in built.state_dict().values() if t.dtype.is_floating_point]
    assert len(mine) == len(theirs) and all(map(torch.equal, mine, theirs))


def test_standardize_weights_keeps_parameters_draws_nothing_and_skips_the_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=2, padding=1), nn.GroupNorm(2, 8),
                          nn.Conv2d(8, 4, 1))  # the classifier: no norm after it
    weight, calls = model[0].weight, []
    model[3].register_forward_hook(lambda *_: calls.append(1))
    expected = StdConv2d(8, 8, 3, groups=2, padding=1)
    expected.load_state_dict(model[3].state_dict())
    state = torch.random.get_rng_state()
    standardize_weights(model)
    assert torch.equal(state, torch.random.get_rng_state())
    assert [type(m) for m in model] == [StdConv2d, nn.BatchNorm2d, nn.ReLU, StdConv2d,
                                        nn.GroupNorm, nn.Conv2d]
    assert model[0].weight is weight
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(model[3](x), expected(x)) and calls == [1]
    # The formula, in float64: each filter at zero mean and unit (biased) variance.
    w = expected.weight.double().flatten(1)
    w = ((w - w.mean(1, keepdim=True)) / (w.var(1, correction=0, keepdim=True) + 1e-6).sqrt())
    torch.testing.assert_close(model[3].standardised_weight().double(),
                               w.view_as(expected.weight), rtol=1e-6, atol=1e-6)


def test_model_args_are_python_literals_else_strings():
    assert parse_model_args(["depth=8", "rate=0.5", "flag=True", "size=(1, 2)", "name=wide"]) \
        == {"depth": 8, "rate": 0.5, "flag": True, "size": (1, 2), "name": "wide"}


MODELS = '''
    import torch
    from torch import nn

    def small(in_channels=1, num_classes=10, width=8):
        return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def fixed():  # takes neither in_channels nor num_classes
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def wrong_classes(in_channels=1):
        return small(in_channels, 7)

    def layer_norm(in_channels=1):
        return nn.Sequential(small(in_channels), nn.LayerNorm(10))

    def not_a_model():
        return 42

    def breaks(num_classes=10):
        raise RuntimeError("no such depth")

    NUMBER = 3
'''


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "mymodels.py"
    path.write_text(textwrap.dedent(MODELS))
    return path


@pytest.mark.parametrize("spec, args, message", [
    ("{p}:missing", [], "mymodels.py has no 'missing'"),
    ("{p}:NUMBER", [], "NUMBER is a int, not a callable that returns a model"),
    ("{p}:not_a_model", [], "returned a int, not a torch.nn.Module"),
    ("{p}:breaks", [], "building it failed (RuntimeError: no such depth); check --model-arg"),
    ("{p}:fixed", [], "the model takes 3 input channel(s), the data has 1: the callable "
     "takes no in_channels, in_chans, n_input_channels, input_channels argument"),
    ("{p}:wrong_classes", [], "its output is (2, 7), normlab needs (N, 10)"),
    ("{p}:layer_norm", ["--variants", "gn"], "LayerNorm: normalise over their last dimension"),
    ("{p}:small", ["--model-arg", "width"], "--model-arg 'width': expected KEY=VALUE"),
    ("{p}:small", ["--model-arg", "width=6", "--variants", "gn"],
     "num_groups=4 does not divide"),
    ("no_such_package.models:net", [], "cannot import no_such_package.models "
     "(ModuleNotFoundError"),
    ("{d}/absent.py:net", [], "no such file"),
    ("just_a_name", [], "expected package.module:callable or path/to/file.py:callable"),
])
def test_a_model_that_cannot_work_is_refused_in_one_line_before_training(
        tiny_mnist, tmp_path, capsys, models, spec, args, message):
    out = tmp_path / "out"
    code, line = cli_error(["compare", "--model", spec.format(p=models, d=tmp_path), *args,
                            "--data-dir", str(tiny_mnist[1]), "--epochs", "1", "--out",
                            str(out), "--no-progress"], capsys)
    assert code == 2 and message in line, line
    assert not list(out.glob("*.safetensors")) and not (out / "checkpoints").exists()


def test_a_broken_model_file_names_its_error(tmp_path, tiny_mnist, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nraise ImportError('needs monai')\n")
    code, line = cli_error(["compare", "--model", f"{bad}:net", "--data-dir",
                            str(tiny_mnist[1]), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "bad.py fails to import (ImportError: needs monai)" in line


def test_a_user_model_runs_records_resumes_and_evaluates(tiny_mnist, tmp_path, capsys, models):
    """A model returning logits (normlab adds the log_softmax), its arguments from the data
    and --model-arg, recorded with its fingerprint and parameter counts; its weights files
    rebuild it for evaluate; a resume with changed code is refused in one line."""
    out = tmp_path / "run"
    main(["compare", "--model", f"{models}:small", "--model-arg", "width=12", "--variants",
          "bn", "gn", "frn", "--epochs", "2", "--batch-size", "32", "--out", str(out),
          "--data-dir", str(tiny_mnist[1]), "--no-progress"])
    record = json.loads((out / "metrics.json").read_text())
    described = record["config"]["model"]
    assert described["spec"] == f"{models}:small" and described["args"] == {"width": 12}
    assert described["fingerprint"].startswith("sha256:") and described["outputs"] == "logits"
    # 12 channels: conv 1*12*9 + 12, norm 24 (frn: +12 thresholds), linear 12*10 + 10
    assert described["parameters"] == {"bn": 274, "gn": 274, "frn": 286}
    assert record["variants"]["gn"]["params"] == 274
    # The report's command is the one that ran: the model's description is no option value.
    report = (out / "report.md").read_text()
    command = report.replace(" \\\n    ", " ")  # as a shell reads its continued lines
    assert f"--model {models}:small --model-arg width=12" in command
    assert "defaults have changed" not in report
    rows = evaluate_files([out / "gn-seed1.safetensors"], ["running"], CPU,
                          data_dir=str(tiny_mnist[1]))
    assert rows[0]["test_acc"] == record["variants"]["gn"]["runs"][0]["history"]["test_acc"][-1]

    # A resume that trains nothing still checks the code it would continue.
    models.write_text(models.read_text() + "\n# edited\n")
    code, line = cli_error(["compare", "--resume", str(out)], capsys)
    assert code == 2 and "its code is now sha256:" in line and "restore that code" in line


def test_convert_gives_a_residual_block_its_norm_without_activation():
    """examples/resnet.py's second norm of a block is followed by the addition: converting to
    FRN makes it FRN without its threshold there, and with it where a ReLU follows."""
    from pathlib import Path

    spec = ModelSpec.parse(f"{Path(__file__).parents[1] / 'examples' / 'resnet.py'}:resnet",
                           {"depth": 8})
    torch.manual_seed(0)
    model = spec.variant("frn", 4, 1, False, 1, 10)
    acts = [m.apply_act for m in model.modules() if type(m).__name__ == "FilterResponseNorm2d"]
    assert acts == [True, True, False, True, False, False, True, False, False]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    again = convert(spec.build(1, 10), "evonorm-b0", virtual_batches=2)
    assert again(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_summary_shows_your_model_converted_for_each_variant(models, capsys):
    """`normlab summary --model` builds each variant as a study would (the input's channels
    and the classes passed on), so its layers and parameter counts are the study's."""
    assert main(["summary", "--model", f"{models}:small", "--model-arg", "width=8",
                 "--variants", "bn", "gn+ws", "frn", "--input-shape", "3,32,32",
                 "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    # conv 3*8*9 + 8 bias, norm 8 + 8, classifier 8*5 + 5; FRN adds its tau (8)
    assert "== bn: Batch Norm (285 parameters)" in out and "[1, 5]" in out
    assert "(285 parameters)" in out.split("== gn+ws")[1] and "(293 parameters)" in out
    assert "StdConv2d" in out and "GroupNorm" in out and "== frn:" in out
    assert "[1, 8, 30, 30]" in out  # a 3x32x32 input through the 3x3 convolution


@pytest.mark.parametrize("argv, message", [
    (["--input-shape", "3,32"], "--input-shape is for a --model"),
    (["--input-shape", "3,x"], "expected positive integers C,L or C,H,W or C,D,H,W"),
    (["--model", "{p}:fixed", "--input-shape", "1,28,28"], "the data has 1"),
])
def test_summary_refuses_in_one_line(models, capsys, argv, message):
    code, line = cli_error(["summary", *[a.format(p=models) for a in argv]], capsys)
    assert code == 2 and message in line, line
