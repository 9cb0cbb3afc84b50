"""Runs the real ``normlab`` CLI on a small synthetic dataset, as a script that torchrun (or
a plain Python) can start; what it does is set by environment variables:

NORMLAB_TEST_DATA  folder for the dataset; each rank writes its own copy (its "machine")
NORMLAB_TEST_TRAIN training images (default 1024); NORMLAB_TEST_TEST test images (200)
NORMLAB_TEST_NOISY=1: noisy_digits
NORMLAB_TEST_F64=1 train in float64 (exact oracles); NORMLAB_TEST_BAD_RANK=r: that rank's
                   training images are truncated (bad data on one machine)
It writes its pid to <data>/<rank>/pid, so a test can kill one rank.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from conftest import write_dataset  # noqa: E402
from normlab import data as D  # noqa: E402
from normlab.cli import main  # noqa: E402

if __name__ == "__main__":  # --jobs workers re-import this file: only the launch runs main
    env = os.environ
    if env.get("NORMLAB_TEST_F64"):
        torch.set_default_dtype(torch.float64)
    rank = env.get("RANK", "0")
    folder = Path(env["NORMLAB_TEST_DATA"]) / rank
    D.DATASETS["mnist"] = write_dataset(folder, n_train=int(env.get("NORMLAB_TEST_TRAIN", 1024)),
                                        n_test=int(env.get("NORMLAB_TEST_TEST", 200)),
                                        noisy=bool(env.get("NORMLAB_TEST_NOISY")))
    if env.get("NORMLAB_TEST_BAD_RANK") == rank:
        images = folder / "train-images-idx3-ubyte.gz"
        images.write_bytes(images.read_bytes()[:1000])
    env[D.ENV_VAR] = str(folder)
    (folder / "pid").write_text(str(os.getpid()))
    sys.exit(main(sys.argv[1:]))
