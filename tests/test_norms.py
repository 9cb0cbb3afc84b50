"""The public norm API: ``make_norm`` and ``convert`` on normlab's Net and on a hand-built
ResNet-style block with nested modules."""

import pytest
import torch
from torch import nn

from normlab.model import Net
from normlab.norms import BatchNorm2d, convert, make_norm


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
    assert not converted.training
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
    assert isinstance(convert(nn.Sequential(nn.BatchNorm2d(4)), "none")[0], nn.Identity)


def test_groups_that_do_not_divide_a_layer_name_it():
    model = nn.Module()
    model.stem = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12))  # 3 divides 12
    model.stages = nn.ModuleList([Block(12, 16)])  # but not 16
    with pytest.raises(ValueError, match=r"layer stages\.0\.body\.1: num_groups=3 does not "
                                         r"divide 16 channels"):
        convert(model, "group", num_groups=3)
    model = nn.Sequential(nn.Conv2d(1, 6, 1), nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match=r"layer 1: num_groups=4 does not divide 6 channels"):
        convert(model, "group")
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
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNorm2d(4, fast=True, virtual_batches=2)(torch.randn(2, 4, 1, 1))
