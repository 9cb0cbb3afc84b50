"""The package as users get it: an sdist and a wheel built by ``python -m build``, the wheel
installed into a fresh virtual environment outside the checkout, and run from there, so a
module missing from the package or a path relative to the checkout fails here."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, real_mnist_dir
from normlab import __version__

pytest.importorskip("build")


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    # No flags: build the sdist, then the wheel from the sdist (so the sdist must be whole).
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("normlab-*.whl"))
    assert next(dist.glob("normlab-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("cli", "runner", "experiments/compare", "norms", "distributed", "engine",
                   "data/__init__", "data/cifar", "modelspec", "api", "checkpoint",
                   "explain/compute"):
        assert f"normlab/{module}.py" in names
    assert not any(n.startswith("tests/") for n in names)

    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                   timeout=120)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", str(wheel)], check=True, timeout=300)
    # The dependencies (torch etc.) come from this environment, added after the fresh one's
    # own site-packages; normlab itself must come from the wheel.
    fresh = subprocess.run([str(python), "-c", "import sysconfig; "
                            "print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                           text=True, check=True).stdout.strip()
    Path(fresh, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NORMLAB_DATA")}
    normlab = str(env_dir / "bin" / "normlab")

    def run(*args: str, **extra: str) -> str:
        done = subprocess.run([normlab, *args], cwd=tmp_path, env={**env, **extra},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    where = subprocess.run([str(python), "-c", "import normlab; print(normlab.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(env_dir)), where.stdout + where.stderr
    assert run("--version").strip() == f"normlab {__version__}"  # no git checkout there
    assert "Batch Norm" in run("explain")
    mnist = real_mnist_dir()
    if mnist is None:  # the tiny compare below needs the real files (checked by their MD5s)
        pytest.skip("the wheel installs and runs; its compare needs the real MNIST: set "
                    "NORMLAB_DATA to a folder with the IDX files")
    out = run("compare", "--variants", "gn", "--epochs", "1", "--limit-train", "500",
              "--no-progress", "--out", "run", NORMLAB_DATA=str(mnist))
    assert "report: run/report.md" in out
    assert (tmp_path / "run" / "gn-seed1.safetensors").exists()
