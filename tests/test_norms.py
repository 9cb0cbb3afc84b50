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
