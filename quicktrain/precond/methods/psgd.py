"""PSGD with Kronecker-factored preconditioners (Li, "Preconditioned Stochastic Gradient Descent",
IEEE TNNLS 2018; "Preconditioner on Matrix Lie Group for SGD", ICLR 2019).

Each parameter viewed as a matrix ``G ∈ R^{m×n}`` (a vector is ``n = 1``) gets ``P = (Q_r^T Q_r) ⊗ (Q_l^T Q_l)``
with upper-triangular ``Q_l, Q_r``, fitted to pairs ``(V, H_V)`` of a random perturbation and its damped
Hessian-vector product ``H_V = (H + λI) V`` by minimising ``E[h^T P h + v^T P^{-1} v]``; the relative-gradient
step on the group of triangular matrices is

.. math::
    A = Q_l H_V Q_r^\\top, \\quad B = Q_l^{-\\top} V Q_r^{-1}, \\quad
    Q_l \\leftarrow Q_l - \\frac{\\mu}{\\max|\\nabla_l|} \\nabla_l Q_l, \\;
    \\nabla_l = \\mathrm{triu}(A A^\\top - B B^\\top)

(and the same with ``A^T A - B^T B`` for ``Q_r``); the update is ``ΔW = Q_l^T Q_l\\, G\\, Q_r^T Q_r``.
Every parameter (BatchNorm, LayerNorm, Embedding included) gets a preconditioner. ``curvature_interval``
sets how often ``Q`` is fitted (those steps need a Hessian-vector product), ``inverse_interval`` how often the
products ``Q^T Q`` are refreshed. On fitting steps the gradient comes from ``autograd.grad`` through the
module inside a DDP wrapper, with gradients and products averaged over ranks here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from quicktrain.precond._math import as_matrix
from quicktrain.precond.curvature import math_attention
from quicktrain.precond.distributed import all_reduce_mean
from quicktrain.precond.makers import RngState, check_common, check_method, check_unsupported, due, trainable_params
from quicktrain.precond.registry import register
from quicktrain.train.hooks import unwrap

__all__ = ["PsgdGradients", "psgd_kron_update"]


def psgd_kron_update(ql: Tensor, qr: Tensor, v: Tensor, hv: Tensor, step: float) -> tuple[Tensor, Tensor]:
    """One fitting step of the Kronecker PSGD preconditioner (see the module docstring).

    Args:
        ql: ``[m, m]`` upper triangular.
        qr: ``[n, n]`` upper triangular.
        v: perturbation ``[m, n]``.
        hv: ``(H + λI) v`` as ``[m, n]``.
        step: normalised step size ``μ``.

    Returns:
        New ``(Q_l, Q_r)``.
    """
    rho = torch.sqrt(ql.diagonal().abs().max() / qr.diagonal().abs().max())
    ql, qr = ql / rho, qr * rho
    a = ql @ hv @ qr.T
    b = torch.linalg.solve_triangular(qr, v, upper=True, left=False)  # V Q_r^{-1}
    b = torch.linalg.solve_triangular(ql.T, b, upper=False)  # Q_l^{-T} V Q_r^{-1}
    grad_l = torch.triu(a @ a.T - b @ b.T)
    grad_r = torch.triu(a.T @ a - b.T @ b)
    tiny = torch.finfo(ql.dtype).tiny
    ql = ql - step / (grad_l.abs().max() + tiny) * grad_l @ ql
    qr = qr - step / (grad_r.abs().max() + tiny) * grad_r @ qr
    return ql, qr


class PsgdGradients:
    """Kronecker PSGD gradient maker (see the module docstring).

    Args:
        model: the model.
        loss_fn: any twice-differentiable loss.
        damping: ``λ`` added to the Hessian in the fitted pairs.
        precond_lr: ``μ``, the normalised step of the preconditioner fit.
        init_scale: initial ``Q = init_scale · I``.
        curvature_interval: fit ``Q`` every this many steps.
        inverse_interval: refresh ``Q^T Q`` every this many steps.
        warmup: fit every step before this step.
        ignore_modules: names/types/objects whose parameters keep the plain gradient.
        unsupported: validated only: PSGD preconditions a parameter of any module by its shape.
        max_dim: refuse sides longer than this (dense triangular factors).
        seed: seed of the perturbations.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, damping: float = 1e-4, precond_lr: float = 0.1,
                 init_scale: float = 1.0, curvature_interval: int = 1, inverse_interval: int = 1, warmup: int = 0,
                 ema_decay: float | None = None, ignore_modules: Iterable[Any] = (), unsupported: str = "error",
                 max_dim: int = 4096, seed: int = 0) -> None:
        check_common(damping, curvature_interval, inverse_interval, warmup, ema_decay)
        check_unsupported(unsupported)
        if ema_decay is not None:
            raise ValueError("psgd fits its preconditioner by stochastic steps; ema_decay does not apply")
        self.model, self.inner, self.loss_fn = model, unwrap(model), loss_fn
        self.damping, self.precond_lr, self.init_scale = damping, precond_lr, init_scale
        self.curvature_interval, self.inverse_interval, self.warmup = curvature_interval, inverse_interval, warmup
        self.params = trainable_params(self.inner, ignore_modules)
        for name, p in self.params.items():
            m = as_matrix(p)
            if max(m.shape) > max_dim:
                raise ValueError(f"psgd: parameter {name!r} has a side {max(m.shape)} > max_dim={max_dim}; "
                                 "raise max_dim or pass ignore_modules=[...]")
        self.ql: dict[str, Tensor] = {}
        self.qr: dict[str, Tensor] = {}
        self.pl: dict[str, Tensor] = {}
        self.pr: dict[str, Tensor] = {}
        self.rng = RngState(seed)
        self.step = 0

    def _init(self) -> None:
        for name, p in self.params.items():
            m, n = as_matrix(p).shape
            self.ql[name] = self.init_scale * torch.eye(m, dtype=p.dtype, device=p.device)
            self.qr[name] = torch.eye(n, dtype=p.dtype, device=p.device)

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        t = self.step
        if not self.ql:
            self._init()
        names, params = list(self.params), list(self.params.values())
        if due(t, self.curvature_interval, self.warmup):
            with math_attention():  # the fit needs a double backward
                logits = self.inner(inputs)
            loss = self.loss_fn(logits, targets)
            others = [p for p in self.inner.parameters() if p.requires_grad and all(p is not q for q in params)]
            grads = torch.autograd.grad(loss, params + others, create_graph=True, materialize_grads=True)
            gen = self.rng.get(params[0].device)
            vs = [torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for p in params]
            hvs = torch.autograd.grad(grads[: len(params)], params, vs, materialize_grads=True)
            for p, g in zip(params + others, grads, strict=True):
                p.grad = all_reduce_mean(g.detach().clone())
            for name, v, hv in zip(names, vs, hvs, strict=True):
                hv = all_reduce_mean(hv.detach()) + self.damping * v
                self.ql[name], self.qr[name] = psgd_kron_update(self.ql[name], self.qr[name], as_matrix(v),
                                                                as_matrix(hv), self.precond_lr)
        else:
            logits = self.model(inputs)
            loss = self.loss_fn(logits, targets)
            loss.backward()
        if due(t, self.inverse_interval, self.warmup) or not self.pl:
            self.pl = {n: q.T @ q for n, q in self.ql.items()}
            self.pr = {n: q.T @ q for n, q in self.qr.items()}
        for name, p in self.params.items():
            out = self.pl[name] @ as_matrix(p.grad) @ self.pr[name]
            if not bool(torch.isfinite(out).all()):
                raise FloatingPointError(f"psgd: non-finite update of {name!r} at step {t}; lower precond_lr")
            p.grad = out.reshape(p.shape).contiguous()
        self.step += 1
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"method": "psgd", "step": self.step, "ql": self.ql, "qr": self.qr, "pl": self.pl, "pr": self.pr,
                "rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_method(state, "psgd")
        self.step = int(state["step"])
        dev = {n: p.device for n, p in self.params.items()}
        for key in ("ql", "qr", "pl", "pr"):
            setattr(self, key, {n: v.to(dev[n]) for n, v in state[key].items()})
        self.rng.load_state_dict(state["rng"])


@register("psgd")
def psgd(model: nn.Module, loss_fn: nn.Module, **config: Any) -> PsgdGradients:
    """Kronecker PSGD; see :class:`PsgdGradients`."""
    return PsgdGradients(model, loss_fn, **config)
