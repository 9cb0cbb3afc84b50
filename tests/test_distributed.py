"""Data parallelism against its oracles: synchronized and virtual-batch Batch Norm against
``nn.BatchNorm2d``, K-process runs against one-process runs, and what happens when a rank
fails. Multi-process runs use gloo on 127.0.0.1, two processes, each bounded in time.

Oracle tolerances: the layer tests run in float32 against PyTorch's own Batch Norm (1e-5
relative and absolute); the training-run comparisons run in float64 (the driver sets the
default dtype), where one process and two agree to 1e-9 after 32 SGD steps while plain
Batch Norm over two devices differs from one process by more than 1e-2. In float32 a
rounding difference can flip a ReLU or max-pool tie and then grow, so float32 runs are
compared only with float32 runs of the same arithmetic (resume, --jobs: bit for bit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import TIMEOUT, cli_error, finish, free_port, launch, wait_for
from normlab import distributed, runner
from normlab.checkpoint import read_weights
from normlab.engine import virtual_batches_per_process
from normlab.norms import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm2d, make_norm

TESTS = Path(__file__).resolve().parent
CLOSE = dict(rtol=1e-5, atol=1e-5)


# -- the layers, against nn.BatchNorm2d -------------------------------------------------

def _sync_rank(rank: int, world: int, port: int, cases: list[dict]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        for case in cases:
            _sync_case(rank, **case)
    finally:
        dist.destroy_process_group()


def _sync_case(rank: int, sizes: list[int], momentum: float | None, spatial: tuple[int, ...],
               affine: bool = True, renorm: bool = False, bf16: bool = False) -> None:
    """One layer on this rank's part of the batch against the same layer over the whole
    batch in one process: nn.BatchNorm1d/2d/3d, or for Batch Renorm normlab's own
    (tested against the paper's formula in test_layers.py)."""
    dims = max(1, len(spatial))
    label = f"sizes {sizes}, spatial {spatial}, momentum {momentum}, affine {affine}, " \
            f"renorm {renorm}, bf16 {bf16}"
    torch.manual_seed(0)
    x = torch.randn(sum(sizes), 5, *spatial) * 3 + 1
    upstream = torch.randn_like(x)
    close = CLOSE
    if bf16:  # bfloat16 input (as under autocast): statistics in float32, output bfloat16
        x = x.bfloat16().float()  # the oracle sees exactly the values the layer gets
        upstream = upstream.bfloat16().float()  # and the same upstream gradient
        close = dict(rtol=1e-2, atol=5e-2)  # for what is rounded to bfloat16: y and dy/dx
    if renorm:
        oracle = BatchRenorm2d(5, momentum=momentum, r_max=1.5, d_max=0.5)
        layer = BatchRenorm2d(5, momentum=momentum, r_max=1.5, d_max=0.5, sync=True)
        oracle.running_mean.uniform_(-1, 3)  # so that r and d clip
    else:
        oracle = LAYERS[dims][1](5, momentum=momentum, affine=affine)
        layer = LAYERS[dims][0](5, momentum=momentum, affine=affine, sync=True)
    if affine:
        oracle.weight.data.uniform_(0.5, 1.5)
        oracle.bias.data.uniform_(-1, 1)
    layer.load_state_dict(oracle.state_dict())
    lo = sum(sizes[:rank])
    part = slice(lo, lo + sizes[rank])
    for _ in range(2):  # two steps: running statistics are checked after two updates
        xo = x.clone().requires_grad_()
        yo = oracle(xo)
        (yo * upstream).sum().backward()
        xl = x[part].clone().to(torch.bfloat16 if bf16 else x.dtype).requires_grad_()
        y = layer(xl)
        assert y.dtype == xl.dtype
        (y * upstream[part]).sum().backward()
        torch.testing.assert_close(y.float(), yo[part], **close, msg=lambda m: f"{label}: {m}")
        torch.testing.assert_close(xl.grad.float(), xo.grad[part], **close,
                                   msg=lambda m: f"{label}: {m}")
        for name in ("weight", "bias") if affine else ():  # each rank holds its share
            grad = getattr(layer, name).grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, getattr(oracle, name).grad, **CLOSE,
                                       msg=lambda m, n=name: f"{label}, {n}: {m}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(layer, name), getattr(oracle, name), **CLOSE,
                                       msg=lambda m, n=name: f"{label}, {n}: {m}")
        layer.zero_grad()
        oracle.zero_grad()
        x = x * 0.5 + 2
        if bf16:
            x = x.bfloat16().float()


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` processes; fail after TIMEOUT."""
    context = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "ranks did not finish in time"
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


SYNC_CASES = [
    dict(sizes=[6, 6], momentum=0.1, spatial=(6, 6)),
    dict(sizes=[7, 2], momentum=0.1, spatial=(16, 16)),
    dict(sizes=[5, 3], momentum=None, spatial=(6, 6)),
    dict(sizes=[5, 0], momentum=0.1, spatial=(6, 6)),
    dict(sizes=[6, 5], momentum=0.1, spatial=(6, 6), affine=False),
    dict(sizes=[9, 4], momentum=0.1, spatial=()),
    dict(sizes=[7, 2], momentum=None, spatial=(9,)),
    dict(sizes=[3, 2], momentum=0.1, spatial=(3, 4, 5)),
    dict(sizes=[2, 0], momentum=0.1, spatial=(2, 3, 3)),
    dict(sizes=[7, 3], momentum=0.1, spatial=(6, 6), renorm=True),
    dict(sizes=[6, 4], momentum=0.1, spatial=(6, 6), bf16=True),
]


def test_sync_batchnorm_over_two_ranks_equals_batchnorm_over_the_whole_batch():
    """Outputs, input gradients, weight/bias gradients and running statistics, on (N, C),
    (N, C, L), (N, C, H, W) and (N, C, D, H, W) inputs, with unequal per-rank batches, a
    rank with no images, momentum=None (cumulative average), affine=False, small and large
    maps, bfloat16 input (statistics in float32), and synchronized Batch Renorm with its
    clipping active. All cases in one pair of
    processes (starting them costs more than the cases)."""
    spawn(_sync_rank, SYNC_CASES)


LAYERS = {1: (BatchNorm1d, nn.BatchNorm1d), 2: (BatchNorm2d, nn.BatchNorm2d),
          3: (BatchNorm3d, nn.BatchNorm3d)}
SPATIAL = {"N,C": (1, ()), "N,C,L": (1, (9,)), "N,C,H,W": (2, (16, 16)),
           "N,C,D,H,W": (3, (3, 4, 5))}


@pytest.mark.parametrize("layout", list(SPATIAL))
@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"momentum": None}],
                         ids=["affine", "no-affine", "cumulative"])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("n, parts", [(128, 2), (96, 4), (7, 2), (9, 4)])
def test_virtual_batches_equal_batchnorm_on_each_part(n, parts, fast, kwargs, layout):
    """Each part normalised exactly as nn.BatchNorm1d/2d/3d would normalise it alone (outputs,
    input, weight and bias gradients, with a random shift as well as scale); the running
    statistics are the mean of the parts' (what averaging K devices' gives), also as a
    cumulative average; with PyTorch's kernel and with the fast statistics (which apply to
    maps of 256 values or more: the 16x16 case)."""
    dims, spatial = SPATIAL[layout]
    ours, theirs = LAYERS[dims]
    torch.manual_seed(1)
    x = (torch.randn(n, 5, *spatial) * 3 + 1).requires_grad_()
    upstream = torch.randn_like(x)
    layer = ours(5, virtual_batches=parts, fast=fast, **kwargs)
    if layer.affine:
        layer.weight.data.uniform_(0.5, 1.5)
        layer.bias.data.uniform_(-1, 1)
    oracles = [theirs(5, **kwargs) for _ in range(parts)]
    xo = x.detach().clone().requires_grad_()
    outputs = []
    for oracle, part in zip(oracles, xo.tensor_split(parts), strict=True):
        oracle.load_state_dict(layer.state_dict())
        outputs.append(oracle(part))
    (layer(x) * upstream).sum().backward()
    (torch.cat(outputs) * upstream).sum().backward()
    torch.testing.assert_close(layer(x.detach()), torch.cat(outputs).detach(), **CLOSE)
    torch.testing.assert_close(x.grad, xo.grad, **CLOSE)
    if layer.affine:
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(layer, name).grad,
                                       sum(getattr(o, name).grad for o in oracles), **CLOSE)
    # the layer ran twice (above, and in the check): two updates for each oracle too
    for oracle, part in zip(oracles, xo.detach().tensor_split(parts), strict=True):
        oracle(part)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layer, name),
                                   torch.stack([getattr(o, name) for o in oracles]).mean(0),
                                   **CLOSE)


def test_one_process_sync_and_virtual_layers_are_plain_batchnorm_with_its_state_dict():
    torch.manual_seed(2)
    x = torch.randn(16, 4, 5, 5)
    plain, synced = nn.BatchNorm2d(4), make_norm("syncbatch", 4)
    assert isinstance(synced, nn.BatchNorm2d)
    assert synced.state_dict().keys() == plain.state_dict().keys()
    synced.load_state_dict(plain.state_dict())
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)  # one process: is BN
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=0, atol=0)
    ghost = make_norm("batch", 4, virtual_batches=2).eval()
    ghost.load_state_dict(plain.state_dict())
    torch.testing.assert_close(ghost(x), plain.eval()(x), rtol=0, atol=0)  # eval: running


def test_impossible_layer_combinations_are_refused():
    with pytest.raises(ValueError, match="does not combine with virtual batches"):
        make_norm("syncbatch", 4, virtual_batches=2)
    with pytest.raises(ValueError, match="cannot also use virtual batches"):
        BatchNorm2d(4, sync=True, virtual_batches=2)


# -- whole runs: torchrun against one process -------------------------------------------

def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "NORMLAB_TEST_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
            distributed.TIMEOUT_ENV: "60", "PYTHONUNBUFFERED": "1", **extra}


def run(args: list[str], env: dict[str, str], nproc: int = 0, **kw) -> tuple[str, str]:
    code, out, err = finish(launch(args, env, nproc, **kw))
    assert code == 0, out + err
    return out, err


def weights(folder: Path, variant: str) -> dict[str, torch.Tensor]:
    """A run's weights as saved (float64 in the float64 runs)."""
    return read_weights(folder / f"{variant}-seed1.safetensors")[1]


def max_difference(a: tuple[Path, str], b: tuple[Path, str], running: bool = False) -> float:
    wa, wb = weights(*a), weights(*b)
    keys = [k for k in wa if "num_batches" not in k and ("running" in k) == running]
    return max((wa[k] - wb[k]).abs().max().item() for k in keys)


COMMON = ["compare", "--epochs", "2", "--batch-size", "64", "--no-progress", "--device", "cpu"]


def test_two_ranks_equal_one_process_in_float64(tmp_path):
    """32 SGD steps (2 epochs of 1,001 images, global batch 64: every epoch ends on a batch
    of 41, split 21/20, so the loss weighting by each rank's share and synchronized BN with
    unequal rank batches count) on each side: GN over 2 ranks = GN in 1 process; SBN over 2
    ranks = BN in 1 process; BN over 2 ranks = BN with --virtual-batch-size 32 in 1 process;
    and, as the control that shows the test can fail, BN over 2 ranks != BN in 1 process.
    2,500 test images in batches of 1,000: rank 0 evaluates two batches, rank 1 one, and the
    sums over ranks must give one process's numbers."""
    env = _env(tmp_path, NORMLAB_TEST_F64="1", NORMLAB_TEST_NOISY="1",
               NORMLAB_TEST_TRAIN="1001", NORMLAB_TEST_TEST="2500")
    two, one, ghost = tmp_path / "two", tmp_path / "one", tmp_path / "ghost"
    out, _ = run([*COMMON, "--variants", "gn", "sbn", "bn", "--out", str(two)], env, nproc=2)
    run([*COMMON, "--variants", "gn", "bn", "--out", str(one), "--threads", "1"], env)
    run([*COMMON, "--variants", "bn", "--virtual-batch-size", "32", "--out", str(ghost)], env)

    assert weights(two, "gn")["head.weight"].dtype == torch.float64
    assert max_difference((two, "gn"), (one, "gn")) < 1e-9
    assert max_difference((two, "sbn"), (one, "bn")) < 1e-9
    assert max_difference((two, "sbn"), (one, "bn"), running=True) < 1e-9
    assert max_difference((two, "bn"), (ghost, "bn")) < 1e-9
    assert max_difference((two, "bn"), (ghost, "bn"), running=True) < 1e-9
    assert max_difference((two, "bn"), (one, "bn")) > 1e-2  # the control

    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["config"]["world_size"] == 2
    assert metrics["parallel"] == dict(world_size=2, nodes=1, backend="gloo",
                                       images_per_device=32, jobs=1, threads_per_process=1)
    ones = json.loads((one / "metrics.json").read_text())["variants"]
    for a, b in (("gn", "gn"), ("sbn", "bn")):  # evaluation on 2 ranks = on 1 process
        ha, hb = metrics["variants"][a]["runs"][0]["history"], ones[b]["runs"][0]["history"]
        assert ha["test_acc"] == hb["test_acc"]
        assert ha["test_loss"] == pytest.approx(hb["test_loss"], abs=1e-9)
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-9)
    report = (two / "report.md").read_text()
    assert "2 processes" in report and "32 images per device" in report
    assert "rank 0" not in out  # progress lines come from rank 0 alone, unprefixed
    assert out.count("  gn epoch  1/2") == 1


def test_two_machines_on_localhost_write_one_report(tmp_path):
    """Two torchrun launchers, --nnodes 2, one process each, meet at a c10d rendezvous on
    127.0.0.1; each runs in its own folder, and only rank 0's writes anything."""
    env = _env(tmp_path)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node in (0, 1):
        cwd = tmp_path / f"machine{node}"
        cwd.mkdir()
        flags = ["--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", endpoint, "--rdzv-id", "normlab-test"]
        nodes.append((cwd, launch(["compare", "--variants", "gn", "--epochs", "1",
                                   "--batch-size", "64", "--no-progress", "--out", "run"],
                                  env, nproc=1, cwd=cwd, torchrun=flags)))
    for _, proc in nodes:
        code, out, err = finish(proc)
        assert code == 0, out + err
    assert (tmp_path / "machine0" / "run" / "report.md").exists()
    assert not (tmp_path / "machine1" / "run").exists()
    parallel = json.loads((tmp_path / "machine0/run/metrics.json").read_text())["parallel"]
    assert parallel["world_size"] == 2 and parallel["nodes"] == 2


def test_killed_rank_stops_every_rank_and_resume_equals_uninterrupted(tmp_path):
    env = _env(tmp_path, NORMLAB_TEST_TRAIN="1600")
    args = ["compare", "--variants", "gn", "bn", "--epochs", "3", "--batch-size", "32",
            "--no-progress"]
    whole, out = tmp_path / "whole", tmp_path / "killed"
    run([*args, "--out", str(whole)], env, nproc=2)

    proc = launch([*args, "--out", str(out)], env, nproc=2)
    wait_for(out / "checkpoints" / "bn-seed1.ckpt", proc)  # gn done, bn one epoch in
    os.kill(int((tmp_path / "data" / "1" / "pid").read_text()), signal.SIGKILL)
    started = time.monotonic()
    code, stdout, stderr = finish(proc)
    assert code != 0 and time.monotonic() - started < 30
    line = next(x for x in stderr.splitlines() if x.startswith("normlab compare: rank 0:"))
    assert "rank 1 stopped or lost contact; every finished epoch is saved; resume with: " \
           f"torchrun --nproc-per-node 2 -m normlab compare --resume {out}" in line
    assert "[rank0]" not in stderr  # rank 0 said it in one line, no traceback of its own
    assert list(json.loads((out / "metrics.json").read_text())["variants"]) == ["gn"]

    resumed, _ = run(["compare", "--resume", str(out)], env, nproc=2)
    assert "gn: Group Norm, seed 1 - finished earlier, kept" in resumed
    assert "bn epoch  1/3" not in resumed and "bn epoch  2/3" in resumed
    a, b = (json.loads((d / "metrics.json").read_text())["variants"] for d in (whole, out))
    for name in ("gn", "bn"):
        ha, hb = a[name]["runs"][0]["history"], b[name]["runs"][0]["history"]
        assert all(ha[k] == hb[k] for k in ha if k != "epoch_time"), name
        wa, wb = weights(whole, name), weights(out, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_bad_data_on_one_machine_stops_every_rank_with_its_message(tmp_path):
    env = _env(tmp_path, NORMLAB_TEST_BAD_RANK="1")
    code, out, err = finish(launch(["compare", "--variants", "gn", "--epochs", "1",
                                    "--out", str(tmp_path / "run")], env, nproc=2))
    assert code != 0
    lines = [x for x in err.splitlines() if x.startswith("normlab compare:")]
    assert any(x.startswith("normlab compare: rank 1: data error: ") and "truncated" in x
               for x in lines), err
    assert any(x.startswith("normlab compare: rank 0: stopped: rank 1 failed with data error")
               for x in lines), err


def test_a_global_batch_the_ranks_cannot_share_is_refused():
    """What every rank checks once the data is known (a torchrun launch reports it as
    "normlab compare: rank 0: error: ...", as the bad-data test above shows)."""
    with pytest.raises(ValueError, match=r"the global batch of 33 images does not split over "
                                         r"2 processes; choose a --batch-size that 2 divides"):
        virtual_batches_per_process(1024, 33, 2)
    with pytest.raises(ValueError, match=r"the last batch holds 1 of the 1,025 training "
                                         r"images, too few to give each of 2 parts one"):
        virtual_batches_per_process(1025, 64, 2)
    with pytest.raises(ValueError, match=r"--virtual-batch-size 24 does not divide the batch "
                                         r"of 32 images per process \(64 over 2\)"):
        virtual_batches_per_process(1024, 64, 2, 24)
    # 41 images in the last batch: 4 parts of 10 or 11
    assert virtual_batches_per_process(1001, 64, 2, 16) == 2


# -- --jobs ------------------------------------------------------------------------------

def test_jobs_give_the_numbers_of_the_same_runs_one_after_another(tmp_path):
    env = _env(tmp_path)
    base = ["compare", "--variants", "gn", "ln", "bn", "--seeds", "1", "2", "--epochs", "2",
            "--batch-size", "64", "--no-progress"]
    jobs, serial = tmp_path / "jobs", tmp_path / "serial"
    out, _ = run([*base, "--jobs", "2", "--out", str(jobs)], env)
    run([*base, "--threads", "1", "--out", str(serial)], env)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (jobs, serial))
    assert list(a["variants"]) == ["gn", "ln", "bn"]  # the command line's order
    assert a["parallel"]["jobs"] == 2 and a["parallel"]["threads_per_process"] == 1
    assert a["environment"]["torch_threads"] == 1
    for name in a["variants"]:
        for ra, rb in zip(a["variants"][name]["runs"], b["variants"][name]["runs"],
                          strict=True):
            assert ra["seed"] == rb["seed"]
            assert all(ra["history"][k] == rb["history"][k] for k in ra["history"]
                       if k != "epoch_time")
            assert ra["misclassified"] == rb["misclassified"]
        wa, wb = (weights(d, name) for d in (jobs, serial))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "2 runs at a time, 1 thread(s) each" in out
    assert sum(line.startswith("[") and " final " in line for line in out.splitlines()) == 6
    assert (jobs / "report.md").exists() and (jobs / "misclassified_bn.png").exists()


def test_sweep_runs_under_torchrun_and_as_jobs(tmp_path):
    env = _env(tmp_path)
    grid = ["sweep", "--variants", "bn", "gn", "--batch-sizes", "8", "16", "--seeds", "1",
            "--samples", "256", "--epochs", "1", "--no-progress"]
    run([*grid, "--out", str(tmp_path / "ddp")], env, nproc=2)
    run([*grid, "--out", str(tmp_path / "jobs"), "--jobs", "2"], env)
    run([*grid, "--out", str(tmp_path / "serial"), "--threads", "1"], env)
    ddp, jobs, serial = (json.loads((tmp_path / d / "sweep.json").read_text())
                         for d in ("ddp", "jobs", "serial"))
    assert ddp["config"]["world_size"] == 2 and ddp["parallel"]["backend"] == "gloo"
    assert list(ddp["runs"]) == list(jobs["runs"]) == list(serial["runs"])  # grid order
    for key, r in serial["runs"].items():
        assert jobs["runs"][key]["test_error"] == r["test_error"]
    assert "data-parallel over 2 processes" in (tmp_path / "ddp" / "report.md").read_text()


def test_ctrl_c_with_jobs_stops_the_workers_and_says_how_to_resume(tmp_path):
    env = _env(tmp_path, NORMLAB_TEST_TRAIN="3000")
    out = tmp_path / "run"
    proc = launch(["compare", "--variants", "gn", "ln", "--epochs", "3", "--batch-size", "32",
                   "--jobs", "2", "--no-progress", "--out", str(out)], env)
    wait_for(out / "checkpoints" / "gn-seed1.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, 60)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"normlab compare: interrupted; every finished "
                                            f"epoch is saved; resume with: normlab compare "
                                            f"--resume {out}")
    assert (out / "checkpoints" / "gn-seed1.ckpt").exists()
    resumed, _ = run(["compare", "--resume", str(out)], env)
    assert "gn epoch  1/3" not in resumed and "final" in resumed


# -- bad input: one line, exit 2 -----------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--virtual-batch-size", "48"], "--virtual-batch-size 48 does not divide the batch of "
                                     "128 images; choose a divisor of 128"),
    (["--jobs", "0"], "argument --jobs: expected a positive whole number or auto, got '0'"),
    (["--jobs", "all"], "argument --jobs: expected a positive whole number or auto, got 'all'"),
    (["--variants", "sbn", "--virtual-batch-size", "16"], "sbn (synchronized Batch Norm) "
     "computes over the whole global batch; --virtual-batch-size does not combine with it"),
    (["--batch-size", "64", "--limit-train", "65", "--variants", "bn", "--virtual-batch-size",
      "32"], "the last batch holds 1 of the 65 training images, too few to give each of 2 "
             "parts one"),
])
def test_bad_parallel_arguments_give_one_line(args, message, tiny_mnist, tmp_path, capsys):
    _, folder = tiny_mnist
    code, line = cli_error(["compare", "--data-dir", str(folder), "--out", str(tmp_path / "r"),
                            *args], capsys)
    assert code == 2 and message in line, line


def test_jobs_auto_uses_a_process_per_core_only_for_small_batch_runs_on_a_cpu(monkeypatch):
    monkeypatch.setattr(runner, "cores", lambda: 2)
    cpu, one = torch.device("cpu"), distributed.Ranks()
    compare = [runner.Run(v, 1, 128, 0.05, v, v) for v in ("bn+l1", "ln", "gn")]
    sweep = [runner.Run("bn", 1, b, 0.02, str(b), str(b)) for b in (2, 8, 128)]
    images = 2 * 60_000  # two epochs of MNIST

    def auto(runs, device=cpu, ranks=one, images=images):
        return runner.resolve_jobs("auto", runs, device, ranks, images)

    assert auto(compare) == 1  # the default study
    assert auto(sweep) == 2
    assert auto(sweep[:1]) == 1  # nothing to share the cores with
    assert auto(sweep, images=256) == 1  # starting workers would cost more than they save
    assert auto(sweep, device=torch.device("cuda")) == 1
    assert auto(sweep, ranks=distributed.from_env(dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
                                                       LOCAL_WORLD_SIZE="2"))) == 1
    assert runner.resolve_jobs(3, compare, cpu, one, images) == 3  # asked for: as asked
    monkeypatch.setattr(runner, "cores", lambda: 1)
    assert auto(sweep) == 1


def test_jobs_under_torchrun_is_refused(tiny_mnist, tmp_path, capsys, monkeypatch):
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
                           LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    code, line = cli_error(["compare", "--jobs", "2", "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert line == ("normlab compare: rank 0: error: --jobs runs independent runs in worker "
                    "processes; under torchrun each run is already spread over the ranks: "
                    "drop --jobs or torchrun")


def test_torchrun_environment_is_read_and_checked():
    assert distributed.from_env({}) == distributed.Ranks()
    ranks = distributed.from_env(dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1",
                                      LOCAL_WORLD_SIZE="2"))
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.nodes) == (3, 4, 1, 2)
    with pytest.raises(ValueError, match="RANK=4 is outside WORLD_SIZE=4"):
        distributed.from_env(dict(RANK="4", WORLD_SIZE="4"))


def test_a_dying_jobs_worker_stops_the_run_with_one_line_and_keeps_finished_work(tmp_path):
    env = _env(tmp_path, NORMLAB_TEST_TRAIN="3000")
    out = tmp_path / "run"
    proc = launch(["compare", "--variants", "gn", "ln", "--epochs", "3", "--batch-size", "32",
                   "--jobs", "2", "--no-progress", "--out", str(out)], env)
    wait_for(out / "checkpoints" / "gn-seed1.ckpt", proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"],
                              capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children  # the two workers
    os.kill(int(children[0]), signal.SIGKILL)  # as the out-of-memory killer would
    code, _, err = finish(proc, 60)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "normlab compare: error: a --jobs worker process died (killed, or out of memory); "
        "finished runs and epochs are saved")
    assert (out / "checkpoints").exists() and (out / "metrics.json").exists()


def test_resuming_with_another_number_of_processes_is_refused(tiny_mnist, tmp_path):
    """A different world size changes Batch Norm's statistics: the resume must use the
    record's (the same check every rank makes under torchrun)."""
    from normlab.experiments.compare import Compare
    from normlab.options import add_model_options, add_run_options

    record = {"config": {"world_size": 1}}
    parser = __import__("argparse").ArgumentParser()
    add_model_options(parser, ("gn",))
    add_run_options(parser)
    args = parser.parse_args(["--out", str(tmp_path)])
    two = distributed.Ranks(rank=0, world_size=2, local_world_size=2)
    with pytest.raises(runner.UsageError, match=rf"{tmp_path} was run by 1 process\(es\), this "
                                                rf"is 2; resume it the same way: normlab compare "
                                                rf"--resume {tmp_path}"):
        runner._load_and_check(Compare(args), record, two)
    record["config"]["world_size"] = 2
    with pytest.raises(runner.UsageError, match="resume it the same way: torchrun "
                                                "--nproc-per-node 2 -m normlab compare"):
        runner._load_and_check(Compare(args), record, distributed.Ranks())
