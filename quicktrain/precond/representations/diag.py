"""Diagonal Fisher: ``Δθ = ∇θ / (diag F + λ)`` from per-example gradients."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quicktrain.precond.capture import LayerBatch
from quicktrain.precond.distributed import all_reduce_mean
from quicktrain.precond.representations.base import Representation, ema

__all__ = ["Diagonal"]


class Diagonal(Representation):
    """Diagonal Fisher ``diag(F) = Σ_{k,n} ∇θ_{kn}^2``; ``Δθ = ∇θ / (diag(F) + λ)``."""

    _state = ("D",)

    def update(self, batch: LayerBatch, decay: float) -> None:
        m = self.module
        if isinstance(m, nn.Linear) and batch.inputs[0].dim() == 2 and len(batch.inputs) == 1:
            a, g = batch.kron_inputs(), batch.kron_grads()  # one position: (g a^T)^2 = g^2 (a^2)^T
            g2 = g[:, 0, 0].square().reshape(-1, a.shape[0], g.shape[-1])  # [K, N, d_out]
            sq = torch.einsum("kno,ni->oi", g2, a[:, 0, 0].square()).mul_(batch.scale**2)
            d = {"weight": sq[:, : m.in_features]}
            if m.bias is not None:
                d["bias"] = sq[:, -1]
        else:
            d = {n: t.square().sum(0) for n, t in batch.per_example_grads().items()}
        self.D = {n: ema(None if self.D is None else self.D[n], all_reduce_mean(d[n]), decay) for n in d}

    def update_inverse(self, damping: float) -> None:
        """Nothing to precompute."""

    def precondition(self, damping: float) -> None:
        for n, g in self.grads().items():
            self.params[n].grad = g / (self.D[n] + damping)

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.D[n] * v for n, v in vecs.items()}
