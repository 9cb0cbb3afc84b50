"""Data sets in memory: find or download them, verify them, hold them as tensors, batch them.

Why this shape: a whole split is one tensor (47 MB for MNIST train), so a batch is an index
into memory rather than 128 Python objects, and augmentation runs on the batch as one tensor
operation (the airbench approach). One module per format, each returning both splits as
tensors and a ``DatasetSpec``:

* ``idx``: ``mnist`` and ``fashion-mnist`` (the default data sets);
* ``cifar``: ``cifar10`` and ``cifar100``, the python archives;
* ``imagefolder``: ``folder:PATH``, ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``;
* ``npz``: ``npz:PATH``, arrays of signals, images or volumes.

``load_data`` picks the format by name, refuses a data set that cannot fit in memory before
reading it, computes the other formats' per-channel mean and std from the training images,
and chooses the augmentation (``augment``) by kind. ``Loader`` (``loader``) batches.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .augment import AUGMENTS, affine, crop_flip, default_augment, random_affine
from .idx import (
    DATASETS,
    ENV_VAR,
    FASHION_MNIST,
    FIX,
    IMAGE_MAGIC,
    LABEL_MAGIC,
    MNIST,
    DatasetSpec,
    default_data_dir,
    download,
    get_spec,
    load_file,
    load_split,
    parse_idx,
    resolve_data_dir,
)
from .loader import Loader, split_bounds

__all__ = ["AUGMENTS", "DATASETS", "ENV_VAR", "FASHION_MNIST", "FIX", "IMAGE_MAGIC",
           "LABEL_MAGIC", "MNIST", "NAMED", "Data", "DataError", "DatasetSpec", "Loader",
           "affine", "crop_flip", "default_augment", "default_data_dir", "download",
           "get_spec", "load_data", "load_file", "load_split", "make_loaders", "parse_idx",
           "random_affine", "resolve_data_dir", "shown_dataset", "split_bounds"]

NAMED = ("mnist", "fashion-mnist", "cifar10", "cifar100")  # and folder:PATH, npz:PATH


@dataclass
class Data:
    """Training and evaluation splits in memory, with the spec that says how to normalise
    them. ``eval_split`` says what the "test" tensors are: the test set, or a validation set
    held out of the training set for tuning. ``augment`` names the training augmentation
    (``AUGMENTS``; None: the spec's)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    spec: DatasetSpec
    eval_split: str = "test"
    augment: str | None = None
    source: str | None = None  # the fingerprint of the data set as read (``fingerprint``)

    @property
    def grayscale(self) -> bool:
        """Whether the inputs are held as N x H x W grayscale images (MNIST's way)."""
        return self.spec.kind == "image" and self.train_images.dim() == 3

    @property
    def in_channels(self) -> int:
        """Channels of one input (grayscale images held as N x H x W have one)."""
        return 1 if self.grayscale else self.train_images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.spec.classes)

    @property
    def inputs(self) -> str:
        """What its inputs are called: images, signals or volumes."""
        return f"{self.spec.kind}s"

    @property
    def training_augment(self) -> str:
        """The augmentation training uses: ``augment`` if set, else the data set's own."""
        return self.augment or self.spec.augment

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input as the model sees it: (C, L), (C, H, W) or (C, D, H, W)."""
        shape = tuple(self.train_images.shape[1:])
        return (1, *shape) if self.grayscale else shape

    def loader(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
               **options: Any) -> Loader:
        """A ``Loader`` of some of this data set's inputs, normalised with its statistics;
        ``options`` are Loader's (shuffle, augment, seed, device, shard)."""
        return Loader(images, labels, batch_size, mean=self.spec.mean, std=self.spec.std,
                      grayscale=self.grayscale, **options)

    def example(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` training inputs as the model sees them (normalised floats)."""
        return next(iter(self.loader(self.train_images[:n], self.train_labels[:n], n)))[0]

    def describe(self) -> dict:
        """What the record keeps of a data set normlab does not ship: its kind, shape,
        classes, statistics, augmentation and fingerprint (``--resume`` refuses other
        data)."""
        return dict(kind=self.spec.kind, input_shape=list(self.input_shape),
                    classes=len(self.spec.classes), mean=_listed(self.spec.mean),
                    std=_listed(self.spec.std),
                    augment=self.training_augment, fingerprint=self.fingerprint(),
                    **({"class_names": list(self.spec.classes)}
                       if self.spec.classes != tuple(map(str, range(self.num_classes)))
                       else {}))

    def fingerprint(self) -> str:
        """What identifies the data: the fingerprint of the files' decoded splits before
        any ``holdout`` or ``limit_train`` (``source``), else of the splits held."""
        return self.source or fingerprint(self.train_images, self.train_labels,
                                          self.test_images, self.test_labels)


def fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 of tensors as decoded (values, shapes and types): the same for the same data
    in any file format or order of files on disk, different when any input or label
    changed."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
        digest.update(tensor.contiguous().numpy())  # its buffer: no copy
    return "sha256:" + digest.hexdigest()


def shown_dataset(name: str) -> str:
    """A data set's name for a line or a title: ``npz:``/``folder:`` paths relative to the
    working directory where that is shorter (records keep them absolute)."""
    kind, sep, where = name.partition(":")
    if not sep or kind not in ("npz", "folder"):
        return name
    try:
        relative = os.path.relpath(where)
    except ValueError:  # another drive (Windows)
        return name
    return f"{kind}:{relative}" if len(relative) < len(where) else name


def _listed(value: float | tuple[float, ...]) -> float | list[float]:
    return list(value) if isinstance(value, tuple) else value  # as JSON gives it back


def load_data(data_dir: str | os.PathLike | None = None, dataset: str | DatasetSpec = "mnist",
              limit_train: int | None = None, download_missing: bool = True,
              holdout: int | None = None, augment: str | None = None) -> Data:
    """Load and verify both splits; ``limit_train`` keeps the first N training images.

    ``dataset`` is a name of ``NAMED``, ``folder:PATH`` or ``npz:PATH`` (or a spec of IDX
    files). ``holdout=N`` is for tuning: the last N training images become the evaluation
    set and the test set is not used, so choices made on it cannot leak into the test score.
    ``limit_train`` then applies to what is left. ``augment`` overrides the kind's default
    augmentation (``AUGMENTS``).
    """
    if limit_train is not None and limit_train <= 0:
        raise ValueError(f"limit_train must be positive, got {limit_train}")
    if augment is not None and augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of: "
                         f"{', '.join(AUGMENTS)}")
    if isinstance(dataset, DatasetSpec) or dataset in DATASETS:  # IDX files
        spec = get_spec(dataset)
        train_x, train_y = load_split("train", data_dir, spec, download_missing)
        test = None if holdout is not None else \
            load_split("test", data_dir, spec, download_missing)
        fixed_statistics = True  # the published ones
        source = None  # checked against the published checksums when read
    else:
        spec, splits = _load_other(dataset, data_dir, download_missing)
        (train_x, train_y), test = splits["train"], splits.get("test")
        source = fingerprint(train_x, train_y, *(test or ()))
        test = None if holdout is not None else test
        fixed_statistics = False
    if holdout is not None:
        if not 0 < holdout < len(train_y):
            raise ValueError(f"holdout must be between 1 and {len(train_y) - 1} (the training "
                             f"set has {len(train_y):,} images), got {holdout}")
        keep = len(train_y) - holdout
        test, (train_x, train_y) = (train_x[keep:], train_y[keep:]), (train_x[:keep],
                                                                       train_y[:keep])
    train_x, train_y = train_x[:limit_train], train_y[:limit_train]
    if not fixed_statistics:  # normlab's own data sets are checked by their checksums
        check_labels(spec.name, spec.classes, train_y, test[1],
                     "validation" if holdout is not None else "test")
    if not fixed_statistics:
        grayscale = spec.kind == "image" and train_x.dim() == 3
        mean, std = channel_statistics(train_x, grayscale)
        spec = replace(spec, mean=mean, std=std,
                       augment=default_augment(spec.kind, 1 if grayscale else train_x.shape[1]))
    if augment is not None and augment != "none" and spec.kind != "image":
        raise ValueError(f"--augment {augment} is for images; {spec.name} holds "
                         f"{spec.kind}s (use --augment none)")
    return Data(train_x, train_y, test[0], test[1], spec,
                eval_split="validation" if holdout is not None else "test", augment=augment,
                source=source)


def _load_other(dataset: str, data_dir: str | os.PathLike | None, download_missing: bool
                ) -> tuple[DatasetSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A data set of another format than IDX, by name (each format checks that it fits in
    memory before reading it)."""
    kind, _, where = dataset.partition(":")
    if dataset in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        return load_cifar(dataset, data_dir, download_missing)
    if kind == "npz" and where:
        from .npz import load_npz

        return load_npz(where)
    if kind == "folder" and where:
        from .imagefolder import load_folder

        return load_folder(where)
    raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(NAMED)}, "
                    f"folder:PATH (PATH/train/<class>/*, PATH/test/<class>/*) or npz:PATH "
                    f"(x_train, y_train, x_test, y_test)")


def check_labels(name: str, classes: tuple[str, ...], train: torch.Tensor, test: torch.Tensor,
                 split: str = "test") -> None:
    """Refuse, in the user's terms, labels a classifier cannot be trained on as given: an
    empty split, a single class, a class with no training input (1-based labels, an empty
    class folder), labels of the evaluated split that training never sees; warn (one line)
    where the evaluated split lacks some classes (usable: its accuracy is over the others).

    Examples:
        >>> try:
        ...     check_labels("npz:d.npz", ("0", "1"), torch.tensor([1, 1]), torch.tensor([1]))
        ... except DataError as error:
        ...     print(error)
        npz:d.npz: every training input is of class 1; a classifier needs at least two classes
    """
    if len(train) == 0 or len(test) == 0:
        empty = "training" if len(train) == 0 else split
        raise DataError(f"{name}: the {empty} split is empty; give it inputs")
    seen, evaluated = set(train.tolist()), set(test.tolist())
    if len(seen) < 2:
        raise DataError(f"{name}: every training input is of class {_named(classes, seen)}; "
                        f"a classifier needs at least two classes")
    unseen = sorted(evaluated - seen)
    if unseen:
        raise DataError(f"{name}: the {split} split has labels that no training input has "
                        f"({_named(classes, unseen)}), which the model could never predict; "
                        f"give training inputs of those classes, or drop them from the "
                        f"{split} split")
    empty = sorted(set(range(len(classes))) - seen)
    if empty:
        hint = (" (labels from 1? number classes from 0: subtract 1)" if empty == [0] else
                "; number the classes 0 .. K-1 without gaps, or remove the empty class "
                "folders")
        raise DataError(f"{name}: no training input of class {_named(classes, empty)}, of "
                        f"{len(classes)} classes{hint}")
    missing = sorted(seen - evaluated)
    if missing:
        warn(f"{name}: the {split} split has no input of class {_named(classes, missing)}; "
             f"its accuracy is over the others")


def _named(classes: tuple[str, ...], labels: Any) -> str:
    """Class labels as the user knows them: their names where the data names them."""
    labels = sorted(labels)
    shown = [classes[k] if k < len(classes) and classes[k] != str(k) else str(k)
             for k in labels[:5]]
    names = [f"{n} (label {k})" if n != str(k) else n for n, k in zip(shown, labels, strict=False)]
    return ", ".join(names) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")


def warn(message: str) -> None:
    """One line on stderr that the data are usable but not as the user may think (rank 0
    only under torchrun, where every rank loads the data)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)


def check_fits(nbytes: int, name: str, available: int | None = None) -> None:
    """Refuse, before reading it, a data set that would take more than three quarters of
    the memory this machine has available: normlab holds every split in memory.

    Examples:
        >>> check_fits(2**29, "npz:small.npz", available=2**30)  # fits: no error
        >>> try:
        ...     check_fits(2**30, "npz:big.npz", available=2**30)
        ... except DataError as error:
        ...     print(str(error)[:32])
        npz:big.npz: 1.0 GiB in memory,
    """
    available = available if available is not None else available_memory()
    if available is not None and nbytes > 0.75 * available:
        raise DataError(f"{name}: {nbytes / 2**30:.1f} GiB in memory, {available / 2**30:.1f} "
                        f"GiB available; normlab holds data sets in memory: use a subset, or "
                        f"a machine with more memory")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no check)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def channel_statistics(x: torch.Tensor, grayscale: bool = False, chunk: int = 4096
                       ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of inputs as the model sees them (uint8
    scaled to [0, 1]), in float64, a chunk of inputs at a time; ``grayscale``: ``x`` is
    N x H x W, one channel.

    Examples:
        >>> x = torch.tensor([[[0, 255]], [[255, 255]]], dtype=torch.uint8)  # 2 x 1 x 2
        >>> channel_statistics(x)
        ((0.75,), (0.433013,))
    """
    if len(x) == 0:
        raise DataError("the training split is empty")
    channels = 1 if grayscale else x.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    square = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for part in x.split(chunk):
        part = part.to(torch.float64).reshape(len(part), channels, -1)
        if x.dtype == torch.uint8:
            part = part / 255
        total += part.sum((0, 2))
        square += part.square().sum((0, 2))
        count += part.shape[0] * part.shape[2]
    mean = total / count
    std = (square / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-8)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def make_loaders(data: Data, batch_size: int, seed: int, device: torch.device | str = "cpu",
                 test_batch_size: int = 1000, shard: tuple[int, int] = (0, 1)
                 ) -> tuple[Loader, Loader]:
    """Train loader (shuffled, augmented, seeded; ``shard=(rank, world)`` gives this rank's
    part of every global batch) and test loader (in order, large batches)."""
    return (data.loader(data.train_images, data.train_labels, batch_size, shuffle=True,
                        augment=data.training_augment, seed=seed, shard=shard,
                        device=device),
            data.loader(data.test_images, data.test_labels, test_batch_size, device=device))
