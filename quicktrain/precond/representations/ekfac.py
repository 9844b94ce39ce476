"""Eigenvalue-corrected K-FAC (George et al., "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis", NeurIPS 2018).

With the K-FAC factors ``A = U_A Λ_A U_A^T`` and ``G = U_G Λ_G U_G^T``, the curvature is kept diagonal in the
Kronecker eigenbasis with the second moments of the projected per-example gradients as its entries:

.. math::
    S_{ij} = \\sum_{k,n} \\big[U_G^\\top \\nabla W_{kn} U_A\\big]_{ij}^2, \\qquad
    \\Delta W = U_G \\Big(\\frac{U_G^\\top \\nabla W U_A}{S + \\lambda}\\Big) U_A^\\top

(eq. 10–11 of the paper; ``∇W_{kn}`` are the scaled per-example gradients so that ``Σ_{k,n}`` is the Fisher).
The eigenbasis is recomputed on inverse steps, the scales on curvature steps (restarted when the basis
changes, kept as a moving average otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quicktrain.precond._math import eigh_float64, kfac_factors, kron_per_example
from quicktrain.precond.capture import LayerBatch
from quicktrain.precond.distributed import all_reduce_mean
from quicktrain.precond.representations.base import Representation, ema
from quicktrain.precond.representations.kron import kron_grad_matrix, kron_set_grad

__all__ = ["EigenCorrectedKron", "ekfac_scales"]


def ekfac_scales(a: Tensor, g: Tensor, ua: Tensor, ug: Tensor) -> Tensor:
    """EKFAC scales ``S = Σ_{k,n} (U_G^T ∇W_{kn} U_A)^2`` with ``∇W_{kn} = Σ_l g_{knl} a_{nl}^T``.

    Args:
        a: inputs ``[N, L, groups, d_in]``.
        g: output gradients ``[K*N, L, groups, d_out]``.
        ua: ``[groups, d_in, d_in]`` eigenvectors of ``A``.
        ug: ``[groups, d_out, d_out]`` eigenvectors of ``G``.

    Returns:
        ``[groups, d_out, d_in]``.
    """
    a_hat = torch.einsum("nlgi,gij->nlgj", a, ua)
    g_hat = torch.einsum("nlgo,gop->nlgp", g, ug)
    if a.shape[1] == 1:  # one position: (ĝ â^T)^2 = ĝ^2 (â^2)^T
        g2 = g_hat[:, 0].square().reshape(-1, a.shape[0], *g_hat.shape[2:])  # [K, N, groups, d_out]
        return torch.einsum("kngo,ngi->goi", g2, a_hat[:, 0].square())
    return kron_per_example(a_hat, g_hat).square().sum(0)


class EigenCorrectedKron(Representation):
    """EKFAC block of a Linear or Conv2d layer (see the module docstring)."""

    _state = ("A", "G", "UA", "UG", "S", "fresh_basis")

    def __init__(self, name: str, module) -> None:
        super().__init__(name, module)
        self._pending: tuple[Tensor, Tensor, float] | None = None  # inputs, gradients, their scale

    def update(self, batch: LayerBatch, decay: float) -> None:
        a, g = batch.kron_inputs(), batch.kron_grads()
        fa, fg = kfac_factors(a, g, batch.n, batch.scale)
        self.A = ema(self.A, all_reduce_mean(fa), decay)
        self.G = ema(self.G, all_reduce_mean(fg), decay)
        self._pending = (a, g, batch.scale)
        self._decay = decay

    def update_inverse(self, damping: float) -> None:
        _, self.UA = eigh_float64(self.A)
        _, self.UG = eigh_float64(self.G)
        self.fresh_basis = torch.tensor(True)

    def _update_scales(self) -> None:
        if self._pending is None:
            return
        a, g, scale = self._pending
        s = all_reduce_mean(ekfac_scales(a, g, self.UA, self.UG).mul_(scale**2))
        self.S = s if bool(self.fresh_basis) else ema(self.S, s, self._decay)
        self.fresh_basis = torch.tensor(False)
        self._pending = None

    def precondition(self, damping: float) -> None:
        self._update_scales()
        grads = self.grads()
        mat = kron_grad_matrix(self.module, grads["weight"], grads.get("bias"))
        ug, ua = self.UG, self.UA
        proj = ug.transpose(-1, -2) @ mat @ ua
        kron_set_grad(self.module, ug @ (proj / (self.S + damping)) @ ua.transpose(-1, -2))
