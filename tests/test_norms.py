"""The public norm API: ``make_norm`` and ``convert`` on normlab's Net and on a hand-built
ResNet-style block with nested modules."""

import copy

import pytest
import torch
from torch import nn

from normlab.model import Net
from normlab.norms import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchRenorm2d,
    BatchRenorm3d,
    FilterResponseNorm2d,
    batch_statistics,
    convert,
    make_norm,
    precise_bn,
)


class Block(nn.Module):
    """A residual block: two conv-BN pairs and a downsampling shortcut with its own BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=1, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, eps=1e-3))
        self.stages = nn.ModuleList([Block(8, 16), Block(16, 16)])
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.SyncBatchNorm)}


def _randomise(model: nn.Module) -> None:
    torch.manual_seed(0)
    for m in _norms(model).values():
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.5, 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize("norm, kind, groups", [("group", nn.GroupNorm, 4),
                                                ("layer", nn.GroupNorm, 1),
                                                ("syncbatch", BatchNorm2d, None)])
def test_convert_replaces_every_norm_in_nested_modules_and_keeps_scale_and_shift(norm, kind,
                                                                                 groups):
    model = TinyResNet()
    _randomise(model)
    before = {n: (m.weight.clone(), m.bias.clone(), m.eps) for n, m in _norms(model).items()}
    converted = convert(model, norm)
    assert converted is model
    after = _norms(model)
    assert after.keys() == before.keys() and len(after) == 7
    for name, m in after.items():
        assert type(m) is kind, name
        if groups is not None:
            assert m.num_groups == groups
        torch.testing.assert_close(m.weight, before[name][0], rtol=0, atol=0)
        torch.testing.assert_close(m.bias, before[name][1], rtol=0, atol=0)
        assert m.eps == before[name][2]
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_batch_to_batch_carries_running_statistics_so_eval_outputs_are_unchanged():
    model = TinyResNet().eval()
    _randomise(model)
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    converted = convert(model, "syncbatch")
    layers = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(layers) == 7 and all(type(m) is BatchNorm2d and m.sync for m in layers)
    assert not any(m.training for m in layers)  # the new layers kept eval mode
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)


def test_converting_normlab_net_gives_the_net_built_with_that_norm():
    torch.manual_seed(3)
    source = Net("batch")
    target = Net("group", num_groups=4)
    target.load_state_dict({k: v for k, v in source.state_dict().items()
                            if "running" not in k and "num_batches" not in k})
    converted = convert(source, "group")
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(converted(x), target(x), rtol=0, atol=0)
    assert convert(converted, "batch").state_dict().keys() == Net("batch").state_dict().keys()


def test_a_norm_as_the_root_and_none_and_device_and_dtype():
    root = nn.BatchNorm2d(6).double()
    new = convert(root, "instance")
    assert isinstance(new, nn.GroupNorm) and new.num_groups == 6
    assert new.weight.dtype == torch.float64
    on_meta = convert(nn.Sequential(nn.BatchNorm2d(6, device="meta")), "batchrenorm")[0]
    assert type(on_meta) is BatchRenorm2d and on_meta.running_mean.device.type == "meta"
    assert on_meta.weight.device.type == "meta"
    assert isinstance(convert(nn.Sequential(nn.BatchNorm2d(4)), "none")[0], nn.Identity)


def test_groups_that_do_not_divide_a_layer_name_it():
    model = nn.Module()
    model.stem = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12))  # 3 divides 12
    model.stages = nn.ModuleList([Block(12, 16)])  # but not 16
    with pytest.raises(ValueError, match=r"3 layer\(s\) of 16 channels, which num_groups=3 "
                                         r"does not divide \(stages\.0\.body\.1, "
                                         r"stages\.0\.body\.4, stages\.0\.shortcut\.1\)"):
        convert(model, "group", num_groups=3)
    model = nn.Sequential(nn.Conv2d(1, 6, 1), nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match=r"1 layer\(s\) of 6 channels, which num_groups=4 does "
                                         r"not divide \(1\)") as error:
        convert(model, "group")
    assert "skip=" not in str(error.value)  # skipping cannot help: num_groups must change
    with pytest.raises(ValueError, match="unknown norm 'weight'"):
        convert(model, "weight")


def test_make_norm_builds_each_named_layer():
    assert type(make_norm("batch", 8)) is BatchNorm2d
    assert make_norm("batch", 8, virtual_batches=4).virtual_batches == 4
    assert make_norm("syncbatch", 8).sync
    assert make_norm("group", 8, 2).num_groups == 2
    assert isinstance(make_norm("none", 8), nn.Identity)


# -- the fast Batch Norm against nn.BatchNorm2d ------------------------------------------
# float32 throughout; rtol/atol 1e-5 (outputs, gradients, running statistics): the two sum in
# different orders, and a channel's output is (x - mean) / std, so rounding of the mean and
# variance (a few float32 ulps) shows up at about 1e-6 of the output's scale.
FAST_CLOSE = dict(rtol=1e-5, atol=1e-5)


def _fast_and_oracle(channels: int, **kwargs) -> tuple[BatchNorm2d, nn.BatchNorm2d]:
    oracle = nn.BatchNorm2d(channels, **kwargs)
    if oracle.affine:
        with torch.no_grad():
            oracle.weight.uniform_(0.5, 1.5)
            oracle.bias.uniform_(-1, 1)
    fast = BatchNorm2d(channels, fast=True, **kwargs)
    fast.load_state_dict(oracle.state_dict())
    return fast, oracle


@pytest.mark.parametrize("shape, scale, shift, kwargs", [
    ((128, 16, 24, 24), 1.0, 0.0, {}),  # the model's largest map
    ((64, 8, 26, 26), 3.0, 2.0, {"momentum": None}),  # cumulative running average
    ((7, 5, 16, 16), 0.5, -1.0, {"affine": False}),
    ((3, 4, 16, 17), 2.0, 0.5, {"eps": 1e-3}),
    ((32, 6, 20, 20), 1.0, 0.0, {"track_running_stats": False}),
    ((128, 12, 24, 24), 0.5, 5.0, {}),  # mean 10 std: float64 mean, two-pass variance
])
def test_fast_batchnorm_equals_nn_batchnorm2d(shape, scale, shift, kwargs):
    """Three training steps and an eval step: outputs, input/weight/bias gradients for a
    non-uniform upstream gradient, running statistics and the batch count."""
    torch.manual_seed(3)
    fast, oracle = _fast_and_oracle(shape[1], **kwargs)
    for _ in range(3):
        x = torch.randn(shape) * scale + shift
        x.requires_grad_()
        xo = x.detach().clone().requires_grad_()
        upstream = torch.randn(shape)
        y, yo = fast(x), oracle(xo)
        torch.testing.assert_close(y, yo, **FAST_CLOSE)
        (y * upstream).sum().backward()
        (yo * upstream).sum().backward()
        torch.testing.assert_close(x.grad, xo.grad, **FAST_CLOSE)
        if oracle.affine:
            for name in ("weight", "bias"):
                torch.testing.assert_close(getattr(fast, name).grad,
                                           getattr(oracle, name).grad, rtol=1e-4, atol=1e-3)
    assert fast.state_dict().keys() == oracle.state_dict().keys()
    for key, value in oracle.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, **FAST_CLOSE)
    x = torch.randn(shape) * scale + shift
    torch.testing.assert_close(fast.eval()(x), oracle.eval()(x), **FAST_CLOSE)


def test_fast_synchronized_batchnorm_in_one_process_is_fast_plain_batchnorm():
    torch.manual_seed(6)
    oracle = nn.BatchNorm2d(4)
    synced = BatchNorm2d(4, sync=True, fast=True)
    x = torch.randn(8, 4, 16, 16)
    torch.testing.assert_close(synced(x), oracle(x), **FAST_CLOSE)
    torch.testing.assert_close(synced.running_var, oracle.running_var, **FAST_CLOSE)


def test_fast_batchnorm_variance_is_accurate_on_a_large_offset_map():
    """PyTorch's vectorised statistics were rejected over accuracy on large maps (PR 113350):
    here against a float64 computation, on maps whose mean is 1000 standard deviations."""
    torch.manual_seed(4)
    x = torch.randn(64, 4, 64, 64) + 1000.0
    fast = BatchNorm2d(4, fast=True, momentum=1.0)  # running stats := this batch's
    fast(x)
    x64 = x.double()
    torch.testing.assert_close(fast.running_mean.double(), x64.mean((0, 2, 3)), rtol=2.4e-7,
                               atol=0)  # two float32 ulps
    torch.testing.assert_close(fast.running_var.double(), x64.var((0, 2, 3)), rtol=1e-5,
                               atol=0)


def test_fast_batchnorm_leaves_other_inputs_to_pytorchs_kernel():
    """Maps under FAST_MIN_PIXELS, bfloat16 and channels-last take nn.BatchNorm2d's own path:
    bit for bit its result, and its error."""
    torch.manual_seed(5)
    fast, oracle = _fast_and_oracle(4)
    assert fast._fast_for(torch.randn(8, 4, 16, 16))  # the path the tests above take
    for x in (torch.randn(8, 4, 15, 15), torch.randn(8, 4, 16, 16).bfloat16(),
              torch.randn(8, 4, 16, 16).contiguous(memory_format=torch.channels_last)):
        f, o = (m.to(x.dtype) for m in (fast, oracle))
        assert torch.equal(f(x), o(x))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNorm2d(4, fast=True)(torch.randn(1, 4, 1, 1))
    # Virtual batches: the message speaks of the user's input, not of the parts' reshaping
    with pytest.raises(ValueError, match=r"an input of shape \(2, 4, 1, 1\) in 2 virtual "
                                         r"batches leaves 1 value per channel in a part"):
        BatchNorm2d(4, fast=True, virtual_batches=2)(torch.randn(2, 4, 1, 1))


# -- convert on 1-D and 3-D networks, and what it refuses -----------------------------------

class Net1d3d(nn.Module):
    """A point-cloud-style 1-D branch, an MLP head over (N, C) and a 3-D stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem3d = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.seq1d = nn.Sequential(nn.Conv1d(4, 8, 1), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Linear(8, 3))
        self.inorm = nn.InstanceNorm3d(4, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inorm(self.stem3d(x))  # (N, 4, D, H, W)
        x = self.seq1d(x.flatten(2))  # (N, 8, D*H*W)
        return self.head(x.mean(2))  # (N, 8) -> (N, 3)


def _randomise_all(model: nn.Module) -> None:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm) and m.weight is not None:
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize("norm", ["batch", "syncbatch", "batchrenorm"])
def test_convert_between_batch_norms_keeps_dimension_state_and_eval_outputs(norm):
    model = Net1d3d()
    _randomise_all(model)
    for layer in (model.stem3d[1], model.head[1]):
        layer.momentum, layer.eps = 0.05, 1e-3
    model.eval()
    x = torch.randn(2, 1, 3, 4, 4)
    expected = model(x)
    converted, changes = convert(model, norm, skip=(nn.InstanceNorm3d,), report=True)
    kinds = {"batch": "BatchNorm", "syncbatch": "BatchNorm", "batchrenorm": "BatchRenorm"}
    assert type(model.stem3d[1]).__name__ == f"{kinds[norm]}3d"
    assert type(model.seq1d[1]).__name__ == type(model.head[1]).__name__ == f"{kinds[norm]}1d"
    assert model.stem3d[1].momentum == 0.05 and model.stem3d[1].eps == 1e-3
    assert not model.stem3d[1].training
    assert getattr(model.head[1], "sync", False) == (norm == "syncbatch")
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)  # statistics carried
    assert set(changes) == {"stem3d.1", "seq1d.1", "head.1"}
    assert changes["stem3d.1"].startswith("BatchNorm3d(4, eps=0.001, momentum=0.05")
    assert "-> " + kinds[norm] + "3d(4" in changes["stem3d.1"]


@pytest.mark.parametrize("norm, groups", [("group", 2), ("layer", 1), ("instance", None)])
def test_convert_to_group_layer_and_instance_norm_in_1d_and_3d(norm, groups):
    model = Net1d3d().train()
    _randomise_all(model)
    before = {n: (m.weight.clone(), m.bias.clone()) for n, m in model.named_modules()
              if isinstance(m, nn.BatchNorm1d | nn.BatchNorm3d)}
    convert(model, norm, num_groups=2)
    for name, (weight, bias) in before.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.GroupNorm and layer.training
        assert layer.num_groups == (groups or layer.num_channels)
        assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    out = model(torch.randn(2, 1, 3, 4, 4))
    out.sum().backward()  # trains
    assert out.shape == (2, 3)


def test_convert_to_frn_and_evonorm_replaces_the_norm_and_its_relu():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    old = f"BatchNorm2d({model[1].extra_repr()})"
    converted, changes = convert(model, "frn", report=True)
    assert isinstance(converted[1], FilterResponseNorm2d) and isinstance(converted[2], nn.Identity)
    assert changes == {"1": f"{old} -> FilterResponseNorm2d(8, eps=1e-06)",
                       "2": "ReLU -> Identity (part of frn)"}
    assert converted(torch.randn(2, 3, 6, 6)).shape == (2, 4, 4, 4)


def test_convert_refuses_what_it_cannot_convert_naming_every_layer_unless_skipped():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.LayerNorm(8 * 4 * 4), nn.ReLU(),
                          nn.Unflatten(1, (8, 4, 4)), nn.Conv3d(8, 8, 1), nn.BatchNorm3d(8),
                          nn.ReLU())
    with pytest.raises(ValueError) as error:
        convert(model, "evonorm-b0")
    assert str(error.value).splitlines() == [
        "cannot convert to 'evonorm-b0': 2 layer(s) refused, so nothing was changed",
        "- 1 layer(s) LayerNorm: normalise over their last dimension(s), not over channels and "
        "positions (4): convert them by hand, or leave them, or pass skip=(LayerNorm,) to "
        "leave them as they are",
        "- 1 layer(s) BatchNorm3d on 3-D maps, where evonorm-b0 is defined for 2-D maps "
        "(N, C, H, W) only (8): choose another target, or pass skip=(BatchNorm3d,) to leave "
        "them as they are"]
    assert type(model[1]) is nn.BatchNorm2d  # nothing was changed
    with pytest.raises(ValueError, match=r"LayerNorm: .* \(4\)") as error:
        convert(model, "group", num_groups=2)
    assert "(1)" not in str(error.value)
    _, changes = convert(model, "group", num_groups=2, skip=(nn.LayerNorm,), report=True)
    assert set(changes) == {"1", "8"} and type(model[4]) is nn.LayerNorm


def test_convert_says_when_a_model_has_no_normalization_layer():
    with pytest.raises(ValueError, match="the model has no normalization layer"):
        convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), "group")
    with pytest.raises(ValueError, match="of 8 channels, which num_groups=3 does not divide"):
        convert(Net1d3d(), "group", num_groups=3)


def test_make_norm_builds_each_dimension():
    assert type(make_norm("batch", 8, dims=1)) is BatchNorm1d
    assert type(make_norm("batchrenorm", 8, dims=3)) is BatchRenorm3d
    assert type(make_norm("syncbatch", 8, dims=None)) is BatchNorm
    with pytest.raises(ValueError, match="frn is defined for 2-D maps"):
        make_norm("frn", 8, dims=1)
    with pytest.raises(ValueError, match="needs at least 4 images, got 3"):
        make_norm("batch", 8, virtual_batches=4, dims=3).train()(torch.randn(3, 8, 2, 2, 2))


# -- PreciseBN and batch statistics at test ------------------------------------------------

def _bn_net() -> nn.Module:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                          nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, momentum=None), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5))
    _randomise_all(model)
    return model


def test_precise_bn_gives_each_layer_the_average_of_its_batch_statistics():
    """Oracle: the same layers run by PyTorch's own cumulative average (momentum None from a
    fresh count), layer after layer in training mode, with Dropout in eval mode; every other
    parameter and buffer unchanged."""
    model = _bn_net().train()
    batches = [torch.randn(16, 1, 8, 8) * 2 + 1 for _ in range(5)]
    oracle = copy.deepcopy(model).eval()
    for m in oracle.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        for x in batches:
            oracle(x)
    before = copy.deepcopy(model.state_dict())
    assert precise_bn(model, iter(batches), images=80) == 5
    assert model.training and model[3].training  # modes restored
    for key, value in model.state_dict().items():
        if "running_mean" in key or "running_var" in key:
            torch.testing.assert_close(value, oracle.state_dict()[key], rtol=1e-5, atol=1e-6)
            assert not torch.equal(value, before[key])
        else:  # weights, num_batches_tracked
            assert torch.equal(value, before[key]), key
    assert model[5].momentum is None and model[1].momentum == 0.1


def test_precise_bn_uses_whole_batches_and_groups_and_refuses_too_few_images():
    model = _bn_net()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(4)]
    assert precise_bn(model, batches, images=50) == 3  # 48 images in whole batches
    with pytest.raises(ValueError, match="10 image\\(s\\) do not make one batch of 16"):
        precise_bn(model, batches, images=10)
    with pytest.raises(ValueError, match="no layer with running statistics"):
        precise_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2)), batches)
    # grouped: the statistics of 4-image parts, i.e. of batches of 4 images
    grouped, small = _bn_net(), _bn_net()
    grouped = nn.Sequential(*[BatchNorm2d(m.num_features) if isinstance(m, nn.BatchNorm2d)
                              else m for m in grouped])
    small.load_state_dict(grouped.state_dict())
    grouped[9] = small[9] = nn.Identity()  # nn.BatchNorm1d cannot cut a batch into parts
    precise_bn(grouped, batches, images_per_statistic=4)  # normlab's layers cut each batch
    precise_bn(small, [p for x in batches for p in x.split(4)])
    for key, value in grouped.state_dict().items():
        torch.testing.assert_close(value, small.state_dict()[key], rtol=1e-5, atol=1e-6)
    mixed, small = _bn_net(), _bn_net()  # PyTorch's layers too: one call per group
    assert precise_bn(mixed, batches, images_per_statistic=4) == 16
    precise_bn(small, [p for x in batches for p in x.split(4)])
    for key, value in mixed.state_dict().items():
        torch.testing.assert_close(value, small.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_batch_statistics_normalise_each_group_of_the_test_batch_and_keep_running_ones():
    model = _bn_net().eval()
    x = torch.randn(14, 1, 8, 8)  # groups of 4, 4, 4 and 2
    before = copy.deepcopy(model.state_dict())
    train_mode = copy.deepcopy(model)
    for m in train_mode.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    with torch.no_grad():
        expected = torch.cat([train_mode(part) for part in x.split(4)])
        with batch_statistics(model, 4) as forward:
            got = forward(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not model.training and not model[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- a normalization registered from outside: one record, usable everywhere


class PixelNorm(nn.Module):
    """Each position's channel vector divided by its root mean square (Karras et al. 2018):
    batch-independent, a normalization none of normlab's own records describe."""

    def __init__(self, num_features: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale * self.weight.view(shape) + self.bias.view(shape)


class BatchScale(nn.Module):
    """Each channel divided by its mean square over (N, H, W): batch-dependent, keeping a
    running ``running_var`` updated with ``momentum`` as Batch Norm's contract asks."""

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = x.pow(2).mean((0, 2, 3))
            with torch.no_grad():
                self.running_var.lerp_(var, self.momentum)
        else:
            var = self.running_var
        return x * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)


@pytest.fixture
def outside_norms():
    """Two records registered as a user would, removed again afterwards."""
    from normlab.norms import NORMS, Norm, register
    from normlab.variants import VARIANTS

    register(Norm("pixel", lambda c, g, k, d, **o: PixelNorm(c, **o), "Pixel Norm",
                  (PixelNorm,)))
    register(Norm("batchscale", lambda c, g, k, d, **o: BatchScale(c, **o), "Batch Scale",
                  (BatchScale,), batch_dependent=True, dims=(2,)), variant="bs")
    yield
    for table, key in ((NORMS, "pixel"), (NORMS, "batchscale"), (VARIANTS, "pixel"),
                       (VARIANTS, "bs")):
        del table[key]


def test_a_registered_norm_works_in_net_convert_ws_and_precise_bn(outside_norms):
    from normlab.norms import NORMS, Norm, register, standardize_weights

    net = Net("pixel")
    assert sum(isinstance(m, PixelNorm) for m in net.modules()) == 7
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # convert puts it in, recognises it as a normalization and takes it out again
    model = nn.Sequential(nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 2, 1))
    convert(model, "pixel")
    assert isinstance(model[1], PixelNorm) and model[1].num_features == 6
    convert(model, "group", num_groups=3)
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 3
    convert(model, "pixel")
    assert [type(m).__name__ for m in standardize_weights(model)] == \
        ["StdConv1d", "PixelNorm", "ReLU", "Conv1d"]
    # its dimensions, stated once in its record, are checked by make_norm and convert
    with pytest.raises(ValueError, match="batchscale is defined for 2-D maps"):
        make_norm("batchscale", 4, dims=3)
    with pytest.raises(ValueError, match=r"BatchNorm1d on 1-D maps, where batchscale"):
        convert(nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)), "batchscale")
    # precise_bn: the running statistic becomes the average of the batches' (by hand)
    layer = nn.Sequential(nn.Conv2d(2, 3, 1), make_norm("batchscale", 3))
    batches = [torch.randn(5, 2, 4, 4) + i for i in range(3)]
    assert precise_bn(layer, batches) == 3
    with torch.no_grad():
        expected = torch.stack([layer[0](x).pow(2).mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(layer[1].running_var, expected, rtol=1e-6, atol=1e-6)
    with batch_statistics(layer), torch.no_grad():  # eval with the batch's own statistic
        x = batches[0]
        y = layer[0](x)
        torch.testing.assert_close(layer(x), y * torch.rsqrt(y.pow(2).mean((0, 2, 3)) + 1e-5)
                                   .view(1, -1, 1, 1))
    # normlab's own names stay normlab's
    with pytest.raises(ValueError, match="one of normlab's own norms"):
        register(Norm("group", NORMS["pixel"].build, "Mine", (PixelNorm,)))
    with pytest.raises(ValueError, match="variant name 'gn' is taken by Group Norm"):
        register(Norm("mine", NORMS["pixel"].build, "Mine", (PixelNorm,)), variant="gn")


def test_a_registered_norm_is_a_variant_of_every_study(outside_norms, tiny_mnist, tmp_path):
    import normlab
    from normlab import evaluate

    _, folder = tiny_mnist
    record, out = normlab.run("compare", variants=["pixel", "bs"], epochs=1, batch_size=32,
                              data_dir=str(folder), out=str(tmp_path / "run"), no_progress=True,
                              device="cpu")
    assert set(record["variants"]) == {"pixel", "bs"}
    assert "Pixel Norm" in (out / "report.md").read_text()
    model, how = evaluate.load_trained(out / "bs-seed1.safetensors", torch.device("cpu"))
    assert how.images_per_statistic == 32 and evaluate.batch_dependent(model)
    data = normlab.data.load_data(folder)
    accuracies = {mode: evaluate.evaluate_model(model, data, how, mode, torch.device("cpu"),
                                                precise_images=64)
                  for mode in ("running", "precise", "batch")}
    assert len(accuracies) == 3
