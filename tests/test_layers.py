"""The small-batch remedies' layers against their papers' formulas, written here in float64
and independently of the code under test: Batch Renorm (Ioffe 2017, Algorithm 1), Filter
Response Norm (Singh & Krishnan 2020), EvoNorm-B0 and -S0 (Liu et al. 2020) and Weight
Standardization (Qiao et al. 2019).

Every layer runs in float64 against its formula (outputs, input and parameter gradients for
a non-uniform upstream gradient, running statistics, eval mode) at a tolerance of 1e-10;
inputs have non-zero means, random scales and shifts, and random running statistics, so a
missing term, a swapped axis or eps in the wrong place shows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.norms import (
    BatchNorm2d,
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNorm2d,
    RenormSchedule,
    StdConv2d,
    renorm_limits,
)

EXACT = dict(rtol=1e-10, atol=1e-10)


def _randomise(layer: nn.Module, seed: int = 0) -> None:
    """Scales, shifts and (where present) running statistics away from 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            low, high = (0.5, 1.5) if name in ("weight", "v") else (-0.5, 0.5)
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * (high - low) + low)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(torch.rand(layer.num_features, generator=g) - 0.5)
        if getattr(layer, "running_var", None) is not None:
            layer.running_var.copy_(torch.rand(layer.num_features, generator=g) * 2 + 0.3)


def _grads(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor, forward=None
           ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(output, input gradient, parameter gradients) of ``forward(x)`` (default: the layer)."""
    x = x.detach().clone().requires_grad_()
    y = (forward or layer)(x)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad((y * upstream).sum(), [x, *params.values()])
    return y.detach(), grads[0], dict(zip(params, grads[1:], strict=True))


# -- Batch Renorm --------------------------------------------------------------------------

def batch_renorm_formula(x, weight, bias, running_mean, running_var, r_max, d_max, eps,
                         detach=True):
    """Ioffe (2017), Algorithm 1, over the batch of ``x`` (N, C, *): the output, and the batch
    mean and unbiased variance (for the running statistics)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    var_b = ((x - mu_b.view(shape)) ** 2).mean(dims)  # biased
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(running_var + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b - running_mean) / sigma, -d_max, d_max)
    if detach:
        r, d = r.detach(), d.detach()
    x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    n = x.numel() // x.shape[1]
    return weight.view(shape) * x_hat + bias.view(shape), mu_b, var_b * n / (n - 1)


RENORM_SHAPES = [(BatchRenorm1d, (16, 5)), (BatchRenorm1d, (8, 5, 7)),
                 (BatchRenorm2d, (8, 5, 6, 6)), (BatchRenorm3d, (4, 5, 3, 4, 5)),
                 (BatchRenorm, (8, 5, 6, 6))]


@pytest.mark.parametrize("cls, shape", RENORM_SHAPES)
@pytest.mark.parametrize("limits", [(1.5, 0.5), (1e3, 1e3)], ids=["clipping", "open"])
def test_batch_renorm_equals_its_formula_in_1d_2d_and_3d(cls, shape, limits):
    """Two training steps (running statistics updated in between) and eval mode. With
    (1.5, 0.5) the running statistics are far enough from the batch's that r and d clip."""
    r_max, d_max = limits
    layer = cls(5, r_max=r_max, d_max=d_max, momentum=0.3).double()
    _randomise(layer)
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.5 + 1.5
        upstream = torch.randn(shape, generator=g, dtype=torch.float64)
        rm, rv = layer.running_mean.clone(), layer.running_var.clone()

        def formula(inp, rm=rm, rv=rv):
            return batch_renorm_formula(inp, layer.weight, layer.bias, rm, rv, r_max, d_max,
                                        layer.eps)[0]

        y, gx, gp = _grads(layer, x, upstream)
        y0, gx0, gp0 = _grads(layer, x, upstream, formula)
        torch.testing.assert_close(y, y0, **EXACT)
        torch.testing.assert_close(gx, gx0, **EXACT)
        for name in ("weight", "bias"):
            torch.testing.assert_close(gp[name], gp0[name], **EXACT)
        # _grads ran the layer once (the formula does not touch it): one update so far.
        _, mean, unbiased = batch_renorm_formula(x, layer.weight, layer.bias, rm, rv, r_max,
                                                 d_max, layer.eps)
        torch.testing.assert_close(layer.running_mean, 0.7 * rm + 0.3 * mean, **EXACT)
        torch.testing.assert_close(layer.running_var, 0.7 * rv + 0.3 * unbiased, **EXACT)
        if step == 0 and limits == (1.5, 0.5):  # the clipping really is active
            sigma_b = torch.sqrt(unbiased * (x.numel() // 5 - 1) / (x.numel() // 5) + layer.eps)
            r = sigma_b / torch.sqrt(rv + layer.eps)
            assert ((r > 1.5) | (r < 1 / 1.5)).any()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    expected = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                            False, 0.0, layer.eps)
    torch.testing.assert_close(layer.eval()(x), expected, **EXACT)


def test_batch_renorm_treats_r_and_d_as_constants():
    """The gradient is the one with r and d detached (the paper's stop-gradient), and that
    differs from letting them carry gradient: so the test above would catch the mistake."""
    layer = BatchRenorm2d(4, r_max=1e3, d_max=1e3).double()
    _randomise(layer)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 2 + 1
    upstream = torch.randn_like(x)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    _, gx, _ = _grads(layer, x, upstream)
    for detach in (True, False):
        _, gx0, _ = _grads(layer, x, upstream, lambda inp, detach=detach: batch_renorm_formula(
            inp, layer.weight, layer.bias, rm, rv, 1e3, 1e3, layer.eps, detach)[0])
        assert torch.allclose(gx, gx0, **EXACT) is detach


@pytest.mark.parametrize("n, parts", [(12, 3), (7, 2)])
def test_batch_renorm_with_virtual_batches_corrects_each_part_on_its_own(n, parts):
    """Each part gets its own r and d against the same running statistics; the running
    statistics move towards the parts' average (as for Batch Norm's virtual batches); a
    last batch that the parts do not divide is split as torch.tensor_split splits it."""
    layer = BatchRenorm2d(3, r_max=1.5, d_max=0.5, virtual_batches=parts).double()
    _randomise(layer, seed=2)
    x = torch.randn(n, 3, 4, 4, dtype=torch.float64) * 2 + 1
    upstream = torch.randn_like(x)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()

    def formula(inp):
        return torch.cat([batch_renorm_formula(p, layer.weight, layer.bias, rm, rv, 1.5, 0.5,
                                               layer.eps)[0] for p in inp.tensor_split(parts)])

    y, gx, gp = _grads(layer, x, upstream)
    y0, gx0, gp0 = _grads(layer, x, upstream, formula)
    torch.testing.assert_close(y, y0, **EXACT)
    torch.testing.assert_close(gx, gx0, **EXACT)
    torch.testing.assert_close(gp["weight"], gp0["weight"], **EXACT)
    stats = [batch_renorm_formula(p, layer.weight, layer.bias, rm, rv, 1.5, 0.5, layer.eps)[1:]
             for p in x.tensor_split(parts)]
    torch.testing.assert_close(layer.running_mean,
                               0.9 * rm + 0.1 * torch.stack([s[0] for s in stats]).mean(0), **EXACT)
    torch.testing.assert_close(layer.running_var,
                               0.9 * rv + 0.1 * torch.stack([s[1] for s in stats]).mean(0), **EXACT)


def test_batch_renorm_is_batch_norm_at_limits_one_and_zero_and_shares_its_state_dict():
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(4)
    _randomise(bn)
    brn = BatchRenorm2d(4, r_max=1.0, d_max=0.0)
    assert brn.state_dict().keys() == bn.state_dict().keys()
    brn.load_state_dict(bn.state_dict())
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    torch.testing.assert_close(brn(x), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-6, atol=1e-6)
    bn.load_state_dict(brn.state_dict())  # and back


def test_batch_renorm_refuses_a_statistic_of_one_value_and_bad_limits():
    with pytest.raises(ValueError, match=r"an input of shape \(1, 3\) has 1 value per "
                                         r"channel, and Batch Norm's statistics need at least"):
        BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="r_max >= 1 and d_max >= 0"):
        BatchRenorm2d(3, r_max=0.5)


def test_renorm_schedule_follows_the_papers_proportions():
    """Plain Batch Norm for the first 5% of the steps, then d_max reaches 5 at 20% and r_max
    3 at 30%, linearly; a function of the step alone (a resumed run continues exactly)."""
    assert renorm_limits(0.0) == (1.0, 0.0) and renorm_limits(0.049) == (1.0, 0.0)
    assert renorm_limits(0.125) == pytest.approx((1.6, 2.5))
    assert renorm_limits(0.2) == pytest.approx((1 + 2 * 0.15 / 0.25, 5.0))
    assert renorm_limits(0.3) == (3.0, 5.0) == renorm_limits(1.0)
    model = nn.Sequential(BatchRenorm2d(2), nn.ReLU(), BatchRenorm1d(2), nn.BatchNorm2d(2))
    schedule = RenormSchedule(model, total_steps=200)
    assert len(schedule.layers) == 2
    schedule.update(25)
    assert (model[0].r_max, model[2].d_max) == pytest.approx((1.6, 2.5))


# -- Filter Response Norm, EvoNorm --------------------------------------------------------

def frn_formula(x, weight, bias, tau, eps):
    nu2 = (x ** 2).mean((2, 3), keepdim=True)
    y = weight.view(1, -1, 1, 1) * x / torch.sqrt(nu2 + eps) + bias.view(1, -1, 1, 1)
    return torch.maximum(y, tau.view(1, -1, 1, 1))


def evonorm_b0_formula(x, weight, bias, v, batch_var, eps):
    instance_var = ((x - x.mean((2, 3), keepdim=True)) ** 2).mean((2, 3), keepdim=True)
    left = torch.sqrt(batch_var + eps)
    right = v.view(1, -1, 1, 1) * x + torch.sqrt(instance_var + eps)
    return x / torch.maximum(left, right) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def batch_variance(x):
    """Biased variance per channel over (N, H, W), shaped (1, C, 1, 1)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    return ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)


def evonorm_s0_formula(x, weight, bias, v, groups, eps):
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups, h, w)
    var = ((xg - xg.mean((2, 3, 4), keepdim=True)) ** 2).mean((2, 3, 4), keepdim=True)
    std = torch.sqrt(var + eps).expand_as(xg).reshape(x.shape)
    return x * torch.sigmoid(v.view(1, -1, 1, 1) * x) / std * weight.view(1, -1, 1, 1) \
        + bias.view(1, -1, 1, 1)


def _check_against(layer: nn.Module, formula, shape=(6, 4, 5, 5)) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    y, gx, gp = _grads(layer, x, upstream)
    y0, gx0, gp0 = _grads(layer, x, upstream, formula)
    torch.testing.assert_close(y, y0, **EXACT)
    torch.testing.assert_close(gx, gx0, **EXACT)
    assert gp.keys() == gp0.keys() and len(gp) == 3
    for name in gp:
        torch.testing.assert_close(gp[name], gp0[name], **EXACT)


def test_filter_response_norm_equals_its_formula_with_a_threshold_per_channel():
    layer = FilterResponseNorm2d(4).double()
    _randomise(layer, seed=5)
    assert layer.eps == 1e-6 and layer.tau.shape == (4,)
    assert len(set(layer.tau.tolist())) == 4  # a scalar tau would fail the gradient check
    _check_against(layer, lambda x: frn_formula(x, layer.weight, layer.bias, layer.tau, 1e-6))


def test_evonorm_b0_equals_its_formula_in_training_and_eval():
    layer = EvoNorm2dB0(4).double()
    _randomise(layer, seed=6)
    assert layer.eps == 1e-3
    _check_against(layer, lambda x: evonorm_b0_formula(x, layer.weight, layer.bias, layer.v,
                                                       batch_variance(x), 1e-3))
    # running variance: momentum 0.1 towards the batch's unbiased variance (one update per
    # forward of the layer; _check_against ran it once)
    layer = EvoNorm2dB0(4).double()
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 2
    layer(x)
    n = 6 * 25
    torch.testing.assert_close(layer.running_var,
                               0.9 + 0.1 * batch_variance(x).flatten() * n / (n - 1), **EXACT)
    layer.eval()
    torch.testing.assert_close(layer(x), evonorm_b0_formula(
        x, layer.weight, layer.bias, layer.v, layer.running_var.view(1, -1, 1, 1), 1e-3),
        **EXACT)


def test_evonorm_b0_with_virtual_batches_uses_each_parts_variance():
    layer = EvoNorm2dB0(3, virtual_batches=2).double()
    _randomise(layer, seed=7)
    before = layer.running_var.clone()

    def formula(inp):
        return torch.cat([evonorm_b0_formula(p, layer.weight, layer.bias, layer.v,
                                             batch_variance(p), 1e-3)
                          for p in inp.tensor_split(2)])

    _check_against(layer, formula, shape=(7, 3, 4, 4))
    g = torch.Generator().manual_seed(4)  # the input _check_against drew
    x = torch.randn((7, 3, 4, 4), generator=g, dtype=torch.float64) * 2 + 0.5
    unbiased = [batch_variance(p).flatten() * len(p) * 16 / (len(p) * 16 - 1)
                for p in x.tensor_split(2)]
    torch.testing.assert_close(layer.running_var,
                               0.9 * before + 0.1 * torch.stack(unbiased).mean(0), **EXACT)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        EvoNorm2dB0(3, virtual_batches=2).train()(torch.randn(2, 3, 1, 1))


def test_evonorm_s0_equals_its_formula():
    layer = EvoNorm2dS0(4, groups=2).double()
    _randomise(layer, seed=8)
    _check_against(layer, lambda x: evonorm_s0_formula(x, layer.weight, layer.bias, layer.v,
                                                       2, 1e-5))
    with pytest.raises(ValueError, match="num_groups=3 does not divide 4 channels"):
        EvoNorm2dS0(4, groups=3)


@pytest.mark.parametrize("layer", [FilterResponseNorm2d(3), EvoNorm2dB0(3), EvoNorm2dS0(3, 3)])
def test_norm_activation_layers_refuse_other_than_2d_maps(layer):
    with pytest.raises(ValueError, match=r"expects \(N, C, H, W\) input, got 3-D"):
        layer(torch.randn(2, 3, 5))


# -- Weight Standardization ----------------------------------------------------------------

def test_std_conv_standardises_each_filter_before_convolving():
    torch.manual_seed(9)
    conv = StdConv2d(3, 5, 3, bias=True).double()
    with torch.no_grad():
        conv.weight.mul_(3).add_(0.2)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    upstream = torch.randn(2, 5, 5, 5, dtype=torch.float64)

    def formula(inp):
        w = conv.weight
        mean = w.mean((1, 2, 3), keepdim=True)
        var = ((w - mean) ** 2).mean((1, 2, 3), keepdim=True)  # biased
        return F.conv2d(inp, (w - mean) / torch.sqrt(var + 1e-6), conv.bias)

    y, gx, gp = _grads(conv, x, upstream)
    y0, gx0, gp0 = _grads(conv, x, upstream, formula)
    torch.testing.assert_close(y, y0, **EXACT)
    torch.testing.assert_close(gx, gx0, **EXACT)
    for name in ("weight", "bias"):
        torch.testing.assert_close(gp[name], gp0[name], **EXACT)
    standardised = conv.standardised_weight().flatten(1)
    torch.testing.assert_close(standardised.mean(1), torch.zeros(5, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert isinstance(conv, nn.Conv2d) and conv.state_dict().keys() == {"weight", "bias"}


def test_batch_norm_layers_of_any_dimension_check_their_input_like_pytorch():
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchNorm2d(3, virtual_batches=2)(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match="at least a 2-D input"):
        BatchRenorm(3)(torch.randn(3))


@pytest.mark.parametrize("cls", [BatchNorm2d, BatchRenorm2d])
def test_virtual_batches_take_bfloat16_input_with_float32_statistics(cls):
    """Under bfloat16 autocast a layer gets bfloat16 input: its statistics are computed in
    float32 (as PyTorch's kernels do) and its output is bfloat16, close to the float32
    layer's on the same values; the running statistics are float32 and equal."""
    torch.manual_seed(10)
    x = (torch.randn(16, 4, 6, 6) * 2 + 1).bfloat16()
    layer, oracle = cls(4, virtual_batches=4), cls(4, virtual_batches=4)
    oracle.load_state_dict(layer.state_dict())
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.running_var.dtype == torch.float32
    torch.testing.assert_close(y.float(), oracle(x.float()), rtol=1e-2, atol=3e-2)
    torch.testing.assert_close(layer.running_var, oracle.running_var, rtol=1e-6, atol=1e-6)
