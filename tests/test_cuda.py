"""CUDA-only checks, skipped where there is no GPU (CI); run them on a GPU machine.

The CUDA-graph training path must train exactly what the eager path trains, and the
GPU's whole-epoch data preparation must give the CPU's batches, and each small-batch remedy
layer must compute on the GPU what it computes on the CPU.
"""

import pytest
import torch

from normlab.data import load_data, make_loaders
from normlab.engine import TrainingDiverged, train_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def deterministic_cudnn():
    """Same kernels for both paths, so that they can be compared closely."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("norm, lambda_l1, virtual_batch_size", [
    ("batch", 1e-5, None), ("group", 0.0, None), ("layer", 0.0, None), ("batch", 0.0, 16)])
def test_cuda_graph_trains_as_eager(tiny_mnist, monkeypatch, norm, lambda_l1, virtual_batch_size):
    data = load_data(tiny_mnist[1])  # 256 training images: 5 batches of 48 and a short one of 16
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay",
                        lambda self: (replays.append(1), replay(self))[1])
    runs = {}
    for graphed in (False, True):
        runs[graphed] = train_model(norm, lambda_l1=lambda_l1, epochs=2, batch_size=48,
                                    device="cuda", data=data, progress=False,
                                    cuda_graph=graphed, virtual_batch_size=virtual_batch_size)
    # Every full batch of both epochs replayed; the short last batch ran eagerly in between,
    # so epoch 2 also checks that the eager step left the graph's gradients in place.
    assert len(replays) == 2 * 5
    (eager, h_eager), (graphed, h_graphed) = runs[False], runs[True]
    for key in ("train_loss", "test_loss"):  # float32 sums in the same order: tolerance 1e-5
        assert h_graphed[key] == pytest.approx(h_eager[key], rel=1e-5), key
    assert h_graphed["train_acc"] == h_eager["train_acc"]
    state = graphed.state_dict()
    for name, value in eager.state_dict().items():  # weights and running statistics
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_cuda_graph_reports_divergence(tiny_mnist):
    # Without a norm, a step at lr 1e30 overflows the next forward: batch 2 or later.
    with pytest.raises(TrainingDiverged, match=r"non-finite .* at batch [2-6] of 6 in epoch 1"):
        train_model("none", epochs=1, batch_size=48, lr=1e30, device="cuda",
                    data=load_data(tiny_mnist[1]), progress=False)


def test_gpu_epoch_preparation_matches_cpu_batches(tiny_mnist):
    data = load_data(tiny_mnist[1])
    cpu, _ = make_loaders(data, 48, seed=3, device="cpu")
    gpu, _ = make_loaders(data, 48, seed=3, device="cuda")
    for _ in range(2):  # two epochs: the same shuffles and augmentation draws
        for (x, y), (gx, gy) in zip(cpu, gpu, strict=True):
            assert torch.equal(gy.cpu(), y)
            torch.testing.assert_close(gx.cpu(), x, rtol=0, atol=1e-4)


def _remedy_layers():
    from normlab.batchnorm import BatchRenorm2d
    from normlab.normact import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNorm2d, StdConv2d

    renorm = BatchRenorm2d(8, virtual_batches=2)
    renorm.r_max, renorm.d_max = 1.5, 0.5  # clipping active
    return {"brn": renorm, "frn": FilterResponseNorm2d(8),
            "evob0": EvoNorm2dB0(8, virtual_batches=2), "evos0": EvoNorm2dS0(8, 4),
            "ws": StdConv2d(8, 8, 3)}


def remedy_layer_on(device: str, name: str, atol: float = 1e-4) -> None:
    """One training step and one eval forward of ``name`` on ``device`` equal the same layer
    on the CPU (outputs, input and parameter gradients, buffers) to ``atol``."""
    torch.manual_seed(0)
    cpu = _remedy_layers()[name]
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for b in cpu.buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b) * 0.5)
    other = {k: v.clone() for k, v in cpu.state_dict().items()}
    gpu = _remedy_layers()[name].to(device)
    gpu.load_state_dict(other)
    x = torch.randn(8, 8, 6, 6) * 2 + 0.5
    xs = [x.clone().requires_grad_(), x.to(device).requires_grad_()]
    for layer, xi in zip((cpu, gpu), xs, strict=True):
        layer.train()
        (layer(xi) ** 2).sum().backward()
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(b.grad.cpu(), a.grad, atol=atol, rtol=1e-4)
    torch.testing.assert_close(xs[1].grad.cpu(), xs[0].grad, atol=atol, rtol=1e-4)
    for (k, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values(), strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=atol, rtol=1e-4, msg=k)
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.to(device)).cpu(), cpu(x), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name", ["brn", "frn", "evob0", "evos0", "ws"])
def test_remedy_layers_on_cuda_equal_the_cpu(name):
    remedy_layer_on("cuda", name)
