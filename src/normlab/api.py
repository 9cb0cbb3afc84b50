"""Any experiment from Python (a notebook, a script): ``normlab.run("remedies", model=...,
dataset=..., seeds=[1, 2, 3])`` runs exactly what the command line would, and returns the
record and the output folder.

The options are the command line's, spelt as keywords (``images_per_statistic=[2, 128]``
for ``--images-per-statistic 2 128``), and go through the same parser, so they are checked
the same way and recorded as the command that reproduces the run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UsageError
from .folder import prepare_out, remove_unused


def run(experiment: str, *, model: str | Callable[..., Any] | None = None,
        dataset: str | Path | None = None, **options: Any) -> tuple[dict[str, Any], Path]:
    """Run ``experiment`` (compare, statistics, sweep, remedies) and return its record and
    output folder.

    Args:
        experiment: the subcommand's name.
        model: ``"package.module:callable"``, ``"path/file.py:callable"``, or the callable
            itself when it is defined in an importable module or file (normlab imports it
            again in ``--jobs`` workers and on ``--resume``); None: normlab's own CNN.
        dataset: a name (``"mnist"``, ``"cifar10"``, ...), ``"folder:PATH"``, ``"npz:PATH"``,
            or a path: a folder (``folder:``) or a ``.npz`` file.
        **options: the subcommand's options as keywords: ``model_arg={"depth": 8}``,
            ``seeds=[1, 2]``, ``no_progress=True``, ``out="runs/mine"``.

    Raises:
        UsageError: options the command line would refuse, with its message.

    Example: ``record, folder = normlab.run("compare", variants=["bn", "gn"], epochs=1)``.
    """
    from .cli import build_parser, main

    argv = [experiment, *_model_argv(model), *_dataset_argv(dataset), *_argv(options)]
    parser = build_parser()
    error = io.StringIO()
    with contextlib.redirect_stderr(error):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            raise UsageError(error.getvalue().strip().splitlines()[-1]) from None
    if getattr(args, "experiment", None) is None:
        raise UsageError(f"{experiment!r} is not an experiment; choose one of: compare, "
                         f"statistics, sweep, remedies")
    made = args.out is None and args.resume is None
    if made:  # the folder must be known to return it
        args.out = prepare_out(None, experiment, args.experiment.record_name)
        argv += ["--out", str(args.out)]
    said = _Tee(sys.stderr)  # the user still sees it; the exception repeats its last line
    try:
        with contextlib.redirect_stderr(said):
            code = main(argv)
    except SystemExit as exc:  # the command line's one-line errors, as an exception
        if made:  # refused before it wrote anything: no empty folder left behind
            remove_unused(Path(args.out))
        lines = [line for line in said.text().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"stopped with exit code {exc.code}"
        raise UsageError(reason.removeprefix(f"normlab {experiment}: ")) from None
    folder = Path(args.resume or args.out)
    record = json.loads((folder / args.experiment.record_name).read_text())
    if code:
        record["exit_code"] = code
    return record, folder


class _Tee(io.StringIO):
    """Writes to ``stream`` and keeps a copy."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)

    def flush(self) -> None:
        self.stream.flush()

    def text(self) -> str:
        return self.getvalue()


def _model_argv(model: str | Callable[..., Any] | None) -> list[str]:
    if model is None:
        return []
    if isinstance(model, str):
        return ["--model", model]
    module, name = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise UsageError(f"normlab.run needs a model it can import again (for --jobs workers "
                         f"and --resume), but {name or model!r} is defined in the notebook "
                         f"or script itself: put it in a .py file and pass "
                         f"model='file.py:{name or 'callable'}'")
    return ["--model", f"{module}:{name}"]


def _dataset_argv(dataset: str | Path | None) -> list[str]:
    """A name, ``folder:PATH``, ``npz:PATH`` or a bare path, spelt out as the command line
    records it (``npz:/absolute/path``)."""
    if dataset is None:
        return []
    from .options import dataset_arg

    try:
        return ["--dataset", dataset_arg(str(dataset))]
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"dataset: {exc}") from None


def _argv(options: dict[str, Any]) -> list[str]:
    """Keywords as options: ``lr=0.1`` -> ``--lr 0.1``, ``no_progress=True`` -> the flag,
    lists as several values, ``model_arg`` (a dict) as repeated ``--model-arg K=V``."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif key == "model_arg" and isinstance(value, dict):
            argv += [x for k, v in value.items() for x in (flag, f"{k}={v!r}")]
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
