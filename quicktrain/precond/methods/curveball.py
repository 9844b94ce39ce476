"""CurveBall (Henriques, Ehrhardt, Albanie & Vedaldi, "Small steps and giant leaps: Minimal Newton solvers for
Deep Learning", ICCV 2019).

One step of gradient descent with momentum on the damped quadratic model
``m(z) = gᵀz + ½ zᵀ(Ĝ + λI)z`` replaces the inner solver of Hessian-free optimisation, and the momentum
and step size are the minimisers of the model over the plane they span (Algorithm 1 of the paper):

.. math::
    \\Delta z = (\\hat G + \\lambda I) z + g, \\qquad z \\leftarrow \\rho z - \\beta \\Delta z, \\qquad
    \\theta \\leftarrow \\theta + z,

    \\begin{bmatrix} \\Delta z^\\top A \\Delta z & z^\\top A \\Delta z \\\\ z^\\top A \\Delta z & z^\\top A z
    \\end{bmatrix} \\begin{bmatrix} -\\beta \\\\ \\rho \\end{bmatrix}
    = -\\begin{bmatrix} g^\\top \\Delta z \\\\ g^\\top z \\end{bmatrix}, \\quad A = \\hat G + \\lambda I

(the paper's eq. 13). ``Ĝ = Jᵀ H_L J`` is the Gauss–Newton matrix of the batch loss, applied matrix-free:
``Ĝ z`` needs one Jacobian-vector product and one vector-Jacobian product, and every scalar above is an
inner product in output space (``gᵀz = ∇_f L · Jz``, ``zᵀĜΔz = Jz · H_L JΔz``), so a step costs one forward,
one backward with graph and three more backward passes. The maker writes ``-z`` into ``p.grad``: plain SGD
with ``lr=1`` applies CurveBall exactly; a smaller rate shortens the step. ``λ`` is fixed (the paper's
Levenberg–Marquardt adaptation of ``λ`` is not implemented).

ASDL's ``CurveBallGradientMaker`` uses the Hessian and a fixed momentum instead of the tuned ``ρ, β``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from quicktrain.precond.curvature import loss_hessian_vp, loss_kind
from quicktrain.precond.distributed import all_reduce_mean
from quicktrain.precond.makers import GraphMaker
from quicktrain.precond.registry import register

__all__ = ["CurveBallGradients", "curveball_coefficients"]


def curveball_coefficients(z_a_z: Tensor, z_a_dz: Tensor, dz_a_dz: Tensor, g_z: Tensor, g_dz: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """``(ρ, β)`` minimising ``m(ρz - βΔz)`` (eq. 13); a singular system (``z = 0`` at the first step) gets the
    least-norm solution, i.e. ``ρ = 0`` and a steepest-descent step along ``Δz``."""
    system = torch.stack([torch.stack([dz_a_dz, z_a_dz]), torch.stack([z_a_dz, z_a_z])])
    minus_beta, rho = (torch.linalg.pinv(system) @ -torch.stack([g_dz, g_z])).unbind()
    return rho, -minus_beta


class CurveBallGradients(GraphMaker):
    """CurveBall with the Gauss–Newton matrix (see the module docstring).

    Args:
        model: the model.
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss``.
        damping: ``λ``.
        **common: ``curvature_interval``/``inverse_interval`` must be 1; ``ignore_modules``.
    """

    method = "curveball"

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, damping: float = 1e-3, curvature_interval: int = 1,
                 inverse_interval: int = 1, warmup: int = 0, ema_decay: float | None = None,
                 ignore_modules: Iterable[Any] = (), unsupported: str = "error") -> None:
        super().__init__(model, loss_fn, damping, curvature_interval, inverse_interval, warmup, ema_decay,
                         ignore_modules, unsupported)
        if curvature_interval != 1 or inverse_interval != 1:
            raise ValueError("curveball is matrix-free: it updates with the current batch's curvature at every "
                             "step, so curvature_interval and inverse_interval must be 1")
        loss_kind(loss_fn)
        self.z: Tensor | None = None

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        gc, loss = self._graph(inputs, targets)
        (r,) = torch.autograd.grad(loss, gc.logits, retain_graph=True)  # ∇_f L, so that g = Jᵀ r
        if self.z is None:
            self.z = torch.zeros(sum(p.numel() for p in gc.params), dtype=r.dtype, device=r.device)
        z, lam = self.z, self.damping

        def gauss_newton_out(v: Tensor) -> tuple[Tensor, Tensor]:
            jv = gc.jvp(v).detach()
            return jv, loss_hessian_vp(self.loss_fn, gc.logits, gc.targets, jv)

        jz, hjz = gauss_newton_out(z)
        dz = all_reduce_mean(gc.vjp(hjz + r).detach()) + lam * z  # (Ĝ + λI) z + g
        jdz, hjdz = gauss_newton_out(dz)
        sums = all_reduce_mean(torch.stack([(jz * hjz).sum(), (jz * hjdz).sum(), (jdz * hjdz).sum(),
                                            (r * jz).sum(), (r * jdz).sum()]))
        z_a_z, z_a_dz, dz_a_dz, g_z, g_dz = sums.unbind()
        rho, beta = curveball_coefficients(z_a_z + lam * z.dot(z), z_a_dz + lam * z.dot(dz),
                                           dz_a_dz + lam * dz.dot(dz), g_z, g_dz)
        self.z = rho * z - beta * dz
        self._write(-self.z)
        self.step += 1
        return loss.detach(), gc.logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "z": self.z}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.z = self._on_device(state["z"])


@register("curveball")
def curveball(model: nn.Module, loss_fn: nn.Module, **config: Any) -> CurveBallGradients:
    """CurveBall: one tuned heavy-ball step on the Gauss–Newton quadratic model per training step."""
    return CurveBallGradients(model, loss_fn, **config)
