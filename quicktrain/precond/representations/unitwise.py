"""Unit-wise natural gradient (Ollivier, "Riemannian metrics for neural networks I: feedforward networks",
Information and Inference 2015): the Fisher kept as small dense blocks, one per unit.

Blocks: 2×2 (weight, bias) per unit of BatchNorm/LayerNorm/GroupNorm; ``[d_in, d_in]`` per output unit of
Linear/Conv2d (bias included); ``[D, D]`` per token of an Embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quicktrain.precond._math import damped_cholesky_inverse
from quicktrain.precond.capture import KRON_TYPES, LayerBatch
from quicktrain.precond.distributed import all_reduce_mean
from quicktrain.precond.representations.base import Representation, ema
from quicktrain.precond.representations.kron import kron_grad_matrix, kron_set_grad

__all__ = ["UnitWise"]


class UnitWise(Representation):
    """Unit-wise natural gradient blocks (see the module docstring).

    .. math:: F_u = \\sum_{k,n} \\nabla\\theta_{u,kn} \\nabla\\theta_{u,kn}^\\top, \\qquad
        \\Delta\\theta_u = (F_u + \\lambda I)^{-1} \\nabla\\theta_u
    """

    _state = ("F", "F_inv")

    def _unit_rows(self, batch: LayerBatch) -> Tensor:
        m = self.module
        if isinstance(m, KRON_TYPES):
            return batch.kron_per_example()  # [KN, groups, o, i]
        if isinstance(m, nn.Embedding):
            return batch.per_example_grads()["weight"]  # [KN, V, D]
        return batch.unit_grads()  # [KN, U, c]

    def update(self, batch: LayerBatch, decay: float) -> None:
        rows = self._unit_rows(batch)
        f = torch.einsum("n...i,n...j->...ij", rows, rows)
        self.F = ema(self.F, all_reduce_mean(f), decay)

    def update_inverse(self, damping: float) -> None:
        self.F_inv = damped_cholesky_inverse(self.F, damping)

    def _to_units(self, vecs: dict[str, Tensor]) -> Tensor:
        m = self.module
        if isinstance(m, KRON_TYPES):
            return kron_grad_matrix(m, vecs["weight"], vecs.get("bias"))
        if isinstance(m, nn.Embedding):
            return vecs["weight"]
        return torch.stack([vecs[n].reshape(-1) for n in ("weight", "bias") if n in vecs], dim=-1)

    def _from_units(self, u: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
        m = self.module
        if isinstance(m, nn.Embedding):
            return {"weight": u}
        if isinstance(m, KRON_TYPES):
            out = {}
            if "bias" in like:
                out["bias"] = u[..., -1].reshape(like["bias"].shape)
                u = u[..., :-1]
            out["weight"] = u.reshape(like["weight"].shape)
            return out
        names = [n for n in ("weight", "bias") if n in like]
        return {n: u[..., i].reshape(like[n].shape) for i, n in enumerate(names)}

    def precondition(self, damping: float) -> None:
        grads = self.grads()
        u = (self.F_inv @ self._to_units(grads).unsqueeze(-1)).squeeze(-1)
        if isinstance(self.module, KRON_TYPES):
            kron_set_grad(self.module, u)
            return
        for n, t in self._from_units(u, grads).items():
            self.params[n].grad = t.contiguous()

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._from_units((self.F @ self._to_units(vecs).unsqueeze(-1)).squeeze(-1), vecs)
