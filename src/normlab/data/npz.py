"""Your own arrays: ``npz:PATH``, a NumPy ``.npz`` file holding ``x_train``, ``y_train``,
``x_test`` and ``y_test``. ``x`` is (N, C, L) for signals, (N, C, H, W) for images or
(N, C, D, H, W) for volumes, uint8 (pixels, scaled to [0, 1]) or floating point (taken as
it is, in float32); ``y`` holds whole-number class labels 0 .. K-1 (integers, or floats
holding whole numbers, with a warning). An optional ``classes`` array names the classes in
the reports (``classes[k]`` is label k's name).

Read without pickle (``allow_pickle=False``): a ``.npz`` can hold pickled objects, which
could run code when loaded; normlab refuses them.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from . import check_fits, warn  # the package is loaded before any format module
from .idx import DatasetSpec

KEYS = ("x_train", "y_train", "x_test", "y_test")
KINDS = {3: "signal", 4: "image", 5: "volume"}


def npz_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's shape and dtype from its header, nothing loaded (for the memory check)."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for key in KEYS:
                try:
                    with archive.open(f"{key}.npy") as f:
                        version = np.lib.format.read_magic(f)
                        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = read(f)
                except KeyError:
                    raise DataError(f"{path}: has no {key}; an npz data set holds "
                                    f"{', '.join(KEYS)}") from None
                shapes[key] = (shape, dtype)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    return shapes


def load_npz(path: str | Path, splits: tuple[str, ...] = ("train", "test")
             ) -> tuple[DatasetSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The spec (kind from the number of dimensions, classes 0 .. K-1) and the asked splits
    as (x, int64 labels), checked for matching lengths, shapes and labels."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"npz:{path}: no such file")
    shapes = npz_shapes(path)
    check_fits(sum(math.prod(shape) * (1 if dtype == np.uint8 else 4)  # as held in memory
                   for shape, dtype in shapes.values()), f"npz:{path}")
    ndim = len(shapes["x_train"][0])
    if ndim not in KINDS:
        raise DataError(f"{path}: x_train is {ndim}-D {shapes['x_train'][0]}; expected (N, C, L) "
                        f"signals, (N, C, H, W) images or (N, C, D, H, W) volumes")
    if shapes["x_test"][0][1:] != shapes["x_train"][0][1:]:
        raise DataError(f"{path}: x_test's inputs are {shapes['x_test'][0][1:]}, x_train's "
                        f"{shapes['x_train'][0][1:]}; they must match")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as arrays:
            for split in splits:
                x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
                out[split] = (_inputs(x, path, split), _labels(y, len(x), path, split))
            classes = _classes(arrays, path, out)
    except ValueError as exc:  # object arrays: refused, they would need pickle
        raise DataError(f"{path}: {exc}; store plain numeric arrays") from None
    spec = DatasetSpec(name=f"npz:{path}", files={},
                       counts={k: len(v[1]) for k, v in out.items()}, mirrors=(),
                       classes=classes, mean=0.0, std=1.0, kind=KINDS[ndim])
    return spec, out


def _inputs(x: np.ndarray, path: Path, split: str) -> torch.Tensor:
    if x.dtype == np.uint8:
        return torch.from_numpy(x.copy())
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{path}: x_{split} is {x.dtype}; use uint8 pixels or floats")
    x = torch.from_numpy(x.astype(np.float32))
    if not torch.isfinite(x).all():
        raise DataError(f"{path}: x_{split} holds NaN or infinite values; clean them first")
    return x


def _classes(arrays: np.lib.npyio.NpzFile, path: Path,
             out: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[str, ...]:
    """The class names: the optional ``classes`` array (one name per label), else the
    labels 0 .. the largest."""
    top = max((int(y.max()) for _, y in out.values() if len(y)), default=-1)
    if "classes" not in arrays:
        return tuple(str(k) for k in range(top + 1))
    names = arrays["classes"]
    if names.ndim != 1 or not (names.dtype.kind in "US" or np.issubdtype(names.dtype,
                                                                          np.integer)):
        raise DataError(f"{path}: classes is {names.dtype} {names.shape}; expected one name "
                        f"per class, e.g. np.array(['cat', 'dog'])")
    if top >= len(names):
        raise DataError(f"{path}: a label is {top}, but classes names only {len(names)} "
                        f"classes (labels 0 .. {len(names) - 1})")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())


def _labels(y: np.ndarray, n: int, path: Path, split: str) -> torch.Tensor:
    if y.shape != (n,) or not (np.issubdtype(y.dtype, np.integer)
                               or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{path}: y_{split} is {y.dtype} {y.shape}; expected {n} whole-number "
                        f"class labels, one per input")
    if np.issubdtype(y.dtype, np.floating):
        whole = np.isfinite(y).all() and bool((y == np.round(y)).all())
        if not whole:
            raise DataError(f"{path}: y_{split} holds values that are not whole numbers "
                            f"(e.g. {y[~(y == np.round(y))][0]}); expected class labels "
                            f"0 .. K-1")
        warn(f"{path}: y_{split} is {y.dtype}; its values are whole numbers, taken as class "
             f"labels")
    y = torch.from_numpy(y.astype(np.int64))
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{path}: y_{split} has negative labels; use classes 0 .. K-1")
    return y
