"""MNIST as IDX files: reading and checking them (magic numbers, sizes, published checksums),
the download path against a local fake server, the loaders built from them, and the errors
missing or corrupt files give."""

import gzip
import hashlib
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import idx_bytes, synthetic_digits, write_dataset
from normlab import data as D
from normlab.data import DataError, Loader, load_split, random_affine


def test_parses_gzipped_and_raw_files_identically(tmp_path):
    spec = write_dataset(tmp_path / "gz", gz=True)
    write_dataset(tmp_path / "raw", gz=False)
    x_gz, y_gz = load_split("train", tmp_path / "gz", spec, download_missing=False)
    x_raw, y_raw = load_split("train", tmp_path / "raw", spec, download_missing=False)
    expected_x, expected_y = synthetic_digits(256, 0)
    assert x_gz.dtype == torch.uint8 and x_gz.shape == (256, 28, 28)
    assert torch.equal(x_gz, expected_x) and torch.equal(x_raw, expected_x)
    assert torch.equal(y_gz, expected_y) and torch.equal(y_raw, expected_y)
    assert y_gz.dtype == torch.long


def _rewrite(path: Path, content: bytes) -> None:
    path.write_bytes(gzip.compress(content))


def _content(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


@pytest.mark.parametrize("damage, message", [
    (lambda p: _rewrite(p, _content(p)[:-100]), "truncated"),
    (lambda p: _rewrite(p, _content(p) + b"\0"), "trailing bytes"),
    (lambda p: _rewrite(p, b"\0\0\x08\x01" + _content(p)[4:]), "wrong magic number 2049"),
    (lambda p: _rewrite(p, _content(p)[:1000] + b"\1" + _content(p)[1001:]), "checksum mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[:50]), "not a valid gzip file"),
    (lambda p: p.unlink(), "not found"),
])
def test_bad_image_file_is_named_with_what_is_wrong(tiny, damage, message):
    spec, folder = tiny
    path = folder / "train-images-idx3-ubyte.gz"
    damage(path)
    with pytest.raises(DataError, match=message) as err:
        load_split("train", folder, spec, download_missing=False)
    text = str(err.value)
    assert "train-images-idx3-ubyte" in text and "\n" not in text
    assert any(word in text for word in ("delete it", "copy", "replace"))  # says what to do


def test_count_mismatch_between_images_and_labels(tmp_path):
    spec = write_dataset(tmp_path)
    images, _ = synthetic_digits(256)
    _, labels = synthetic_digits(200)
    data = idx_bytes(labels, D.LABEL_MAGIC)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(data))
    files = dict(spec.files)
    files["train-labels"] = ("train-labels-idx1-ubyte", hashlib.md5(data).hexdigest())
    with pytest.raises(DataError, match="256 images and 200 labels, expected 256"):
        load_split("train", tmp_path, replace(spec, files=files), download_missing=False)


def _replace_file(folder: Path, spec: D.DatasetSpec, key: str, tensor: torch.Tensor,
                  magic: int) -> D.DatasetSpec:
    """Write ``tensor`` as the IDX file ``key`` and return a spec whose checksum accepts it,
    so that the check after the checksum is what answers."""
    data = idx_bytes(tensor, magic)
    name = spec.files[key][0]
    (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    return replace(spec, files={**spec.files, key: (name, hashlib.md5(data).hexdigest())})


def test_labels_beyond_the_classes_are_refused(tmp_path):
    spec = write_dataset(tmp_path)
    _, labels = synthetic_digits(256)
    labels[17] = 12
    spec = _replace_file(tmp_path, spec, "train-labels", labels, D.LABEL_MAGIC)
    with pytest.raises(DataError, match="train labels go up to 12, expected fewer than 10 "
                                        "classes; replace the train files"):
        load_split("train", tmp_path, spec, download_missing=False)


@pytest.mark.parametrize("shape", [(256, 784), (256, 28, 28, 1)])
def test_images_that_are_not_n_by_h_by_w_are_refused(tmp_path, shape):
    """An IDX file's magic number states its dimensions: a 2-D or 4-D "image" file, even with
    a matching checksum, is refused by it (so every split that loads is N x H x W)."""
    spec = write_dataset(tmp_path)
    magic = 0x800 + len(shape)
    spec = _replace_file(tmp_path, spec, "train-images", torch.zeros(shape, dtype=torch.uint8),
                         magic)
    with pytest.raises(DataError, match=f"wrong magic number {magic} \\(expected 2051\\); "
                                        "not an IDX image file"):
        load_split("train", tmp_path, spec, download_missing=False)


def test_unreadable_file_says_permission_denied(tiny, monkeypatch):
    spec, folder = tiny
    original = Path.read_bytes

    def deny(self):  # root ignores chmod, so simulate the OS refusing the read
        if self.name.startswith("test-labels"):
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError, match="test-labels.*permission denied.*chmod"):
        load_split("test", folder, spec, download_missing=False)


def test_data_dir_that_is_a_file(tmp_path, tiny):
    spec, _ = tiny
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        load_split("train", f, spec)


def test_data_dir_precedence(tmp_path, monkeypatch, tiny):
    spec, folder = tiny
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    assert D.resolve_data_dir(tmp_path / "arg", spec) == tmp_path / "arg"
    assert D.resolve_data_dir(None, spec) == tmp_path / "env"
    monkeypatch.delenv(D.ENV_VAR)
    with_system = replace(spec, system_dirs=(str(tmp_path / "nowhere"), str(folder)))
    assert D.resolve_data_dir(None, with_system) == folder
    assert D.resolve_data_dir(None, spec) == D.default_data_dir(spec)
    assert "normlab" in str(D.default_data_dir(spec))


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def test_missing_files_are_downloaded_from_the_first_working_mirror(tmp_path, file_server):
    root, url = file_server
    spec = write_dataset(root)
    spec = replace(spec, mirrors=(_closed_port_url(), url))  # first mirror is down
    cache = tmp_path / "cache" / "tiny"
    images, labels = load_split("test", cache, spec)
    assert torch.equal(images, synthetic_digits(128, 1)[0])
    assert torch.equal(labels, synthetic_digits(128, 1)[1])
    assert sorted(p.name for p in cache.iterdir()) == ["test-images-idx3-ubyte.gz",
                                                       "test-labels-idx1-ubyte.gz"]


def test_downloaded_file_with_wrong_content_is_refused(tmp_path, file_server):
    root, url = file_server
    spec = write_dataset(root)
    files = dict(spec.files)
    files["test-labels"] = (files["test-labels"][0], "0" * 32)
    spec = replace(spec, files=files, mirrors=(url,))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_split("test", tmp_path / "cache", spec)


def test_no_network_gives_one_line_with_what_to_do(tmp_path, tiny):
    spec, _ = tiny
    spec = replace(spec, mirrors=(_closed_port_url(), _closed_port_url()))
    with pytest.raises(DataError, match="download failed") as err:
        load_split("train", tmp_path / "empty", spec)
    assert "\n" not in str(err.value) and "copy the four" in str(err.value)


def test_real_mnist_passes_its_published_checksums(mnist_dir):
    images, labels = load_split("test", mnist_dir, download_missing=False)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert torch.bincount(labels).tolist()[:3] == [980, 1135, 1032]  # published class counts


# ----------------------------------------------------------------------------- the loader


def _loader(n=100, **kwargs):
    images, labels = synthetic_digits(n)
    return Loader(images, labels, 32, **kwargs)


def test_batches_cover_the_split_once_with_the_right_shapes():
    loader = _loader(shuffle=True, seed=3)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    assert all(x.shape == (len(y), 1, 28, 28) and x.dtype == torch.float32 for x, y in batches)
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(seen.sort().values, loader.labels.sort().values)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_of_every_global_batch_add_up_to_the_one_process_batch(world):
    """Each rank's part of each global batch, joined in rank order, is exactly what one
    process trains on: the same images (augmented alike, to float rounding) and labels; the
    short last batch (100 = 3 x 32 + 4) is cut as torch.tensor_split cuts it."""
    whole = list(_loader(shuffle=True, augment=True, seed=5))
    shards = [list(_loader(shuffle=True, augment=True, seed=5, shard=(r, world)))
              for r in range(world)]
    for i, (x, y) in enumerate(whole):
        parts = [shard[i] for shard in shards]
        assert [len(p[1]) for p in parts] == [len(t) for t in y.tensor_split(world)]
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=1e-5)
    assert _loader(shard=(0, world)).batch_length(3) == 4


def test_batches_are_normalised():
    images, labels = synthetic_digits(64)
    x, _ = next(iter(Loader(images, labels, 64, mean=0.2, std=0.5)))
    torch.testing.assert_close(x[:, 0], (images.float() / 255 - 0.2) / 0.5)


def test_same_seed_same_batches_other_seed_other_batches():
    def first(seed):
        x, y = next(iter(_loader(shuffle=True, augment=True, seed=seed)))
        return x, y

    a, b, c = first(7), first(7), first(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_augmentation_keeps_labels_and_shapes_and_changes_pixels():
    plain = list(_loader(shuffle=True, seed=5))
    augmented = list(_loader(shuffle=True, augment=True, seed=5))
    for (xp, yp), (xa, ya) in zip(plain, augmented, strict=True):
        assert torch.equal(yp, ya) and xp.shape == xa.shape
    # Same order of examples (the permutation is drawn first), but different pixels.
    assert not torch.allclose(plain[0][0], augmented[0][0])


def test_random_affine_with_zero_ranges_is_the_identity():
    x = torch.rand(8, 1, 28, 28)
    out = random_affine(x, torch.Generator().manual_seed(0), degrees=0, translate=0, scale=0)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_random_affine_shift_moves_content_by_at_most_the_range():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 13:15, 13:15] = 1.0  # a 2x2 blob in the middle
    out = random_affine(x, torch.Generator().manual_seed(0), degrees=0, translate=2, scale=0)
    rows = torch.arange(28.0).view(1, 28, 1)
    centre = (out[:, 0] * rows).sum((1, 2)) / out[:, 0].sum((1, 2))
    assert (centre - 13.5).abs().max() <= 2 + 1e-4
    assert (centre - 13.5).abs().max() > 0.5  # it did move some of them
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)), atol=1e-3, rtol=1e-3)


def test_loader_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch size must be positive"):
        Loader(*synthetic_digits(4), 0)
