"""Batch, Layer, Group and Instance Norm worked through on a tiny example, every number checked.

``compute`` holds the computation (which values share a mean and variance, and what they
are); ``formats`` writes it as text, JSON and Markdown, ``workbook`` as an Excel workbook of
live formulas, ``figure`` as the block diagram. ``normlab explain`` (in ``normlab.cli``)
prints the text and writes the files asked for.
"""

from .compute import (
    AFFINE_NOTE,
    DEFAULT_SEED,
    EPS,
    GROUPS,
    LAYERS,
    TECHNIQUES,
    C,
    Explanation,
    H,
    N,
    NormSet,
    Technique,
    W,
    build_example,
    check_groups,
    explain,
    explain_all,
    stat_counts,
)
from .figure import draw_figure
from .formats import format_text, to_json, to_markdown
from .workbook import CellMap, write_xlsx

__all__ = ["AFFINE_NOTE", "C", "CellMap", "DEFAULT_SEED", "EPS", "GROUPS", "H", "LAYERS", "N",
           "TECHNIQUES", "W", "Explanation", "NormSet", "Technique", "build_example",
           "check_groups",
           "draw_figure", "explain", "explain_all", "format_text", "stat_counts", "to_json",
           "to_markdown", "write_xlsx"]
