"""Pure tensor functions of gradient preconditioning, one equation each.

Conventions: a Kronecker-factored block of a weight matrix ``W`` of shape ``[d_out, d_in]`` (bias appended as
the last input column) is ``A ⊗ G`` with ``A`` of shape ``[d_in, d_in]`` and ``G`` of shape ``[d_out, d_out]``,
and ``vec`` stacks columns, so that

.. math:: (A \\otimes G)\\,\\mathrm{vec}(V) = \\mathrm{vec}(G V A^\\top).

Grouped convolutions carry a leading group axis ``[groups, ...]`` on every factor. Roots and inverses run
``eigh`` in float64 with explicit clamps and are cast back to the input dtype; Cholesky factorisations run in the
input dtype and redo in float64 the matrices where they fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "adam_direction",
    "as_matrix",
    "cg_solve",
    "damped_cholesky",
    "kron_damping",
    "damped_cholesky_inverse",
    "damped_eigh_inverse",
    "eigh_float64",
    "kfac_factors",
    "kfac_input_factor",
    "kfac_output_factor",
    "kron_matmul",
    "kron_per_example",
    "matrix_power",
    "reproject_second_moment",
    "rotate",
    "smw_factor",
    "smw_solve",
]


def kfac_factors(a: Tensor, g: Tensor, n: int, g_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Kronecker factors of one layer from its inputs and output gradients (K-FAC, eq. 1 of Martens & Grosse).

    .. math::
        A = \\frac1N \\sum_{n,l} a_{nl} a_{nl}^\\top, \\qquad
        G = \\sum_{k,n} \\frac1L \\sum_{l} g_{knl} g_{knl}^\\top

    where ``l`` runs over the ``L`` weight-sharing positions (conv locations, sequence tokens; ``L=1`` for a
    plain Linear layer, which makes ``A ⊗ G`` the exact Fisher block when ``N=1``) and ``k`` over the backward
    vectors of the Fisher type (already scaled so that ``sum_k`` of their outer products is the loss-output
    curvature, see :func:`quicktrain.precond.curvature.output_sqrt`). This is KFC (Grosse & Martens, 2016) for
    convolutions.

    Args:
        a: inputs ``[N, L, groups, d_in]``.
        g: output gradients ``[K*N, L, groups, d_out]`` (the K backward vectors stacked along the batch).
        n: batch size ``N`` (the normaliser of ``A``).
        g_scale: the gradients' scale ``s`` (``g`` stands for ``s·g``): folded into ``G`` as ``s²``, so that the
            gradients are never copied to scale them.

    Returns:
        ``(A, G)`` of shapes ``[groups, d_in, d_in]`` and ``[groups, d_out, d_out]``.
    """
    return kfac_input_factor(a, n), kfac_output_factor(g, a.shape[1], g_scale)


def kfac_input_factor(a: Tensor, n: int) -> Tensor:
    """K-FAC's ``A = (1/N) Σ_{n,l} a_{nl} a_{nl}^\top`` alone (see :func:`kfac_factors`), ``[groups, d, d]``; a sum
    over example chunks of ``a`` gives the same ``A``."""
    return _gram(a) / n


def kfac_output_factor(g: Tensor, length: int, g_scale: float = 1.0) -> Tensor:
    """K-FAC's ``G = (s²/L) Σ_{k,n,l} g_{knl} g_{knl}^\top`` alone (see :func:`kfac_factors`), ``[groups, d, d]``."""
    return _gram(g).mul_(g_scale**2 / length)


def kron_per_example(a: Tensor, g: Tensor) -> Tensor:
    """Per-example gradient matrices of a Kronecker layer, ``∇W_{kn} = Σ_l g_{knl} a_{nl}^\\top``.

    Args:
        a: inputs ``[N, L, groups, d_in]``.
        g: output gradients ``[K*N, L, groups, d_out]`` (K backward vectors stacked along the batch).

    Returns:
        ``[K*N, groups, d_out, d_in]``, one batched product over examples (the inputs are not repeated K times).
    """
    n, length, groups = a.shape[:3]
    return torch.einsum("knlgo,nlgi->kngoi", g.reshape(-1, n, length, groups, g.shape[-1]), a).flatten(0, 1)


def _gram(t: Tensor) -> Tensor:
    """``Σ_{n,l} t_{nlg} t_{nlg}^T`` per group: one matrix product for one group; for several, one product per
    example and group summed over examples (no copy when positions are innermost, as for depthwise patches)."""
    if t.shape[2] == 1:
        flat = t.reshape(-1, t.shape[-1])
        return (flat.T @ flat).unsqueeze(0)
    return torch.einsum("nlgi,nlgj->ngij", t, t).sum(0)


def kron_matmul(a_mat: Tensor, g_mat: Tensor, v: Tensor) -> Tensor:
    """Apply ``A ⊗ G`` to ``vec(V)``: returns ``G V A^T`` (batched over a leading group axis).

    Args:
        a_mat: ``[groups, d_in, d_in]``.
        g_mat: ``[groups, d_out, d_out]``.
        v: ``[groups, d_out, d_in]``.

    Returns:
        ``[groups, d_out, d_in]``.
    """
    return g_mat @ v @ a_mat.transpose(-1, -2)


def _check_damping(damping: float | Tensor) -> None:
    if not bool((torch.as_tensor(damping) > 0).all()):
        raise ValueError(f"damping must be > 0 for an inverse, got {damping}")


def _plus_diagonal(m: Tensor, damping: float | Tensor) -> Tensor:
    """``M + λI`` as a new tensor (``λ`` a float or a tensor broadcasting against ``[..., 1, 1]``), in float32 at
    least (16-bit statistics under autocast have no Cholesky)."""
    out = m.float() if m.element_size() < 4 else m.clone()
    lam = damping.to(out.dtype).squeeze(-1) if isinstance(damping, Tensor) and damping.dim() >= 2 else damping
    out.diagonal(dim1=-2, dim2=-1).add_(lam)
    return out


def _clamped_eigh(damped: Tensor, damping: float | Tensor, bad: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, U)`` of the float64 eigendecomposition of the batch elements ``bad`` of ``M + λI``, with the
    eigenvalues clamped below at ``λ`` (what they are for a PSD ``M``; round-off can push them lower)."""
    s, u = torch.linalg.eigh(damped[bad].double())
    floor = damping[bad] if isinstance(damping, Tensor) and damping.dim() > 0 else damping
    floor = torch.as_tensor(floor, dtype=s.dtype, device=s.device).reshape(-1, 1)
    return torch.maximum(s, floor), u


def damped_cholesky_inverse(m: Tensor, damping: float | Tensor) -> Tensor:
    """Inverse of a damped symmetric PSD matrix via Cholesky.

    .. math:: (M + \\lambda I)^{-1} = L^{-\\top} L^{-1}, \\quad L L^\\top = M + \\lambda I

    The factorisation runs in the dtype of ``m`` (float32 is accurate to ~1e-6 relative for the damped
    matrices of preconditioning and 4x faster than float64 on CPU). Batch elements whose factorisation fails,
    because round-off made ``M + λI`` numerically indefinite, are inverted in float64 through the
    eigendecomposition with eigenvalues clamped at ``λ`` (the same matrix for a PSD ``M``).

    Args:
        m: ``[..., d, d]`` symmetric positive semi-definite (only the lower triangle is read).
        damping: ``λ > 0`` (a float, or a tensor broadcasting against ``[..., 1, 1]``).

    Returns:
        ``[..., d, d]`` in the dtype of ``m``.

    Raises:
        ValueError: ``damping`` is not positive.
    """
    _check_damping(damping)
    damped = _plus_diagonal(m, damping)
    chol, info = torch.linalg.cholesky_ex(damped)
    inv = torch.cholesky_inverse(chol)
    bad = info != 0
    if bool(bad.any()):
        s, u = _clamped_eigh(damped.reshape(-1, *m.shape[-2:]), _flat_damping(damping, m), bad.reshape(-1))
        inv.reshape(-1, *m.shape[-2:])[bad.reshape(-1)] = ((u / s.unsqueeze(-2)) @ u.transpose(-1, -2)).to(inv.dtype)
    return inv.to(m.dtype)


def _flat_damping(damping: float | Tensor, m: Tensor) -> float | Tensor:
    """``λ`` with one entry per matrix of the flattened batch of ``m`` (a float stays a float)."""
    if not isinstance(damping, Tensor) or damping.dim() == 0:
        return damping
    return damping.expand(*m.shape[:-2], 1, 1).reshape(-1)


def eigh_float64(m: Tensor, min_eig: float = 0.0) -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``M = U diag(s) U^T`` in float64 with eigenvalues clamped below at ``min_eig``.

    Args:
        m: ``[..., d, d]`` symmetric.
        min_eig: lower clamp of the eigenvalues (0 keeps a PSD matrix PSD under round-off).

    Returns:
        ``(s, U)`` in the dtype of ``m``.
    """
    m64 = m.double()
    s, u = torch.linalg.eigh(0.5 * (m64 + m64.transpose(-1, -2)))
    return s.clamp_min(min_eig).to(m.dtype), u.to(m.dtype)


def damped_eigh_inverse(m: Tensor, damping: float | Tensor) -> Tensor:
    """Inverse of ``M + λI`` through the eigendecomposition (clamping eigenvalues of ``M`` at 0).

    .. math:: (M + \\lambda I)^{-1} = U \\operatorname{diag}\\big(1/(\\max(s_i,0) + \\lambda)\\big) U^\\top

    Args:
        m: ``[..., d, d]`` symmetric.
        damping: ``λ > 0``.

    Returns:
        ``[..., d, d]`` in the dtype of ``m``.
    """
    _check_damping(damping)
    s, u = torch.linalg.eigh(_sym64(m))
    lam = damping.double().squeeze(-1) if isinstance(damping, Tensor) else damping  # [..., 1]
    inv = (u * (1.0 / (s.clamp_min(0.0) + lam)).unsqueeze(-2)) @ u.transpose(-1, -2)
    return inv.to(m.dtype)


def _sym64(m: Tensor) -> Tensor:
    m64 = m.double()
    return 0.5 * (m64 + m64.transpose(-1, -2))


def matrix_power(m: Tensor, power: float, eps: float) -> Tensor:
    """Damped matrix power of a PSD matrix, e.g. Shampoo's inverse p-th root (Gupta et al., 2018, Alg. 1).

    .. math:: (M + \\epsilon I)^{p} = U \\operatorname{diag}\\big((\\max(s_i, 0) + \\epsilon)^{p}\\big) U^\\top

    Args:
        m: ``[..., d, d]`` symmetric PSD.
        power: exponent ``p`` (``-1/4`` for Shampoo on a matrix, ``-1/2`` on a vector).
        eps: ``ε > 0`` added to every eigenvalue.

    Returns:
        ``[..., d, d]`` in the dtype of ``m``.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0 for a matrix power, got {eps}")
    s, u = torch.linalg.eigh(_sym64(m))
    out = (u * ((s.clamp_min(0.0) + eps) ** power).unsqueeze(-2)) @ u.transpose(-1, -2)
    return out.to(m.dtype)


def smw_factor(u: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor of ``λI_K + U Uᵀ`` (float64, ``K × K``), reused by :func:`smw_solve` for every
    right-hand side until the rows ``U`` change.

    Args:
        u: ``[..., K, P]`` rows of the low-rank factor.
        damping: ``λ > 0``.

    Returns:
        ``[..., K, K]`` lower triangular, float64.
    """
    _check_damping(damping)
    gram = (u @ u.transpose(-1, -2)).double()
    gram.diagonal(dim1=-2, dim2=-1).add_(damping)
    return torch.linalg.cholesky(gram)


def smw_solve(u: Tensor, v: Tensor, damping: float, factor: Tensor | None = None) -> Tensor:
    """Solve ``(U^T U + λI) x = v`` with the Sherman–Morrison–Woodbury identity (cheap when ``K < P``).

    .. math:: (\\lambda I + U^\\top U)^{-1} v = \\frac1\\lambda\\Big(v - U^\\top (\\lambda I_K + U U^\\top)^{-1}
        U v\\Big)

    The two ``K × P`` products run in the dtype of ``v``; the ``K × K`` solve in float64.

    Args:
        u: ``[..., K, P]`` rows of the low-rank factor (e.g. per-example gradients, scaled).
        v: ``[..., P, M]`` right-hand sides.
        damping: ``λ > 0``.
        factor: :func:`smw_factor` of ``u`` and ``damping`` (computed here when None).

    Returns:
        ``[..., P, M]`` in the dtype of ``v``.
    """
    factor = smw_factor(u, damping) if factor is None else factor
    u = u.to(v.dtype)
    inner = torch.cholesky_solve((u @ v).double(), factor).to(v.dtype)
    return (v - u.transpose(-1, -2) @ inner) / damping


def cg_solve(
    matvec: Callable[[Tensor], Tensor], b: Tensor, *, max_iters: int, tol: float, x0: Tensor | None = None
) -> tuple[Tensor, int]:
    """Conjugate gradient for ``M x = b`` with a symmetric positive definite, matrix-free ``M``.

    Stops when ``||r|| <= tol * ||b||`` or after ``max_iters`` matrix-vector products (Hestenes & Stiefel).

    Args:
        matvec: ``v -> M v`` on flat vectors.
        b: right-hand side ``[P]``.
        max_iters: at most this many products.
        tol: relative residual tolerance.
        x0: start (zeros if None).

    Returns:
        ``(x, iterations)``.

    Raises:
        ValueError: ``M`` showed a non-positive curvature direction (``p^T M p <= 0``); increase the damping.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = r @ r
    bound = (tol * b.norm()) ** 2
    it = 0
    while it < max_iters and rs > bound:
        mp = matvec(p)
        curv = p @ mp
        if curv <= 0:
            raise ValueError(f"conjugate gradient met non-positive curvature p^T M p = {curv.item():.3e}; "
                             "the matrix is not positive definite: increase damping")
        alpha = rs / curv
        x = x + alpha * p
        r = r - alpha * mp
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
        it += 1
    return x, it


def kron_damping(a: Tensor, g: Tensor, damping: float, pi: bool, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Damping of each Kronecker factor, optionally with Martens & Grosse's π (2015, §6.3).

    .. math:: \\pi = \\sqrt{\frac{\\operatorname{tr}(A)/d_A}{\\operatorname{tr}(G)/d_G}}, \\quad
        \\lambda_A = \\max(\\pi\\sqrt\\lambda, \\epsilon), \\quad \\lambda_G = \\max(\\sqrt\\lambda/\\pi, \\epsilon)

    (``π = 1`` without it). ``π`` makes the damped inverse independent of how a scale is split between
    ``A`` and ``G``.

    Args:
        a: ``[groups, d_A, d_A]``, or its diagonal ``[groups, d_A]`` (``[d_A]`` for an Embedding).
        g: ``[groups, d_G, d_G]``.
        damping: ``λ``.
        pi: use ``π``.
        eps: lower bound of each damping.

    Returns:
        ``(λ_A, λ_G)`` of shape ``[groups, 1, 1]`` (``[1]`` for a diagonal ``a``).
    """
    root = math.sqrt(damping)
    groups = g.shape[0]
    if not pi:
        one = torch.ones(groups, 1, 1, dtype=g.dtype, device=g.device) * root
        return one, one
    mean_a = (a if a.dim() < g.dim() else torch.diagonal(a, dim1=-2, dim2=-1)).mean(-1).reshape(-1)
    mean_g = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1)
    p = torch.sqrt(mean_a.double() / mean_g.double())
    p = torch.where(torch.isfinite(p) & (p > 0), p, torch.ones_like(p))
    da = (root * p).clamp_min(eps).to(g.dtype).view(groups, 1, 1)
    dg = (root / p).clamp_min(eps).to(g.dtype).view(groups, 1, 1)
    return da, dg


def damped_cholesky(m: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor ``L`` of ``M + λI`` for repeated solves (in the dtype of ``m``).

    .. math:: L L^\\top = M + \\lambda I, \\qquad (M + \\lambda I)^{-1} v = L^{-\\top} L^{-1} v

    Keeping ``L`` instead of the inverse costs a third of the flops on inverse steps and the same on the
    other steps (two triangular solves instead of one product). Where round-off made ``M`` slightly
    indefinite, ``L`` factors ``U diag(max(s, λ)) U^T`` from the float64 eigendecomposition of ``M + λI``.

    Args:
        m: ``[d, d]`` symmetric positive semi-definite.
        damping: ``λ > 0``.

    Returns:
        ``[d, d]`` lower triangular, in the dtype of ``m``.
    """
    _check_damping(damping)
    damped = _plus_diagonal(m, damping)
    chol, info = torch.linalg.cholesky_ex(damped)
    if bool((info != 0).any()):
        s, u = _clamped_eigh(damped.reshape(-1, *m.shape[-2:]), damping, (info != 0).reshape(-1))
        chol = torch.linalg.cholesky((u * s.unsqueeze(-2)) @ u.transpose(-1, -2)).reshape(m.shape)
    return chol.to(m.dtype)


def as_matrix(t: Tensor) -> Tensor:
    """``[dim0, prod(rest)]`` view (a scalar or vector becomes ``[d, 1]``)."""
    if t.dim() <= 1:
        return t.reshape(-1, 1)
    return t.reshape(t.shape[0], -1)


# ------------------------------------------------------------------------ Adam in a rotated basis (SOAP)
def adam_direction(g: Tensor, m: Tensor | None, v: Tensor | None, step: int, beta1: float, beta2: float,
                   eps: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """Adam's step direction for the gradient ``g`` (Kingma & Ba, 2015, Algorithm 1, bias-corrected):

    .. math:: m \\leftarrow \\beta_1 m + (1-\\beta_1)\\, g, \\quad v \\leftarrow \\beta_2 v + (1-\\beta_2)\\, g^2,
        \\quad d = \\frac{m / (1-\\beta_1^{t+1})}{\\sqrt{v / (1-\\beta_2^{t+1})} + \\epsilon}

    (``m = (1-β₁) g``, ``v = (1-β₂) g²`` at the first step, ``t`` counted from 0). ``beta1 = 0`` keeps no first
    moment, ``d = g / (√v̂ + ε)``: RMSprop with Adam's bias correction, for a momentum applied after it.

    Args:
        g: the gradient (any shape).
        m: its running first moment, updated in place; None at the first step or with ``beta1 = 0``.
        v: its running second moment, updated in place; None at the first step.
        step: ``t``, the number of earlier updates.
        beta1: ``β₁`` (0: no first moment).
        beta2: ``β₂``.
        eps: ``ε``.

    Returns:
        ``(d, m, v)`` (``m`` None with ``beta1 = 0``).
    """
    v = (1 - beta2) * g.square() if v is None else v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if beta1 > 0:
        m = (1 - beta1) * g if m is None else m.mul_(beta1).add_(g, alpha=1 - beta1)
        g = m / (1 - beta1 ** (step + 1))
    return g / ((v / (1 - beta2 ** (step + 1))).sqrt() + eps), m, v


def rotate(m: Tensor, left: Tensor | None, right: Tensor | None, back: bool = False) -> Tensor:
    """``Q_Lᵀ M Q_R`` into an eigenbasis, or ``Q_L M Q_Rᵀ`` out of it (``back``); None is the identity.

    Args:
        m: ``[..., d_out, d_in]``.
        left: ``[..., d_out, d_out]`` orthogonal, or None.
        right: ``[..., d_in, d_in]`` orthogonal, or None.
        back: rotate back to the parameter basis.
    """
    if left is not None:
        m = (left if back else left.transpose(-1, -2)) @ m
    if right is not None:
        m = m @ (right.transpose(-1, -2) if back else right)
    return m


def reproject_second_moment(v: Tensor, old: tuple[Tensor | None, Tensor | None],
                            new: tuple[Tensor | None, Tensor | None]) -> Tensor:
    """A second moment kept per coordinate of the basis ``old = (Q_L, Q_R)``, in the basis ``new``.

    Taking the second moment as diagonal in the old basis, ``diag(vec v)``, its diagonal in the new one is

    .. math:: v' = (R_L \\circ R_L)^\\top\\, v\\, (R_R \\circ R_R), \\qquad R = Q_{\\text{old}}^\\top Q_{\\text{new}}

    (``∘`` the entrywise product): exact for a pure permutation or sign flip of the eigenvectors (which ``eigh``
    may return for an unchanged or slightly changed matrix), and a mix of the old entries for a rotated basis.
    heavyball's SOAP does this with ``heavy=True``; Vyas et al. (2024) keep ``v`` as it is.

    Args:
        v: ``[..., d_out, d_in]``.
        old: the old ``(Q_L, Q_R)`` (None: identity).
        new: the new ``(Q_L, Q_R)``, None where ``old`` is None.

    Returns:
        ``v'`` of the shape of ``v``.
    """
    (old_l, old_r), (new_l, new_r) = old, new
    if old_l is not None:
        v = (old_l.transpose(-1, -2) @ new_l).square().transpose(-1, -2) @ v
    if old_r is not None:
        v = v @ (old_r.transpose(-1, -2) @ new_r).square()
    return v
