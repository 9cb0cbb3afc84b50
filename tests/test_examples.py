"""The examples in the API reference run, and show what they print: every ``>>>`` example
of the public modules, as doctests (so an example cannot drift from the code)."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn

MODULES = ["normlab.batchnorm", "normlab.normact", "normlab.precise", "normlab.model",
           "normlab.stats", "normlab.engine", "normlab.data", "normlab.data.loader",
           "normlab.data.augment", "normlab.modelspec", "normlab.checkpoint",
           "normlab.convert", "normlab.norms", "normlab.weightstd"]


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_of_each_public_module_run(name):
    module = importlib.import_module(name)
    torch.manual_seed(0)
    extra = {"torch": torch, "nn": nn}
    for attr in ("BatchNorm2d", "convert", "count_parameters"):  # what examples also use
        extra.setdefault(attr, getattr(importlib.import_module("normlab.norms"), attr, None)
                         or getattr(importlib.import_module("normlab.model"), attr))
    result = doctest.testmod(module, extraglobs=extra, optionflags=doctest.ELLIPSIS
                             | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0, f"{result.failed} example(s) of {name} failed (above)"
    if name not in ("normlab.norms", "normlab.convert", "normlab.data.loader"):
        assert result.attempted > 0, f"{name} has no example"


def test_the_architecture_pages_example_of_a_new_normalization_runs():
    """The "Adding a normalization" example, run as written: its norm then works in Net,
    convert, and as a study variant."""
    from pathlib import Path

    from normlab.norms import NORMS
    from normlab.variants import VARIANTS

    page = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    section = page.split("## Adding a normalization", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    space: dict = {}
    try:
        exec(compile(code, "architecture.md", "exec"), space)
        assert type(space["model"][1]).__name__ == "PixelNorm"
        assert sum(type(m).__name__ == "PixelNorm" for m in space["net"].modules()) == 7
        assert VARIANTS["pixel"].norm == "pixel" and NORMS["pixel"].label == "Pixel Norm"
    finally:
        NORMS.pop("pixel", None)
        VARIANTS.pop("pixel", None)
