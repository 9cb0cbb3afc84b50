"""Data sets beyond MNIST: CIFAR archives (downloaded from a local fake with the real layout,
checked before anything is unpickled), image folders, npz arrays of signals, images and
volumes; their statistics, augmentation, memory check and refusals."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from normlab.data import (
    DataError,
    Loader,
    channel_statistics,
    check_fits,
    crop_flip,
    imagefolder,
    load_data,
)
from normlab.data import cifar as C


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def cifar_archive(n_per_batch: int = 6, evil: bytes | None = None) -> tuple[bytes, dict]:
    """A CIFAR-10 archive with the real layout: five training batches, a test batch and
    batches.meta, each a pickled dict with a NumPy uint8 b"data" of (n, 3072) (red plane,
    green plane, blue plane) and b"labels". Pixel values encode (batch, image, channel)."""
    members, truth = {}, {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.zeros((n_per_batch, 3072), dtype=np.uint8)
        for i in range(n_per_batch):
            for c in range(3):
                data[i, 1024 * c:1024 * (c + 1)] = 40 * b + 10 * c + i  # one value per plane
        data[:, 5] = 255  # red, row 0, column 5: a pixel that shows the row-major layout
        labels = [(b + i) % 10 for i in range(n_per_batch)]
        members[name] = _pickle({b"data": data, b"labels": labels})
        truth["test" if name == "test_batch" else "train"].append((data, labels))
    members["batches.meta"] = _pickle({b"label_names": [f"class{k}".encode()
                                                       for k in range(10)]})
    if evil is not None:
        members["data_batch_1"] = evil
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue(), truth


@pytest.fixture
def fake_cifar(monkeypatch, file_server):
    """CIFAR-10 served by a local mirror, its published MD5 replaced by the fake's."""
    root, url = file_server
    blob, truth = cifar_archive()
    (root / "cifar-10-python.tar.gz").write_bytes(blob)
    monkeypatch.setitem(C.ARCHIVES, "cifar10", replace(
        C.ARCHIVES["cifar10"], url=url, md5=hashlib.md5(blob).hexdigest()))
    return root, truth


def test_cifar_is_downloaded_verified_and_read_plane_by_plane(tmp_path, fake_cifar):
    _, truth = fake_cifar
    cache = tmp_path / "cache"
    data = load_data(cache, "cifar10")
    assert (cache / "cifar-10-python.tar.gz").exists()
    assert data.train_images.shape == (30, 3, 32, 32) and data.test_images.shape == (6, 3, 32, 32)
    assert data.spec.classes == tuple(f"class{k}" for k in range(10))
    # image 2 of batch 1 (the 9th training image): each plane one value, one bright red pixel
    x = data.train_images[8]
    assert x[0, 0, 5] == 255 and x[0, 0, 4] == 40 + 2 and x[1, 0, 5] == 40 + 10 + 2
    assert x[2, 31, 31] == 40 + 20 + 2
    assert data.train_labels.tolist() == [label for _, labels in truth["train"]
                                          for label in labels]
    assert data.augment is None and data.spec.augment == "crop-flip" and data.in_channels == 3
    expected = np.concatenate([d for d, _ in truth["train"]]).reshape(-1, 3, 1024) / 255
    assert data.spec.mean == pytest.approx(expected.mean((0, 2)), abs=1e-6)
    assert data.spec.std == pytest.approx(expected.std((0, 2)), abs=1e-6)
    # From the cache next time: no mirror needed.
    again = load_data(cache, "cifar10", download_missing=False)
    assert torch.equal(again.train_images, data.train_images)


def test_a_cifar_archive_is_checked_before_anything_in_it_is_unpickled(tmp_path, fake_cifar,
                                                                       monkeypatch):
    """A pickle that would run code: with the wrong checksum it is never opened; with a
    matching one (a compromised mirror and checksum), the unpickler refuses to run it."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil, _ = cifar_archive(evil=pickle.dumps(Evil()))
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "cifar-10-python.tar.gz").write_bytes(evil)
    with pytest.raises(DataError, match="checksum mismatch .* the file is corrupt or not "
                                        "the cifar10 archive"):
        load_data(folder, "cifar10")
    monkeypatch.setitem(C.ARCHIVES, "cifar10", replace(C.ARCHIVES["cifar10"],
                                                       md5=hashlib.md5(evil).hexdigest()))
    with pytest.raises(DataError, match="not a CIFAR python batch .*refusing to load "
                                        "(io|builtins).open"):
        load_data(folder, "cifar10")
    assert not marker.exists()


def test_a_download_that_is_not_the_published_archive_is_not_kept(tmp_path, fake_cifar,
                                                                  monkeypatch):
    monkeypatch.setitem(C.ARCHIVES, "cifar10", replace(C.ARCHIVES["cifar10"], md5="0" * 32))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="the download is not the published cifar10 archive"):
        load_data(cache, "cifar10")
    assert not (cache / "cifar-10-python.tar.gz").exists()
    with pytest.raises(DataError, match="not found in .*; download it from"):
        load_data(cache, "cifar10", download_missing=False)


def test_crop_flip_is_a_padded_crop_and_a_mirror_per_image():
    """The batched gather against a per-image loop: pad by 4, crop at the drawn offset,
    mirror where the third draw is >= 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 10, generator=g)
    draws = torch.rand(16, 3, generator=g) * 2 - 1
    draws[0] = torch.tensor([-1.0, 0.9999, 0.5])  # offsets 0 and 8 (the extremes), flipped
    out = crop_flip(x, draws)
    for i in range(16):
        padded = torch.nn.functional.pad(x[i], (4, 4, 4, 4))
        dy, dx = (int((draws[i, k] + 1) / 2 * 9) for k in range(2))
        crop = padded[:, dy:dy + 8, dx:dx + 10]
        assert torch.equal(out[i], crop.flip(-1) if draws[i, 2] >= 0 else crop), i
    assert out[0, :, :4].abs().sum() == 0  # shifted down by 4: the top rows are padding


def test_a_colour_loader_normalises_each_channel_and_crops_and_flips():
    images = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    mean, std = channel_statistics(images)
    loader = Loader(images, torch.zeros(40, dtype=torch.long), 40, mean=mean, std=std)
    x, _ = next(iter(loader))
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4,
                               rtol=0)
    augmented = Loader(images, torch.zeros(40, dtype=torch.long), 40, augment="crop-flip",
                       shuffle=True, seed=3, mean=mean, std=std)
    a, b = next(iter(augmented)), next(iter(Loader(images, torch.zeros(40, dtype=torch.long),
                                                   40, augment="crop-flip", shuffle=True,
                                                   seed=3, mean=mean, std=std)))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], x)  # seeded, and augmented


def _png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def image_folder(root, size=(6, 5), mode="RGB", n=3):
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = {}
    for split in ("train", "test"):
        for name in ("cat", "ant", "bee"):
            for i in range(n):
                array = rng.integers(0, 256, shape, dtype=np.uint8)
                _png(root / split / name / f"{i}.png", array)
                pixels[(split, name, i)] = array
    return pixels


def test_an_image_folder_is_read_in_class_order_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr("normlab.data.idx.default_data_dir",
                        lambda name: tmp_path / "cache" / str(name))
    monkeypatch.setattr(imagefolder, "default_data_dir",
                        lambda name: tmp_path / "cache" / str(name))
    pixels = image_folder(tmp_path / "pets")
    data = load_data(None, f"folder:{tmp_path / 'pets'}")
    assert data.spec.classes == ("ant", "bee", "cat")  # sorted by name
    assert data.train_images.shape == (9, 3, 5, 6) and data.train_labels.tolist() == \
        [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert np.array_equal(data.train_images[7].permute(1, 2, 0).numpy(),
                          pixels[("train", "cat", 1)])
    assert data.spec.augment == "crop-flip"
    assert len(list((tmp_path / "cache" / "folder-cache").glob("*.safetensors"))) == 1

    def no_decoding(*_):
        raise AssertionError("decoded again")

    monkeypatch.setattr(imagefolder, "_decode", no_decoding)
    assert torch.equal(load_data(None, f"folder:{tmp_path / 'pets'}").test_images,
                       data.test_images)
    _png(tmp_path / "pets" / "train" / "ant" / "9.png", np.zeros((5, 6, 3), np.uint8))
    with pytest.raises(AssertionError, match="decoded again"):  # a new file: a new key
        load_data(None, f"folder:{tmp_path / 'pets'}")


def test_image_folders_of_mixed_images_or_layout_are_refused(tmp_path):
    image_folder(tmp_path / "mixed")
    _png(tmp_path / "mixed" / "train" / "bee" / "big.png", np.zeros((7, 7, 3), np.uint8))
    with pytest.raises(DataError, match=r"big.png: RGB 7x7, but .* is RGB 6x5; resize"):
        load_data(None, f"folder:{tmp_path / 'mixed'}")
    (tmp_path / "flat" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="expected .*/train/<class>/\\* and .*/test/<class>"):
        load_data(None, f"folder:{tmp_path / 'flat'}")
    image_folder(tmp_path / "extra")
    _png(tmp_path / "extra" / "test" / "dog" / "0.png", np.zeros((5, 6, 3), np.uint8))
    with pytest.raises(DataError, match="class folder\\(s\\) dog are not in train/"):
        load_data(None, f"folder:{tmp_path / 'extra'}")


def write_npz(path, shape, n_train=64, n_test=32, dtype=np.float32, classes=3, **changes):
    """Inputs whose class is the sign pattern of their first channel's mean: learnable."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n)
        x = rng.normal(size=(n, *shape)).astype(np.float32)
        x[:, 0] += (y - (classes - 1) / 2).reshape(-1, *[1] * len(shape[1:])) * 1.5
        arrays[f"x_{split}"] = (x * 40 + 128).clip(0, 255).astype(dtype) \
            if dtype == np.uint8 else x.astype(dtype)
        arrays[f"y_{split}"] = y
    arrays.update(changes)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("shape, kind", [((2, 40), "signal"), ((1, 12, 12), "image"),
                                         ((1, 6, 6, 6), "volume")])
def test_npz_data_sets_of_each_kind(tmp_path, shape, kind):
    arrays = write_npz(tmp_path / "d.npz", shape, dtype=np.uint8 if kind == "image" else
                       np.float32)
    data = load_data(None, f"npz:{tmp_path / 'd.npz'}", holdout=8)
    assert data.spec.kind == kind and data.input_shape == shape and data.eval_split == \
        "validation"
    assert data.spec.augment == ("affine" if kind == "image" else "none")
    assert len(data.train_labels) == 56 and torch.equal(
        data.test_labels, torch.from_numpy(arrays["y_train"][56:]))
    assert len(data.spec.mean) == shape[0]
    if kind != "image":
        with pytest.raises(ValueError, match=f"--augment crop-flip is for images; .* holds "
                                             f"{kind}s"):
            load_data(None, f"npz:{tmp_path / 'd.npz'}", augment="crop-flip")


@pytest.mark.parametrize("changes, message", [
    ({"y_test": np.zeros((32, 2), np.int64)}, "y_test is int64 \\(32, 2\\); expected 32"),
    ({"x_test": np.zeros((32, 2, 41), np.float32)}, "x_test's inputs are \\(2, 41\\)"),
    ({"x_train": np.zeros((64, 40), np.float32)}, "x_train is 2-D"),
    ({"x_train": np.full((64, 2, 40), np.nan, np.float32)}, "NaN or infinite"),
    ({"y_train": np.full(64, -1)}, "negative labels"),
    ({"x_train": np.array([[[None] * 40] * 2] * 64, dtype=object)},
     "Object arrays cannot be loaded when allow_pickle=False"),
])
def test_bad_npz_data_sets_are_refused_in_one_line(tmp_path, changes, message):
    write_npz(tmp_path / "d.npz", (2, 40), **changes)
    with pytest.raises(DataError, match=message):
        load_data(None, f"npz:{tmp_path / 'd.npz'}")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((4, 1, 8)))
    with pytest.raises(DataError, match="has no y_train"):
        load_data(None, f"npz:{tmp_path / 'partial.npz'}")


def test_a_data_set_too_big_for_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="npz:big: 1.5 GiB in memory, 1.0 GiB available"):
        check_fits(int(1.5 * 2**30), "npz:big", available=2**30)
    check_fits(2**29, "npz:small", available=2**30)  # fits
    write_npz(tmp_path / "d.npz", (2, 40))
    monkeypatch.setattr("normlab.data.available_memory", lambda: 1000)
    with pytest.raises(DataError, match="GiB in memory"):
        load_data(None, f"npz:{tmp_path / 'd.npz'}")


def test_unknown_data_sets_name_the_choices():
    with pytest.raises(DataError, match="choose one of: mnist, fashion-mnist, cifar10, "
                                        "cifar100, folder:PATH"):
        load_data(None, "imagenet")
