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
from .errors import UsageError
from .normact import standardize_weights
from .variants import VARIANTS


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
    logits: bool = False  # it returns logits: normlab adds a log_softmax (``check`` finds out)

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
                                 f"({type(exc).__name__}: {_first_line(exc)})") from None
            return module
        try:
            return importlib.import_module(where)
        except Exception as exc:
            raise UsageError(f"--model {self.spec}: cannot import {where} "
                             f"({type(exc).__name__}: {_first_line(exc)}); install it or "
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
                "outputs": "logits" if self.logits else "log-probabilities"}

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> ModelSpec:
        """The spec that ``describe`` described (a record's or a weights file's)."""
        spec = cls.parse(described["spec"], described.get("args", {}))
        return cls(spec.spec, spec.args, described.get("outputs") == "logits")

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
        passed where the callable takes them and ``args`` does not set them."""
        target = self.callable()
        kwargs = dict(self.args)
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            params = {}
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if key in params and key not in kwargs:
                kwargs[key] = value
        try:
            model = target(**kwargs)
        except Exception as exc:
            raise UsageError(f"--model {self.spec}: building it failed "
                             f"({type(exc).__name__}: {_first_line(exc)}); check "
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
        if self.logits:
            model = nn.Sequential(model, nn.LogSoftmax(1))
        # What rebuilds it from a weights file (checkpoint.save_model / rebuild).
        model.normlab_config = dict(model=self.describe(), norm=norm, num_groups=num_groups,
                                    virtual_batches=virtual_batches, weight_std=weight_std,
                                    in_channels=in_channels, num_classes=num_classes)
        return model


def from_args(args: Any) -> ModelSpec | None:
    """The --model of the command line, or the one a resumed record names (refused if its
    code changed since); None for normlab's own Net."""
    given = getattr(args, "model", None)
    if given is None:
        return None
    if isinstance(given, dict):  # put back from the record by --resume
        return ModelSpec.from_record(given, str(args.resume))
    return ModelSpec.parse(given, getattr(args, "model_arg", None))


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


def check(spec: ModelSpec, variants: dict[str, tuple[str, bool]], num_groups: int,
          example: torch.Tensor, num_classes: int) -> tuple[ModelSpec, dict[str, int]]:
    """Build every variant (name -> (norm, weight_std)) and run it on ``example`` (two inputs
    of the data), raising one UsageError line for what would fail later. Returns the spec,
    marked as returning logits where its outputs are not log-probabilities (normlab's loss
    is the NLL, as pytorch/examples' MNIST), and each variant's parameter count."""
    counts = {}
    for name, (norm, weight_std) in variants.items():
        torch.manual_seed(0)
        model = spec.variant(norm, num_groups, 1, weight_std, example.shape[1], num_classes)
        try:
            with torch.no_grad():
                out = model.train()(example)
        except Exception as exc:
            raise UsageError(f"--model {spec.spec} ({name}): a batch of shape "
                             f"{tuple(example.shape)} fails in forward ({type(exc).__name__}: "
                             f"{_first_line(exc)}){_channel_hint(model, example)}") from None
        if not isinstance(out, torch.Tensor) or out.shape != (len(example), num_classes):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(f"--model {spec.spec}: its output is {shape}, normlab needs "
                             f"(N, {num_classes}) log-probabilities (end with log_softmax), "
                             f"one per class of the data")
        sums = out.float().logsumexp(1)
        if not spec.logits and not torch.allclose(sums, torch.zeros_like(sums), atol=1e-3):
            spec = ModelSpec(spec.spec, spec.args, logits=True)
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return spec, counts


def _channel_hint(model: nn.Module, example: torch.Tensor) -> str:
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != example.shape[1]:
        return (f"; the model takes {first.in_channels} input channel(s), the data has "
                f"{example.shape[1]}: give the callable an in_channels argument or pass "
                f"--model-arg in_channels={example.shape[1]}")
    return ""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
