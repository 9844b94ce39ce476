"""Newton's method (exact Hessian, small models) and Newton-CG / Hessian-free (matrix-free).

``newton``: the dense Hessian ``H`` of the batch loss is built from ``P`` Hessian-vector products and
eigendecomposed; eigenvalues are replaced by their absolute values (saddle-free Newton, Dauphin et al.
2014), so

.. math:: \\Delta\\theta = U \\operatorname{diag}\\big(1/(|s_i| + \\lambda)\\big) U^\\top \\nabla\\theta

which equals ``(H + λI)^{-1}∇θ`` when ``H`` is positive semi-definite.

``newton_cg``: conjugate gradient on ``(C + λI) Δθ = ∇θ`` with ``C`` the GGN (default, Martens 2010) or the
Hessian, each product by double backward on the step's own graph (no extra forward).

Both compute gradients with ``torch.autograd.grad(create_graph=True)``, so they forward through the module
inside a DDP wrapper and average gradients and curvature products over ranks themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from quicktrain.precond._math import cg_solve
from quicktrain.precond.curvature import GraphCurvature, flatten, loss_kind
from quicktrain.precond.distributed import all_reduce_mean
from quicktrain.precond.makers import GraphMaker, due
from quicktrain.precond.registry import register

__all__ = ["NewtonCGGradients", "NewtonGradients"]


class NewtonGradients(GraphMaker):
    """Damped (saddle-free) Newton with the exact Hessian; refuses models over ``max_params``."""

    method = "newton"

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, damping: float = 1e-3, curvature_interval: int = 1,
                 inverse_interval: int = 1, warmup: int = 0, ema_decay: float | None = None,
                 ignore_modules: Iterable[Any] = (), unsupported: str = "error", max_params: int = 5000) -> None:
        super().__init__(model, loss_fn, damping, curvature_interval, inverse_interval, warmup, ema_decay,
                         ignore_modules, unsupported)
        n = sum(p.numel() for p in self.params.values())
        if n > max_params:
            raise ValueError(f"newton builds the dense Hessian: {n} parameters exceed max_params={max_params}; "
                             "use newton_cg for larger models")
        self.H: Tensor | None = None
        self.eig_s: Tensor | None = None
        self.eig_u: Tensor | None = None

    def hessian(self, gc: GraphCurvature) -> tuple[Tensor, Tensor]:
        """Dense Hessian ``[P, P]`` from ``P`` batched Hessian-vector products, and the gradient ``[P]``."""
        grads = torch.autograd.grad(gc.loss, gc.params, create_graph=True, materialize_grads=True)
        flat = flatten(grads)
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        rows = torch.autograd.grad(flat, gc.params, eye, retain_graph=True, is_grads_batched=True,
                                   materialize_grads=True)
        h = torch.cat([r.reshape(flat.numel(), -1) for r in rows], dim=1)
        return all_reduce_mean(0.5 * (h + h.T)), all_reduce_mean(flat.detach())

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        gc, loss = self._graph(inputs, targets)
        t = self.step
        if due(t, self.curvature_interval, self.warmup) or self.H is None:
            self.H, g = self.hessian(gc)
        else:
            g = all_reduce_mean(flatten(torch.autograd.grad(loss, gc.params, materialize_grads=True)))
        if due(t, self.inverse_interval, self.warmup) or self.eig_u is None:
            s, u = torch.linalg.eigh(self.H.double())
            self.eig_s, self.eig_u = s, u
        u = self.eig_u
        step = (u * (1.0 / (self.eig_s.abs() + self.damping)).unsqueeze(0)) @ (u.T @ g.double())
        self._write(step.to(g.dtype))
        self.step += 1
        return loss.detach(), gc.logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "H": self.H, "eig_s": self.eig_s, "eig_u": self.eig_u}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for k in ("H", "eig_s", "eig_u"):
            setattr(self, k, self._on_device(state[k]))


class NewtonCGGradients(GraphMaker):
    """Newton-CG / Hessian-free: CG on ``(C + λI)Δθ = ∇θ`` with matrix-free products.

    Args:
        model: the model.
        loss_fn: the loss (``ggn`` needs CE or MSE).
        damping: ``λ``.
        curvature: ``ggn`` (positive semi-definite, default) or ``hessian``.
        cg_max_iters: at most this many products per step.
        cg_tol: relative residual tolerance.
        warm_start: start CG from the previous step's solution (Martens 2010, §4.5).
        **common: ``curvature_interval``/``inverse_interval`` must be 1; ``ignore_modules``.
    """

    method = "newton_cg"

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, damping: float = 1e-3, curvature: str = "ggn",
                 cg_max_iters: int = 20, cg_tol: float = 1e-3, warm_start: bool = False, curvature_interval: int = 1,
                 inverse_interval: int = 1, warmup: int = 0, ema_decay: float | None = None,
                 ignore_modules: Iterable[Any] = (), unsupported: str = "error") -> None:
        super().__init__(model, loss_fn, damping, curvature_interval, inverse_interval, warmup, ema_decay,
                         ignore_modules, unsupported)
        if curvature_interval != 1 or inverse_interval != 1:
            raise ValueError("newton_cg is matrix-free: it solves with the current batch's curvature at every "
                             "step, so curvature_interval and inverse_interval must be 1")
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"Unknown curvature {curvature!r}; choose from ['ggn', 'hessian']")
        if curvature == "ggn":
            loss_kind(loss_fn)
        self.curvature, self.cg_max_iters, self.cg_tol, self.warm_start = curvature, cg_max_iters, cg_tol, warm_start
        self.previous: Tensor | None = None
        self.last_iters = 0

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        gc, loss = self._graph(inputs, targets)
        g = all_reduce_mean(flatten(torch.autograd.grad(loss, gc.params, retain_graph=True,
                                                         materialize_grads=True)).detach())
        product = gc.ggn_vp if self.curvature == "ggn" else gc.hessian_vp

        def matvec(v: Tensor) -> Tensor:
            return all_reduce_mean(product(v).detach()) + self.damping * v

        x0 = self.previous if self.warm_start else None
        x, self.last_iters = cg_solve(matvec, g, max_iters=self.cg_max_iters, tol=self.cg_tol, x0=x0)
        self.previous = x
        self._write(x)
        self.step += 1
        return loss.detach(), gc.logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.previous = self._on_device(state.get("previous"))


@register("newton")
def newton(model: nn.Module, loss_fn: nn.Module, **config: Any) -> NewtonGradients:
    """Damped saddle-free Newton with the exact Hessian (small models)."""
    return NewtonGradients(model, loss_fn, **config)


@register("newton_cg")
def newton_cg(model: nn.Module, loss_fn: nn.Module, **config: Any) -> NewtonCGGradients:
    """Newton-CG / Hessian-free."""
    return NewtonCGGradients(model, loss_fn, **config)
