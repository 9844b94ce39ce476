"""Dense reference trainer: builds ``x = torch.kron(u, v)`` explicitly and runs plain SGD.

Per step it costs ``O(m · |B| · d)`` — the baseline Kronecker SGD is compared with.
The gradient comes from autograd, so it is an independent check of the closed-form
update in :func:`quicktrain.kron._math.update_coefficients`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_factors, check_indices, check_positive
from ._math import kron_rows, squared_loss
from .model import KronMLP

__all__ = ["DenseSGD", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    """Outcome of one SGD step.

    Attributes:
        pred: ``[B]`` predictions on the batch *before* the update.
        loss: Scalar batch loss ``½ Σ (f_i - y_i)²`` before the update.
        n_active: Number of (data point, neuron) pairs with ``Z_ri > b`` in the batch.
        n_touched: Number of distinct neurons whose weights moved (``|∪_i S_i|``).
    """

    pred: Tensor
    loss: Tensor
    n_active: int = -1
    n_touched: int = -1


class DenseSGD:
    """Plain SGD on :class:`KronMLP` with explicit Kronecker inputs.

    .. math::  w_r \\leftarrow w_r - \\eta \\frac{\\partial}{\\partial w_r}
               \\frac{1}{2} \\sum_{i \\in B} (f(W, x_i, a) - y_i)^2

    Args:
        model: The network (its ``weight`` is updated in place).
        factors: K tensors ``[n, d_k]`` (same dtype/device as the model).
        y: Targets ``[n]``.
        lr: Step size ``η``.
    """

    def __init__(self, model: KronMLP, factors: Sequence[Tensor], y: Tensor, *, lr: float) -> None:
        self.factors = check_factors(factors, y)
        check_positive("lr", lr)
        if model.weight.shape[1] != math.prod(f.shape[1] for f in self.factors):
            raise ValueError(
                f"model input dimension {model.weight.shape[1]} does not match the product of the "
                f"factor dimensions {[f.shape[1] for f in self.factors]}; build the model with d = Π d_k"
            )
        self.model, self.y, self.lr = model, y, float(lr)
        self.n = y.shape[0]

    def step(self, idx: Tensor) -> StepResult:
        """One SGD step on the batch ``idx`` (builds ``x_i = u_i ⊗ v_i`` explicitly)."""
        idx = check_indices(idx, self.n, self.y.device)
        x = kron_rows([f[idx] for f in self.factors])  # [B, d]: the d-dependent part
        pred = self.model(x)
        loss = squared_loss(pred, self.y[idx])
        (grad,) = torch.autograd.grad(loss, self.model.weight)
        with torch.no_grad():
            self.model.weight.sub_(self.lr * grad)
        return StepResult(pred.detach(), loss.detach())

    @torch.no_grad()
    def predict(self, idx: Tensor) -> Tensor:
        """Predictions on training points ``idx`` without updating."""
        idx = check_indices(idx, self.n, self.y.device)
        return self.model(kron_rows([f[idx] for f in self.factors]))
