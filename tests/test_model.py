import pytest
import torch
from torch import nn

from normlab.model import NORMS, Net, count_parameters, make_norm

NORMALIZING = ("batch", "layer", "group", "instance")

# Which axes of an N x C x H x W tensor share one mean/variance, per norm (group: G=2 of C=4).
AXES = {"batch": (0, 2, 3), "layer": (1, 2, 3), "instance": (2, 3)}


@pytest.mark.parametrize("norm", NORMS)
def test_output_is_log_probabilities(norm):
    torch.manual_seed(0)
    out = Net(norm)(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(5))


def test_parameter_budget_is_the_same_for_every_normalization():
    counts = {norm: count_parameters(Net(norm)) for norm in NORMALIZING}
    assert len(set(counts.values())) == 1, counts
    assert max(counts.values()) <= 10_000
    assert count_parameters(Net("none")) <= 10_000


@pytest.mark.parametrize("norm", NORMALIZING)
def test_every_conv_block_uses_the_chosen_norm(norm):
    expected = type(make_norm(norm, 8))
    model = Net(norm)
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert len(norms) == len(convs) and all(type(m) is expected for m in norms)


@pytest.mark.parametrize("norm", ["batch", "layer", "instance", "group"])
def test_norm_layer_normalises_over_the_axes_it_claims(norm):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5) * 3 + 2
    layer = make_norm(norm, 4, 2).train()
    if norm == "group":  # per sample, channels {0,1} and {2,3}
        xs = x.view(6, 2, 2, 5, 5)
        mean, var = xs.mean((2, 3, 4), keepdim=True), xs.var((2, 3, 4), keepdim=True,
                                                             unbiased=False)
        expected = ((xs - mean) / torch.sqrt(var + 1e-5)).view_as(x)
    else:
        axes = AXES[norm]
        mean, var = x.mean(axes, keepdim=True), x.var(axes, keepdim=True, unbiased=False)
        expected = (x - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_unknown_norm_lists_the_choices():
    with pytest.raises(ValueError, match="unknown norm 'weight'.*batch, layer, group"):
        Net("weight")


def test_num_groups_must_divide_each_layer():
    with pytest.raises(ValueError, match="layer conv1: num_groups=3 does not divide 8 channels"):
        Net("group", num_groups=3)
    with pytest.raises(ValueError, match="layer conv3: num_groups=8 does not divide 12"):
        Net("group", num_groups=8)
    Net("batch", num_groups=3)  # only group norm cares


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_groups=0), "num_groups must be positive"),
    (dict(num_groups=-2), "num_groups must be positive"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(num_classes=0), "num_classes"),
    (dict(architecture=(("conv1", 0, 3),)), "channels and kernel must be positive"),
])
def test_bad_sizes_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Net("group", **kwargs)


@pytest.mark.parametrize("shape", [(4, 3, 24, 24), (2, 5, 9, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_maxpool2x2_equals_pytorchs_maxpool_in_values_and_gradients(shape, dtype):
    from normlab.model import MaxPool2x2

    g = torch.Generator().manual_seed(0)
    # Post-ReLU activations (many exact zeros), some exact positive ties, some ordinary values.
    x = torch.relu(torch.randn(shape, generator=g)).to(dtype)
    x[..., 0:2, 0:2] = 1.5  # a window whose four entries tie
    x[..., 2, 2:4] = 0.75  # a tie within the top row of a window
    x = x.detach().requires_grad_()
    upstream = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=g).to(dtype)
    ours = MaxPool2x2()(x)
    (grad_ours,) = torch.autograd.grad(ours, x, upstream)
    theirs = torch.nn.functional.max_pool2d(x, 2)
    (grad_theirs,) = torch.autograd.grad(theirs, x, upstream)
    assert torch.equal(ours, theirs)
    assert torch.equal(grad_ours, grad_theirs)  # exact: ties go to the same element


def test_maxpool2x2_passes_gradcheck():
    from normlab.model import MaxPool2x2

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(MaxPool2x2(), (x,))
