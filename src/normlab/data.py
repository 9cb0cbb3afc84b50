"""MNIST-style IDX data: find or download it, verify it, hold it in memory, batch it.

Why this shape: the whole split is one uint8 tensor (47 MB for MNIST train), so a batch
is an index into memory rather than 128 Python objects, and augmentation runs on the
batch as one tensor op (the airbench approach). Every file is checked against the
published MD5 of its *decompressed* content before use, so we never train on bad data.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import DataError

ENV_VAR = "NORMLAB_DATA"
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # 0x00000803 and 0x00000801 in the IDX spec
FIX = "delete it to download it again, or point --data-dir at a good copy"


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's four IDX files are called, what they must contain, where to get them."""

    name: str
    files: dict[str, tuple[str, str]]  # "train-images" etc. -> (file name, MD5 of content)
    counts: dict[str, int]  # "train" / "test" -> number of examples
    mirrors: tuple[str, ...]  # base URLs, tried in order
    classes: tuple[str, ...]
    mean: float  # pixel statistics of the training set, for normalisation
    std: float
    env_var: str = ENV_VAR  # environment variable naming a folder that holds the files
    system_dirs: tuple[str, ...] = ()  # read-only places a distribution may have put the files


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


def default_data_dir(spec: DatasetSpec) -> Path:
    """The per-user cache folder used when neither --data-dir nor $NORMLAB_DATA is given."""
    import pooch

    return Path(pooch.os_cache("normlab")) / spec.name


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
                                  progressbar=True)
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


def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 7.0,
                  translate: float = 2.0, scale: float = 0.1) -> torch.Tensor:
    """Rotate (+-degrees), shift (+-translate pixels) and scale (1 +- scale) a whole batch.

    The per-batch equivalent of torchvision's per-sample RandomAffine, with the random draws
    from ``generator`` (on the CPU) so that one seed gives the same augmentation on any device.
    """
    draws = torch.rand(len(x), 4, generator=generator).to(x.device) * 2 - 1
    return affine(x, draws, degrees, translate, scale)


def affine(x: torch.Tensor, draws: torch.Tensor, degrees: float = 7.0, translate: float = 2.0,
           scale: float = 0.1) -> torch.Tensor:
    """Apply the affine maps chosen by ``draws`` (n x 4, uniform in [-1, 1): angle, scale, x and
    y shift, as fractions of their ranges) to the batch ``x``: one affine grid, sampled
    bilinearly, computed on ``x``'s device."""
    n, _, h, w = x.shape
    angle = draws[:, 0] * math.radians(degrees)
    factor = 1 + draws[:, 1] * scale
    # affine_grid works in normalised coordinates, where the image spans [-1, 1].
    shift = draws[:, 2:] * translate * torch.tensor([2 / w, 2 / h], device=draws.device)
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class Data:
    """Training and evaluation splits in memory, with the spec that says how to normalise
    them. ``eval_split`` says what the "test" tensors are: the test set, or a validation set
    held out of the training set for tuning."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    spec: DatasetSpec
    eval_split: str = "test"

    @property
    def in_channels(self) -> int:
        """Channels of one input (images held as N x H x W have one)."""
        return 1 if self.train_images.dim() == 3 else self.train_images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.spec.classes)

    def example(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` training inputs as the model sees them (normalised floats)."""
        loader = Loader(self.train_images[:n], self.train_labels[:n], n, mean=self.spec.mean,
                        std=self.spec.std)
        return next(iter(loader))[0]


def load_data(data_dir: str | os.PathLike | None = None, dataset: str | DatasetSpec = "mnist",
              limit_train: int | None = None, download_missing: bool = True,
              holdout: int | None = None) -> Data:
    """Load and verify both splits; ``limit_train`` keeps the first N training images.

    ``holdout=N`` is for tuning: the last N training images become the evaluation set and
    the test set is not loaded at all, so choices made on it cannot leak into the test score.
    ``limit_train`` then applies to what is left.
    """
    spec = get_spec(dataset)
    if limit_train is not None and limit_train <= 0:
        raise ValueError(f"limit_train must be positive, got {limit_train}")
    train_x, train_y = load_split("train", data_dir, spec, download_missing)
    if holdout is None:
        test_x, test_y = load_split("test", data_dir, spec, download_missing)
        return Data(train_x[:limit_train], train_y[:limit_train], test_x, test_y, spec)
    if not 0 < holdout < len(train_y):
        raise ValueError(f"holdout must be between 1 and {len(train_y) - 1} (the training set "
                         f"has {len(train_y):,} images), got {holdout}")
    keep = len(train_y) - holdout
    return Data(train_x[:keep][:limit_train], train_y[:keep][:limit_train], train_x[keep:],
                train_y[keep:], spec, eval_split="validation")


def make_loaders(data: Data, batch_size: int, seed: int, device: torch.device | str = "cpu",
                 test_batch_size: int = 1000, shard: tuple[int, int] = (0, 1)
                 ) -> tuple[Loader, Loader]:
    """Train loader (shuffled, augmented, seeded; ``shard=(rank, world)`` gives this rank's
    part of every global batch) and test loader (in order, large batches)."""
    stats = dict(mean=data.spec.mean, std=data.spec.std, device=device)
    return (Loader(data.train_images, data.train_labels, batch_size, shuffle=True,
                   augment=True, seed=seed, shard=shard, **stats),
            Loader(data.test_images, data.test_labels, test_batch_size, **stats))


class Loader:
    """Mini-batches from an in-memory uint8 split.

    The split is moved to ``device`` once; each batch is gathered by index, converted to
    float, optionally augmented and normalised there, so a GPU run makes no per-batch host
    copies. Shuffling and augmentation draw from one seeded generator: the same seed gives
    the same batches, and ``generator.get_state()`` is all a checkpoint needs to resume.

    Data parallelism: with ``shard=(rank, world)`` every rank draws the same global shuffle
    and augmentation, and yields only its own contiguous part of each global batch of
    ``batch_size`` (cut as ``torch.tensor_split`` cuts it), so the union over ranks is
    exactly what one process would train on.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, augment: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu", mean: float = MNIST.mean,
                 std: float = MNIST.std, shard: tuple[int, int] = (0, 1)) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.mean, self.std, self.shard = mean, std, shard
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def batch_length(self, i: int) -> int:
        """Images in global batch ``i`` (all ranks together): the last one may be short."""
        return min(self.batch_size, len(self.labels) - i * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.labels), self.images.device
        # An epoch's randomness is drawn up front on the CPU generator (the same numbers on
        # any device) and moved to the device in one copy each: no per-batch host transfers.
        order = torch.randperm(n, generator=self.generator).to(device) if self.shuffle else None
        draws = (torch.rand(n, 4, generator=self.generator).to(device) * 2 - 1
                 if self.augment else None)
        # On a GPU, prepare the whole epoch in a few large kernels (airbench's way): a step
        # then costs two slices instead of a dozen small launches. On a CPU, batch by batch
        # keeps the working set in cache. Each image's result is the same either way.
        epoch = self._prepare(slice(None) if order is None else order, draws) \
            if self.images.is_cuda else None
        rank, world = self.shard
        for start in range(0, n, self.batch_size):
            stop = start + self.batch_size
            if world > 1:  # this rank's part of the global batch
                start, stop = split_bounds(start, min(stop, n), rank, world)
            index = slice(start, stop) if order is None else order[start:stop]
            x = epoch[start:stop] if epoch is not None else \
                self._prepare(index, None if draws is None else draws[start:stop])
            yield x, self.labels[index]

    def _prepare(self, index: slice | torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """The images at ``index`` as a normalised float batch, augmented by ``draws``."""
        x = self.images[index].unsqueeze(1).to(torch.get_default_dtype()).div_(255)
        if draws is not None:
            x = affine(x, draws)
        return x.sub_(self.mean).div_(self.std)


def split_bounds(start: int, stop: int, rank: int, world: int) -> tuple[int, int]:
    """The ``rank``-th of ``world`` contiguous parts of ``range(start, stop)``, cut as
    ``torch.tensor_split`` cuts: the first ``(stop - start) % world`` parts one longer."""
    size, extra = divmod(stop - start, world)
    lo = start + rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)
