"""Your own images: ``folder:PATH``, laid out as torchvision's ``ImageFolder`` expects,
``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (PNG or JPEG), classes sorted by name.

Every image is decoded once with Pillow into one uint8 tensor per split, cached in normlab's
cache folder (``folder-cache/<key>.safetensors``, keyed by the folder, its file list, sizes
and modification times, so adding, removing or changing an image decodes again; the user's
folder is only read). One rule for
mixed images: every image must have the size and mode (grayscale or RGB) of the first;
RGBA and palette images are converted to RGB, 16-bit grayscale is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import DataError
from ..progress import bar
from . import check_fits  # the package is loaded before any format module
from .idx import DatasetSpec, default_data_dir

SUFFIXES = {".png", ".jpg", ".jpeg"}


def image_files(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """The classes (the train folder's subfolders, sorted) and each split's (file, label)."""
    train = root / "train"
    if not train.is_dir() or not (root / "test").is_dir():
        raise DataError(f"folder:{root}: expected {root}/train/<class>/* and "
                        f"{root}/test/<class>/* (PNG or JPEG)")
    classes = tuple(sorted(d.name for d in train.iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise DataError(f"{train}: found {len(classes)} class folder(s); a classification "
                        f"needs at least two")
    files = {}
    for split in ("train", "test"):
        extra = sorted({d.name for d in (root / split).iterdir() if d.is_dir()} - set(classes))
        if extra:
            raise DataError(f"{root / split}: class folder(s) {', '.join(extra)} are not in "
                            f"train/; the two splits must share their classes")
        files[split] = [(f, k) for k, name in enumerate(classes)
                        for f in sorted((root / split / name).glob("*"))
                        if f.suffix.lower() in SUFFIXES]
        if not files[split]:
            raise DataError(f"{root / split}: no PNG or JPEG images")
    return classes, files


def estimated_bytes(files: dict[str, list[tuple[Path, int]]]) -> int:
    """The decoded size of every image, from the first one's header (all must match it)."""
    from PIL import Image, UnidentifiedImageError

    first = files["train"][0][0]
    try:
        with Image.open(first) as im:
            channels = 1 if im.mode in ("L", "1") else 3
            width, height = im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{first}: cannot be read as an image ({exc})") from None
    return (len(files["train"]) + len(files["test"])) * channels * width * height


def load_folder(path: str | Path
                ) -> tuple[DatasetSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The spec and both splits as (uint8 N x C x H x W, int64 labels), from the cache when
    the files are unchanged."""
    root = Path(path).expanduser()
    classes, files = image_files(root)
    check_fits(estimated_bytes(files), f"folder:{root}")
    listing = [str(root.resolve())] + [
        (str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns, k)
        for split in ("train", "test") for f, k in files[split]]
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:24]
    cache = default_data_dir("folder-cache") / f"{key}.safetensors"
    splits = _read_cache(cache) if cache.exists() else None
    if splits is None:
        splits = {split: _decode(files[split], split) for split in ("train", "test")}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({f"{s}_{t}": v for s, (x, y) in splits.items()
                       for t, v in (("x", x), ("y", y))}, str(cache))
        except OSError:
            pass  # no writable cache: decode again next time
    spec = DatasetSpec(name=f"folder:{root}", files={},
                       counts={k: len(v[1]) for k, v in splits.items()}, mirrors=(),
                       classes=classes, mean=0.0, std=1.0)
    return spec, splits


def _read_cache(cache: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    try:
        t = load_file(str(cache))
        return {s: (t[f"{s}_x"], t[f"{s}_y"]) for s in ("train", "test")}
    except (SafetensorError, OSError, KeyError):
        return None  # a damaged cache is decoded again


def _decode(files: list[tuple[Path, int]], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    first = None
    images = []
    for f, _ in bar(files, desc=f"decoding {split} images", unit="image", leave=False):
        try:
            with Image.open(f) as im:
                if im.mode in ("I;16", "I", "F"):
                    raise DataError(f"{f}: {im.mode} images (16-bit or float) are not "
                                    f"supported; save 8-bit grayscale or RGB")
                im = im.convert("L" if im.mode in ("L", "1") else "RGB")
                shape = (im.mode, im.size)
                if first is None:
                    first = (f, shape)
                if shape != first[1]:
                    raise DataError(f"{f}: {im.mode} {im.size[0]}x{im.size[1]}, but "
                                    f"{first[0].name} is {first[1][0]} "
                                    f"{first[1][1][0]}x{first[1][1][1]}; resize or convert "
                                    f"the images to one size and mode first")
                array = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{f}: cannot be read as an image ({exc})") from None
        images.append(torch.from_numpy(array.copy()).reshape(*array.shape[:2], -1)
                      .permute(2, 0, 1))
    return torch.stack(images), torch.tensor([k for _, k in files])
