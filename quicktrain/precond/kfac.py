"""Kronecker-factored curvature: K-FAC for Linear/Conv2d (KFC) and Embedding, and SKFAC.

Damping enters each factor as ``√λ``, rescaled by π unless ``pi_damping=False`` (see
:func:`~quicktrain.precond._math.kron_damping`):

.. math:: \\Delta W = (G + \\tfrac{\\sqrt\\lambda}{\\pi} I)^{-1}\\, \\nabla W\\, (A + \\pi\\sqrt\\lambda I)^{-1}

(Martens & Grosse, 2015, §6.3). References: Martens & Grosse, "Optimizing Neural
Networks with Kronecker-factored Approximate Curvature", ICML 2015; Grosse & Martens, "A Kronecker-factored
approximate Fisher matrix for convolution layers", ICML 2016; Tang et al., "SKFAC: Training Neural Networks
With Faster Kronecker-Factored Approximate Curvature", CVPR 2021.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quicktrain.precond._math import (
    damped_cholesky_inverse,
    damped_eigh_inverse,
    kfac_factors,
    kron_damping,
    smw_solve,
)
from quicktrain.precond.representation import Representation, ema, require_finite
from quicktrain.precond.stats import (
    LayerBatch,
    all_gather_rows,
    all_reduce_mean,
    kron_grad_matrix,
    kron_sandwich_grad,
    kron_set_grad,
)

__all__ = ["KronEmbedding", "KronFactored", "SmwKronFactored"]

_SOLVERS = {"cholesky": damped_cholesky_inverse, "eigen": damped_eigh_inverse}


class KronFactored(Representation):
    """K-FAC block ``A ⊗ G`` of a Linear or Conv2d layer (weight and bias together), per group.

    Args:
        name: module name.
        module: ``nn.Linear`` or ``nn.Conv2d``.
        solver: ``cholesky`` (damped Cholesky inverse) or ``eigen`` (eigendecomposition).
        pi_damping: split the damping by π (see :func:`~quicktrain.precond._math.kron_damping`).
        bias: ``augment`` (the bias is the last input column of ``A``, Martens & Grosse) or ``separate``
            (``A`` over the weight inputs only, bias preconditioned by ``G`` alone, as ASDL does).
    """

    _state = ("A", "G", "A_inv", "G_inv")

    def __init__(self, name: str, module, solver: str = "cholesky", pi_damping: bool = True,
                 bias: str = "augment") -> None:
        super().__init__(name, module)
        if solver not in _SOLVERS:
            raise ValueError(f"Unknown solver {solver!r}; choose from {sorted(_SOLVERS)}")
        if bias not in ("augment", "separate"):
            raise ValueError(f"Unknown bias={bias!r}; choose from ['augment', 'separate']")
        self.solver, self.pi_damping = solver, pi_damping
        self.separate = bias == "separate" and module.bias is not None

    def update(self, batch: LayerBatch, decay: float) -> None:
        fa, fg = kfac_factors(batch.kron_inputs(with_bias=not self.separate), batch.kron_grads(), batch.n)
        self.A = ema(self.A, all_reduce_mean(fa), decay)
        self.G = ema(self.G, all_reduce_mean(fg), decay)

    def update_inverse(self, damping: float) -> None:
        inv = _SOLVERS[self.solver]
        lam_a, lam_g = kron_damping(self.A, self.G, damping, self.pi_damping)
        self.A_inv = inv(self.A, lam_a)
        self.G_inv = inv(self.G, lam_g)

    def precondition(self, damping: float) -> None:
        self.grads()  # raises naming the parameter when one has no gradient
        kron_sandwich_grad(self.module, self.G_inv, self.A_inv, "separate" if self.separate else "augment")

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.separate:
            raise NotImplementedError("mvp is defined for bias='augment' only")
        mat = kron_grad_matrix(self.module, vecs["weight"], vecs.get("bias"))
        out = self.G @ mat @ self.A
        res = {}
        if "bias" in vecs:
            res["bias"] = out[..., -1].reshape(vecs["bias"].shape)
            out = out[..., :-1]
        res["weight"] = out.reshape(vecs["weight"].shape)
        return res


class KronEmbedding(Representation):
    """K-FAC block of an Embedding: ``A`` is diagonal (token frequencies), ``G`` is dense.

    .. math:: A = \\frac1N \\operatorname{diag}\\Big(\\sum_{n,l} e_{x_{nl}}\\Big), \\quad
        G = \\sum_{k,n} \\frac1L \\sum_l g_{knl} g_{knl}^\\top, \\quad
        \\Delta W = (A + \\sqrt\\lambda I)^{-1} \\nabla W (G + \\sqrt\\lambda I)^{-1}

    (the weight is ``[V, D]``: rows are inputs, columns outputs).
    """

    _state = ("A", "G", "A_inv", "G_inv")

    def __init__(self, name: str, module, pi_damping: bool = True) -> None:
        super().__init__(name, module)
        self.pi_damping = pi_damping

    def update(self, batch: LayerBatch, decay: float) -> None:
        idx, length = batch.embedding_inputs()
        m = self.module
        counts = torch.bincount(idx.reshape(-1), minlength=m.num_embeddings).to(m.weight.dtype) / batch.n
        if m.padding_idx is not None:
            counts[m.padding_idx] = 0
        g = batch.embedding_grads()
        fg = torch.einsum("nld,nle->de", g, g) / length
        self.A = ema(self.A, all_reduce_mean(counts), decay)
        self.G = ema(self.G, all_reduce_mean(fg), decay)

    def update_inverse(self, damping: float) -> None:
        lam_a, lam_g = kron_damping(self.A, self.G[None], damping, self.pi_damping)
        self.A_inv = 1.0 / (self.A + lam_a.reshape(()))
        self.G_inv = damped_cholesky_inverse(self.G, lam_g[0])

    def precondition(self, damping: float) -> None:
        w = self.module.weight
        w.grad = (self.A_inv.unsqueeze(1) * self.grads()["weight"]) @ self.G_inv

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"weight": (self.A.unsqueeze(1) * vecs["weight"]) @ self.G}


class SmwKronFactored(Representation):
    """SKFAC: each Kronecker factor kept as its rows ``U`` (``A = U_A^T U_A``) and inverted by SMW.

    For a convolution the positions are reduced to their mean (Tang et al., 2021, §3.2):
    ``Σ_l a_l a_l^T ≈ L ā ā^T``, so ``U_A = √(L/N) ā_n`` and ``U_G = √L ḡ_{kn}``; for a Linear layer without
    extra dims this is exactly K-FAC's factors. Only the latest curvature batch is used (no moving average), and
    the damping is split as ``√λ`` per factor (no π).

    .. math:: (A + \\sqrt\\lambda I)^{-1} V = \\lambda^{-1/2}\\big(V - U_A^\\top (\\sqrt\\lambda I + U_A U_A^\\top)^{-1}
        U_A V\\big)
    """

    _state = ("UA", "UG")

    def update(self, batch: LayerBatch, decay: float) -> None:
        a, g = batch.kron_inputs(), batch.kron_grads()
        length = a.shape[1]
        ua = a.mean(1) * math.sqrt(length / batch.n)  # [N, groups, d_in]
        ug = g.mean(1) * math.sqrt(length)  # [K*N, groups, d_out]
        self.UA = all_gather_rows(ua).transpose(0, 1).contiguous()  # [groups, N, d_in]
        self.UG = all_gather_rows(ug).transpose(0, 1).contiguous()

    def update_inverse(self, damping: float) -> None:
        """Nothing to precompute: SMW solves against the rows at each step (their ``K × K`` Gram matrices per
        group are cheap, and caching their factors would cost ``groups × K²`` per layer)."""

    def precondition(self, damping: float) -> None:
        grads = self.grads()
        mat = kron_grad_matrix(self.module, grads["weight"], grads.get("bias"))  # [g, o, i]
        lam = math.sqrt(damping)
        left = smw_solve(self.UG, mat, lam)
        out = smw_solve(self.UA, left.transpose(-1, -2), lam).transpose(-1, -2)
        kron_set_grad(self.module, require_finite(out, "SKFAC update", self.name, self.step))
