"""Putting normlab's normalizations into any model, and taking them out again.

``convert(model, "group")`` replaces every normalization layer of a network (1-D, 2-D or 3-D)
by the one named; ``to_torch(model)`` (or ``convert(model, "torch")``) turns normlab's
layers back into PyTorch's, so a model trained with normlab deploys without it.

A model is a user's work of days, so both work in two phases: **plan** every layer first
(what replaces it, which of its settings carry, and every reason one cannot be converted),
then **apply** the plan only if nothing was refused. A refusal therefore leaves the model
exactly as it was, and ``dry_run=True`` returns the plan without applying it. A module
used in several places is planned once and replaced by one new module, so what was shared
stays shared.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .batchnorm import _BatchRenorm, _BatchStatistics, twin_of
from .errors import UsageError
from .normact import NormAct, StdConv2d
from .norms import NORMS, Norm, layer_types, make_norm, norm_record

__all__ = ["convert", "to_torch"]

_TORCH_NORMS = (_BatchNorm, nn.GroupNorm, _InstanceNorm)
_NOT_CONVERTIBLE = {  # normalizations over other axes than (channel, spatial): no target fits
    nn.LayerNorm: "normalise over their last dimension(s), not over channels and positions",
    nn.LocalResponseNorm: "normalise across neighbouring channels, with no scale or shift",
    **({nn.RMSNorm: "normalise over their last dimension(s), not over channels and positions"}
       if hasattr(nn, "RMSNorm") else {}),
}
_CONV_DIMS = {nn.Conv1d: 1, nn.ConvTranspose1d: 1, nn.Conv2d: 2, nn.ConvTranspose2d: 2,
              nn.Conv3d: 3, nn.ConvTranspose3d: 3}
_TORCH_DIMS = ((1, (nn.BatchNorm1d, nn.InstanceNorm1d)), (2, (nn.BatchNorm2d, nn.InstanceNorm2d)),
               (3, (nn.BatchNorm3d, nn.InstanceNorm3d)))
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
          "_backward_pre_hooks")
_COUNTED_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks")  # the others flag entries of these
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")
SHOWN = 3  # layer names a refusal shows per reason


@dataclass
class _Slot:
    """One place a module sits: ``parent.<key>`` (parent None for the model itself)."""

    parent: nn.Module | None
    key: str
    name: str


@dataclass
class _Step:
    """What happens to one module object, wherever it sits."""

    old: nn.Module
    slots: list[_Slot]
    new: nn.Module | None = None
    notes: list[str] = field(default_factory=list)
    relus: list[_Slot] = field(default_factory=list)  # ReLUs an activation norm absorbs
    after: tuple[nn.Module, nn.Module] | None = None  # a norm-act layer's (drop, act)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]


@dataclass(frozen=True)
class _Refusal:
    reason: str  # what is wrong with these layers, after "N layer(s) ..."
    fix: str  # what to do
    skippable: type[nn.Module] | None = None  # a type skip= would leave alone


Decide = Callable[["_Step", int | None], "nn.Module | _Refusal | None"]


def convert(model: nn.Module, norm: str, num_groups: int = 4, virtual_batches: int = 1, *,
            skip: tuple[type[nn.Module], ...] = (), report: bool = False,
            dry_run: bool = False, **options: Any
            ) -> nn.Module | tuple[nn.Module, dict[str, str]] | dict[str, str]:
    """Replace every normalization layer of ``model`` by ``make_norm(norm, ...)``, or with
    ``norm="torch"`` turn normlab's layers back into PyTorch's (``to_torch``).

    Converts ``nn.BatchNorm1d/2d/3d`` (normlab's and Batch Renorm too), ``nn.SyncBatchNorm``,
    ``nn.GroupNorm`` (so also normlab's layer, group and instance norms),
    ``nn.InstanceNorm1d/2d/3d`` and normlab's FRN and EvoNorm layers, the way timm's
    ``convert_sync_batchnorm`` converts: in place for children, returning the model (a new
    one if ``model`` itself is a norm). Each new layer keeps what has a meaning in it:

    * the old layer's map dimension (``BatchNorm3d`` becomes ``normlab.norms.BatchNorm3d``;
      a layer of unknown dimension, such as ``nn.GroupNorm``, takes the dimension of the
      convolution before it, where a target needs one);
    * its scale and shift, ``affine``, ``eps``, each parameter's ``requires_grad``, device,
      dtype and train/eval mode, its forward and backward hooks;
    * between Batch Norms also ``momentum``, ``track_running_stats`` and the running
      statistics, so eval outputs are unchanged.

    Where a setting cannot carry (``affine=False`` into FRN, which needs its parameters; a
    frozen layer's new parameters), the report says what was done instead. FRN and EvoNorm
    also replace the activation: where an ``nn.ReLU`` follows the layer in the same
    ``nn.Sequential`` (past Dropout or Identity), that ReLU becomes ``nn.Identity``; where
    none does (a residual block's last norm, before the addition, or a ReLU called as
    ``F.relu``), the new layer is built without its activation (``apply_act=False``), as
    timm builds such networks, and the report says so.

    Every layer is checked before anything changes: a refusal leaves ``model`` as it was.

    Args:
        model: any ``nn.Module``; converted in place (a norm at its root is replaced).
        norm: the target, one of ``NORMS``, or ``"torch"`` (see ``to_torch``).
        num_groups: groups for ``group`` and ``evonorm-s0``.
        virtual_batches: parts per training batch for the targets that take them.
        skip: normalization types to leave as they are instead of refusing them.
        report: also return what was replaced.
        dry_run: change nothing; return what would be replaced.
        **options: keyword arguments for every new layer, overriding what is carried:
            Batch Renorm's ``r_max`` and ``d_max`` (``RenormSchedule`` raises each layer's
            limits to these), ``eps``, ...

    Returns:
        The model; with ``report=True`` ``(model, changes)``; with ``dry_run=True`` only
        ``changes``. ``changes`` maps each replaced layer's name (a shared layer once, under
        its first name) to "Old(...) -> New(...)", followed by what did not carry.

    Raises:
        ValueError: one line per reason, naming the layers (a few, and how many), with what
            to do; ``skip=`` is suggested only where skipping the type would help.

    Example: ``convert(unet3d, "syncbatch")`` before ``DistributedDataParallel(unet3d)``;
    ``convert(model, "batchrenorm", r_max=1.5, d_max=0.5)`` for Wu & He's limits.
    """
    if norm == "torch":
        if options or num_groups != 4 or virtual_batches != 1:
            raise ValueError("convert(model, 'torch') takes no layer options: it restores "
                             "PyTorch's own layers with their settings")
        return to_torch(model, skip=skip, report=report, dry_run=dry_run)
    record = norm_record(norm)
    # The settings that hold whatever a layer's channels and dimension (each layer's: below).
    record.check(max(num_groups, 1), num_groups, virtual_batches, record.dims[0])

    def decide(step: _Step, dims: int | None) -> nn.Module | _Refusal:
        return _replacement(step, record, num_groups, virtual_batches, dims, options)

    return _run(model, decide, skip, report, dry_run, f"convert to {norm!r}",
                (*_sources(), *_NOT_CONVERTIBLE), absorb_relu=norm if record.activation else None,
                strangers=True)


def to_torch(model: nn.Module, *, skip: tuple[type[nn.Module], ...] = (),
             report: bool = False, dry_run: bool = False
             ) -> nn.Module | tuple[nn.Module, dict[str, str]] | dict[str, str]:
    """Turn normlab's layers back into PyTorch's, so that a model trained with normlab runs
    where normlab is not installed: Batch Norm and Batch Renorm of 1, 2 or 3 dimensions
    become ``nn.BatchNorm1d/2d/3d`` (of any dimension: that of the convolution before it,
    else ``nn.SyncBatchNorm``), a synchronized one ``nn.SyncBatchNorm``, ``StdConv2d`` an
    ``nn.Conv2d`` holding its standardized weights. Settings, parameters (with their
    ``requires_grad``), running statistics, hooks, device, dtype and mode carry, so eval
    outputs are the same bit for bit where the computation is (Batch Renorm's eval is plain
    Batch Norm with its running statistics); the report names what training would now do
    differently (virtual batches, Batch Renorm's correction). Group, Layer and Instance Norm
    are PyTorch's already. FRN and EvoNorm have no PyTorch equivalent: they are refused,
    every one named, and nothing changes.

    Returns and raises as ``convert``.

    Example: ``to_torch(model); torch.jit.script(model)`` for a model trained with
    ``virtual_batches``.
    """
    return _run(model, _torch_twin, skip, report, dry_run, "convert to plain torch",
                (_BatchStatistics, *_untwinned(), StdConv2d), absorb_relu=None)


# -- plan, then apply

def _run(model: nn.Module, decide: Decide, skip: tuple[type[nn.Module], ...], report: bool,
         dry_run: bool, what: str, targets: tuple[type, ...], absorb_relu: str | None,
         strangers: bool = False
         ) -> nn.Module | tuple[nn.Module, dict[str, str]] | dict[str, str]:
    steps, dims = _find(model, targets, skip)
    refusals: dict[_Refusal, list[str]] = {}
    for name, layer in _strangers(model, (*targets, *skip)) if strangers else ():
        refusals.setdefault(_Refusal(
            f"{type(layer).__name__}: a normalization normlab does not know (no subclass "
            f"of a torch norm), so no target would replace it", "convert them by hand",
            type(layer)), []).append(name)
    if not steps and not refusals and decide is _torch_twin:  # plain torch already
        return {} if dry_run else (model, {}) if report else model
    if not steps and not refusals:
        raise ValueError("the model has no normalization layer (Batch, Group, Instance, "
                         "Layer Norm ...) to convert; nothing was changed")
    for step in steps:
        outcome = _refused_type(step.old) or _norm_act(step)
        if outcome is None and absorb_relu and step.after is None:
            outcome = _relus_after(step)
        if outcome is None:
            outcome = decide(step, dims.get(id(step.old)))
        if isinstance(outcome, _Refusal):
            refusals.setdefault(outcome, []).extend(step.names)
        elif outcome is not None:
            step.new = outcome
    if refusals:
        raise ValueError(_refusal_message(what, refusals))
    steps = [s for s in steps if s.new is not None and s.new is not s.old]
    changes = {step.names[0]: _change_line(step) for step in steps}
    for step in steps:
        for relu in step.relus:
            changes[relu.name] = f"ReLU -> Identity (part of {absorb_relu})"
    if dry_run:
        return changes
    for step in steps:  # nothing can fail from here on
        _move_hooks(step.old, step.new)
        for slot in step.slots:
            if slot.parent is None:
                model = step.new
            else:
                setattr(slot.parent, slot.key, step.new)
        for relu in step.relus:
            setattr(relu.parent, relu.key, nn.Identity())
    return (model, changes) if report else model


def _find(model: nn.Module, targets: tuple[type, ...], skip: tuple[type[nn.Module], ...]
          ) -> tuple[list[_Step], dict[int, int]]:
    """Every layer to plan (one step per module object, with every place it sits), and the
    map dimension of each, from its type or the convolution before it in module order."""
    steps: dict[int, _Step] = {}
    dims: dict[int, int] = {}
    last_conv: int | None = None
    seen: set[int] = set()

    def visit(parent: nn.Module | None, key: str, module: nn.Module, name: str) -> None:
        nonlocal last_conv
        if isinstance(module, skip):  # left as it is, children and all
            return
        if isinstance(module, targets):
            step = steps.setdefault(id(module), _Step(module, []))
            step.slots.append(_Slot(parent, key, name or "(the model)"))
            dims.setdefault(id(module), _layer_dims(module) or last_conv)
            if not isinstance(module, StdConv2d):
                return
        if id(module) in seen:
            return
        seen.add(id(module))
        conv = next((d for t, d in _CONV_DIMS.items() if isinstance(module, t)), None)
        last_conv = conv or last_conv
        for child_key, child in module._modules.items():
            if child is not None:
                visit(module, child_key, child, f"{name}.{child_key}" if name else child_key)

    visit(None, "", model, "")
    return list(steps.values()), dims


def _sources() -> tuple[type[nn.Module], ...]:
    """The layers convert replaces: PyTorch's norms and every record's (registered too)."""
    return (*_TORCH_NORMS, *layer_types())


def _untwinned() -> tuple[type[nn.Module], ...]:
    """The records' layers that PyTorch has no layer for (FRN, EvoNorm, registered ones)."""
    return tuple(t for t in layer_types() if not issubclass(t, _TORCH_NORMS))


def _layer_dims(layer: nn.Module) -> int | None:
    """The input dimension a layer is built for: 1, 2, 3, or None where it takes any."""
    torch_dims = next((d for d, types in _TORCH_DIMS if isinstance(layer, types)), None)
    return torch_dims or next((n.dims[0] for n in NORMS.values()
                               if len(n.dims) == 1 and isinstance(layer, n.layers)), None)


def _refused_type(layer: nn.Module) -> _Refusal | None:
    """Why no target fits ``layer`` whatever the target, or None."""
    for kind, reason in _NOT_CONVERTIBLE.items():
        if isinstance(layer, kind):
            return _Refusal(f"{kind.__name__}: {reason}",
                            "convert them by hand, or leave them", kind)
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        return _Refusal(f"{type(layer).__name__} not initialised yet",
                        "run one forward pass before converting")
    if any(getattr(layer, hooks, None) for hooks in _STATE_HOOKS) or \
            torch.nn.utils.parametrize.is_parametrized(layer):
        return _Refusal(f"{type(layer).__name__} with state-dict hooks or parametrizations, "
                        f"which a new layer would not have", "remove them first",
                        type(layer))
    return None


def _norm_act(step: _Step) -> _Refusal | None:
    """A torch norm whose ``forward`` another library overrides does more than normalize:
    timm's norm-act layers (``BatchNormAct2d``, ``GroupNormAct``, ``SyncBatchNormAct``)
    apply their ``drop`` and ``act`` modules after it, which ``step.after`` keeps for the
    replacement. Any other override is refused by name: what it adds cannot be read. A
    registered record's layer is the normalization its ``forward`` says."""
    layer = step.old
    owner = next(k for k in type(layer).__mro__ if "forward" in vars(k))
    if owner.__module__.split(".")[0] in ("torch", "normlab") or owner in layer_types():
        return None
    children = set(layer._modules)
    if children and children <= {"act", "drop"}:
        step.after = (layer._modules.get("drop") or nn.Identity(),
                      layer._modules.get("act") or nn.Identity())
        return None
    return _Refusal(f"{type(layer).__name__}, whose forward() does more than normalize, in a "
                    f"way normlab cannot read (timm's norm-act layers keep theirs in 'drop' "
                    f"and 'act' modules)", "convert them by hand", type(layer))


# Class names of normalization layers outside torch (timm's EvoNorm2dS0a, FrozenBatchNorm2d,
# FilterResponseNormTlu2d, LayerNorm2d, ...); "Normalize" (an input transform) is not one.
_NORM_NAME = re.compile(r"Norm(Act)?(\d[dD])?$|^EvoNorm|NormAct|FilterResponseNorm")


def _strangers(model: nn.Module, known: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """Layers that look like normalizations (by name, holding their own parameters or
    buffers) but are no torch norm and not normlab's: a convert that left them would leave
    a 'group' variant with another library's norms in it, without a word."""
    for name, module in model.named_modules():
        kind = type(module)
        if isinstance(module, (*known, NormAct)) or \
                kind.__module__.split(".")[0] in ("torch", "normlab") or \
                not _NORM_NAME.search(kind.__name__) or set(module._modules) - {"act", "drop"}:
            continue
        if next(module.parameters(recurse=False), None) is not None or \
                next(module.buffers(recurse=False), None) is not None:
            yield name or "(the model)", module


def _relus_after(step: _Step) -> _Refusal | None:
    """Find, for every place of ``step``'s layer, the ReLU that follows it in its
    nn.Sequential (past Dropout and Identity: ReLU commutes with dropout's positive
    scaling). A layer no ReLU follows anywhere (a residual block's last norm, before the
    addition) becomes the target without its activation (``apply_act=False``, as timm
    builds such networks); a shared layer followed by a ReLU in some places only is refused."""
    found = [_relu_after(slot) for slot in step.slots]
    if all(relu is None for relu in found):
        return None
    if any(relu is None for relu in found):
        return _Refusal("used in several places, with an nn.ReLU after them in some only",
                        "convert to a norm without its own activation", type(step.old))
    step.relus.extend(found)
    return None


def _relu_after(slot: _Slot) -> _Slot | None:
    if not isinstance(slot.parent, nn.Sequential):
        return None
    keys = list(slot.parent._modules)
    for key in keys[keys.index(slot.key) + 1:]:
        child = slot.parent._modules[key]
        if isinstance(child, nn.ReLU):
            return _Slot(slot.parent, key, slot.name.rpartition(".")[0] + f".{key}"
                         if "." in slot.name else key)
        if not isinstance(child, nn.Dropout | nn.Identity):
            return None
    return None


def _refusal_message(what: str, refusals: dict[_Refusal, list[str]]) -> str:
    total = sum(len(names) for names in refusals.values())
    lines = [f"cannot {what}: {total} layer(s) refused, so nothing was changed"]
    for refusal, names in refusals.items():
        shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more"
                                            if len(names) > SHOWN else "")
        hint = (f", or pass skip=({refusal.skippable.__name__},) to leave them as they are"
                if refusal.skippable is not None else "")
        lines.append(f"- {len(names)} layer(s) {refusal.reason} ({shown}): "
                     f"{refusal.fix}{hint}")
    return "\n".join(lines)


def _change_line(step: _Step) -> str:
    line = f"{_describe(step.old)} -> {_describe(step.new)}"
    if len(step.slots) > 1:
        line += f" (one layer, shared: also at {', '.join(step.names[1:])})"
    return line + "".join(f"; {note}" for note in step.notes)


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, NormAct):  # what a norm-act layer became: the norm, then the rest
        rest = [type(m).__name__ for m in (layer.drop, layer.act)
                if not isinstance(m, nn.Identity)]
        return " + ".join([_describe(layer.norm), *rest])
    return f"{type(layer).__name__}({layer.extra_repr()})"


# -- what replaces one layer

def _replacement(step: _Step, record: Norm, num_groups: int, virtual_batches: int,
                 dims: int | None, options: dict) -> nn.Module | _Refusal:
    old = step.old
    channels = old.num_channels if isinstance(old, nn.GroupNorm) else old.num_features
    kind = type(old)
    if record.dims != (1, 2, 3) and dims not in record.dims:
        seen = f"{dims}-D maps" if dims else "maps of a dimension convert cannot tell (no " \
            "convolution before them)"
        return _Refusal(f"{kind.__name__} on {seen}, where {record.name} is defined for "
                        f"{record.maps} only", "choose another target", kind)
    try:
        record.check(channels, num_groups, virtual_batches, dims)
    except UsageError:  # the only rule left to break: the groups
        return _Refusal(f"of {channels} channels, which num_groups={num_groups} does not divide",
                        "pick a num_groups that divides every layer's channels")
    settings, notes = _carried(old, record)
    act = step.after[1] if step.after is not None else None
    absorbs = bool(step.relus) or type(act) is nn.ReLU  # the target is its own activation
    if record.activation and not absorbs:
        settings["apply_act"] = False
        notes.append(f"without its own activation: its {type(act).__name__} follows it"
                     if act is not None and not isinstance(act, nn.Identity)
                     else "no nn.ReLU after it: without its activation")
    try:
        new = make_norm(record.name, channels, num_groups, virtual_batches,
                        None if record.dims == (1, 2, 3) and _layer_dims(old) is None
                        else dims, **{**settings, **options})
    except (TypeError, ValueError) as exc:
        return _Refusal(f"{kind.__name__} whose new {record.name} layer cannot be built "
                        f"({exc})", "check the options")
    step.notes.extend(notes)
    _take_state(old, new, step.notes)
    if step.after is None:
        return new
    drop, act = step.after
    if record.activation and absorbs:
        act = nn.Identity()
        step.notes.append(f"its ReLU is {record.name}'s own activation")
    return NormAct(new, drop, act).train(old.training)


def _carried(old: nn.Module, record: Norm) -> tuple[dict, list[str]]:
    """The settings of ``old`` that the target keeps, and notes on those it cannot."""
    settings: dict = {}
    notes: list[str] = []
    if "eps" in record.settings and isinstance(old, _TORCH_NORMS):  # others mean another eps
        settings["eps"] = old.eps
    affine = getattr(old, "affine", True)
    if "affine" in record.settings:
        settings["affine"] = affine
    elif not affine and record.name != "none":
        notes.append(f"affine=False cannot carry: {record.name} needs its scale and shift, "
                     f"which start at 1 and 0")
    if isinstance(old, _BatchNorm) and record.batch_family:
        settings["momentum"] = old.momentum
        settings["track_running_stats"] = old.track_running_stats
    elif isinstance(old, _BatchNorm) and not old.track_running_stats and \
            record.batch_dependent:
        notes.append(f"track_running_stats=False cannot carry: {record.name} keeps running "
                     f"statistics for eval")
    return settings, notes


def _take_state(old: nn.Module, new: nn.Module, notes: list[str]) -> None:
    """Device, dtype, mode, the parameters both have (values and requires_grad), and
    between Batch Norms the running statistics, from ``old`` into ``new``."""
    state = next(iter(old.parameters()), None)
    state = state if state is not None else next(iter(old.buffers()), None)
    if state is not None:
        new.to(device=state.device, dtype=state.dtype)
    new.train(old.training)
    old_params = dict(old.named_parameters(recurse=False))
    with torch.no_grad():
        for key, param in new.named_parameters(recurse=False):
            if key in old_params:
                param.copy_(old_params[key])
                param.requires_grad_(old_params[key].requires_grad)
        if isinstance(old, _BatchNorm) and isinstance(new, _BatchNorm) and \
                old.running_mean is not None and new.running_mean is not None:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(new, key).copy_(getattr(old, key))
    frozen = old_params and not any(p.requires_grad for p in old_params.values())
    added = [k for k in dict(new.named_parameters(recurse=False)) if k not in old_params]
    if frozen and added:
        for key in added:
            getattr(new, key).requires_grad_(False)
        notes.append(f"frozen: its new parameters ({', '.join(added)}) are frozen too, at "
                     f"their initial values")
    hooks = sum(len(getattr(old, h)) for h in _COUNTED_HOOKS)
    if hooks:
        notes.append(f"{hooks} hook(s) carried over")


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the very hook dictionaries of ``old``: the hooks run on ``new``, and the
    handles the user holds still remove them."""
    for hooks in _HOOKS:
        setattr(new, hooks, getattr(old, hooks))
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


# -- back to PyTorch's own layers

def _torch_twin(step: _Step, dims: int | None) -> nn.Module | _Refusal | None:
    old = step.old
    if isinstance(old, _untwinned()):
        return _Refusal(f"{type(old).__name__}, which PyTorch has no layer for",
                        "keep normlab installed where the model runs, or convert them to "
                        "another norm first", type(old))
    if isinstance(old, StdConv2d):
        new = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride,
                        old.padding, old.dilation, old.groups, old.bias is not None,
                        old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.standardised_weight())
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        if old.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        new.train(old.training)
        step.notes.append("weights standardized once: further training would no longer "
                          "standardize them")
        return new
    twin = twin_of(old, dims)
    if isinstance(twin, str):
        return _Refusal(twin, "convert them to another norm first", type(old))
    notes = step.notes
    if old.virtual_batches > 1:
        notes.append(f"training now normalises over the whole batch, not "
                     f"{old.virtual_batches} virtual batches")
    if isinstance(old, _BatchRenorm):
        notes.append("training is now plain Batch Norm (no r and d); eval is the same")
    if isinstance(twin, nn.SyncBatchNorm) and not old.sync:
        notes.append("nn.SyncBatchNorm is torch's Batch Norm of any dimension: in training "
                     "under torch.distributed it synchronizes")
    return twin
