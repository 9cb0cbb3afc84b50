import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import synthetic_digits, write_dataset
from normlab import engine
from normlab.data import Loader, load_data
from normlab.engine import l1_penalty, misclassified, objective, select_device, train, train_model
from normlab.model import ARCHITECTURE, Net

CPU = torch.device("cpu")


def _hand_l1(model):
    """Independent oracle: every conv/linear kernel is a parameter named *weight with dim > 1."""
    return sum(p.abs().sum() for n, p in model.named_parameters()
               if n.endswith("weight") and p.dim() > 1)


def test_l1_term_changes_the_loss_by_exactly_lambda_times_sum_abs_w():
    torch.manual_seed(0)
    model = Net("batch").eval()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    lam = 3e-4
    with_l1, data_loss, _ = objective(model, x, y, lam)
    without, _, _ = objective(model, x, y, 0.0)
    torch.testing.assert_close(with_l1 - without, lam * _hand_l1(model), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(without, data_loss)


def test_l1_leaves_norm_scale_and_shift_alone():
    model = Net("group")
    before = l1_penalty(model)
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data.mul_(100)
    assert l1_penalty(model) == before


def _synthetic_loaders(n_train=512, n_test=200, batch_size=32, seed=0):
    tx, ty = synthetic_digits(n_train, 0)
    vx, vy = synthetic_digits(n_test, 1)
    return (Loader(tx, ty, batch_size, shuffle=True, seed=seed, mean=0.1, std=0.3),
            Loader(vx, vy, 100, mean=0.1, std=0.3))


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_a_few_hundred_steps_lower_the_loss(norm):
    torch.manual_seed(0)
    model = Net(norm)
    train_loader, test_loader = _synthetic_loaders()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start_loss, _ = engine.test(model, CPU, test_loader)
    history = [train(model, CPU, train_loader, optimizer, lambda_l1=1e-5, progress=False)
               for _ in range(16)]  # 16 epochs x 16 batches = 256 steps
    end_loss, end_acc = engine.test(model, CPU, test_loader)
    assert history[-1][0] < 0.5 * history[0][0]
    assert end_loss < 0.5 * start_loss and end_acc > 80


def test_test_returns_mean_nll_and_accuracy_of_the_whole_set():
    torch.manual_seed(0)
    model = Net("layer").eval()
    _, loader = _synthetic_loaders()
    x = torch.cat([b for b, _ in loader])
    y = torch.cat([t for _, t in loader])
    with torch.no_grad():
        out = model(x)
    loss, acc = engine.test(model, CPU, loader)
    assert loss == pytest.approx(F.nll_loss(out, y).item(), rel=1e-5)
    assert acc == pytest.approx(100 * (out.argmax(1) == y).float().mean().item())


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_evaluation_in_chunks_gives_the_numbers_of_one_pass_per_batch(norm, monkeypatch):
    """test() runs 1000-image batches in chunks of EVAL_CHUNK on a CPU (faster: the chunk's
    activations stay in cache); loss and accuracy must be bit for bit those of whole batches,
    as the committed results were measured."""
    torch.manual_seed(2)
    model = Net(norm)
    for layer in model.modules():  # trained-looking running statistics, not 0 and 1
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    images = torch.randint(0, 256, (2100, 28, 28), dtype=torch.uint8)
    loader = Loader(images, torch.randint(0, 10, (2100,)), 1000)
    chunked = engine.test(model, CPU, loader)
    monkeypatch.setattr(engine, "EVAL_CHUNK", 10_000)
    assert engine.test(model, CPU, loader) == chunked


def test_misclassified_returns_only_wrong_predictions_in_order():
    torch.manual_seed(1)
    model = Net("batch").eval()  # untrained: plenty of mistakes
    _, loader = _synthetic_loaders()
    wrong = misclassified(model, CPU, loader, n=10)
    assert len(wrong.predicted) == len(wrong.indices) == len(wrong.images) == 10
    assert wrong.indices == sorted(wrong.indices)
    x = torch.cat([b for b, _ in loader])
    with torch.no_grad():
        probs = model(x[wrong.indices]).exp()
    assert probs.argmax(1).tolist() == wrong.predicted
    assert loader.labels[wrong.indices].tolist() == wrong.target
    assert all(p != t for p, t in zip(wrong.predicted, wrong.target, strict=True))
    torch.testing.assert_close(probs.max(1).values, torch.tensor(wrong.confidence))
    assert torch.equal(wrong.images, loader.images[wrong.indices])


def test_misclassified_of_a_perfect_model_is_empty():
    torch.manual_seed(0)
    model = Net("batch").eval()
    _, loader = _synthetic_loaders()
    with torch.no_grad():  # relabel the data with the model's own predictions
        predicted = torch.cat([model(x).argmax(1) for x, _ in loader])
    agreed = Loader(loader.images, predicted, 100, mean=0.1, std=0.3)
    assert misclassified(model, CPU, agreed, n=10).predicted == []


def test_train_model_is_reproducible_and_records_every_epoch(tmp_path):
    spec = write_dataset(tmp_path, n_train=320, n_test=100)
    data = load_data(tmp_path, spec)
    runs = [train_model("group", epochs=2, seed=4, batch_size=32, data=data, device="cpu",
                        progress=False) for _ in range(2)]
    (m1, h1), (m2, h2) = runs
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time"):
        assert len(h1[key]) == 2
    assert {k: v for k, v in h1.items() if k != "epoch_time"} == \
           {k: v for k, v in h2.items() if k != "epoch_time"}
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    other = train_model("group", epochs=2, seed=5, batch_size=32, data=data, device="cpu",
                        progress=False)[1]
    assert other["train_loss"] != h1["train_loss"]


def test_hooks_see_the_trainer_at_every_step_and_epoch_and_end_even_when_training_stops(
        tmp_path):
    """A Hook gets the Trainer: before_train once, before_step/after_step around each step
    with the steps taken, the optimizer and the scheduler's learning rate as they are then,
    after_epoch the epoch's row (which becomes the history's), after_train once however
    training ends; its state_dict is saved in the checkpoint and restored on resume. A
    TrainConfig trains exactly as the same settings passed by name."""
    spec = write_dataset(tmp_path, n_train=96, n_test=40)
    data = load_data(tmp_path, spec)

    class Recorder(engine.Hook):
        def __init__(self):
            self.started, self.steps, self.lrs, self.rows, self.ended = 0, [], [], [], 0
            self.total_steps = 0  # kept in the checkpoint

        def before_train(self, trainer):
            self.started += 1
            assert isinstance(trainer.net, nn.Module) and trainer.config.norm == "layer"

        def before_step(self, trainer):
            self.steps.append(trainer.step)

        def after_step(self, trainer):  # the schedule (a default hook) has stepped already
            self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
            self.total_steps += 1
            assert trainer.scheduler.last_epoch == trainer.step

        def after_epoch(self, trainer):
            self.rows.append((trainer.epoch, dict(trainer.row)))
            if trainer.epoch == 1 and stop:
                raise KeyboardInterrupt

        def after_train(self, trainer):
            self.ended += 1

        def state_dict(self):
            return {"total_steps": self.total_steps}

        def load_state_dict(self, state):
            self.total_steps = state["total_steps"]

    common = dict(data=data, device="cpu", progress=False)
    stop, hook = False, Recorder()
    config = engine.TrainConfig("layer", epochs=2, seed=3, batch_size=32)
    _, history = train_model(config, hooks=[hook], **common)
    assert hook.steps == list(range(6)) and hook.ended == hook.started == 1  # 3 steps an epoch
    _, scheduler = engine.make_optimizer(nn.Linear(1, 1), 0.05, 2, 3)
    expected = []
    for _ in range(6):
        scheduler.optimizer.step()
        scheduler.step()
        expected.append(scheduler.get_last_lr()[0])
    assert hook.lrs == pytest.approx(expected, rel=1e-12)
    assert [e for e, _ in hook.rows] == [1, 2]
    assert [r["test_acc"] for _, r in hook.rows] == history["test_acc"]
    by_name = train_model("layer", epochs=2, seed=3, batch_size=32, **common)[1]
    assert {k: v for k, v in by_name.items() if k != "epoch_time"} == \
           {k: v for k, v in history.items() if k != "epoch_time"}
    # stopped after epoch 1 with a checkpoint, resumed: the hook's state comes back
    stop, hook = True, Recorder()
    with pytest.raises(KeyboardInterrupt):
        train_model(config, hooks=[hook], checkpoint=tmp_path / "ck.pt", **common)
    assert hook.ended == 1 and len(hook.rows) == 1 and hook.total_steps == 3
    stop, resumed = False, Recorder()
    _, again = train_model(config, hooks=[resumed], checkpoint=tmp_path / "ck.pt", **common)
    assert resumed.steps == [3, 4, 5] and resumed.total_steps == 6
    assert {k: v for k, v in again.items() if k != "epoch_time"} == \
           {k: v for k, v in history.items() if k != "epoch_time"}


def test_checkpoint_key_is_the_one_earlier_versions_wrote():
    """A checkpoint is continued only when its key matches: the key TrainConfig derives must
    be the dict train_model wrote before TrainConfig existed (written out here by hand), so
    that checkpoints of earlier versions still resume; settings at their default that those
    versions did not record stay out of it."""
    config = engine.TrainConfig("group", lambda_l1=0.0, num_groups=2, epochs=3, seed=7,
                                batch_size=32, lr=0.02)
    earlier = dict(norm="group", num_groups=2, dropout=0.0, lambda_l1=0.0,
                   architecture=[list(layer) for layer in ARCHITECTURE],
                   epochs=3, seed=7, batch_size=32, lr=0.02, momentum=0.9, weight_decay=0.0,
                   precision="fp32", train_images=320)
    key = config.checkpoint_key("fp32", 320, world=1)
    assert key == earlier and list(key) == list(earlier)
    more = dataclasses.replace(config, virtual_batch_size=8, weight_std=True)
    assert more.checkpoint_key("fp32", 320, world=2) == {
        **earlier, "world_size": 2, "virtual_batch_size": 8, "weight_std": True}


def test_train_model_rejects_bad_settings():
    with pytest.raises(ValueError, match="epochs must be positive"):
        train_model(epochs=0)
    with pytest.raises(ValueError, match="L1 weight must be >= 0"):
        train_model(lambda_l1=-1)


def test_select_device(monkeypatch):
    assert select_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device(None) == select_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device(None) == CPU
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        select_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            select_device("cuda")


def test_precision_auto_follows_the_hardware(monkeypatch):
    from normlab import device
    from normlab.device import resolve_precision

    monkeypatch.setattr(device, "native_bf16", lambda device: True)
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(device, "native_bf16", lambda device: False)
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # asked for explicitly: honoured
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", CPU)


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    for flags, expected in (("fpu avx512f avx512_bf16 sse", True), ("fpu amx_bf16", True),
                            ("fpu avx512f avx2", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, _i=info, **k: real_open(
            _i if path == "/proc/cpuinfo" else path, *a, **k))
        assert engine.native_bf16(CPU) is expected
    assert engine.native_bf16(torch.device("meta")) is False


def test_bf16_forward_is_close_to_fp32_and_keeps_float32_weights_and_loss():
    torch.manual_seed(0)
    model = Net("group")
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    loss32, _, out32 = objective(model, x, y, precision="fp32")
    loss16, _, out16 = objective(model, x, y, precision="bf16")
    assert out16.dtype == torch.float32 and loss16.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: log-probabilities agree to about 1e-2.
    torch.testing.assert_close(out16, out32, rtol=0, atol=5e-2)
    loss16.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_training_learns_like_fp32():
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = Net("batch")
        train_loader, test_loader = _synthetic_loaders()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(6):
            train(model, CPU, train_loader, optimizer, progress=False, precision=precision)
        results[precision] = engine.test(model, CPU, test_loader, precision=precision)
    assert results["bf16"][1] > 80 and abs(results["bf16"][1] - results["fp32"][1]) <= 5


def test_weight_decay_touches_convolution_weights_only():
    from normlab.engine import make_optimizer

    model = Net("group")
    optimizer, scheduler = make_optimizer(model, lr=0.1, epochs=2, steps_per_epoch=5,
                                          weight_decay=1e-3)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0
               for p in g["params"]}
    for name, p in model.named_parameters():
        is_kernel = name.endswith("weight") and p.dim() > 1
        assert (id(p) in decayed) == is_kernel, name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == \
        len(list(model.parameters()))
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.01  # one cycle


class _Stop(Exception):
    """Stands for a kill right after an epoch's checkpoint was written."""


@pytest.mark.parametrize("norm, kwargs", [
    ("batch", {}),  # running statistics
    ("batch", {"virtual_batch_size": 8}),
    ("group", {"precision": "bf16"}),
    ("batchrenorm", {}),  # its limits follow the step count
    ("evonorm-b0", {"virtual_batch_size": 8}),
])
def test_resume_inside_one_process_equals_an_uninterrupted_run(tiny, tmp_path, norm, kwargs):
    """train_model(checkpoint=...) stopped after its first epoch and called again continues
    from the checkpoint to the same model (parameters and running statistics) and history,
    bit for bit."""
    spec, folder = tiny
    data = load_data(folder, spec)
    common = dict(epochs=3, batch_size=32, seed=2, data=data, device="cpu", progress=False,
                  **kwargs)
    whole, history = train_model(norm, **common)
    checkpoint = tmp_path / "state.ckpt"

    class Stop(engine.Hook):
        def after_epoch(self, trainer: engine.Trainer) -> None:
            if trainer.epoch == 1:
                raise _Stop

    with pytest.raises(_Stop):
        train_model(norm, checkpoint=checkpoint, hooks=[Stop()], **common)
    resumed, again = train_model(norm, checkpoint=checkpoint, **common)
    assert {k: v for k, v in again.items() if k != "epoch_time"} == \
        {k: v for k, v in history.items() if k != "epoch_time"}
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
