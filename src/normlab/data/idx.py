"""MNIST-style IDX data (MNIST, Fashion-MNIST): find or download it, verify it, read it.

Every file is checked against the published MD5 of its *decompressed* content before use,
so we never train on bad data. The whole split becomes one uint8 tensor (47 MB for MNIST
train), held in memory as every normlab data set is (``normlab.data``).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from ..progress import shown

ENV_VAR = "NORMLAB_DATA"
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # 0x00000803 and 0x00000801 in the IDX spec
FIX = "delete it to download it again, or point --data-dir at a good copy"


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's four IDX files are called, what they must contain, where to get them;
    for the other formats, what was found in the files (``files`` then empty). ``mean`` and
    ``std`` are the training split's pixel statistics: one number for grayscale, one per
    channel otherwise. ``kind`` is "image", "signal" or "volume"; ``augment`` the default
    augmentation (``normlab.data.augment``)."""

    name: str
    files: dict[str, tuple[str, str]]  # "train-images" etc. -> (file name, MD5 of content)
    counts: dict[str, int]  # "train" / "test" -> number of examples
    mirrors: tuple[str, ...]  # base URLs, tried in order
    classes: tuple[str, ...]
    mean: float | tuple[float, ...]  # pixel statistics of the training set, for normalisation
    std: float | tuple[float, ...]
    env_var: str = ENV_VAR  # environment variable naming a folder that holds the files
    system_dirs: tuple[str, ...] = ()  # read-only places a distribution may have put the files
    kind: str = "image"
    augment: str = "affine"


MNIST = DatasetSpec(
    name="mnist",
    files={
        "train-images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
        "test-images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
        "test-labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
    },
    counts={"train": 60000, "test": 10000},
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    classes=tuple(str(d) for d in range(10)),
    mean=0.1307,
    std=0.3081,
)

# Zalando's Fashion-MNIST: same format and sizes, ten clothing classes, a harder task. The
# MD5s are of the decompressed files (upstream publishes the .gz archives' MD5s; Debian's
# dataset-fashion-mnist recompresses them, with byte-identical content).
FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    files={
        "train-images": ("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels": ("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9"),
        "test-images": ("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
        "test-labels": ("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965"),
    },
    counts={"train": 60000, "test": 10000},
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
             "Sneaker", "Bag", "Ankle boot"),
    mean=0.2860,
    std=0.3530,
    env_var="NORMLAB_FASHION_MNIST_DATA",
    system_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian's dataset-fashion-mnist
)

DATASETS: dict[str, DatasetSpec] = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}


def get_spec(dataset: str | DatasetSpec) -> DatasetSpec:
    if isinstance(dataset, DatasetSpec):
        return dataset
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def default_data_dir(spec: DatasetSpec | str) -> Path:
    """The per-user cache folder used when neither --data-dir nor $NORMLAB_DATA is given."""
    import pooch

    return Path(pooch.os_cache("normlab")) / (spec if isinstance(spec, str) else spec.name)


def resolve_data_dir(data_dir: str | os.PathLike | None, spec: DatasetSpec) -> Path:
    """--data-dir wins, then the dataset's environment variable ($NORMLAB_DATA for MNIST),
    then a system copy holding all four files, then the per-user cache."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(spec.env_var):
        return Path(os.environ[spec.env_var]).expanduser()
    for folder in map(Path, spec.system_dirs):
        if all(_find(folder, name) for name, _ in spec.files.values()):
            return folder
    return default_data_dir(spec)


def _find(folder: Path, name: str) -> Path | None:
    """The gzipped or raw copy of ``name`` in ``folder``, if either exists."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.exists():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise DataError(f"{path}: permission denied; make it readable (chmod +r) "
                        f"or point --data-dir at a readable copy") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); {FIX}") from None
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc}), it is corrupt or "
                        f"truncated; {FIX}") from None


def parse_idx(data: bytes, magic: int, source: str | Path = "<bytes>") -> torch.Tensor:
    """Decode one IDX file (uint8 payload) into a tensor, checking magic and length."""
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise DataError(f"{source}: wrong magic number {found} (expected {magic}); "
                        f"not an IDX {'image' if magic == IMAGE_MAGIC else 'label'} file; {FIX}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated header; {FIX}")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(shape)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{source}: {what} (header says {expected} bytes, file has "
                        f"{len(data)}); {FIX}")
    array = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    return array.reshape(shape)


def download(spec: DatasetSpec, root: Path, name: str, mirrors: tuple[str, ...] | None = None
             ) -> Path:
    """Fetch ``name``.gz into ``root`` with pooch, trying each mirror in turn."""
    import pooch
    import requests

    pooch.get_logger().setLevel("WARNING")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data folder {root} ({exc.strerror}); pass a "
                        f"writable --data-dir or set ${spec.env_var}") from None
    errors = []
    for base in mirrors or spec.mirrors:
        url = base + name + ".gz"
        try:
            # The archive's own hash is not checked here: mirrors recompress files. The
            # decompressed content is checked against the published MD5 after download.
            path = pooch.retrieve(url, known_hash=None, fname=name + ".gz", path=root,
                                  progressbar=shown())
            return Path(path)
        except PermissionError as exc:
            raise DataError(f"cannot write {root / (name + '.gz')} ({exc.strerror}); pass "
                            f"a writable --data-dir or set ${spec.env_var}") from None
        except (requests.RequestException, OSError, ValueError) as exc:
            errors.append(f"{url}: {type(exc).__name__}")
    raise DataError(f"{name}: not in {root} and the download failed ({'; '.join(errors)}); "
                    f"check your network, or copy the four {spec.name} IDX files there "
                    f"(or set --data-dir/${spec.env_var} to a folder holding them)")


def load_file(spec: DatasetSpec, root: Path, key: str, download_missing: bool = True
              ) -> torch.Tensor:
    """One verified IDX file as a tensor: found (or downloaded), checksummed, parsed."""
    name, md5 = spec.files[key]
    path = _find(root, name)
    if path is None:
        if not download_missing:
            raise DataError(f"{name}: not found in {root}; copy the {spec.name} IDX files "
                            f"there, or set --data-dir/${spec.env_var} to a folder holding them")
        path = download(spec, root, name)
    data = _read_bytes(path)
    tensor = parse_idx(data, IMAGE_MAGIC if key.endswith("images") else LABEL_MAGIC, path)
    digest = hashlib.md5(data).hexdigest()
    if digest != md5:
        raise DataError(f"{path}: checksum mismatch (MD5 of content {digest}, published "
                        f"{md5}); the file is corrupt or not the {spec.name} file; {FIX}")
    return tensor


def load_split(split: str, data_dir: str | os.PathLike | None = None,
               dataset: str | DatasetSpec = "mnist", download_missing: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x 28 x 28 uint8, labels N int64) for ``split`` "train" or "test"."""
    spec = get_spec(dataset)
    if split not in spec.counts:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(spec.counts)}")
    root = resolve_data_dir(data_dir, spec)
    if root.exists() and not root.is_dir():
        raise DataError(f"data folder {root} is a file; pass a folder as --data-dir or "
                        f"${spec.env_var}")
    # The magic numbers that parse_idx checks fix the shapes: images N x H x W, labels N.
    images = load_file(spec, root, f"{split}-images", download_missing)
    labels = load_file(spec, root, f"{split}-labels", download_missing)
    expected = spec.counts[split]
    if len(images) != len(labels) or len(images) != expected:
        raise DataError(f"{root}: {split} split has {len(images)} images and {len(labels)} "
                        f"labels, expected {expected} of each; replace the {split} files")
    if int(labels.max()) >= len(spec.classes):
        raise DataError(f"{root}: {split} labels go up to {int(labels.max())}, expected "
                        f"fewer than {len(spec.classes)} classes; replace the {split} files")
    return images, labels.long()

