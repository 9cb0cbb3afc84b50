"""One training step's pieces: the objective, the epoch's running totals, and the step
captured as a CUDA graph.

They live apart from the loop (``engine.train``) so that the loop reads as an outline and
the GPU-only machinery can be read on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .device import at_least_fp32, autocast


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over convolution and linear *weights* (not biases, not norm scale/shift).

    The norm layers' affine parameters are left out on purpose: shrinking them would fight
    the normalization itself rather than sparsify the filters.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return torch.stack([w.abs().sum() for w in weights]).sum()


def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lambda_l1: float = 0.0,
              precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to minimise, data loss, log-probabilities): NLL + lambda_l1 * sum |w|."""
    with autocast(x.device, precision):
        output = model(x)
    output = at_least_fp32(output)
    data_loss = F.nll_loss(output, y)
    loss = data_loss + lambda_l1 * l1_penalty(model) if lambda_l1 else data_loss
    return loss, data_loss, output


class Totals:
    """An epoch's running sums, kept on the device: no host sync per batch. The first
    non-finite loss is remembered by its batch number (1-based; -1 while all are finite)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.batches = torch.zeros((), device=device, dtype=torch.long)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)

    def reset(self) -> None:
        for t in (self.loss, self.correct, self.batches):
            t.zero_()
        self.first_bad.fill_(-1)

    def add(self, loss: torch.Tensor, data_loss: torch.Tensor, output: torch.Tensor,
            y: torch.Tensor) -> None:
        # In place only, so that a CUDA graph can record these updates (CudaGraphStep).
        self.batches += 1
        bad = (self.first_bad < 0) & ~torch.isfinite(loss.detach())
        self.first_bad.copy_(torch.where(bad, self.batches, self.first_bad))
        self.loss += data_loss.detach() * len(y)
        self.correct += (output.argmax(1) == y).sum()


class CudaGraphStep:
    """Forward, loss, backward and running totals of a full training batch, captured once as
    a CUDA graph and replayed for every later batch of that shape.

    Why: normlab's model is tiny, so on a GPU a step is bound by launching its few hundred
    small kernels from Python (about 4 ms per step on an H100), not by arithmetic; a replay
    launches them all at once (PyTorch's "whole-network capture"; airbench's approach). The
    optimiser step and schedule stay eager and torch.optim's own. Replays write the
    gradients into the same tensors every time, so ``optimizer.zero_grad`` must not drop
    them (``train`` zeroes in place when it has a graph). float32 only: autocast's weight cache
    does not mix with graphs, so bf16 stays eager.
    """

    def __init__(self, model: nn.Module, lambda_l1: float, device: torch.device) -> None:
        self.model, self.lambda_l1 = model, lambda_l1
        self.totals = Totals(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x = self.y = torch.empty(0)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` can go through the graph (the first batch decides its shape)."""
        return self.graph is None or x.shape == self.x.shape

    def __call__(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
                 ) -> None:
        if self.graph is None:
            self._capture(x, y, optimizer)
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()

    def _capture(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
                 ) -> None:
        self.x, self.y = x.clone(), y.clone()
        # Capture needs warm kernels (cuDNN, autograd's streams): two passes on a side
        # stream, with Batch Norm's running statistics restored afterwards, so that the
        # warm-up leaves no trace in training.
        saved = [b.clone() for b in self.model.buffers()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                optimizer.zero_grad(set_to_none=True)
                objective(self.model, self.x, self.y, self.lambda_l1)[0].backward()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for b, value in zip(self.model.buffers(), saved, strict=True):
                b.copy_(value)
        optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients itself
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss, data_loss, output = objective(self.model, self.x, self.y, self.lambda_l1)
            loss.backward()
            self.totals.add(loss, data_loss, output, self.y)


def graph_step(model: nn.Module, lambda_l1: float, device: torch.device, precision: str,
               world: int = 1) -> CudaGraphStep | None:
    """A ``CudaGraphStep`` where one applies (a CUDA device, float32, one process), else None."""
    if device.type == "cuda" and precision == "fp32" and world == 1:
        return CudaGraphStep(model, lambda_l1, device)
    return None
