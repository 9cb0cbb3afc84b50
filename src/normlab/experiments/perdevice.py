"""The per-device protocol that the statistics and remedies studies share: one optimiser
setting (global batch, learning rate, one-cycle schedule, steps, data order per seed), and
only the number of images each batch statistic covers changes, by virtual batches inside one
process, as that many devices would cut the batch.

``PerDevice`` is their common base: the protocol's options and refusals, its grid (each swept,
batch-dependent variant at every number of images per statistic, each batch-independent
reference once per seed), the data, the record's settings, and the first seed's weights. A
study overrides only what differs: which variants it sweeps, what more it records of a run
(``more_results``), its announcement, its report.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from ..checkpoint import WEIGHTS_SUFFIX, save_model
from ..data import Data, load_data
from ..engine import DEFAULTS
from ..errors import UsageError
from ..evaluate import Trained, evaluate_model
from ..model import Net
from ..options import positive_float, positive_int
from .base import Run, Settings
from .sweep import Sweep

# Epochs per run: chosen so that the statistics study's 33 runs (27 in one process, 6 on two)
# fit in about 45 minutes on the project's 2-core machine with --jobs 2; the time taken and
# the accuracies reached are in results/statistics/report.md. The remedies study keeps it.
PROTOCOL_EPOCHS = 5


def add_protocol_options(p: argparse.ArgumentParser, groups: str = "Group Norm",
                         epochs_note: str = "", seeds: bool = True) -> None:
    """The protocol's options: seeds (unless the study chooses them), epochs, the global
    batch, the learning rate, groups."""
    if seeds:
        p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], metavar="SEED")
    p.add_argument("--epochs", type=positive_int, default=PROTOCOL_EPOCHS,
                   help=f"epochs per run (default: %(default)s{epochs_note})")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"],
                   help="the global batch, the same for every run (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"],
                   help="peak learning rate of the one-cycle schedule (default: %(default)s)")
    p.add_argument("--num-groups", type=positive_int, default=DEFAULTS["num_groups"],
                   help=f"groups for {groups} (default: %(default)s)")
    p.add_argument("--limit-train", type=positive_int, metavar="N",
                   help="train on the first N training images only (quick runs)")


def protocol_runs(a: argparse.Namespace, swept: Sequence[str],
                  references: Sequence[str]) -> list[Run]:
    """Seed by seed: each swept variant at every number of images per statistic (virtual
    batches of that size, none at the whole batch), then each reference once."""
    runs = []
    for seed in a.seeds:
        for variant in swept:
            runs += [Run(variant, seed, a.batch_size, a.lr, f"{variant}/ips{ips}/seed{seed}",
                         f"{variant} {ips}/statistic",
                         virtual_batch_size=ips if ips < a.batch_size else None)
                     for ips in a.images_per_statistic]
        runs += [Run(v, seed, a.batch_size, a.lr, f"{v}/seed{seed}", v) for v in references]
    return runs


class PerDevice(Sweep):
    """A study of the per-device protocol (not a subcommand itself: no ``name``)."""

    name = ""
    fixed = ("lambda_l1",)  # no variant of these studies carries L1

    def swept(self) -> list[str]:
        """The batch-dependent variants, trained at every number of images per statistic."""
        raise NotImplementedError

    def references(self) -> list[str]:
        """The batch-independent variants, trained once per seed."""
        raise NotImplementedError

    def variants(self) -> list[str]:
        return [*self.swept(), *self.references()]

    def check(self) -> None:
        a = self.args
        if a.virtual_batch_size is not None:
            raise UsageError(f"normlab {self.name} sets the images per statistic itself: use "
                             "--images-per-statistic instead of --virtual-batch-size")
        for ips in a.images_per_statistic:
            if a.batch_size % ips:
                raise UsageError(f"--images-per-statistic {ips} does not divide --batch-size "
                                 f"{a.batch_size}; choose divisors of the batch")

    def runs(self) -> list[Run]:
        return protocol_runs(self.args, self.swept(), self.references())

    def load(self) -> Data:
        a = self.args
        return load_data(a.data_dir, a.dataset, a.limit_train, augment=a.augment)

    def recorded_variants(self) -> dict[str, list[str]]:
        """How the record's config names the variants."""
        return {"variants": self.swept(), "references": self.references()}

    def more_config(self) -> dict[str, Any]:
        """The study's own settings, recorded after the protocol's."""
        return {}

    def new_record(self, data: Data) -> dict[str, Any]:
        a = self.args
        return {"config": dict(**self.recorded_variants(),
                               images_per_statistic=a.images_per_statistic, seeds=a.seeds,
                               epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                               lambda_l1=0.0, num_groups=a.num_groups, dataset=a.dataset,
                               limit_train=a.limit_train, **self.more_config(),
                               precision=a.precision, train_images=len(data.train_labels),
                               test_images=len(data.test_labels)),
                "runs": {}}

    def grid_fields(self, run: Run, s: Settings, data: Data) -> dict[str, Any]:
        # None for the norms without batch statistics
        return {**super().grid_fields(run, s, data),
                "images_per_statistic": run.images_per_statistic(s)}

    def more_results(self, run: Run, model: Net, result: dict[str, Any], data: Data,
                     device: torch.device, s: Settings) -> dict[str, Any]:
        """What the study records of a finished run besides its grid point and curves."""
        return {}

    def result(self, run: Run, model: Net, history: dict[str, list[float]], data: Data,
               device: torch.device, s: Settings) -> dict[str, Any]:
        """The grid point with its curves and the study's own results; the first seed's
        weights too (for the figures and ``normlab evaluate``)."""
        result = {**super().result(run, model, history, data, device, s), "history": history}
        result.update(self.more_results(run, model, result, data, device, s))
        if s.writes and run.seed == self.args.seeds[0]:
            save_model(model, s.out / f"{run.stem}{WEIGHTS_SUFFIX}", variant=run.variant,
                       seed=run.seed, test_acc=result["test_acc"],
                       images_per_statistic=result["images_per_statistic"],
                       git_revision=s.revision, dataset=self.args.dataset,
                       batch_size=run.batch_size, precision=s.precision)
        return result


def inference_results(model: Net, data: Data, device: torch.device, run: Run,
                      images_per_statistic: int, s: Settings, dataset: str,
                      precise_images: int, modes: Sequence[str]) -> dict[str, Any]:
    """A trained batch-dependent run's test numbers with each of Batch Norm's inference
    remedies (``normlab.evaluate``), which need no retraining."""
    trained = Trained(dataset, run.batch_size, images_per_statistic, s.precision)
    inference = {}
    for mode in modes:
        loss, acc = evaluate_model(model, data, trained, mode, device, precise_images)
        inference[mode] = dict(test_loss=loss, test_acc=acc, test_error=100.0 - acc)
    return {"inference": inference}


def inference_summary(result: dict[str, Any]) -> str:
    """A finished run's line: its test error, each inference remedy's, its time."""
    extra = "".join(f", {mode} {r['test_error']:.2f}%"
                    for mode, r in result.get("inference", {}).items())
    return f"test error {result['test_error']:5.2f}%{extra}  {result['wall_time_s']:5.1f}s"
