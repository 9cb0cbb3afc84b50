"""The block diagram of which values share one mean and variance (Wu & He 2018, Fig. 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ..plots import save_figure
from .compute import GROUPS, TECHNIQUES, C, H, N, W, explain


def draw_figure(path: str | Path | None = None, shape: Sequence[int] = (N, C, H, W),
                groups: int = GROUPS) -> Figure:
    """The N x C x (H*W) block diagram of Wu & He (2018, Fig. 2), one panel per technique.

    Blue cubes are one set: the values that share a mean and variance. The shading comes from
    ``explain``'s own sets, so the picture cannot disagree with the numbers.
    """
    n, c, h, w = shape
    fig = Figure(figsize=(14, 4.4), layout="constrained")
    x = torch.zeros(n, c, h, w, dtype=torch.float64)
    for position, (key, t) in enumerate(TECHNIQUES.items(), 1):
        # voxel axes: x = C (across), y = N (depth), z = H*W (up), as in the paper
        shaded = np.zeros((c, n, h * w), dtype=bool)
        for mn, mc, mh, mw in explain(x, key, groups).sets[0].members:
            shaded[mc, mn, mh * w + mw] = True
        ax = fig.add_subplot(1, len(TECHNIQUES), position, projection="3d")
        ax.voxels(np.ones_like(shaded), facecolors=np.where(shaded, "#4a86c5", "#ffffff"),
                  edgecolor="#555555", linewidth=0.4)
        ax.set(xlabel="C (channels)", ylabel="N (samples)", zlabel="H, W (positions)",
               xticks=[], yticks=[], zticks=[])
        ax.set_box_aspect((c, n, h * w), zoom=0.8)
        ax.view_init(elev=20, azim=-60)
        suffix = f", G={groups}" if t.grouped else ""
        ax.set_title(f"{t.name} ({key}{suffix})\n{t.describe()}", fontsize=9)
    fig.suptitle(f"Which values share one mean and variance (blue), for N={n}, C={c}, "
                 f"H*W={h * w}", fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig

