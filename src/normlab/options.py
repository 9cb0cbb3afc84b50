"""The command-line options that every experiment shares, and the types that check them.

An experiment adds its own options (its grid) in ``add_arguments`` and calls
``add_model_options`` / ``add_run_options`` for the rest, so every training command spells
data, output, device, precision, resume and parallelism the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .data import AUGMENTS, NAMED
from .device import PRECISIONS
from .engine import DEFAULTS
from .variants import VARIANTS


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def dataset_arg(text: str) -> str:
    """A data set's name, ``folder:PATH`` or ``npz:PATH``; a bare path to a folder or a
    ``.npz`` file is taken as such. Paths are made absolute, so the record names the same
    data from any working directory (``evaluate``, ``--resume``)."""
    kind, sep, where = text.partition(":")
    if text in NAMED:
        return text
    if sep and kind in ("folder", "npz") and where:
        return f"{kind}:{Path(where).expanduser().resolve()}"
    path = Path(text).expanduser()
    if path.suffix.lower() == ".npz":
        return f"npz:{path.resolve()}"
    if path.is_dir():
        return f"folder:{path.resolve()}"
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(NAMED)}, folder:PATH, "
                                     f"npz:PATH, a folder or a .npz file, got {text!r}")


def jobs_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or auto, got "
                                         f"{text!r}") from None


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def add_model_options(p: argparse.ArgumentParser, default: tuple[str, ...]) -> None:
    """--variants (default ``default``) and --num-groups."""
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(default),
                   metavar="VARIANT", help=f"which variants (default: {' '.join(default)}; "
                   f"choices: {', '.join(VARIANTS)})")
    p.add_argument("--num-groups", type=positive_int, default=DEFAULTS["num_groups"],
                   help="groups for Group Norm; must divide every layer's channels (default: 4)")


def add_model_spec_options(p: argparse.ArgumentParser) -> None:
    """--model and --model-arg: the user's network (every study, and ``summary``)."""
    p.add_argument("--model", metavar="SPEC",
                   help="train your own network instead of normlab's small CNN: "
                   "package.module:callable or path/to/file.py:callable returning an "
                   "nn.Module; each variant is it with its norms converted "
                   "(normlab.norms.convert)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="a keyword argument of the --model callable, as a Python literal "
                   "(repeatable); in_channels and num_classes come from the data unless set")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options every training command shares: data, output, device, L1, resume, parallelism."""
    p.add_argument("--l1", type=non_negative_float, default=DEFAULTS["lambda_l1"],
                   metavar="LAMBDA", help="L1 weight for variants with L1 (default: %(default)s)")
    add_model_spec_options(p)
    p.add_argument("--dataset", type=dataset_arg, default="mnist", metavar="DATASET",
                   help=f"{', '.join(NAMED)}; folder:PATH (PATH/train/<class>/*.png|jpg and "
                   f"PATH/test/<class>/*); or npz:PATH (x_train, y_train, x_test, y_test: "
                   f"signals, images or volumes); a bare folder or .npz path is taken as such "
                   f"(default: mnist)")
    p.add_argument("--data-dir", help="folder with the dataset's files (default: "
                   "$NORMLAB_DATA for mnist, $NORMLAB_FASHION_MNIST_DATA or Debian's "
                   "dataset-fashion-mnist for fashion-mnist, else a per-user cache; missing "
                   "files are downloaded)")
    p.add_argument("--augment", choices=list(AUGMENTS), help="the training augmentation: "
                   + "; ".join(f"{a.name}: {a.what}" for a in AUGMENTS.values())
                   .replace("%", "%%")  # argparse formats help with %
                   + " (default: affine for one-channel images, crop-flip for colour images, "
                   "none for signals and volumes)")
    p.add_argument("--out", type=Path, help="output folder (default: a new folder under runs/)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS["precision"],
                   help="fp32, bf16 (bfloat16 mixed precision: faster, but Group Norm lost "
                   "0.07 points over 3 seeds), or auto: bf16 where the hardware has it "
                   "(CUDA, CPUs with AVX512-BF16 or AMX), else fp32 (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", type=Path, metavar="OUTDIR",
                   help="continue the run in OUTDIR with its own settings: finished work is "
                   "kept, the interrupted model continues from its last finished epoch")
    p.add_argument("--virtual-batch-size", type=positive_int, metavar="B",
                   help="Batch Norm computes its training statistics over each B images of "
                   "a batch, as batch/B devices would (ghost batch norm); B must divide the "
                   "batch per process")
    p.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="log every run's per-epoch losses, accuracies and learning rate to "
                   "DIR, one TensorBoard run per variant and seed (needs normlab[tensorboard]; "
                   "view with: tensorboard --logdir DIR)")
    p.add_argument("--jobs", type=jobs_arg, default="auto", metavar="N",
                   help="train N independent runs at a time in separate processes, each "
                   "with max(1, cores // N) threads; auto: one run per core on a CPU when "
                   "several runs train batches under 64 images (where that measured faster), "
                   "else one at a time (default: auto)")
    p.add_argument("--threads", type=positive_int, metavar="T",
                   help="torch threads per process (default: all cores for one process; "
                   "cores // N for --jobs N; cores // processes per machine under torchrun)")
