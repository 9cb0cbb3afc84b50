"""Weight Standardization for any model: ``standardize_weights`` swaps each convolution that a
normalization follows for its ``StdConv`` twin (the layers are in ``normlab.normact``). A
normalization is any of PyTorch's or any layer a ``Norm`` record names, registered ones
included, so ``+ws`` works with every norm.
"""

from __future__ import annotations

from torch import nn

from .normact import StdConv1d, StdConv2d, StdConv3d
from .norms import layer_types

__all__ = ["standardize_weights"]

_STD_CONV = {nn.Conv1d: StdConv1d, nn.Conv2d: StdConv2d, nn.Conv3d: StdConv3d}


def standardize_weights(model: nn.Module, eps: float = 1e-6) -> nn.Module:
    """Give Weight Standardization to every ``nn.Conv1d/2d/3d`` of ``model`` that a
    normalization layer follows (the next convolution or norm registered after it is a
    norm), in place, as Qiao et al. use it: the norm after it supplies the scale WS removes.
    Other convolutions (a classifier) stay plain. Each becomes ``StdConv1d/2d/3d`` holding
    the very same ``weight`` and ``bias`` parameters (so their values, ``requires_grad`` and
    any optimizer state stay), settings, mode and hooks; a convolution used in several
    places stays one module. Draws no random numbers, so the model's seed gives the same
    training as a model built with ``StdConv`` layers from the start. Returns the model (a
    new one if ``model`` itself is a convolution, which is then always standardised).
    ``standardize_weights(convert(resnet, "group"))`` is GN+WS (Qiao et al.).

    Examples:
        >>> model = nn.Sequential(nn.Conv1d(2, 8, 3), nn.BatchNorm1d(8),
        ...                       nn.Conv1d(8, 4, 1))
        >>> [type(m).__name__ for m in standardize_weights(model)]
        ['StdConv1d', 'BatchNorm1d', 'Conv1d']
    """
    done: dict[int, nn.Module] = {}

    def swap(conv: nn.Module) -> nn.Module:
        if id(conv) not in done:
            cls = _STD_CONV[type(conv)]
            # Built on the meta device: its initialisation draws no random numbers and
            # allocates nothing; its parameters are then the old ones.
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                conv.padding_mode, eps=eps, device="meta")
            new.weight, new.bias = conv.weight, conv.bias
            new.train(conv.training)
            for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                          "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                          "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
                setattr(new, hooks, getattr(conv, hooks))
            done[id(conv)] = new
        return done[id(conv)]

    if type(model) in _STD_CONV:
        return swap(model)
    # Torch's own norms (batch, instance, group) and every registered normlab norm.
    norm_layers = (nn.modules.batchnorm._NormBase, nn.GroupNorm, *layer_types())
    chosen, last = set(), None
    for module in model.modules():  # registration order, each module once
        if type(module) in _STD_CONV:
            last = module
        elif isinstance(module, norm_layers) and last is not None:
            chosen.add(id(last))
            last = None
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in chosen:
                setattr(parent, key, swap(child))
    return model
