"""K-BFGS (Goldfarb, Ren & Bahamou, "Practical Quasi-Newton Methods for Training Deep Neural Networks",
NeurIPS 2020).

For a Linear/Conv2d layer the Kronecker factor ``A`` is kept as in K-FAC and the inverse of the output factor is
a BFGS matrix ``H ≈ G^{-1}`` updated from a secant pair of the layer's pre-activations ``h`` and their
gradients ``g = ∂L/∂h`` (both averaged over the batch and positions) on the *same* batch at two parameter
values: ``s = h̄(θ_{t'}) - h̄(θ_t)``, ``y = ḡ(θ_{t'}) - ḡ(θ_t)``. The pair is double-damped (§4 of the paper:
Powell, when ``s^T y < 0.2\\, y^T H y`` replace ``s ← θ s + (1-θ) H y`` with
``θ = 0.8\\, y^T H y / (y^T H y - s^T y)``; then Levenberg–Marquardt ``y ← y + √λ s``), and

.. math::
    H \\leftarrow (I - \\rho s y^\\top) H (I - \\rho y s^\\top) + \\rho s s^\\top, \\quad \\rho = 1/s^\\top y, \\qquad
    \\Delta W = H\\, \\nabla W\\, (A + \\sqrt\\lambda I)^{-1}.

The second point of each pair is evaluated at the next curvature step by an extra forward and backward pass
on the previous curvature batch (kept in the state), with buffers left unchanged. Embedding layers use K-FAC
and normalisation layers unit-wise blocks, fed by the ``fisher_type`` statistics (``emp`` by default, which
reuses the loss backward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from quicktrain.precond._math import damped_cholesky_inverse, kfac_factors
from quicktrain.precond.capture import LayerBatch, kron_output
from quicktrain.precond.distributed import all_reduce_mean
from quicktrain.precond.representations.base import Representation, ema
from quicktrain.precond.representations.kron import kron_sandwich_grad

__all__ = ["KronBfgs", "bfgs_inverse_update", "damped_bfgs_update"]


def bfgs_inverse_update(h: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """BFGS update of an inverse-curvature matrix (batched over a leading group axis), in ``O(d²)``.

    .. math:: H \\leftarrow (I - \\rho s y^\\top) H (I - \\rho y s^\\top) + \\rho s s^\\top
        = H + \\rho (1 + \\rho\\, y^\\top H y)\\, s s^\\top - \\rho\\,(H y s^\\top + s y^\\top H),
        \\quad \\rho = 1/s^\\top y

    Args:
        h: ``[groups, d, d]`` current inverse approximation (symmetric positive definite).
        s: ``[groups, d]`` change of the variable.
        y: ``[groups, d]`` change of the gradient.

    Returns:
        ``[groups, d, d]`` satisfying the secant equation ``H_new y = s``; a group whose pair has ``sᵀy ≤ 0``
        (no curvature information, e.g. the parameters did not move) keeps ``H`` (``ρ = 0``).
    """
    sy = (s * y).sum(-1, keepdim=True)
    ok = sy > 0
    rho = torch.where(ok, 1.0 / torch.where(ok, sy, torch.ones_like(sy)), torch.zeros_like(sy))  # [groups, 1]
    hy = (h @ y.unsqueeze(-1)).squeeze(-1)
    yhy = (y * hy).sum(-1, keepdim=True)
    u = 0.5 * rho * (1 + rho * yhy) * s - rho * hy  # the update is s uᵀ + u sᵀ; no ρ² (it overflows for tiny pairs)
    cross = s.unsqueeze(-1) * u.unsqueeze(-2)
    return h + cross + cross.transpose(-1, -2)


def damped_bfgs_update(h: Tensor, s: Tensor, y: Tensor, mu: float) -> Tensor:
    """Double-damped BFGS update (see the module docstring): Powell's damping of ``s``, then
    Levenberg–Marquardt ``y ← y + μ s``, then :func:`bfgs_inverse_update`.

    Args:
        h: ``[groups, d, d]`` current inverse approximation (symmetric positive definite).
        s: ``[groups, d]`` change of the variable.
        y: ``[groups, d]`` change of the gradient.
        mu: Levenberg–Marquardt damping ``μ``.

    Returns:
        ``[groups, d, d]`` satisfying the secant equation ``H_new y' = s'`` for the damped pair.
    """
    hy = (h @ y.unsqueeze(-1)).squeeze(-1)
    yhy = (y * hy).sum(-1, keepdim=True)
    sy = (s * y).sum(-1, keepdim=True)
    theta = torch.where(sy < 0.2 * yhy, 0.8 * yhy / (yhy - sy), torch.ones_like(sy))
    s = theta * s + (1 - theta) * hy  # Powell's damping on H
    return bfgs_inverse_update(h, s, y + mu * s)  # Levenberg-Marquardt damping on H^{-1}


def _means(batch: LayerBatch) -> tuple[Tensor, Tensor]:
    """Batch-and-position means of the layer output ``h̄`` and of the per-example output gradient ``ḡ``."""
    h = torch.cat([kron_output(batch.module, o) for o in batch.outputs], dim=1).mean((0, 1))
    g = batch.kron_grads()  # gradients of the mean loss: N·g is the per-example gradient
    return h, g.mean(1).sum(0).mul_(batch.scale)


class KronBfgs(Representation):
    """K-BFGS block of a Linear or Conv2d layer (see the module docstring).

    Args:
        name: module name.
        module: ``nn.Linear`` or ``nn.Conv2d``.
        a_inverse: ``cholesky`` (``(A + √λ I)^{-1}`` by a damped Cholesky inverse on each inverse step, as in
            the paper) or ``bfgs`` (the Cholesky inverse once, then on each inverse step one BFGS update towards
            the current ``A`` along the mean input, ``s = H_A ā``, ``y = (A + √λ I) s``, as ASDL does; ``O(d²)``
            instead of ``O(d³)``).
        bias: ``augment`` (the bias is the last input column of ``A``) or ``separate`` (``A`` over the weight
            inputs only and the bias preconditioned by ``H`` alone, as ASDL does).
    """

    _state = ("A", "A_inv", "a_bar", "H", "h_bar", "g_bar")

    def __init__(self, name: str, module: nn.Module, a_inverse: str = "cholesky", bias: str = "augment") -> None:
        super().__init__(name, module)
        if a_inverse not in ("cholesky", "bfgs"):
            raise ValueError(f"Unknown a_inverse={a_inverse!r}; choose from ['bfgs', 'cholesky']")
        if bias not in ("augment", "separate"):
            raise ValueError(f"Unknown bias={bias!r}; choose from ['augment', 'separate']")
        self.a_inverse, self.bias = a_inverse, bias

    def update(self, batch: LayerBatch, decay: float) -> None:
        a = batch.kron_inputs(with_bias=self.bias == "augment")
        fa, _ = kfac_factors(a, batch.kron_grads()[:0], batch.n)
        self.A = ema(self.A, all_reduce_mean(fa), decay)
        self.a_bar = all_reduce_mean(a.mean((0, 1)))  # [groups, d_in]

    def record(self, batch: LayerBatch) -> None:
        """First point of the next secant pair (current parameters, current batch)."""
        h, g = _means(batch)
        self.h_bar, self.g_bar = all_reduce_mean(h), all_reduce_mean(g)
        if self.H is None:
            eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
            self.H = eye.expand(h.shape[0], -1, -1).clone()

    def secant(self, batch: LayerBatch, damping: float) -> None:
        """Second point: the previous batch at the current parameters; updates ``H``."""
        h, g = _means(batch)
        s = all_reduce_mean(h) - self.h_bar
        y = all_reduce_mean(g) - self.g_bar
        self.H = damped_bfgs_update(self.H, s, y, math.sqrt(damping))

    def update_inverse(self, damping: float) -> None:
        lam = math.sqrt(damping)
        if self.a_inverse == "cholesky" or self.A_inv is None:
            self.A_inv = damped_cholesky_inverse(self.A, lam)
            return
        s = (self.A_inv @ self.a_bar.unsqueeze(-1)).squeeze(-1)
        y = (self.A @ s.unsqueeze(-1)).squeeze(-1) + lam * s
        self.A_inv = bfgs_inverse_update(self.A_inv, s, y)

    def precondition(self, damping: float) -> None:
        self.grads()  # raises naming the parameter when one has no gradient
        kron_sandwich_grad(self.module, self.H, self.A_inv, self.bias)
