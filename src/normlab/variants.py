"""The study's variants by name: which normalization, whether it carries the L1 penalty, and
whether its convolutions are Weight-Standardized. Everything about the normalization itself
is its record in ``normlab.norms.NORMS``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """A named study variant: which normalization, whether it carries the L1 penalty, and
    whether its convolutions are Weight-Standardized."""

    name: str
    norm: str
    label: str
    l1: bool = False
    weight_std: bool = False


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("bn+l1", "batch", "Batch Norm + L1", l1=True),
    Variant("ln", "layer", "Layer Norm"),
    Variant("gn", "group", "Group Norm"),
    Variant("bn", "batch", "Batch Norm"),
    Variant("sbn", "syncbatch", "Synchronized Batch Norm"),
    Variant("in", "instance", "Instance Norm"),
    Variant("none", "none", "No norm"),
    # The small-batch remedies: docs/normalization.md says what each changes.
    Variant("brn", "batchrenorm", "Batch Renorm"),
    Variant("bn+ws", "batch", "Batch Norm + WS", weight_std=True),
    Variant("gn+ws", "group", "Group Norm + WS", weight_std=True),
    Variant("ln+ws", "layer", "Layer Norm + WS", weight_std=True),
    Variant("frn", "frn", "Filter Response Norm"),
    Variant("evob0", "evonorm-b0", "EvoNorm-B0"),
    Variant("evos0", "evonorm-s0", "EvoNorm-S0"),
)}
STUDY_VARIANTS = ("bn+l1", "ln", "gn")
