"""Shared fixtures: small IDX datasets written on the fly, and the real MNIST when present."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from normlab.data import IMAGE_MAGIC, LABEL_MAGIC, DatasetSpec

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "dist_driver.py"  # the real CLI on synthetic data (NORMLAB_TEST_*)


def idx_bytes(tensor: torch.Tensor, magic: int) -> bytes:
    """Encode a uint8 tensor as an IDX file (the inverse of normlab.data.parse_idx)."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def synthetic_digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Easy-to-learn 28x28 images: class k is a bright 6x6 block at a class-specific spot."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = (torch.rand(n, 28, 28, generator=g) * 40).to(torch.uint8)
    for i, k in enumerate(labels.tolist()):
        r, c = 3 + 8 * (k // 4), 3 + 6 * (k % 4)
        images[i, r:r + 6, c:c + 6] = 255
    return images, labels


def noisy_digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k is a soft blob at a class-specific spot on dense noise: no flat or saturated
    regions, so no exact ties in max-pooling and few activations at ReLU's kink. Training on
    them is a smooth function of the arithmetic, which the multi-process oracles need (a
    rounding difference that flips a tie changes a gradient by its full size)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centres = torch.tensor([[6 + 8 * (k // 4), 5 + 6 * (k % 4)] for k in range(10)]).float()
    c = centres[labels]
    blob = torch.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / 8)
    images = 30 + 150 * blob + 60 * torch.rand(n, 28, 28, generator=g)
    return images.round().to(torch.uint8), labels


def write_dataset(folder: Path, n_train: int = 256, n_test: int = 128, gz: bool = True,
                  name: str = "tiny", mirrors: tuple[str, ...] = (), noisy: bool = False
                  ) -> DatasetSpec:
    """Write four IDX files into ``folder`` and return a spec whose checksums match them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = (noisy_digits if noisy else synthetic_digits)(n, seed)
        for kind, tensor, magic in (("images", images, IMAGE_MAGIC),
                                    ("labels", labels, LABEL_MAGIC)):
            fname = f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
            data = idx_bytes(tensor, magic)
            target = folder / (fname + ".gz" if gz else fname)
            target.write_bytes(gzip.compress(data) if gz else data)
            files[f"{split}-{kind}"] = (fname, hashlib.md5(data).hexdigest())
    return DatasetSpec(name=name, files=files, counts={"train": n_train, "test": n_test},
                       mirrors=mirrors, classes=tuple("0123456789"), mean=0.1, std=0.3)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[DatasetSpec, Path]:
    folder = tmp_path / "tiny"
    return write_dataset(folder), folder


@pytest.fixture
def tiny_mnist(tiny, monkeypatch) -> tuple[DatasetSpec, Path]:
    """Make the CLI's "mnist" the tiny synthetic set, so end-to-end runs take seconds."""
    from normlab import data

    spec, folder = tiny
    monkeypatch.setitem(data.DATASETS, "mnist", spec)
    return spec, folder


def cli_error(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the CLI expecting it to fail; (exit code, last line of stderr), no traceback."""
    from normlab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_.value.code, err.strip().splitlines()[-1]


def real_mnist_dir() -> Path | None:
    """The real MNIST files: $NORMLAB_DATA, else ../shared/data/mnist beside the checkout."""
    for candidate in (os.environ.get("NORMLAB_DATA"), REPO.parent / "shared/data/mnist"):
        if candidate and (Path(candidate) / "t10k-labels-idx1-ubyte.gz").exists():
            return Path(candidate)
    return None


@pytest.fixture
def mnist_dir() -> Path:
    folder = real_mnist_dir()
    if folder is None:
        pytest.skip("real MNIST not available: set NORMLAB_DATA to a folder with the IDX files")
    return folder


def default_sigint() -> None:
    """``preexec_fn`` for children a test interrupts: SIGINT back to its default, since a
    shell starting the test suite in the background (``cmd &``) leaves it ignored, and
    Python then installs no KeyboardInterrupt handler in its children."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- processes a test starts: bounded in time, every port and process freed

TIMEOUT = 120  # seconds any launched run may take before the test fails it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """Wait for a launched run (started with ``start_new_session=True``); kill its whole
    process group if it overruns, and fail the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"run did not finish in {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def launch(args: list[str], env: dict[str, str], nproc: int = 0, cwd: Path | None = None,
           torchrun: list[str] | None = None) -> subprocess.Popen:
    """Start tests/dist_driver.py: plainly (nproc 0) or under torchrun with nproc processes,
    in a session of its own so that ``finish`` can kill all of it."""
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run",
                   *(torchrun or ["--standalone"]), "--nproc-per-node", str(nproc), str(DRIVER)]
    else:
        command = [sys.executable, str(DRIVER)]
    return subprocess.Popen(command + args, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    """Wait until ``path`` exists (a checkpoint, say) while ``proc`` still runs."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server standing in for a dataset mirror (no network needed)."""
    root = tmp_path / "mirror"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
