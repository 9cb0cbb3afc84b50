"""CUDA-only checks, skipped where there is no GPU (CI); run them on a GPU machine.

The CUDA-graph training path must train exactly what the eager path trains, and the
GPU's whole-epoch data preparation must give the CPU's batches.
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
