"""Model cost: parameter count and multiply-accumulates (MACs) per example, via PyTorch's flop counter."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one example of shape ``input_shape`` (eval mode).

    Uses :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matrix products and convolutions
    (and attention) at 2 FLOPs per MAC: :math:`\\text{MACs} = \\text{FLOPs} / 2`. Elementwise ops
    (BatchNorm, activations, residual adds) are not counted, as is usual for MACs.

    Args:
        model: the network; run on a zero input of shape ``[1, *input_shape]`` on its own device and dtype.
        input_shape: one example's shape, e.g. ``(C, H, W)``.

    Returns:
        The MAC count (an integer).
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


__all__ = ["count_macs", "count_params"]
