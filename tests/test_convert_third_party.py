"""``norms.convert`` on networks nobody here wrote (the ``models`` extra): MONAI's U-Net in 2-D
and 3-D and efficientnet_pytorch's EfficientNet-b0. Each converts to every target, trains a
step, and keeps its eval outputs where the statistics carry over; the targets that cannot
replace these networks' layers say so, naming them. And the example of the workflow
(examples/convert_unet3d.py: convert a 3-D U-Net, train it under torchrun, PreciseBN) on two
processes with synchronized Batch Norm against one process with Batch Norm over the whole
batch, in float64."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import finish
from normlab.norms import NORMS, convert

monai = pytest.importorskip("monai", reason="install the models extra: pip install "
                            "'normlab[models]'")
efficientnet = pytest.importorskip("efficientnet_pytorch", reason="install the models extra")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "convert_unet3d.py"
BATCH_TARGETS = ("batch", "syncbatch", "batchrenorm")  # statistics carry over


def unet(dims: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=dims, in_channels=1, out_channels=4, channels=(8, 16, 32),
                strides=(2, 2), num_res_units=1, norm="batch")


def efficientnet_b0() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return efficientnet.EfficientNet.from_name("efficientnet-b0", num_classes=10)


NETWORKS = {  # name -> (model, input, its BatchNorm type, how many)
    "unet2d": (lambda: unet(2), (2, 1, 16, 16), nn.BatchNorm2d, 6),
    "unet3d": (lambda: unet(3), (2, 1, 8, 8, 8), nn.BatchNorm3d, 6),
    "efficientnet-b0": (efficientnet_b0, (2, 3, 32, 32), nn.BatchNorm2d, 49),
}


def _randomise(model: nn.Module) -> None:
    """Trained-looking norms: scales, shifts and running statistics away from 1 and 0."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("target", [n for n in NORMS if n not in ("frn", "evonorm-b0",
                                                                  "evonorm-s0")])
def test_third_party_networks_convert_to_every_target_and_train(network, target):
    build, shape, source, count = NETWORKS[network]
    model = build()
    _randomise(model)
    assert sum(type(m) is source for m in model.modules()) == count
    momenta = [m.momentum for m in model.modules() if type(m) is source]
    x = torch.randn(shape)
    expected = model.eval()(x)
    converted, replaced = convert(model, target, num_groups=4, report=True)
    assert len(replaced) == count and not any(type(m) is source for m in converted.modules())
    if target in BATCH_TARGETS:  # running statistics, eps and momentum carried over
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)
        assert [m.momentum for m in converted.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)] == momenta
    converted.train()
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.01)
    out = converted(x)
    loss = out.float().square().mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in converted.parameters())


@pytest.mark.parametrize("network", ["unet2d", "efficientnet-b0"])
@pytest.mark.parametrize("target", ["frn", "evonorm-b0", "evonorm-s0"])
def test_norm_activation_targets_keep_the_networks_own_activations(network, target):
    """MONAI's blocks end in PReLU and EfficientNet's in Swish, called from forward code, not
    an nn.ReLU that FRN or EvoNorm could take the place of: each norm becomes the target
    without its activation, so no activation is dropped or doubled, and the report says so
    for every layer. The network still trains a step."""
    build, shape, source, count = NETWORKS[network]
    model = build()
    activations = [type(m) for m in model.modules() if isinstance(m, nn.PReLU | nn.SiLU)]
    converted, changes = convert(model, target, report=True)
    new = [m for m in converted.modules() if type(m).__name__.startswith(("Filter", "Evo"))]
    assert len(new) == count and not any(m.apply_act for m in new)
    assert sum("no nn.ReLU after it: without its activation" in c
               for c in changes.values()) == count
    assert [type(m) for m in converted.modules()
            if isinstance(m, nn.PReLU | nn.SiLU)] == activations
    loss = converted.train()(torch.randn(shape)).float().square().mean()
    loss.backward()
    assert all(p.grad is not None for p in converted.parameters() if p.requires_grad)


def test_a_monai_3d_network_goes_to_normlab_and_back_to_torch_unchanged():
    """torch -> normlab (virtual batches) -> torch: PyTorch's layer types again, the state
    dict and the eval outputs equal bit for bit; the network trained a step in between."""
    model = unet(3)
    _randomise(model)
    x = torch.randn(2, 1, 8, 8, 8)
    expected, state = model.eval()(x), {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, "batch", virtual_batches=2)
    assert torch.equal(model(x), expected)
    back, changes = convert(model, "torch", report=True)
    assert len(changes) == 6 and sum(type(m) is nn.BatchNorm3d for m in back.modules()) == 6
    assert back.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())
    assert torch.equal(back(x), expected)


def test_shared_norms_of_dynunet_are_converted_once_and_a_refusal_on_segresnet_changes_nothing():
    from monai.networks.nets import DynUNet, SegResNet

    model = DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                    upsample_kernel_size=[2, 2], norm_name="batch")
    places = [n for n, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, nn.BatchNorm3d)]
    layers = {id(m) for m in model.modules() if isinstance(m, nn.BatchNorm3d)}
    assert (len(places), len(layers)) == (20, 10)  # each norm sits in two places
    parameters = sum(p.numel() for p in model.parameters())
    model, changes = convert(model, "group", num_groups=2, report=True)
    assert len(changes) == 10 and sum(p.numel() for p in model.parameters()) == parameters
    assert model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
    segresnet = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2)
    types = [type(m) for m in segresnet.modules()]
    with pytest.raises(ValueError, match="cannot convert to 'frn': 25 layer"):
        convert(segresnet, "frn")
    assert [type(m) for m in segresnet.modules()] == types


def _example(tmp_path: Path, norm: str, processes: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{norm}-{processes}.safetensors"
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable])
    proc = subprocess.Popen([*launch, str(EXAMPLE), "--norm", norm, "--steps", "4",
                             "--batch", "3", "--side", "12", "--float64", "--out", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    code, stdout, stderr = finish(proc)
    assert code == 0, stdout + stderr
    return load_file(out)


def test_example_3d_unet_syncbatch_on_two_processes_equals_batchnorm_in_one(tmp_path):
    """Four SGD steps of global batch 3 (2 + 1 volumes on the two ranks, so the weighting of
    unequal parts counts), then PreciseBN: weights and running statistics agree to 1e-9 in
    float64. Plain Batch Norm on two processes (each rank its own volumes) differs."""
    two = _example(tmp_path, "syncbatch", 2)
    one = _example(tmp_path, "batch", 1)
    per_device = _example(tmp_path, "batch", 2)
    assert two.keys() == one.keys() and two["model.0.conv.unit0.conv.weight"].dtype == \
        torch.float64
    running = [k for k in two if "running" in k]
    assert running
    for key in two:
        if "num_batches" not in key:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-9, msg=key)
    assert max((per_device[k] - one[k]).abs().max().item() for k in running) > 1e-3


def test_a_monai_classifier_through_compare_with_model(tiny_mnist, tmp_path):
    """``normlab compare --model monai.networks.nets:DenseNet`` on a subset: MONAI's own
    arguments by --model-arg, in_channels from the data, its logits given a log_softmax,
    the package version as the fingerprint, every variant converted and trained."""
    from normlab.cli import main

    out = tmp_path / "densenet"
    assert main(["compare", "--model", "monai.networks.nets:DenseNet", "--model-arg",
                 "spatial_dims=2", "--model-arg", "out_channels=10", "--model-arg",
                 "init_features=8", "--model-arg", "growth_rate=4", "--model-arg",
                 "block_config=(2, 2)", "--variants", "bn", "gn", "evos0",
                 "--data-dir", str(tiny_mnist[1]), "--limit-train", "128", "--batch-size",
                 "32", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    import json

    import monai

    described = json.loads((out / "metrics.json").read_text())["config"]["model"]
    assert described["fingerprint"] == f"monai=={monai.__version__}"
    assert described["outputs"] == "logits" and described["args"]["block_config"] == [2, 2]
    assert set(described["parameters"]) == {"bn", "gn", "evos0"}
