"""``convert`` and ``to_torch`` as a practitioner's network needs them: all or nothing,
faithful to every layer setting, shared layers kept shared, back to plain torch, TorchScript;
and ``precise_bn`` on loaders of dicts."""

import copy

import pytest
import torch
from torch import nn

from normlab.convert import to_torch
from normlab.model import Net
from normlab.norms import (
    BatchNorm2d,
    BatchRenorm2d,
    EvoNorm2dB0,
    FilterResponseNorm2d,
    RenormSchedule,
    StdConv2d,
    convert,
    precise_bn,
)


def snapshot(model: nn.Module) -> list:
    """Everything a conversion could change: each module's place, identity and type, every
    parameter and buffer (values, requires_grad), the mode."""
    lazy = nn.parameter.UninitializedTensorMixin
    return [(name, id(m), type(m), m.training) for name, m in model.named_modules()] + \
        [(name, id(t) if isinstance(t, lazy) else t.detach().clone(), t.requires_grad)
         for name, t in model.named_parameters()] + \
        [(name, id(t) if isinstance(t, lazy) else t.clone())
         for name, t in model.named_buffers()]


def assert_unchanged(before: list, model: nn.Module) -> None:
    after = snapshot(model)
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        assert b[0] == a[0] and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(b[1:], a[1:], strict=True)), b[0]


def conv_bn_relu(cin: int, cout: int, dims: int = 2, norm: type | None = None) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = norm or {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return nn.Sequential(conv(cin, cout, 3, padding=1), bn(cout), nn.ReLU())


# -- all or nothing: every refusal leaves the model as it was

def _lazy_then_layernorm() -> nn.Module:
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                      nn.LazyLinear(16), nn.LayerNorm(16))
    m(torch.randn(2, 3, 6, 6))  # initialises the LazyLinear
    return m


def _groups_fail_late() -> nn.Module:
    return nn.Sequential(conv_bn_relu(3, 8), conv_bn_relu(8, 12))  # 8 divides by 4, 12 by 3


def _three_d_group_norms() -> nn.Module:
    return nn.Sequential(conv_bn_relu(1, 4, 3, lambda c: nn.GroupNorm(2, c)),
                         conv_bn_relu(4, 4, 3, lambda c: nn.GroupNorm(2, c)))


def _lazy_norm() -> nn.Module:
    return nn.Sequential(conv_bn_relu(3, 4), nn.Conv2d(4, 4, 1), nn.LazyBatchNorm2d())


def _shared_with_a_relu_in_one_place() -> nn.Module:
    norm = nn.BatchNorm2d(4)
    return nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), norm, nn.ReLU()),
                         nn.Sequential(nn.Conv2d(4, 4, 1), norm))


def _parametrized() -> nn.Module:
    m = nn.Sequential(conv_bn_relu(3, 4), conv_bn_relu(4, 4))
    nn.utils.parametrizations.weight_norm(m[1][1], "weight", dim=0)
    return m


@pytest.mark.parametrize("build, target, kwargs, reason", [
    (_lazy_then_layernorm, "group", {}, "LayerNorm: normalise over their last dimension"),
    (_groups_fail_late, "group", {"num_groups": 8}, "of 12 channels, which num_groups=8"),
    (_three_d_group_norms, "frn", {}, "GroupNorm on 3-D maps, where frn is defined for 2-D"),
    (_shared_with_a_relu_in_one_place, "evonorm-s0", {},
     "used in several places, with an nn.ReLU after them in some only"),
    (_lazy_norm, "batch", {}, "LazyBatchNorm2d not initialised yet"),
    (_parametrized, "group", {}, "with state-dict hooks or parametrizations"),
    (lambda: convert(_groups_fail_late(), "frn"), "torch", {},
     "FilterResponseNorm2d, which PyTorch has no layer for"),
    (lambda: nn.Sequential(conv_bn_relu(3, 4)), "batchrenorm", {"r_max": 0.5},
     "cannot be built (Batch Renorm needs r_max >= 1"),
])
def test_a_refused_conversion_leaves_the_model_exactly_as_it_was(build, target, kwargs, reason):
    model = build()
    before = snapshot(model)
    with pytest.raises(ValueError, match="nothing was changed") as error:
        convert(model, target, **kwargs)
    assert reason in str(error.value)
    assert_unchanged(before, model)


def test_the_first_repro_refuses_without_converting_the_layers_before_the_culprit():
    model = _lazy_then_layernorm()
    with pytest.raises(ValueError):
        convert(model, "group")
    assert type(model[1]) is nn.BatchNorm2d  # was GroupNorm(4, 8): half converted
    _, changes = convert(model, "group", skip=(nn.LayerNorm,), report=True)
    assert list(changes) == ["1"] and type(model[5]) is nn.LayerNorm


def test_dry_run_says_what_would_change_and_changes_nothing():
    model = nn.Sequential(conv_bn_relu(3, 8), conv_bn_relu(8, 8))
    before = snapshot(model)
    plan = convert(model, "frn", dry_run=True)
    assert plan == {"0.1": f"BatchNorm2d({model[0][1].extra_repr()}) -> "
                           f"FilterResponseNorm2d(8, eps=1e-06)",
                    "1.1": f"BatchNorm2d({model[1][1].extra_repr()}) -> "
                           f"FilterResponseNorm2d(8, eps=1e-06)",
                    "0.2": "ReLU -> Identity (part of frn)",
                    "1.2": "ReLU -> Identity (part of frn)"}
    assert_unchanged(before, model)
    _, changes = convert(model, "frn", report=True)
    assert changes == plan


def test_a_refusal_names_a_few_layers_per_reason_and_counts_the_rest():
    model = nn.Sequential(*[nn.LayerNorm(4) for _ in range(50)], conv_bn_relu(3, 6))
    with pytest.raises(ValueError) as error:
        convert(model, "group")
    lines = str(error.value).splitlines()
    assert lines[0] == "cannot convert to 'group': 51 layer(s) refused, so nothing was changed"
    assert lines[1].startswith("- 50 layer(s) LayerNorm: ") and \
        "(0, 1, 2 and 47 more)" in lines[1] and "skip=(LayerNorm,)" in lines[1]
    assert lines[2].startswith("- 1 layer(s) of 6 channels, which num_groups=4 does not "
                               "divide (50.1): pick a num_groups") and "skip" not in lines[2]
    assert len(lines) == 3 and len(str(error.value)) < 600


def test_synchronized_with_virtual_batches_is_refused_before_any_layer():
    with pytest.raises(ValueError, match="does not combine with virtual batches") as error:
        convert(nn.Sequential(conv_bn_relu(3, 4)), "syncbatch", virtual_batches=2)
    assert "skip" not in str(error.value)


# -- shared modules stay shared

def test_a_shared_layer_stays_one_layer_and_is_reported_once():
    bn = nn.BatchNorm2d(8)
    model = nn.ModuleDict({"a": nn.Sequential(bn, nn.ReLU()), "b": nn.Sequential(bn, nn.ReLU())})
    model, changes = convert(model, "batch", report=True)
    assert model.a[0] is model.b[0] and isinstance(model.a[0], BatchNorm2d)
    assert sum(p.numel() for p in model.parameters()) == 16  # not 32
    assert list(changes) == ["a.0"] and changes["a.0"].endswith("(one layer, shared: also at b.0)")
    model = convert(model, "evonorm-b0")  # an activation norm: both ReLUs go
    assert model.a[0] is model.b[0] and isinstance(model.a[1], nn.Identity) and \
        isinstance(model.b[1], nn.Identity)


# -- every setting that has a meaning in the target carries

def test_between_batch_norms_every_setting_carries_and_eval_is_unchanged():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, affine=False, eps=1e-3, momentum=0.05).double()
    batch_in_eval = nn.BatchNorm2d(4, track_running_stats=False).double()  # batch statistics
    frozen = nn.BatchNorm2d(4).double()
    frozen.requires_grad_(False)
    frozen.running_mean.uniform_(-1, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1).double(), plain, nn.Conv2d(4, 4, 1).double(),
                          batch_in_eval, nn.Conv2d(4, 4, 1).double(), frozen).eval()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    expected = model(x)
    convert(model, "batch")
    assert [type(m) for m in model[1::2]] == [BatchNorm2d] * 3
    assert model[1].weight is None and (model[1].eps, model[1].momentum) == (1e-3, 0.05)
    assert model[3].running_mean is None and not model[3].track_running_stats
    assert not model[5].weight.requires_grad and not model[5].bias.requires_grad
    assert not model.training and model[1].running_mean.dtype == torch.float64
    assert torch.equal(model(x), expected)  # bit for bit, batch statistics in eval included


def test_settings_that_cannot_carry_are_reported_and_frozen_stays_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    model[4].requires_grad_(False)
    gn, changes = convert(copy.deepcopy(model), "group", num_groups=2, report=True)
    assert not gn[1].affine and gn[1].weight is None  # affine=False carries into Group Norm
    assert not gn[4].weight.requires_grad and not gn[4].bias.requires_grad
    frn, changes = convert(model, "frn", report=True)
    assert "affine=False cannot carry: frn needs its scale and shift" in changes["1"]
    assert not any(p.requires_grad for p in frn[4].parameters())  # tau too
    assert "frozen: its new parameters (tau) are frozen too" in changes["4"]
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                             nn.ReLU())
    _, changes = convert(no_stats, "evonorm-b0", report=True)
    assert "track_running_stats=False cannot carry" in changes["1"]


def test_hooks_move_to_the_new_layer_and_their_handles_still_remove_them():
    model = nn.Sequential(conv_bn_relu(3, 4))
    calls = []
    forward = model[0][1].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model[0][1].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    _, changes = convert(model, "group", num_groups=2, report=True)
    assert "2 hook(s) carried over" in changes["0.1"]
    model(torch.randn(2, 3, 5, 5, requires_grad=True)).sum().backward()
    assert calls == ["GroupNorm", "backward"]
    forward.remove()
    calls.clear()
    model(torch.randn(2, 3, 5, 5))
    assert calls == []


def test_group_norms_take_the_dimension_of_the_convolution_before_them():
    two_d = nn.Sequential(conv_bn_relu(3, 4, 2, lambda c: nn.GroupNorm(2, c)))
    assert isinstance(convert(two_d, "frn")[0][1], FilterResponseNorm2d)
    lone = nn.Sequential(nn.GroupNorm(2, 4), nn.ReLU())  # no convolution before it
    with pytest.raises(ValueError, match="a dimension convert cannot tell"):
        convert(lone, "evonorm-s0")


def test_batch_renorm_options_reach_the_layers_and_the_schedule():
    model = convert(nn.Sequential(conv_bn_relu(3, 4), conv_bn_relu(4, 4)), "batchrenorm",
                    r_max=1.5, d_max=0.5, eps=1e-3)
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm2d)]
    assert [(m.r_max, m.d_max, m.eps) for m in layers] == [(1.5, 0.5, 1e-3)] * 2
    schedule = RenormSchedule(model, total_steps=100)
    schedule.update(0)
    assert (layers[0].r_max, layers[0].d_max) == (1.0, 0.0)  # plain Batch Norm at first
    schedule.update(100)
    assert (layers[1].r_max, layers[1].d_max) == (1.5, 0.5)  # the layers' own limits


# -- back to plain torch, TorchScript, torch.compile

def _trained_net(norm: str, **kwargs) -> Net:
    torch.manual_seed(1)
    net = Net(norm, **kwargs)
    for m in net.modules():
        if hasattr(m, "running_mean") and m.running_mean is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("norm, kwargs", [("batch", {"virtual_batches": 4}),
                                          ("batchrenorm", {}), ("batch", {"weight_std": True})])
def test_to_torch_gives_pytorchs_layers_with_the_same_state_and_eval_outputs(norm, kwargs):
    net = _trained_net(norm, **kwargs)
    x = torch.randn(6, 1, 28, 28)
    expected, state = net(x), copy.deepcopy(net.state_dict())
    plain, changes = to_torch(net, report=True)
    types = {type(m) for m in plain.modules()}
    assert nn.BatchNorm2d in types and not any(
        t.__module__ in ("normlab.batchnorm", "normlab.normact") for t in types), types
    if kwargs.get("weight_std"):  # the convolutions hold their standardized weights now
        assert "weights standardized once" in changes["features.0.0"]
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
        return
    assert plain.state_dict().keys() == state.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(plain(x), expected)  # bit for bit
    note = "virtual batches" if norm == "batch" else "plain Batch Norm (no r and d)"
    assert note in changes["features.0.1"]
    assert to_torch(plain) is plain  # plain torch already: nothing to do
    back = convert(plain, norm, **{k: v for k, v in kwargs.items() if k == "virtual_batches"})
    assert torch.equal(back(x), expected)  # and round again


def test_to_torch_refuses_layers_pytorch_has_not_naming_them_all():
    net = _trained_net("evonorm-b0")
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"7 layer\(s\) EvoNorm2dB0, which PyTorch has no layer "
                                         r"for \(features\.0\.1, features\.1\.1, "
                                         r"features\.3\.1 and 4 more\)"):
        convert(net, "torch")
    assert_unchanged(before, net)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_plain_batch_norms_script_and_other_settings_say_what_to_do():
    net = _trained_net("batch")
    x = torch.randn(4, 1, 28, 28)
    scripted = torch.jit.script(net)
    assert torch.equal(scripted(x), net(x))
    ghost = _trained_net("batch", virtual_batches=2)
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile normlab's "
                                           r"BatchNorm2d \(virtual_batches=2\); use "
                                           r"torch.compile, or normlab.convert.to_torch"):
        torch.jit.script(ghost)
    expected = ghost(x)
    to_torch(ghost)
    assert torch.equal(torch.jit.script(ghost)(x), expected)


def test_a_converted_network_compiles():
    """torch.compile captures normlab's layers (the aot_eager backend: Dynamo's graph capture
    and AOTAutograd's tracing, with no C++ build) in training and eval."""
    torch._dynamo.reset()
    model = convert(nn.Sequential(conv_bn_relu(3, 8), conv_bn_relu(8, 8)), "batch",
                    virtual_batches=2)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(compiled(x), reference(x))
    compiled.eval()
    reference.eval()
    torch.testing.assert_close(compiled(x), reference(x))


# -- precise_bn on any loader

def test_precise_bn_takes_the_input_from_dict_batches_by_key_or_function():
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn_relu(2, 4, 3))
    volumes = [torch.randn(2, 2, 3, 4, 4) for _ in range(3)]
    dicts = [{"image": v, "label": torch.zeros(2)} for v in volumes]
    by_key, by_function, tensors = (copy.deepcopy(model) for _ in range(3))
    precise_bn(by_key, dicts, input="image")
    precise_bn(by_function, dicts, input=lambda b: b["image"])
    precise_bn(tensors, volumes)
    for m in (by_key, by_function):
        assert torch.equal(m[0][1].running_var, tensors[0][1].running_var)
    with pytest.raises(ValueError, match=r"needs a tensor input from each batch, got dict with "
                                         r"keys 'image', 'label' \(pass input= with the key"):
        precise_bn(copy.deepcopy(model), dicts)
    with pytest.raises(ValueError, match=r"precise_bn\(input='img'\): a batch of type dict "
                                         r"with keys 'image', 'label' has no 'img'"):
        precise_bn(copy.deepcopy(model), dicts, input="img")


def test_evonorm_and_std_conv_keep_their_types_when_not_converted():
    model = nn.Sequential(StdConv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    model = convert(model, "evonorm-b0")
    assert isinstance(model[0], StdConv2d) and isinstance(model[1], EvoNorm2dB0)
