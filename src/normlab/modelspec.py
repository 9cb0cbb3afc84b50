"""Your model in any study: ``--model package.module:callable`` or ``--model file.py:callable``.

A ``ModelSpec`` names a callable that returns an ``nn.Module``, with its arguments. Each run
builds one from its seed and makes it the variant's network with ``norms.convert`` (and, for
the ``+ws`` variants, ``standardize_weights``), so every variant of a seed starts from the
same weights. Everything is checked before any training (``check``), and the record keeps
what rebuilds the model: the spec, its arguments and a fingerprint of its code, which
``--resume`` compares so that a run never continues with other code than it started with.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import convert
from .errors import UsageError, first_line
from .model import count_parameters
from .variants import VARIANTS
from .weightstd import standardize_weights


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings as keyword arguments; values are Python literals (``8``,
    ``0.5``, ``True``, ``(1, 2)``, ``'a'``), anything else a plain string.

    Examples:
        >>> parse_model_args(["depth=20", "widths=(16, 32)", "name=wide"])
        {'depth': 20, 'widths': (16, 32), 'name': 'wide'}
    """
    args: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. depth=20")
        try:
            args[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            args[key] = text
    return args


@dataclass(frozen=True)
class ModelSpec:
    """A model by name: ``spec`` is ``package.module:callable`` or ``path/file.py:callable``,
    ``args`` its keyword arguments as given (sorted pairs, so the spec is hashable).

    Examples:
        >>> spec = ModelSpec.parse("normlab.model:Net", ["dropout=0.1"])
        >>> net = spec.variant("group", num_groups=4, virtual_batches=1,
        ...                    weight_std=False, in_channels=1, num_classes=10)
        >>> type(net.features[0][1]).__name__, net.normlab_config["norm"]
        ('GroupNorm', 'group')
    """

    spec: str
    args: tuple[tuple[str, Any], ...] = ()
    # What it returns (``check`` finds out): "log-probabilities", as normlab's loss (the
    # NLL) takes them; "logits", to which normlab adds a log_softmax; or "probabilities"
    # (a model ending in softmax), of which normlab takes the log.
    outputs: str = "log-probabilities"

    @property
    def logits(self) -> bool:
        return self.outputs == "logits"

    @classmethod
    def parse(cls, spec: str, model_args: list[str] | dict[str, Any] | None = None
              ) -> ModelSpec:
        if ":" not in spec.replace(":\\", "") or spec.endswith(":"):
            raise UsageError(f"--model {spec!r}: expected package.module:callable or "
                             f"path/to/file.py:callable")
        args = model_args if isinstance(model_args, dict) else parse_model_args(model_args)
        return cls(spec, tuple(sorted(args.items())))

    @property
    def _parts(self) -> tuple[str, str]:
        where, _, name = self.spec.rpartition(":")
        return where, name

    @property
    def is_file(self) -> bool:
        return self._parts[0].endswith(".py")

    def _module(self) -> Any:
        where, _ = self._parts
        if self.is_file:
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise UsageError(f"--model {self.spec}: no such file {where}")
            name = f"normlab_model_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            if name in sys.modules:
                return sys.modules[name]
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look modules up here
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise UsageError(f"--model {self.spec}: {where} fails to import "
                                 f"({type(exc).__name__}: {first_line(exc)})") from None
            return module
        try:
            return importlib.import_module(where)
        except Exception as exc:
            raise UsageError(f"--model {self.spec}: cannot import {where} "
                             f"({type(exc).__name__}: {first_line(exc)}); install it or "
                             f"give a path/to/file.py") from None

    def callable(self) -> Callable[..., Any]:
        where, name = self._parts
        target = getattr(self._module(), name, None)
        if target is None:
            raise UsageError(f"--model {self.spec}: {where} has no {name!r}")
        if not callable(target):
            raise UsageError(f"--model {self.spec}: {name} is a {type(target).__name__}, "
                             f"not a callable that returns a model")
        return target

    @cached_property
    def fingerprint(self) -> str:
        """What identifies the code: a file's SHA-256, an installed package's version (else
        the module file's SHA-256). Read once per spec: every variant, checkpoint key and
        weights file of a run names the code as the run found it."""
        where, _ = self._parts
        if self.is_file:
            return "sha256:" + _sha256(Path(where).expanduser())
        top = where.split(".")[0]
        for dist in importlib.metadata.packages_distributions().get(top, []):
            return f"{dist}=={importlib.metadata.version(dist)}"
        return "sha256:" + _sha256(Path(self._module().__file__))

    def describe(self) -> dict[str, Any]:
        """What the record keeps to rebuild the model and recognise its code."""
        return {"spec": self.spec, "args": dict(self.args), "fingerprint": self.fingerprint,
                "outputs": self.outputs}

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> ModelSpec:
        """The spec that ``describe`` described (a record's or a weights file's)."""
        spec = cls.parse(described["spec"], described.get("args", {}))
        return cls(spec.spec, spec.args, described.get("outputs", "log-probabilities"))

    @classmethod
    def from_record(cls, described: dict[str, Any], where: str) -> ModelSpec:
        """The spec a record describes, refused in one line if its code has changed since."""
        spec = cls.from_description(described)
        now = spec.fingerprint
        if now != described.get("fingerprint"):
            raise UsageError(f"{where} was trained with {spec.spec} at "
                             f"{described.get('fingerprint')}, its code is now {now}; restore "
                             f"that code to continue, or start a new run with --out")
        return spec

    def build(self, in_channels: int, num_classes: int) -> nn.Module:
        """The model as its callable builds it; ``in_channels`` and ``num_classes`` are
        passed where the callable takes them (under the names of ``CHANNELS`` and
        ``CLASSES``: torchvision's, timm's, MONAI's) and ``args`` does not set them."""
        target = self.callable()
        kwargs = dict(self.args)
        params = _parameters(target)
        _check_args(self.spec, kwargs, params)
        for names, value in ((CHANNELS, in_channels), (CLASSES, num_classes)):
            name = next((n for n in names if n in params), None)
            if name is not None and not any(n in kwargs for n in names):
                kwargs[name] = value
        try:
            model = target(**kwargs)
        except Exception as exc:
            raise UsageError(f"--model {self.spec}: building it failed "
                             f"({type(exc).__name__}: {first_line(exc)}); check "
                             f"--model-arg") from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {self.spec}: returned a {type(model).__name__}, not "
                             f"a torch.nn.Module")
        return model

    def variant(self, norm: str, num_groups: int, virtual_batches: int, weight_std: bool,
                in_channels: int, num_classes: int) -> nn.Module:
        """The model with every normalization layer made ``norm`` (``norms.convert``), its
        convolutions Weight-Standardized if ``weight_std``. Draws random numbers only in
        ``build``, so seeding before this gives every variant the same initial weights."""
        model = self.build(in_channels, num_classes)
        try:
            model = convert(model, norm, num_groups, virtual_batches)
        except ValueError as exc:
            raise UsageError(f"--model {self.spec}: {norm}: "
                             + "; ".join(str(exc).splitlines())) from None
        if weight_std:
            model = standardize_weights(model)
        if self.outputs in _TO_LOG:
            model = nn.Sequential(model, _TO_LOG[self.outputs]())
        # What rebuilds it from a weights file (checkpoint.save_model / rebuild).
        model.normlab_config = dict(model=self.describe(), norm=norm, num_groups=num_groups,
                                    virtual_batches=virtual_batches, weight_std=weight_std,
                                    in_channels=in_channels, num_classes=num_classes)
        return model


# What networks call their input channels and their classes (normlab's and torchvision's,
# timm's, MONAI's ResNet, other MONAI networks and segmentation libraries).
CHANNELS = ("in_channels", "in_chans", "n_input_channels", "input_channels")
CLASSES = ("num_classes", "n_classes")


def _parameters(target: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return {}


def _check_args(spec: str, kwargs: dict[str, Any], params: dict[str, inspect.Parameter]
                ) -> None:
    """Refuse a --model-arg the callable has no parameter for, and a value that is not a
    Python literal where the parameter's default says it takes a number, a flag or a
    tuple: ``width=abc`` would otherwise reach the model as the string 'abc'."""
    if not params:
        return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in kwargs.items():
        param = params.get(key)
        if param is None:
            if not takes_any:
                raise UsageError(f"--model-arg {key}: {spec} has no parameter {key!r}; it "
                                 f"takes {', '.join(params) or 'none'}")
            continue
        default = param.default
        if isinstance(value, str) and default is not param.empty and default is not None \
                and not isinstance(default, str):
            raise UsageError(f"--model-arg {key}={value}: {key} takes a "
                             f"{type(default).__name__} (its default is {default!r}), and "
                             f"{value!r} is not one; write it as a Python literal")


def from_args(args: Any) -> ModelSpec | None:
    """The --model of the command line, or the one a resumed record names (refused if its
    code changed since); None for normlab's own Net."""
    given = getattr(args, "model", None)
    if given is None:
        return None
    if isinstance(given, dict):  # put back from the record by --resume
        return ModelSpec.from_record(given, str(args.resume))
    spec = ModelSpec.parse(given, getattr(args, "model_arg", None))
    if spec.is_file:  # recorded absolute: evaluate and --resume work from any folder
        where, name = spec._parts
        spec = ModelSpec(f"{Path(where).expanduser().resolve()}:{name}", spec.args)
    return spec


def model_argv(model: str | dict[str, Any] | None, model_arg: list[str] | None) -> list[str]:
    """The --model and --model-arg options that name this model again (for a command that
    normlab runs itself), from the command line's or a record's description."""
    if model is None:
        return []
    if isinstance(model, dict):
        spec, args = model["spec"], [f"{k}={v!r}" for k, v in model.get("args", {}).items()]
    else:
        spec, args = model, list(model_arg or [])
    return ["--model", spec, *[x for a in args for x in ("--model-arg", a)]]


def variant_layers(variants: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """Each variant's (norm, weight_std): what ``check`` and ``ModelSpec.variant`` build."""
    return {v: (VARIANTS[v].norm, VARIANTS[v].weight_std) for v in variants}


class ClampedLog(nn.Module):
    """log(p) of a model's probabilities, clamped above log(0) = -inf: the NLL of a
    softmax output (a softmax whose log was taken again would train on the wrong loss)."""

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()


_TO_LOG = {"logits": lambda: nn.LogSoftmax(1), "probabilities": ClampedLog}


def outputs_of(out: torch.Tensor) -> str:
    """What a model's outputs are: rows of log-probabilities (their exponentials sum to
    1), of probabilities (non-negative, summing to 1), else logits."""
    out = out.detach().float()
    sums = out.sum(1)
    if torch.allclose(out.logsumexp(1), torch.zeros_like(sums), atol=1e-3):
        return "log-probabilities"
    if bool((out >= 0).all()) and torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        return "probabilities"
    return "logits"


def check(spec: ModelSpec, variants: dict[str, tuple[str, bool]], num_groups: int,
          example: torch.Tensor, num_classes: int, fewest: int = 2
          ) -> tuple[ModelSpec, dict[str, int]]:
    """Build every variant (name -> (norm, weight_std)) and run it on ``example`` (two inputs
    of the data) in training mode, raising one UsageError line for what would fail later;
    where a batch statistic may see only ``fewest`` = 1 input (a last batch of one), on one
    input too. Returns the spec with what its outputs are (``outputs_of``: normlab's loss is
    the NLL of log-probabilities, as pytorch/examples' MNIST), and each variant's count of
    trainable parameters."""
    counts, outputs = {}, None
    bare = ModelSpec(spec.spec, spec.args)  # its outputs as the callable returns them
    for name, (norm, weight_std) in variants.items():
        torch.manual_seed(0)
        model = bare.variant(norm, num_groups, 1, weight_std, example.shape[1], num_classes)
        out = _forward(bare, name, model, example, "")
        if not isinstance(out, torch.Tensor) or out.shape != (len(example), num_classes):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(f"--model {spec.spec}: its output is {shape}, normlab needs "
                             f"(N, {num_classes}), one score per class of the data"
                             f"{_classes_hint(bare, out, num_classes)}")
        if fewest < 2:
            _forward(bare, name, model, example[:1], "; the last training batch gives a "
                     "batch statistic one input: change --limit-train or --batch-size so "
                     "that it gives none or more")
        outputs = outputs or outputs_of(out)
        counts[name] = count_parameters(model)
    return ModelSpec(spec.spec, spec.args, outputs or spec.outputs), counts


def _forward(spec: ModelSpec, name: str, model: nn.Module, x: torch.Tensor, fix: str
             ) -> Any:
    try:
        with torch.no_grad():
            return model.train()(x)
    except Exception as exc:
        raise UsageError(f"--model {spec.spec} ({name}): a batch of shape {tuple(x.shape)} "
                         f"fails in forward ({type(exc).__name__}: {first_line(exc)})"
                         f"{_channel_hint(spec, model, x) or fix}") from None


def _classes_hint(spec: ModelSpec, out: Any, num_classes: int) -> str:
    """How to make the model return one score per class: its own argument for it."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return ""
    given = dict(spec.args)
    name = next((n for n in CLASSES if n in _parameters(spec.callable())), None)
    if name is not None:
        if name in given:
            return (f": it was built with --model-arg {name}={given[name]!r}, the data has "
                    f"{num_classes} classes; drop that --model-arg or pass "
                    f"{name}={num_classes}")
        return f": pass --model-arg {name}={num_classes}"
    return (f": the callable takes no {' or '.join(CLASSES)} argument; make it return "
            f"{num_classes} outputs")


def _channel_hint(spec: ModelSpec, model: nn.Module, example: torch.Tensor) -> str:
    """Where the model's first convolution expects other input channels than the data
    has: the callable's own argument for them (its name, or that it has none)."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    have = example.shape[1]
    if first is None or first.in_channels == have:
        return ""
    lead = f"; the model takes {first.in_channels} input channel(s), the data has {have}"
    name = next((n for n in CHANNELS if n in _parameters(spec.callable())), None)
    if name is None:
        return (f"{lead}: the callable takes no {', '.join(CHANNELS)} argument; give it one, "
                f"or convert the data")
    return f"{lead}: pass --model-arg {name}={have}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
