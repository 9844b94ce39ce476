"""Curvature of a loss at the network output, and matrix-free curvature queries on any model.

Every curvature used here is written through the network Jacobian ``J = ∂f/∂θ`` and the batch-mean loss
``L = (1/N) Σ_n ℓ(f_n, y_n)``:

.. math::
    F_\\text{type} = \\sum_k J^\\top v_k v_k^\\top J, \\qquad
    \\mathrm{GGN} = J^\\top \\nabla^2_f L\\, J, \\qquad H = \\nabla^2_\\theta L,

where the backward vectors ``v_k`` of :func:`output_sqrt` are

* ``emp``:   ``v_n = ∇_f ℓ_n / √N`` at the observed targets (one vector, K=1);
* ``mc``:    ``v_{s,n} = ∇_f ℓ(f_n, ŷ_{s,n}) / √(N S)`` with ``ŷ ~ p(y|f_n)`` (S samples, K=S);
* ``exact``: a symmetric factorisation of ``∇²_f L``, so that the Fisher equals the GGN: for cross-entropy
  ``v_{c,n} = √(p_{nc}/N) (e_c - p_n)`` (K=C classes), for mean squared error ``v_c = √(2/(N D)) e_c`` (K=D).

Supported losses: ``nn.CrossEntropyLoss`` (``reduction='mean'``, ``ignore_index`` honoured, no class weights,
no label smoothing; logits ``[N, C]`` or ``[N, C, *]`` where every position is an example) and
``nn.MSELoss`` (``reduction='mean'``, ``ℓ_n = ||f_n - y_n||² / D``; its likelihood is ``N(f, D/2 I)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from enum import StrEnum

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "FisherType",
    "GraphCurvature",
    "fisher_vp",
    "flatten",
    "forward_keep_buffers",
    "ggn_vp",
    "hessian_vp",
    "hutchinson_trace",
    "loss_hessian_vp",
    "loss_kind",
    "math_attention",
    "n_examples",
    "output_sqrt",
    "parse_fisher_type",
    "top_eigenvalues",
    "unflatten",
]


class FisherType(StrEnum):
    """Which Fisher matrix a curvature statistic estimates."""

    EMP = "emp"
    MC = "mc"
    EXACT = "exact"


def parse_fisher_type(value: str | FisherType) -> FisherType:
    """``value`` as a :class:`FisherType`; raises ``ValueError`` listing the choices."""
    try:
        return FisherType(value)
    except ValueError:
        names = [f.value for f in FisherType]
        raise ValueError(f"Unknown fisher_type {value!r}; choose from {names}") from None


def loss_kind(loss_fn: nn.Module) -> str:
    """``'ce'`` or ``'mse'`` for a supported loss module; raises ``ValueError`` naming the fix otherwise."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction != "mean":
            raise ValueError(f"CrossEntropyLoss(reduction={loss_fn.reduction!r}) is not supported; use 'mean'")
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise ValueError("CrossEntropyLoss with class weights or label smoothing is not a likelihood "
                             "the Fisher is defined for; use plain nn.CrossEntropyLoss(ignore_index=...)")
        return "ce"
    if isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction != "mean":
            raise ValueError(f"MSELoss(reduction={loss_fn.reduction!r}) is not supported; use 'mean'")
        return "mse"
    raise ValueError(f"loss {type(loss_fn).__name__} is not supported; use nn.CrossEntropyLoss or nn.MSELoss")


def _ce_flat(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logits as ``[M, C]`` positions, targets ``[M]``, mask ``[M]`` of the non-ignored positions."""
    if logits.dim() < 2:
        raise ValueError(f"cross-entropy logits must be [N, C] or [N, C, *], got shape {tuple(logits.shape)}")
    if targets.dtype.is_floating_point:
        raise ValueError("probability targets are not supported for the Fisher; pass class indices")
    z = logits.movedim(1, -1).reshape(-1, logits.shape[1])
    t = targets.reshape(-1)
    mask = t != ignore_index
    return z, torch.where(mask, t, torch.zeros_like(t)), mask


def _ce_unflat(v: Tensor, logits: Tensor) -> Tensor:
    """``[K, M, C]`` back to ``[K, *logits.shape]``."""
    shape = (logits.shape[0], *logits.shape[2:], logits.shape[1])
    return v.reshape(v.shape[0], *shape).movedim(-1, 2)


def n_examples(loss_fn: nn.Module, logits: Tensor, targets: Tensor) -> int:
    """The number ``N`` of examples the loss averages over (non-ignored positions for cross-entropy)."""
    if loss_kind(loss_fn) == "ce":
        _, _, mask = _ce_flat(logits, targets, loss_fn.ignore_index)
        n = int(mask.sum())
        if n == 0:
            raise ValueError("every target equals ignore_index; the loss and its curvature are undefined")
        return n
    return logits.shape[0]


def output_sqrt(
    loss_fn: nn.Module,
    logits: Tensor,
    targets: Tensor,
    fisher_type: str | FisherType,
    *,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Backward vectors ``v_k`` with ``Σ_k J^T v_k v_k^T J`` the requested Fisher (see the module docstring).

    Args:
        loss_fn: the loss module.
        logits: network output (its graph is not used).
        targets: targets as the loss takes them.
        fisher_type: ``emp``, ``mc`` or ``exact``.
        n_samples: Monte-Carlo samples ``S`` (``mc`` only).
        generator: random generator on the logits' device (``mc`` only).

    Returns:
        ``[K, *logits.shape]``, detached.
    """
    ftype = parse_fisher_type(fisher_type)
    kind = loss_kind(loss_fn)
    f = logits.detach()
    n = n_examples(loss_fn, f, targets)
    if kind == "ce":
        z, t, mask = _ce_flat(f, targets, loss_fn.ignore_index)
        m = mask.to(z.dtype).unsqueeze(-1)
        p = torch.softmax(z, dim=-1)
        if ftype is FisherType.EMP:
            v = (p - nn.functional.one_hot(t, z.shape[1]).to(z.dtype)) * m / math.sqrt(n)
            return _ce_unflat(v.unsqueeze(0), f)
        if ftype is FisherType.MC:
            if n_samples < 1:
                raise ValueError(f"n_samples must be >= 1, got {n_samples}")
            y = torch.multinomial(p, n_samples, replacement=True, generator=generator).T  # [S, M]
            v = (p.unsqueeze(0) - nn.functional.one_hot(y, z.shape[1]).to(z.dtype)) * m / math.sqrt(n * n_samples)
            return _ce_unflat(v, f)
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        v = (p.sqrt().T.unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))) * m / math.sqrt(n)  # [C, M, C]
        return _ce_unflat(v, f)
    d = f[0].numel()
    if ftype is FisherType.EMP:
        return (2.0 / d) * (f - targets.to(f.dtype)).unsqueeze(0) / math.sqrt(n)
    if ftype is FisherType.MC:
        noise = torch.randn((n_samples, *f.shape), generator=generator, dtype=f.dtype, device=f.device)
        return (2.0 / d) * (-noise * math.sqrt(d / 2.0)) / math.sqrt(n * n_samples)
    eye = torch.eye(d, dtype=f.dtype, device=f.device).reshape(d, 1, *f.shape[1:])
    return (eye * math.sqrt(2.0 / (d * n))).expand(d, *f.shape).contiguous()


def loss_hessian_vp(loss_fn: nn.Module, logits: Tensor, targets: Tensor, w: Tensor) -> Tensor:
    """``∇²_f L · w`` for the batch-mean loss (``w`` shaped like the logits).

    .. math:: \\text{CE: } \\frac1N (p \\odot w - p\\, p^\\top w) \\text{ per position}, \\qquad
        \\text{MSE: } \\frac{2}{N D} w
    """
    kind = loss_kind(loss_fn)
    n = n_examples(loss_fn, logits, targets)
    if kind == "ce":
        z, _, mask = _ce_flat(logits.detach(), targets, loss_fn.ignore_index)
        p = torch.softmax(z, dim=-1)
        wz = w.movedim(1, -1).reshape(-1, w.shape[1])
        hw = (p * wz - p * (p * wz).sum(-1, keepdim=True)) * mask.to(p.dtype).unsqueeze(-1) / n
        return _ce_unflat(hw.unsqueeze(0), logits)[0]
    return w * (2.0 / logits.numel())


# --------------------------------------------------------------------------------------------- matvecs
def flatten(ts: Sequence[Tensor]) -> Tensor:
    """Tensors concatenated into one flat vector."""
    return torch.cat([t.reshape(-1) for t in ts])


def unflatten(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """A flat vector split into views shaped like ``like`` (the inverse of :func:`flatten`)."""
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


class GraphCurvature:
    """Matrix-free curvature products on one recorded forward graph (no extra forward passes).

    ``J v`` uses the double-backward trick ``J v = ∂/∂u (J^T u)·v``; ``J^T w`` is one backward;
    ``H v = ∂/∂θ (∇_θ L · v)``. Vectors are flat over ``params`` in order.

    Args:
        params: parameters ``θ`` (require grad).
        logits: network output with its graph.
        loss: ``loss_fn(logits, targets)`` with its graph.
        loss_fn: the loss module.
        targets: the targets.
    """

    def __init__(self, params: Sequence[Tensor], logits: Tensor, loss: Tensor, loss_fn: nn.Module,
                 targets: Tensor) -> None:
        self.params = list(params)
        self.logits, self.loss, self.loss_fn, self.targets = logits, loss, loss_fn, targets
        self._u: Tensor | None = None
        self._jt_u: list[Tensor] | None = None
        self._grad: list[Tensor] | None = None

    def jvp(self, v: Tensor) -> Tensor:
        """``J v`` shaped like the logits."""
        if self._jt_u is None:
            self._u = torch.zeros_like(self.logits, requires_grad=True)
            self._jt_u = list(torch.autograd.grad(self.logits, self.params, self._u, create_graph=True,
                                                  allow_unused=True, materialize_grads=True))
        vs = unflatten(v, self.params)
        (jv,) = torch.autograd.grad(self._jt_u, self._u, vs, retain_graph=True)
        return jv

    def vjp(self, w: Tensor) -> Tensor:
        """``J^T w`` flat."""
        gs = torch.autograd.grad(self.logits, self.params, w, retain_graph=True, allow_unused=True,
                                 materialize_grads=True)
        return flatten(gs)

    def ggn_vp(self, v: Tensor) -> Tensor:
        """``J^T ∇²_f L J v`` (equals the exact Fisher product for CE and MSE)."""
        return self.vjp(loss_hessian_vp(self.loss_fn, self.logits, self.targets, self.jvp(v)))

    def fisher_vp(self, v: Tensor, vectors: Tensor) -> Tensor:
        """``Σ_k J^T v_k (v_k · J v)`` with the dot product per example position (``vectors`` from
        :func:`output_sqrt`)."""
        jv = self.jvp(v)
        if self.logits.dim() > 2 and loss_kind(self.loss_fn) == "ce":
            dots = (vectors * jv.unsqueeze(0)).sum(2, keepdim=True)
        else:
            dots = (vectors * jv.unsqueeze(0)).flatten(2).sum(-1).view(*vectors.shape[:2],
                                                                        *([1] * (jv.dim() - 1)))
        return self.vjp((vectors * dots).sum(0))

    def hessian_vp(self, v: Tensor) -> Tensor:
        """``∇²_θ L v``."""
        if self._grad is None:
            self._grad = list(torch.autograd.grad(self.loss, self.params, create_graph=True, allow_unused=True,
                                                  materialize_grads=True))
        hv = torch.autograd.grad(self._grad, self.params, unflatten(v, self.params), retain_graph=True,
                                 allow_unused=True, materialize_grads=True)
        return flatten(hv)


def math_attention() -> contextlib.AbstractContextManager:
    """Context in which ``F.scaled_dot_product_attention`` (also inside ``nn.MultiheadAttention``) uses its math
    kernel: the only one whose backward is itself differentiable, as double-backward products need (the flash
    and memory-efficient kernels have no double backward)."""
    return sdpa_kernel([SDPBackend.MATH])


def forward_keep_buffers(model: nn.Module, inputs: Tensor) -> Tensor:
    """``model(inputs)`` run on copies of the buffers, so BatchNorm running statistics stay unchanged."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    if not buffers:
        return model(inputs)
    return torch.func.functional_call(model, buffers, (inputs,), strict=False)


def _problem(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor,
             params: Sequence[Tensor] | None) -> GraphCurvature:
    ps = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    with math_attention():
        logits = forward_keep_buffers(model, inputs)
    return GraphCurvature(ps, logits, loss_fn(logits, targets), loss_fn, targets)


def ggn_vp(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, vec: Tensor,
           params: Sequence[Tensor] | None = None) -> Tensor:
    """Generalised Gauss-Newton times a vector, ``J^T ∇²_f L J v`` (model buffers are left unchanged).

    Args:
        model: any model; its trainable parameters (or ``params``) in order define the flat layout.
        loss_fn: a supported loss (see module docstring).
        inputs: one batch of inputs.
        targets: its targets.
        vec: flat vector ``[P]``.
        params: optional subset of parameters.

    Returns:
        ``[P]``.
    """
    return _problem(model, loss_fn, inputs, targets, params).ggn_vp(vec)


def fisher_vp(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, vec: Tensor, *,
              fisher_type: str | FisherType = "exact", n_samples: int = 1,
              generator: torch.Generator | None = None, params: Sequence[Tensor] | None = None) -> Tensor:
    """Fisher times a vector, ``Σ_k J^T v_k v_k^T J v`` (``exact`` equals :func:`ggn_vp`).

    Args:
        model: any model.
        loss_fn: a supported loss.
        inputs: one batch of inputs.
        targets: its targets.
        vec: flat vector ``[P]``.
        fisher_type: ``emp``, ``mc`` or ``exact``.
        n_samples: Monte-Carlo samples.
        generator: random generator (``mc``).
        params: optional subset of parameters.

    Returns:
        ``[P]``.
    """
    prob = _problem(model, loss_fn, inputs, targets, params)
    vectors = output_sqrt(loss_fn, prob.logits, targets, fisher_type, n_samples=n_samples, generator=generator)
    return prob.fisher_vp(vec, vectors)


def hessian_vp(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, vec: Tensor,
               params: Sequence[Tensor] | None = None) -> Tensor:
    """Hessian of the batch-mean loss times a vector (Pearlmutter's trick by double backward).

    Args:
        model: any model.
        loss_fn: any differentiable loss module.
        inputs: one batch of inputs.
        targets: its targets.
        vec: flat vector ``[P]``.
        params: optional subset of parameters.

    Returns:
        ``[P]``.
    """
    ps = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    with math_attention():
        logits = forward_keep_buffers(model, inputs)
    loss = loss_fn(logits, targets)
    return GraphCurvature(ps, logits, loss, loss_fn, targets).hessian_vp(vec)


_MATVECS = {"ggn": "ggn_vp", "fisher": "ggn_vp", "hessian": "hessian_vp"}


def _matvec(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, curvature: str,
            params: Sequence[Tensor] | None):
    if curvature not in _MATVECS:
        raise ValueError(f"Unknown curvature {curvature!r}; choose from {sorted(_MATVECS)}")
    if curvature == "hessian":
        ps = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        with math_attention():
            logits = forward_keep_buffers(model, inputs)
        prob = GraphCurvature(ps, logits, loss_fn(logits, targets), loss_fn, targets)
    else:
        prob = _problem(model, loss_fn, inputs, targets, params)
    return getattr(prob, _MATVECS[curvature]), prob.params


def top_eigenvalues(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, *, k: int = 1,
                    curvature: str = "hessian", max_iters: int = 100, tol: float = 1e-4,
                    generator: torch.Generator | None = None,
                    params: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Largest-magnitude eigenvalues of the Hessian/GGN/Fisher by subspace (block power) iteration.

    Iterates ``V ← qr(M V)`` and takes Rayleigh–Ritz values ``eig(V^T M V)`` until they change by less than
    ``tol`` relatively.

    Args:
        model: any model.
        loss_fn: the loss (``ggn``/``fisher`` need CE or MSE).
        inputs: one batch of inputs.
        targets: its targets.
        k: number of eigenvalues.
        curvature: ``hessian``, ``ggn`` or ``fisher`` (exact Fisher = GGN).
        max_iters: iteration cap.
        tol: relative tolerance on the eigenvalues.
        generator: random generator for the start block.
        params: optional subset of parameters.

    Returns:
        ``(values [k], vectors [P, k])`` sorted by decreasing magnitude.
    """
    mv, ps = _matvec(model, loss_fn, inputs, targets, curvature, params)
    n = sum(p.numel() for p in ps)
    ref = ps[0]
    v = torch.randn(n, k, generator=generator, dtype=ref.dtype, device=ref.device)
    v, _ = torch.linalg.qr(v)
    prev = None
    for _ in range(max_iters):
        mv_cols = torch.stack([mv(v[:, i]) for i in range(k)], dim=1)
        t = v.T @ mv_cols
        vals, vecs = torch.linalg.eigh(0.5 * (t + t.T))
        order = vals.abs().argsort(descending=True)
        vals, vecs = vals[order], vecs[:, order]
        v, _ = torch.linalg.qr(mv_cols @ vecs)
        if prev is not None and ((vals - prev).abs() <= tol * vals.abs().clamp_min(1e-30)).all():
            break
        prev = vals
    return vals.detach(), v.detach()


def hutchinson_trace(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, *,
                     n_samples: int = 100, curvature: str = "hessian", generator: torch.Generator | None = None,
                     params: Sequence[Tensor] | None = None) -> Tensor:
    """Hutchinson's trace estimate ``tr(M) ≈ (1/S) Σ_s z_s^T M z_s`` with Rademacher ``z`` (Hutchinson, 1989).

    Args:
        model: any model.
        loss_fn: the loss.
        inputs: one batch of inputs.
        targets: its targets.
        n_samples: number of probe vectors ``S``.
        curvature: ``hessian``, ``ggn`` or ``fisher``.
        generator: random generator for the probes.
        params: optional subset of parameters.

    Returns:
        scalar tensor.
    """
    mv, ps = _matvec(model, loss_fn, inputs, targets, curvature, params)
    n = sum(p.numel() for p in ps)
    ref = ps[0]
    total = torch.zeros((), dtype=ref.dtype, device=ref.device)
    for _ in range(n_samples):
        z = torch.randint(0, 2, (n,), generator=generator, device=ref.device).to(ref.dtype) * 2 - 1
        total = total + z @ mv(z)
    return (total / n_samples).detach()
