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
from torch import Tensor, nn

from quicktrain.precond._math import (
    damped_cholesky_inverse,
    damped_eigh_inverse,
    kfac_input_factor,
    kfac_output_factor,
    kron_damping,
    smw_factor,
    smw_solve,
)
from quicktrain.precond.capture import LayerBatch
from quicktrain.precond.distributed import all_gather_rows, all_reduce_mean
from quicktrain.precond.representations.base import Representation, ema, require_finite

__all__ = ["KronEmbedding", "KronFactored", "SmwKronFactored", "kron_dims", "kron_grad_matrix",
           "kron_sandwich_grad", "kron_set_grad"]

# ------------------------------------------------------------------ gradient layout of a Kronecker layer
def kron_dims(module: nn.Module, with_bias: bool = True) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear/Conv2d's Kronecker factors per group (``d_in`` with the bias column when the
    layer has a bias and ``with_bias``)."""
    groups = getattr(module, "groups", 1)
    d_in = (module.in_channels // groups * math.prod(module.kernel_size) if isinstance(module, nn.Conv2d)
            else module.in_features)
    return module.weight.shape[0] // groups, d_in + (module.bias is not None and with_bias)


def kron_grad_matrix(module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Weight (and bias column) of a Linear/Conv2d as ``[groups, d_out, d_in(+1)]``."""
    groups = getattr(module, "groups", 1)
    w = weight.reshape(groups, weight.shape[0] // groups, -1)
    if bias is not None:
        w = torch.cat([w, bias.reshape(groups, -1, 1)], dim=-1)
    return w


def kron_sandwich_grad(module: nn.Module, left: Tensor, right: Tensor, bias: str = "augment") -> None:
    """Replace the gradient of a Linear/Conv2d by its Kronecker-preconditioned version (per group).

    ``bias="augment"``: ``right`` is ``[d+1, d+1]`` over the input with a constant 1 appended and
    ``[∇W, ∇b] ← left [∇W, ∇b] right``, computed in blocks, ``[∇W R_ww + ∇b R_bw, ∇W R_wb + ∇b R_bb]``, so that
    the gradient is not concatenated nor the result split and copied. ``bias="separate"`` (or no bias):
    ``∇W ← left ∇W right`` and ``∇b ← left ∇b`` (the bias's input factor is the constant 1).

    Args:
        module: the layer, with ``weight.grad`` (and ``bias.grad``) set.
        left: ``[groups, d_out, d_out]``.
        right: ``[groups, d_in(+1), d_in(+1)]``.
        bias: ``augment`` or ``separate``.
    """
    w = module.weight
    wg = kron_grad_matrix(module, w.grad, None)  # [groups, d_out, d]: a view
    if wg.shape[0] == 1:  # one group: 2-D products, faster than batched ones on CPU
        left, right, wg = left[0], right[0], wg[0]
    bg = None if module.bias is None else module.bias.grad.reshape(*wg.shape[:-1], 1)
    d = wg.shape[-1]
    if bg is None or bias == "separate":
        w.grad = (left @ wg @ right).reshape(w.shape)
        if bg is not None:
            module.bias.grad = (left @ bg).reshape(module.bias.shape)
        return
    mid_w = wg @ right[..., :d, :d] + bg @ right[..., d:, :d]
    mid_b = wg @ right[..., :d, d:] + bg * right[..., d:, d:]
    w.grad = (left @ mid_w).reshape(w.shape)
    module.bias.grad = (left @ mid_b).reshape(module.bias.shape)


def kron_set_grad(module: nn.Module, mat: Tensor) -> None:
    """Write ``[groups, d_out, d_in(+1)]`` back into ``weight.grad`` (and ``bias.grad``)."""
    w = module.weight
    if module.bias is not None:
        module.bias.grad = mat[..., -1].reshape(module.bias.shape).contiguous()
        mat = mat[..., :-1]
    w.grad = mat.reshape(w.shape).contiguous()


# ------------------------------------------------------------------------------------ representations
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
        weight_sharing: how the ``L`` positions that share the weight (tokens, conv locations) enter the
            factors (Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural Network
            Architectures", NeurIPS 2023, eq. 9 and 12): ``expand`` treats them as extra examples,
            ``A = (1/N) Σ_{n,l} a_{nl} a_{nl}ᵀ``, ``G = (1/L) Σ_{k,n,l} g_{knl} g_{knl}ᵀ``; ``reduce`` first
            averages the inputs and sums the output gradients over them, ``ā_n = (1/L) Σ_l a_{nl}``,
            ``ĝ_{kn} = Σ_l g_{knl}``, ``A = (1/N) Σ_n ā_n ā_nᵀ``, ``G = Σ_{k,n} ĝ_{kn} ĝ_{kn}ᵀ`` (``L`` times fewer
            rows in the Gram products; both are exact for ``L = 1``).
        low_rank: when the statistics of one batch are kept as they are (``ema_decay=0``) and ``A``'s
            dimension exceeds its ``R`` rows (``N·L``, or ``N`` with ``reduce``; the ``Linear(3136, 128)`` of a
            CNN at batch 128), keep ``A = U_Aᵀ U_A`` as its rows and solve by Sherman–Morrison–Woodbury,
            ``(A + λ_A I)^{-1} V = λ_A^{-1}(V - U_Aᵀ (λ_A I_R + U_A U_Aᵀ)^{-1} U_A V)``: an ``R × R`` Cholesky
            instead of a ``d × d`` one, and ``R × d`` products instead of a ``d × d`` one at every step. The
            ``R × R`` factor belongs to the rows, so it is refreshed with them (at every curvature step).
        statistics_fraction: ``f ∈ (0, 1]``: ``A`` and ``G`` from the first ``M = ⌈f·N⌉`` examples of the batch
            only, each as the sub-batch's own estimate (``1/N`` becomes ``1/M``; ``f = 1`` is the batch's). A
            different, noisier estimator for cheaper factors: the Gram products shrink by ``f``, the forward
            and backward passes do not (the batch is shuffled, so its first examples are a random subset).
    """

    _state = ("A", "G", "A_inv", "G_inv", "UA", "A_factor", "A_damping")

    def __init__(self, name: str, module, solver: str = "cholesky", pi_damping: bool = True,
                 bias: str = "augment", weight_sharing: str = "expand", low_rank: bool = False,
                 statistics_fraction: float = 1.0) -> None:
        super().__init__(name, module)
        if solver not in _SOLVERS:
            raise ValueError(f"Unknown solver {solver!r}; choose from {sorted(_SOLVERS)}")
        if bias not in ("augment", "separate"):
            raise ValueError(f"Unknown bias={bias!r}; choose from ['augment', 'separate']")
        if weight_sharing not in ("expand", "reduce"):
            raise ValueError(f"Unknown weight_sharing={weight_sharing!r}; choose from ['expand', 'reduce']")
        self.solver, self.pi_damping, self.reduce = solver, pi_damping, weight_sharing == "reduce"
        if not 0.0 < statistics_fraction <= 1.0:
            raise ValueError(f"statistics_fraction must be in (0, 1], got {statistics_fraction}")
        self.low_rank, self.fraction = low_rank, statistics_fraction
        self.separate = bias == "separate" and module.bias is not None

    def update(self, batch: LayerBatch, decay: float) -> None:
        batch = self._statistics_batch(batch)
        self._update_input_factor(batch, decay)
        self._update_output_factor(batch, decay)

    def _statistics_batch(self, batch: LayerBatch) -> LayerBatch:
        """The examples the factors are computed from (the first ``⌈f·N⌉`` with ``statistics_fraction=f``)."""
        return batch if self.fraction == 1.0 else batch.head(max(1, math.ceil(self.fraction * batch.n)))

    def _update_output_factor(self, batch: LayerBatch, decay: float) -> None:
        fg = (kfac_output_factor(batch.kron_grads().sum(1, keepdim=True), 1, batch.scale) if self.reduce
              else batch.kron_output_factor())
        self.G = ema(self.G, all_reduce_mean(fg), decay)

    def _update_input_factor(self, batch: LayerBatch, decay: float) -> None:
        with_bias = not self.separate
        a = batch.kron_input_means(with_bias) if self.reduce else None
        d_in = kron_dims(self.module, with_bias)[1]
        rows = batch.n * (1 if self.reduce else batch.kron_length())
        if self.low_rank and decay == 0.0 and rows < d_in:
            a = batch.kron_inputs(with_bias) if a is None else a
            ua = a.reshape(rows, *a.shape[2:]) / math.sqrt(batch.n)  # A = U_Aᵀ U_A per group
            self.UA = all_gather_rows(ua).transpose(0, 1)  # [groups, R, d_in]
            self.A = self.A_inv = self.A_factor = None
        else:
            # expand: the patches of a convolution are never built for the whole batch (see kron_input_factor)
            fa = batch.kron_input_factor(with_bias) if a is None else kfac_input_factor(a, batch.n)
            if self.UA is not None:  # a moving average starts from the dense matrix of the rows kept so far
                self.A, self.UA, self.A_factor = self.UA.transpose(-1, -2) @ self.UA, None, None
            self.A = ema(self.A, all_reduce_mean(fa), decay)

    def _damping(self, damping: float) -> tuple[Tensor, Tensor]:
        a = self.A if self.UA is None else self.UA.square().sum(-2)  # the rows' diagonal of A
        return kron_damping(a, self.G, damping, self.pi_damping)

    def update_inverse(self, damping: float) -> None:
        inv = _SOLVERS[self.solver]
        lam_a, lam_g = self._damping(damping)
        if self.UA is None:
            self.A_inv = inv(self.A, lam_a)
        self.G_inv = inv(self.G, lam_g)

    def precondition(self, damping: float) -> None:
        self.grads()  # raises naming the parameter when one has no gradient
        if self.UA is None:
            kron_sandwich_grad(self.module, self.G_inv, self.A_inv, "separate" if self.separate else "augment")
            return
        if self.A_factor is None:  # first solve with these rows
            self.A_damping = self._damping(damping)[0]
            self.A_factor = smw_factor(self.UA, self.A_damping.view(-1, 1))
        m = self.module
        mat = kron_grad_matrix(m, m.weight.grad, None if self.separate or m.bias is None else m.bias.grad)
        right = smw_solve(self.UA, mat.transpose(-1, -2), self.A_damping, self.A_factor).transpose(-1, -2)
        out = self.G_inv @ right
        if self.separate:
            m.weight.grad = out.reshape(m.weight.shape).contiguous()
            m.bias.grad = (self.G_inv @ m.bias.grad.reshape(*out.shape[:-1], 1)).reshape(m.bias.shape)
        else:
            kron_set_grad(m, out)

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.separate:
            raise NotImplementedError("mvp is defined for bias='augment' only")
        mat = kron_grad_matrix(self.module, vecs["weight"], vecs.get("bias"))
        a = self.A if self.UA is None else self.UA.transpose(-1, -2) @ self.UA
        out = self.G @ mat @ a
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
        fg = torch.einsum("nld,nle->de", g, g) * (batch.scale**2 / length)
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
        ug = g.mean(1) * (math.sqrt(length) * batch.scale)  # [K*N, groups, d_out]
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
