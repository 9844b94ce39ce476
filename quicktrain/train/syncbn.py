"""BatchNorm synchronised over ``torch.distributed`` ranks, on CUDA and on CPU.

With data-parallel training each rank sees ``1/W`` of the global batch. Plain BatchNorm would normalise with
the rank's own batch statistics and keep per-rank running statistics, so ``W`` processes would not compute
what one process computes on the whole batch. Synchronised BatchNorm uses the statistics of the global batch:

.. math::

    \\mu = \\frac{1}{N} \\sum_{r} \\sum_{i \\in r} x_i, \\qquad
    \\sigma^2 = \\frac{1}{N} \\sum_{r} \\sum_{i \\in r} (x_i - \\mu)^2, \\qquad N = \\sum_r n_r,

and the running statistics follow the single-process update with the unbiased :math:`\\frac{N}{N-1}\\sigma^2`.
The sums are all-reduced by :class:`AllReduceSum`, which is differentiable: its backward all-reduces the
gradients of the statistics (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated),
so each rank's gradient includes the other ranks' loss terms and DDP's gradient average equals the gradient
of the global mean loss.

On CUDA this is ``torch.nn.SyncBatchNorm``; torch's module refuses CPU tensors, so on CPU (gloo) the same
statistics are computed by :class:`CpuSyncBatchNorm` (two all-reduces per layer: sums, then centred squares).
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.distributed as dist
from torch import Tensor, nn

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks, :math:`y = \\sum_r x_r`; the gradient of each rank's input is the sum of all ranks'
    output gradients, :math:`\\partial L / \\partial x_r = \\sum_{r'} \\partial L_{r'} / \\partial y`."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.Module):
    """Wraps a BatchNorm module (sharing its parameters and buffers) and normalises with global-batch statistics
    when training under an initialised process group; otherwise it is the wrapped module."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        if not (self.training and bn.training and dist.is_available() and dist.is_initialized()):
            return bn(x)
        dims = [0, *range(2, x.ndim)]
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        total = AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = total[-1].detach()
        mean = total[:-1] / n
        shape = [1, -1] + [1] * (x.ndim - 2)
        centred = x - mean.view(shape)
        var = AllReduceSum.apply((centred * centred).sum(dims)) / n
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                bn.running_mean.lerp_(mean.detach(), factor)
                bn.running_var.lerp_(var.detach() * (n / (n - 1).clamp_min(1)), factor)
        y = centred * torch.rsqrt(var + bn.eps).view(shape)
        if bn.affine:
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        return y


def synchronised_view(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model``'s module tree whose BatchNorms are synchronised over ranks.

    The copy shares every parameter and buffer with ``model`` (updates through either are seen by both), so
    ``model`` keeps its own module types for checkpoints and transforms while the copy is what DDP trains.
    Returns ``model`` itself when it has no BatchNorm.
    """
    if not any(isinstance(m, _BN_TYPES) for m in model.modules()):
        return model
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(view)
    for parent in list(view.modules()):
        for name, child in parent.named_children():
            if isinstance(child, _BN_TYPES):
                setattr(parent, name, CpuSyncBatchNorm(child))
    return view

