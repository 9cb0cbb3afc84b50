"""A practitioner's network and data, taken at their word: norm-act layers of other
libraries, probability outputs, labels that do not fit, a resume that changes nothing, and
a message for every way a start can go wrong. One test per defect a user met; each fails
without its fix."""

from __future__ import annotations

import copy
import json
import os
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from conftest import cli_error
from normlab import data as data_module
from normlab import engine, runner
from normlab.cli import main
from normlab.convert import convert, to_torch
from normlab.data import DataError, load_data
from normlab.errors import UsageError
from normlab.modelspec import outputs_of
from normlab.normact import EvoNorm2dB0, FilterResponseNorm2d, NormAct
from test_data_formats import write_npz

# -- norm-act layers (timm's BatchNormAct2d, GroupNormAct): ours, built as timm builds them


class BatchNormAct2d(nn.BatchNorm2d):
    """As timm.layers.norm_act.BatchNormAct2d: Batch Norm, then drop and act in forward."""

    def __init__(self, num_features, act_layer=nn.SiLU, drop_layer=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class GroupNormAct(nn.GroupNorm):
    """As timm.layers.norm_act.GroupNormAct."""

    def __init__(self, num_channels, num_groups=4, act_layer=nn.SiLU):
        super().__init__(num_groups, num_channels)
        self.drop, self.act = nn.Identity(), act_layer()

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


class LoggingBatchNorm(nn.BatchNorm2d):
    """A forward override that is no norm-act layout: what it adds cannot be read."""

    def forward(self, x):
        return super().forward(x) * 2


class EvoNorm2dS0a(nn.Module):
    """A normalization of another library that is no torch norm (as timm's EvoNorm2dS0a)."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


for _cls in (BatchNormAct2d, GroupNormAct, LoggingBatchNorm, EvoNorm2dS0a):
    _cls.__module__ = "timm.layers.norm_act"  # as another library's classes are


def efficient_block(act=nn.SiLU, last_act=nn.ReLU):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act),
                          nn.Conv2d(8, 8, 3, padding=1),
                          BatchNormAct2d(8, last_act, drop_layer=lambda: nn.Dropout(0.1)),
                          nn.Conv2d(8, 8, 3, padding=1), GroupNormAct(8))
    for _ in range(3):  # running statistics that are not the initial ones
        model(torch.randn(8, 3, 6, 6) * 2 + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero biases, scales other than one
    return model.eval()


def _count(model, kind):
    return sum(type(m) is kind for m in model.modules())


@pytest.mark.parametrize("target", ["batch", "group", "layer", "batchrenorm", "frn",
                                    "evonorm-b0", "evonorm-s0"])
def test_norm_act_layers_keep_every_activation(target):
    """Every SiLU and ReLU a norm-act layer applied inside its forward is still applied
    after converting; an activation norm takes a ReLU as its own (timm's layout)."""
    model = efficient_block()
    converted, changes = convert(copy.deepcopy(model), target, report=True)
    assert not any(isinstance(m, BatchNormAct2d | GroupNormAct) for m in converted.modules())
    assert _count(converted, nn.SiLU) == 2 and _count(converted, nn.Dropout) == 1
    own_act = target in ("frn", "evonorm-b0", "evonorm-s0")
    assert _count(converted, nn.ReLU) == (0 if own_act else 1)
    if own_act:  # the ReLU became the layer's own activation, the SiLUs follow plain ones
        acts = [m.norm.apply_act for m in converted.modules() if isinstance(m, NormAct)]
        assert acts == [False, True, False]
        assert "its ReLU is" in changes["3"] and "its SiLU follows it" in changes["1"]
    x = torch.randn(4, 3, 6, 6)
    assert converted.eval()(x).shape == (4, 8, 6, 6)


def test_norm_act_to_batch_is_bit_for_bit_and_back_to_torch():
    """Between Batch Norms the eval outputs stay bit for bit (running statistics, scale,
    shift and activation carried); back to plain torch they still are."""
    model = efficient_block()[:4]  # its Batch Norms
    x = torch.randn(5, 3, 6, 6)
    expected = model(x)
    converted = convert(copy.deepcopy(model), "batch")
    assert torch.equal(converted.eval()(x), expected)
    plain = to_torch(converted)
    assert not any(type(m).__module__.startswith("normlab.batchnorm")
                   for m in plain.modules())
    assert torch.equal(plain.eval()(x), expected) and _count(plain, nn.SiLU) == 1


def test_timm_norm_act_layers_where_timm_installs():
    timm_layers = pytest.importorskip("timm.layers", reason="timm needs torchvision, which "
                                      "does not install beside the pinned torch here")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.BatchNormAct2d(8, act_layer=nn.SiLU))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(convert(copy.deepcopy(model), "batch").eval()(x), model(x))


def test_an_unreadable_forward_and_an_unknown_norm_are_refused_by_name_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), LoggingBatchNorm(8), nn.Conv2d(8, 8, 3),
                          EvoNorm2dS0a(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as refused:
        convert(model, "group")
    text = str(refused.value)
    assert "LoggingBatchNorm, whose forward() does more than normalize" in text
    assert "EvoNorm2dS0a: a normalization normlab does not know" in text and "(3)" in text
    assert type(model[1]) is LoggingBatchNorm and type(model[5]) is nn.BatchNorm2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    done = convert(model, "group", skip=(LoggingBatchNorm, EvoNorm2dS0a))
    assert type(done[1]) is LoggingBatchNorm and isinstance(done[5], nn.GroupNorm)


# -- labels, as the user's data give them

def _npz(tmp_path, names=None, **changes):
    path = tmp_path / "d.npz"
    arrays = write_npz(path, (2, 16), n_train=40, n_test=20, **changes)
    if names is not None:  # the optional array of class names
        np.savez(path, **arrays, classes=names)
    return f"npz:{path}"


@pytest.mark.parametrize("changes, message", [
    (dict(y_test=np.r_[np.zeros(19, int), 5]), "labels that no training input has (5)"),
    (dict(y_train=np.arange(40) % 3 + 1, y_test=np.arange(20) % 3 + 1),
     "no training input of class 0, of 4 classes (labels from 1? number classes from 0"),
    (dict(y_train=np.zeros(40, int), y_test=np.zeros(20, int)),
     "every training input is of class 0; a classifier needs at least two"),
    (dict(x_test=np.zeros((0, 2, 16), np.float32), y_test=np.zeros(0, int)),
     "the test split is empty"),
    (dict(y_train=np.arange(40) % 3 + 0.5), "not whole numbers (e.g. 0.5)"),
    (dict(names=np.array(["a", "b"])), "classes names only 2 classes"),
])
def test_labels_a_classifier_cannot_use_are_refused(tmp_path, changes, message):
    with pytest.raises(DataError, match=r".*") as refused:
        load_data(dataset=_npz(tmp_path, **changes))
    assert message in str(refused.value)


def test_usable_labels_are_taken_with_one_line(tmp_path, capsys):
    """Whole-number float labels are labels; a test split without some class is usable
    (said); a classes array names the classes."""
    y_train = (np.arange(40) % 3).astype(np.float64)
    data = load_data(dataset=_npz(tmp_path, y_train=y_train, y_test=np.arange(20) % 2,
                                  names=np.array(["ecg", "emg", "eeg"])))
    err = capsys.readouterr().err.strip().splitlines()
    assert data.train_labels.dtype == torch.int64 and data.spec.classes == ("ecg", "emg", "eeg")
    assert len(err) == 2 and "y_train is float64; its values are whole numbers" in err[0]
    assert "no input of class eeg (label 2); its accuracy is over the others" in err[1]
    assert data.describe()["class_names"] == ["ecg", "emg", "eeg"]


def test_an_empty_class_folder_is_refused(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for name in ("cat", "dog", "emu"):
            (tmp_path / split / name).mkdir(parents=True)
            if name != "dog":
                Image.new("L", (4, 4), 9).save(tmp_path / split / name / "a.png")
    with pytest.raises(DataError, match="no training input of class dog"):
        load_data(dataset=f"folder:{tmp_path}")


# -- the model's outputs, arguments and first batch

NETS = '''
    import torch
    from torch import nn

    def softmax_net(in_channels=2, num_classes=3):
        return nn.Sequential(nn.Conv1d(in_channels, 8, 3), nn.BatchNorm1d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, num_classes),
                             nn.Softmax(1))

    def head(in_channels=2, num_classes=3, width=8):
        return nn.Sequential(nn.Conv1d(in_channels, width, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, width),
                             nn.BatchNorm1d(width), nn.Linear(width, num_classes))

    def monai_like(spatial_dims=1, n_input_channels=3, num_classes=3):
        return nn.Sequential(nn.Conv1d(n_input_channels, 8, 3), nn.BatchNorm1d(8),
                             nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def timm_like(in_chans=3, num_classes=1000):
        return nn.Sequential(nn.Conv1d(in_chans, 8, 3), nn.BatchNorm1d(8),
                             nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def fixed_classes(in_channels=2):
        return nn.Sequential(nn.Conv1d(in_channels, 8, 3), nn.BatchNorm1d(8),
                             nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 1000))
'''


@pytest.fixture
def nets(tmp_path):
    (tmp_path / "nets.py").write_text(textwrap.dedent(NETS))
    write_npz(tmp_path / "s.npz", (2, 16), n_train=64, n_test=32)
    return tmp_path


def _run(nets, spec, *extra, variants=("bn",)):
    return ["compare", "--model", f"{nets / 'nets.py'}:{spec}", "--dataset",
            str(nets / "s.npz"), "--variants", *variants, "--batch-size", "16",
            "--epochs", "1", "--no-progress", *extra]


def test_outputs_are_told_apart():
    logits = torch.randn(4, 3) * 3
    assert outputs_of(logits) == "logits"
    assert outputs_of(logits.log_softmax(1)) == "log-probabilities"
    assert outputs_of(logits.softmax(1)) == "probabilities"


def test_a_softmax_model_trains_on_the_log_of_its_probabilities(nets):
    out = nets / "soft"
    assert main(_run(nets, "softmax_net", "--out", str(out))) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["config"]["model"]["outputs"] == "probabilities"
    weights = normlab.checkpoint.load_model(out / "bn-seed1.safetensors")
    assert type(weights[-1]).__name__ == "ClampedLog"  # log(p), not log_softmax(p)


@pytest.mark.parametrize("spec, args, message", [
    ("monai_like", ["--model-arg", "n_input_channels=3"],
     "the data has 2: pass --model-arg n_input_channels=2"),
    ("fixed_classes", [], "its output is (2, 1000), normlab needs (N, 3), one score per "
     "class of the data: the callable takes no num_classes or n_classes argument"),
    ("timm_like", ["--model-arg", "num_classes=1000"], "built with --model-arg "
     "num_classes=1000, the data has 3 classes; drop that --model-arg or pass num_classes=3"),
    ("head", ["--model-arg", "width=abc"], "--model-arg width=abc: width takes a int (its "
     "default is 8), and 'abc' is not one"),
    ("head", ["--model-arg", "depth=3"], "--model-arg depth: "),
    ("head", ["--limit-train", "49"], "a batch of shape (1, 2, 16) fails in forward "
     "(ValueError: Expected more than 1 value per channel when training"),
])
def test_a_model_is_refused_with_what_to_do(nets, capsys, spec, args, message):
    code, line = cli_error(_run(nets, spec, *args, "--out", str(nets / "o")), capsys)
    assert code == 2 and message in line, line
    assert not (nets / "o").exists()  # a refused start leaves no folder behind


def test_channels_and_classes_reach_other_libraries_names(nets):
    """timm's in_chans and MONAI's n_input_channels are passed from the data."""
    assert main(_run(nets, "timm_like", "--out", str(nets / "t"))) == 0
    assert main(_run(nets, "monai_like", "--out", str(nets / "m"))) == 0


def test_a_refused_start_leaves_no_folder(nets, capsys, monkeypatch):
    monkeypatch.chdir(nets)
    cli_error(_run(nets, "head", "--model-arg", "width=abc"), capsys)
    assert not (nets / "runs").exists() or not any((nets / "runs").iterdir())
    with pytest.raises(UsageError, match="width takes a int"):  # the reason, not "above"
        normlab.run("compare", model=f"{nets / 'nets.py'}:head", dataset=nets / "s.npz",
                    model_arg={"width": "abc"}, variants=["bn"], epochs=1, no_progress=True)
    assert not (nets / "runs").exists() or not any((nets / "runs").iterdir())


def test_records_name_absolute_paths_and_bare_paths_are_accepted(nets, monkeypatch):
    monkeypatch.chdir(nets)
    assert main(["compare", "--model", "nets.py:head", "--dataset", "s.npz", "--variants",
                 "bn", "--batch-size", "16", "--epochs", "1", "--no-progress",
                 "--out", "run"]) == 0
    config = json.loads((nets / "run" / "metrics.json").read_text())["config"]
    assert config["dataset"] == f"npz:{nets / 's.npz'}"
    assert config["model"]["spec"] == f"{nets / 'nets.py'}:head"
    monkeypatch.chdir(nets.parent)  # evaluate from elsewhere
    rows = normlab.evaluate.evaluate_files([nets / "run" / "bn-seed1.safetensors"],
                                           ["running"], torch.device("cpu"))
    assert rows[0]["test_acc"] == rows[0]["recorded_acc"]


# -- --resume changes nothing

def test_resume_keeps_threads_and_equals_the_uninterrupted_run(nets, monkeypatch):
    """A --threads 1 run, interrupted and resumed without flags in a process whose torch
    has 2 threads, trains its second half on 1 thread too, to the same numbers."""
    common = _run(nets, "head", variants=("bn", "gn"))
    common[common.index("--epochs") + 1] = "2"
    threads_seen = []
    real = runner.EpochLines.after_epoch

    def watch(self, trainer):
        threads_seen.append(torch.get_num_threads())
        real(self, trainer)

    monkeypatch.setattr(runner.EpochLines, "after_epoch", watch)
    assert main([*common, "--threads", "1", "--out", str(nets / "whole")]) == 0

    def stop(self, trainer):
        watch(self, trainer)
        if self.label == "gn" and trainer.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.EpochLines, "after_epoch", stop)
    with pytest.raises(SystemExit):
        main([*common, "--threads", "1", "--out", str(nets / "cut")])
    monkeypatch.setattr(runner.EpochLines, "after_epoch", watch)
    torch.set_num_threads(2)  # as a new process starts
    threads_seen.clear()
    try:
        assert main(["compare", "--resume", str(nets / "cut"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert threads_seen == [1]
    whole, cut = (json.loads((nets / f / "metrics.json").read_text()) for f in ("whole", "cut"))
    for v in ("bn", "gn"):
        a, b = (r["variants"][v]["runs"][0]["history"] for r in (whole, cut))
        assert {k: a[k] for k in a if k != "epoch_time"} == \
            {k: b[k] for k in b if k != "epoch_time"}
    assert "resumed_parallel" not in cut


def test_resume_refuses_changed_data(nets, capsys, monkeypatch):
    common = _run(nets, "head", variants=("bn", "gn"))
    real = runner.EpochLines.after_epoch

    def stop(self, trainer):
        real(self, trainer)
        if self.label == "gn":
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.EpochLines, "after_epoch", stop)
    with pytest.raises(SystemExit):
        main([*common, "--out", str(nets / "cut")])
    arrays = dict(np.load(nets / "s.npz"))
    arrays["y_train"] = np.roll(arrays["y_train"], 1)  # same shapes, other labels
    np.savez(nets / "s.npz", **arrays)
    code, line = cli_error(["compare", "--resume", str(nets / "cut")], capsys)
    assert code == 2 and "was trained on other data" in line and "has changed" in line


# -- messages and defaults

def test_1d_networks_run_the_remedies_defaults_without_the_2d_layers(nets, capsys):
    out = nets / "rem"
    code, line = cli_error(["remedies", "--model", f"{nets / 'nets.py'}:head", "--dataset",
                            str(nets / "s.npz"), "--references", "gn", "frn", "--out",
                            str(out), "--no-progress"], capsys)
    assert code == 2 and "frn: defined for 2-D maps only, and the data's are 1-D" in line
    assert main(["remedies", "--model", f"{nets / 'nets.py'}:head", "--dataset",
                 str(nets / "s.npz"), "--variants", "bn", "--images-per-statistic", "16",
                 "--batch-size", "16", "--seeds", "1", "--epochs", "1",
                 "--precise-images", "16", "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "left out frn, evos0: defined for 2-D maps only, and the data's are 1-D" in said
    record = json.loads((out / "remedies.json").read_text())
    assert record["config"]["references"] == ["gn", "gn+ws", "ln", "ln+ws"]
    assert "signals" in said  # not "images"


def test_torchscript_of_frn_and_evonorm_says_what_to_do_in_one_line():
    for layer in (FilterResponseNorm2d(8), EvoNorm2dB0(8)):
        with warnings.catch_warnings(), pytest.raises(RuntimeError) as refused:
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation
            torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), layer))
        text = str(refused.value)
        assert "\n" not in text and "torch.compile" in text and "torch.export" in text


def test_no_progress_bars_in_a_log(tmp_path, capsys):
    """Output that is no terminal (a log file, CI) gets no bars of \\r redraws; neither
    does folder: decoding with --no-progress."""
    from PIL import Image

    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("L", (8, 8), 40 * i + (name == "b") * 100).save(
                    tmp_path / split / name / f"{i}.png")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.LogSoftmax(1))
    loader = data_module.Loader(torch.randn(10, 1, 2, 2), torch.arange(10) % 2, 4)
    engine.train(model, torch.device("cpu"), loader, torch.optim.SGD(model.parameters(), 0.1))
    normlab.progress.set_enabled(True)
    load_data(dataset=f"folder:{tmp_path}")
    assert "\r" not in capsys.readouterr().err


def test_summary_shows_the_norm_layers_of_a_nested_network(tmp_path, capsys):
    (tmp_path / "deep.py").write_text(textwrap.dedent('''
        from torch import nn

        def deep(in_channels=1, num_classes=10):
            block = lambda: nn.Sequential(nn.Sequential(nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())))
            return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), block(), block(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
                                 nn.LogSoftmax(1))
    '''))
    assert main(["summary", "--model", f"{tmp_path / 'deep.py'}:deep", "--variants", "bn",
                 "gn"]) == 0
    out = capsys.readouterr().out
    bn, gn = out.split("== gn")
    assert "BatchNorm2d" in bn and "GroupNorm" in gn and "BatchNorm2d" not in gn


def test_evaluate_table_keeps_its_columns():
    from normlab.evaluate import table

    rows = [dict(file="w.safetensors", mode=m, applies=True, test_acc=90.0, test_loss=0.3,
                 recorded_acc=None) for m in ("running", "precise-augmented")]
    lines = table(rows)
    assert len({line.index("%") for line in lines[1:]}) == 1
