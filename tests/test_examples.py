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
           "normlab.convert", "normlab.norms"]


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
