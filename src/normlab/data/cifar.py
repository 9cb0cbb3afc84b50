"""CIFAR-10 and CIFAR-100 from their python archives (Krizhevsky 2009), the files
torchvision and most code expect: downloaded once into normlab's cache, or found with
``--data-dir``, checked against the published MD5 of the archive **before anything in it is
unpickled** (unpickling runs code if a file is malicious), then read with an unpickler that
accepts nothing but the archive's plain dicts, lists, strings and bytes.

Layout: ``cifar-10-python.tar.gz`` unpacks to ``cifar-10-batches-py/`` with
``data_batch_1`` ... ``data_batch_5`` and ``test_batch``; ``cifar-100-python.tar.gz`` to
``cifar-100-python/`` with ``train`` and ``test``. Each is a pickle of a dict whose
``b"data"`` is uint8 (10000, 3072): 1024 red, 1024 green, then 1024 blue values, each a
32 x 32 row-major plane.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, first_line
from ..progress import shown
from .idx import DatasetSpec, default_data_dir

FIX = "delete it to download it again, or point --data-dir at a good copy"


@dataclass(frozen=True)
class CifarArchive:
    name: str
    archive: str
    md5: str
    folder: str  # inside the archive
    train: tuple[str, ...]
    test: str
    labels: bytes  # the key of the labels in each batch
    meta: str  # the file that names the classes
    classes_key: bytes
    url: str = "https://www.cs.toronto.edu/~kriz/"


ARCHIVES = {a.name: a for a in (
    CifarArchive("cifar10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                 "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                 "test_batch", b"labels", "batches.meta", b"label_names"),
    CifarArchive("cifar100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python", ("train",), "test", b"fine_labels", "meta",
                 b"fine_label_names"),
)}


# What the archives' pickles name: NumPy's array reconstruction, nothing else.
# (_codecs.encode: how Python 3's protocol-2 pickles spell bytes; it only encodes a string.)
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _PlainUnpickler(pickle.Unpickler):
    """Loads built-in containers, numbers, strings, bytes and NumPy arrays only: any other
    class or function a pickle names is refused, so even a file that passed its checksum
    cannot run code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(blob: bytes, source: str) -> dict:
    try:
        return _PlainUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{source}: not a CIFAR python batch ({exc}); {FIX}") from None


def archive_path(which: CifarArchive, data_dir: str | os.PathLike | None,
                 download_missing: bool) -> Path:
    """The archive in ``data_dir`` (or the cache), downloaded there if missing."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir(which.name)
    path = root / which.archive
    if path.exists():
        return path
    if not download_missing:
        raise DataError(f"{which.archive}: not found in {root}; download it from "
                        f"{which.url} there, or set --data-dir to a folder holding it")
    return _download(which, root)


def _download(which: CifarArchive, root: Path) -> Path:
    """The archive fetched into ``root`` with pooch, which checks its MD5 as it arrives (a
    wrong file is deleted, never kept)."""
    import pooch
    import requests

    pooch.get_logger().setLevel("WARNING")
    url = which.url + which.archive
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(pooch.retrieve(url, known_hash=f"md5:{which.md5}", fname=which.archive,
                                   path=root, progressbar=shown()))
    except PermissionError as exc:
        raise DataError(f"cannot write {root / which.archive} ({exc.strerror}); pass a "
                        f"writable --data-dir") from None
    except ValueError as exc:  # pooch: the download's hash is not the published one
        raise DataError(f"{url}: the download is not the published {which.name} archive "
                        f"({first_line(exc, 120)}); try again later, or put the "
                        f"archive in {root} yourself") from None
    except (requests.RequestException, OSError) as exc:
        raise DataError(f"{which.archive}: not in {root} and the download from {url} failed "
                        f"({type(exc).__name__}); check your network, or put the archive "
                        f"there (or set --data-dir to a folder holding it)") from None


def load_cifar(name: str, data_dir: str | os.PathLike | None = None,
               download_missing: bool = True
               ) -> tuple[DatasetSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The spec (classes; statistics still to compute) and both splits as (uint8 N x 3 x 32 x
    32, int64 labels), from the verified archive."""
    which = ARCHIVES[name]
    path = archive_path(which, data_dir, download_missing)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); {FIX}") from None
    digest = hashlib.md5(blob).hexdigest()
    if digest != which.md5:
        raise DataError(f"{path}: checksum mismatch (MD5 {digest}, published {which.md5}); "
                        f"the file is corrupt or not the {name} archive; {FIX}")
    members = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for member in tar.getmembers():
                if member.isfile():
                    members[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable tar.gz archive ({exc}); {FIX}") from None

    def batch(file: str) -> dict:
        key = f"{which.folder}/{file}"
        if key not in members:
            raise DataError(f"{path}: has no {key}; {FIX}")
        return _unpickle(members[key], f"{path}:{key}")

    splits = {}
    for split, files in (("train", which.train), ("test", (which.test,))):
        parts = [batch(f) for f in files]
        try:
            x = torch.cat([torch.as_tensor(np.asarray(p[b"data"], dtype=np.uint8))
                           for p in parts]).view(-1, 3, 32, 32)
            y = torch.tensor([label for p in parts for label in p[which.labels]])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise DataError(f"{path}: a {split} batch is malformed ({exc}); {FIX}") from None
        splits[split] = (x, y)
    names = batch(which.meta).get(which.classes_key, [])
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    spec = DatasetSpec(name=name, files={}, counts={k: len(v[1]) for k, v in splits.items()},
                       mirrors=(which.url,), classes=classes, mean=0.0, std=1.0,
                       augment="crop-flip")
    return spec, splits
