"""Interrupt/resume, safe loading, numerical faults and bad input, end to end."""

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_error, default_sigint, wait_for
from normlab import data as D
from normlab import engine
from normlab.checkpoint import CheckpointError, atomic_write, load_model
from normlab.cli import main
from normlab.model import Net, count_parameters

TESTS = Path(__file__).resolve().parent

# The real CLI in a child process (tests/dist_driver.py) on a synthetic dataset big enough that
# an epoch takes a moment (so a signal can land mid-epoch).
DRIVER = TESTS / "dist_driver.py"
# One process (--jobs 1): these tests follow the runs one after another through a file.
ARGS = ["compare", "--variants", "gn", "ln", "--epochs", "3", "--batch-size", "32",
        "--no-progress", "--device", "cpu", "--jobs", "1"]


def _start(data: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(DRIVER), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "NORMLAB_TEST_DATA":
                                 str(data), "NORMLAB_TEST_TRAIN": "3000"})


@pytest.fixture
def driver(tmp_path):
    return lambda *args: _start(tmp_path / "data", *args)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The results of ARGS run to the end without interruption, shared by the tests that
    interrupt the same run (it takes a while to train)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    proc = _start(folder / "data", *ARGS, "--out", str(folder / "whole"))
    assert proc.wait(timeout=300) == 0, proc.communicate()
    return _results(folder / "whole")


def _results(out: Path) -> dict:
    """Everything a run reports except timings, and its weights."""
    metrics = json.loads((out / "metrics.json").read_text())
    for v in metrics["variants"].values():
        for run in v["runs"]:
            run["history"].pop("epoch_time")
            run.pop("wall_time_s")
    weights = {f"{name}-seed{run['seed']}":
               load_model(out / f"{name}-seed{run['seed']}.safetensors")
               .state_dict() for name, v in metrics["variants"].items() for run in v["runs"]}
    return {"variants": metrics["variants"], "weights": weights}


def _assert_same(a: dict, b: dict) -> None:
    assert a["variants"] == b["variants"]
    for name in a["weights"]:
        for key, tensor in a["weights"][name].items():
            assert torch.equal(tensor, b["weights"][name][key]), (name, key)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(driver, tmp_path,
                                                                   uninterrupted):
    out = tmp_path / "killed"
    proc = driver(*ARGS, "--out", str(out))
    # gn finished and ln has one epoch checkpointed: kill during ln's second epoch.
    wait_for(out / "checkpoints" / "ln-seed1.ckpt", proc)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it really was killed, not finished
    finished = json.loads((out / "metrics.json").read_text())["variants"]
    assert list(finished) == ["gn"]  # the finished variant was on disk already

    resumed = driver("compare", "--resume", str(out))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "gn: Group Norm, seed 1 - finished earlier, kept" in stdout
    assert "ln epoch  1/3" not in stdout and "ln epoch  2/3" in stdout  # continued, not redone
    _assert_same(uninterrupted, _results(out))
    assert not (out / "checkpoints").exists()  # cleaned up once every variant finished


def test_ctrl_c_saves_says_how_to_resume_and_exits_non_zero(driver, tmp_path):
    out = tmp_path / "run"
    proc = driver(*ARGS, "--out", str(out))
    wait_for(out / "checkpoints" / "gn-seed1.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    last = stderr.strip().splitlines()[-1]
    assert f"interrupted; every finished epoch is saved; resume with: normlab compare " \
           f"--resume {out}" in last
    assert "Traceback" not in stderr
    assert (out / "checkpoints" / "gn-seed1.ckpt").exists()
    json.loads((out / "metrics.json").read_text())  # still valid






def test_a_second_run_on_the_same_folder_is_refused(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as a running normlab would hold it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, line = cli_error(["compare", "--out", str(out), "--epochs", "1"], capsys)
    assert code == 2 and "another normlab run is writing to" in line


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_weights_file_is_refused_without_running_its_payload(tmp_path):
    Payload.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"config": {"norm": "batch"}, "state_dict": Payload()}, evil)
    with pytest.raises(CheckpointError, match="not a loadable normlab weights file"):
        load_model(evil)
    assert not Payload.marker.exists()


def test_malicious_checkpoint_in_a_resume_folder(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    _, folder = tiny_mnist
    assert main(["compare", "--variants", "gn", "ln", "--epochs", "1", "--data-dir", str(folder),
                 "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    del metrics["variants"]["ln"]  # as if killed during ln
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "checkpoints").mkdir()
    Payload.marker = tmp_path / "pwned"
    torch.save(Payload(), out / "checkpoints" / "ln-seed1.ckpt")
    code, line = cli_error(["compare", "--resume", str(out), "--data-dir", str(folder)], capsys)
    assert code == 1 and "ln-seed1.ckpt: not a loadable normlab training checkpoint" in line
    assert not Payload.marker.exists()


def test_checkpoint_of_another_variant_is_refused_naming_both(tiny, tmp_path):
    spec, folder = tiny
    data = D.load_data(folder, spec)
    ckpt = tmp_path / "state.ckpt"
    engine.train_model("layer", epochs=2, batch_size=64, data=data, device="cpu",
                       progress=False, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="checkpoint is for norm=layer but this run has "
                                              "norm=group"):
        engine.train_model("group", epochs=2, batch_size=64, data=data, device="cpu",
                           progress=False, checkpoint=ckpt)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "w.pt"  # the format of normlab 0.2
    config = dict(norm="none", num_groups=4, dropout=0.0)  # no norm layers: cannot fit
    torch.save({"config": config, "state_dict": Net("batch").state_dict()}, path)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(path)


@pytest.mark.parametrize("damage, code, message", [
    (lambda out: (out / "metrics.json").write_text("{ not json"), 2, "metrics.json is corrupt"),
    (lambda out: (out / "metrics.json").write_text('{"config": {}}'), 2,
     "metrics.json is corrupt"),
    (lambda out: (out / "metrics.json").unlink(), 2, "not a normlab compare folder"),
    (lambda out: (out / "checkpoints" / "ln-seed1.ckpt").write_bytes(os.urandom(300)), 1,
     "ln-seed1.ckpt: not a loadable normlab training checkpoint"),
    # A pickle that fetches a memo entry it never stored (a KeyError inside torch.load).
    (lambda out: (out / "checkpoints" / "ln-seed1.ckpt").write_bytes(b"\x80\x02h\xce."), 1,
     "ln-seed1.ckpt: not a loadable normlab training checkpoint"),
])
def test_corrupt_resume_folder_gives_one_line(tiny_mnist, tmp_path, capsys, damage, code,
                                              message):
    _, folder = tiny_mnist
    out = tmp_path / "run"
    main(["compare", "--variants", "gn", "ln", "--epochs", "1", "--data-dir", str(folder),
          "--out", str(out), "--no-progress"])
    metrics = json.loads((out / "metrics.json").read_text())
    del metrics["variants"]["ln"]
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "checkpoints").mkdir()
    damage(out)
    got_code, line = cli_error(["compare", "--resume", str(out), "--data-dir", str(folder)], capsys)
    assert got_code == code and message in line


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write(path, "old")

    class Boom(str):
        def encode(self, *args):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, Boom("new"))
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_non_finite_loss_stops_only_that_variant(tiny_mnist, tmp_path, capsys, monkeypatch):
    _, folder = tiny_mnist
    real = engine.objective
    calls = {"n": 0}

    def poisoned(model, x, y, lambda_l1=0.0, precision="fp32"):
        loss, data_loss, out = real(model, x, y, lambda_l1, precision)
        if model.norm == "layer":
            calls["n"] += 1
            if calls["n"] == 3:
                return loss * float("nan"), data_loss, out
        return loss, data_loss, out

    monkeypatch.setattr(engine, "objective", poisoned)
    out = tmp_path / "run"
    code = main(["compare", "--epochs", "1", "--batch-size", "32", "--data-dir", str(folder),
                 "--out", str(out), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "ln: loss became non-finite (NaN or inf) at batch 3 of 8 in epoch 1" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "failed" in metrics["variants"]["ln"]["runs"][0]
    assert "history" in metrics["variants"]["gn"]["runs"][0]
    assert "history" in metrics["variants"]["bn+l1"]["runs"][0]
    report = (out / "report.md").read_text()
    params = f"{count_parameters(Net('layer')):,}"
    assert f"| ln | | {params} | **failed**: ln: loss became non-finite" in report
    assert (out / "misclassified_gn.png").exists() and not (out / "misclassified_ln.png").exists()


# ---------------------------------------------------------------- bad data, through the CLI

def _truncate(folder):
    p = folder / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-200])


def _bad_magic(folder):
    import gzip
    p = folder / "train-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(b"\0\0\x08\x03" + gzip.decompress(p.read_bytes())[4:]))


def _checksum(folder):
    import gzip
    p = folder / "test-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(p.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    p.write_bytes(gzip.compress(bytes(raw)))


def _count(folder):
    shutil.copy(folder / "test-labels-idx1-ubyte.gz", folder / "train-labels-idx1-ubyte.gz")


@pytest.mark.parametrize("damage, message", [
    (lambda f: shutil.rmtree(f), "download failed"),
    (lambda f: (f / "t10k-images-idx3-ubyte.gz").unlink(missing_ok=True)
     or (f / "test-images-idx3-ubyte.gz").unlink(), "test-images-idx3-ubyte: not in"),
    (_truncate, "not a valid gzip file"),
    (_bad_magic, "wrong magic number 2051 (expected 2049)"),
    (_checksum, "checksum mismatch"),
    (_count, "checksum mismatch"),  # a well-formed file of the wrong split
])
def test_bad_data_through_the_cli(tiny_mnist, tmp_path, capsys, damage, message):
    _, folder = tiny_mnist
    damage(folder)
    code, line = cli_error(["compare", "--data-dir", str(folder), "--out", str(tmp_path / "o")],
                       capsys)
    assert code == 1 and message in line and line.startswith("normlab compare: data error:")


def test_unreadable_data_through_the_cli(tiny_mnist, tmp_path, capsys, monkeypatch):
    _, folder = tiny_mnist
    original = Path.read_bytes

    def deny(self):  # the tests run as root, which chmod cannot stop
        if self.parent == folder:
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    code, line = cli_error(["compare", "--data-dir", str(folder), "--out", str(tmp_path / "o")],
                       capsys)
    assert code == 1 and "permission denied" in line


def test_weights_from_before_architectures_were_recorded_still_load(tmp_path):
    from normlab.checkpoint import ARCHITECTURE_0_1

    old = Net("group", architecture=ARCHITECTURE_0_1)
    path = tmp_path / "old.pt"  # as normlab 0.1 wrote it: no architecture in the config
    torch.save({"config": dict(norm="group", num_groups=4, dropout=0.0),
                "state_dict": old.state_dict()}, path)
    loaded = load_model(path)
    assert loaded.architecture == ARCHITECTURE_0_1
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.eval()(x), old.eval()(x))


# -- a full disk ---------------------------------------------------------------------------

def _fills(path: Path) -> None:
    """Write to ``path`` until the filesystem has no space left."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.fixture
def small_disk(tmp_path):
    """A genuinely small filesystem: a 4 MB tmpfs (needs root, as on the project's machines
    and CI); the test skips, saying so, where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected-error test covers the logic")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_filesystem_stops_with_one_line_keeps_everything_and_resumes(driver, tmp_path,
                                                                           small_disk,
                                                                           uninterrupted):
    """On a real full tmpfs: the write that fails names its file and the cause, every file
    keeps its previous version (no half-written file, no temporary left), and once space is
    freed the run resumes to the numbers of an uninterrupted run."""
    args = ARGS
    out = small_disk / "run"
    proc = driver(*args, "--out", str(out))
    wait_for(out / "checkpoints" / "ln-seed1.ckpt", proc)  # gn finished, ln under way
    _fills(small_disk / "filler")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"normlab compare: error: cannot write {out}/")
    assert line.endswith(f"(No space left on device); its previous version and every finished "
                         f"epoch are kept: free some space, then resume it with: normlab "
                         f"compare --resume {out}")
    assert not list(out.rglob("*.tmp"))
    assert list(json.loads((out / "metrics.json").read_text())["variants"]) == ["gn"]
    load_model(out / "gn-seed1.safetensors")
    torch.load(out / "checkpoints" / "ln-seed1.ckpt", weights_only=True)  # whole, loadable

    (small_disk / "filler").unlink()
    resumed = driver("compare", "--resume", str(out))
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    _assert_same(uninterrupted, _results(out))


def test_an_injected_disk_full_error_keeps_the_previous_version(tiny_mnist, tmp_path, capsys,
                                                                monkeypatch):
    """The same logic without a small filesystem: ENOSPC injected at the fsync of the third
    write of metrics.json (after the first variant finished)."""
    _, folder = tiny_mnist
    out = tmp_path / "run"
    args = ["compare", "--variants", "gn", "ln", "--epochs", "1", "--data-dir", str(folder),
            "--no-progress"]
    real_fsync, writes = os.fsync, []

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "metrics.json" in name:
            writes.append(name)
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, line = cli_error([*args, "--out", str(out)], capsys)
    assert code == 1
    assert line == (f"normlab compare: error: cannot write {out / 'metrics.json'} (No space "
                    f"left on device); its previous version and every finished epoch are kept: "
                    f"free some space, then resume it with: normlab compare --resume {out}")
    kept = json.loads((out / "metrics.json").read_text())
    assert list(kept["variants"]) == ["gn"] and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["compare", "--resume", str(out), "--data-dir", str(folder)]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert _results(out)["variants"] == _results(tmp_path / "whole")["variants"]


def test_a_file_that_is_no_training_checkpoint_or_does_not_fit_is_refused(tiny, tmp_path):
    """The two refusals of load_training_state after the configuration matched: a loadable
    torch file of another format, and a checkpoint whose tensors do not fit the model."""
    spec, folder = tiny
    data = D.load_data(folder, spec)
    ckpt = tmp_path / "state.ckpt"
    common = dict(epochs=2, batch_size=64, data=data, device="cpu", progress=False)
    torch.save({"format": "something else", "config": {}}, ckpt)
    with pytest.raises(CheckpointError, match="state.ckpt: not a normlab training checkpoint; "
                                              "delete it to start that variant again"):
        engine.train_model("group", checkpoint=ckpt, **common)
    ckpt.unlink()
    engine.train_model("group", checkpoint=ckpt, **common)
    state = torch.load(ckpt, weights_only=True)
    state["model"]["head.weight"] = torch.zeros(3, 3)  # the same config, a wrong tensor
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="state.ckpt: checkpoint does not fit this model "
                                              r"\(.*head\.weight"):
        engine.train_model("group", checkpoint=ckpt, **common)
