"""K-BFGS (Goldfarb, Ren & Bahamou, "Practical Quasi-Newton Methods for Training Deep Neural Networks",
NeurIPS 2020): :class:`~quicktrain.precond.representations.kbfgs.KronBfgs` (BFGS inverse of ``G``, K-FAC's ``A``)
for Linear/Conv2d, fed by a secant pass on the previous curvature batch; K-FAC for Embedding, unit-wise blocks
for normalisation layers.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from quicktrain.precond.capture import KRON_TYPES, NORM_TYPES, LayerCapture
from quicktrain.precond.curvature import forward_keep_buffers
from quicktrain.precond.makers import CurvatureGradients
from quicktrain.precond.registry import register
from quicktrain.precond.representations import KronBfgs, KronEmbedding, UnitWise
from quicktrain.train.hooks import unwrap

__all__ = ["KbfgsGradients"]


class KbfgsGradients(CurvatureGradients):
    """K-BFGS maker: :class:`CurvatureGradients` plus the secant pass on the previous curvature batch."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "emp", a_inverse: str = "cholesky",
                 bias: str = "augment", **config: Any) -> None:
        reps = {t: functools.partial(KronBfgs, a_inverse=a_inverse, bias=bias) for t in KRON_TYPES}
        reps[nn.Embedding] = KronEmbedding
        reps.update({t: UnitWise for t in NORM_TYPES})
        super().__init__(model, loss_fn, method="kbfgs", reps=reps, fisher_type=fisher_type, **config)
        self.kron = {n: m for n, m in self.modules.items() if isinstance(self.reps[n], KronBfgs)}
        self.previous: tuple[Tensor, Tensor] | None = None

    def _curvature_step(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.previous is not None and self.kron:
            self._secant_pass(*self.previous)
        with LayerCapture(self.kron, keep_outputs=True) as cap:
            loss, logits = super()._curvature_step(inputs, targets)
        n = inputs.shape[0]
        main = slice(-1, None)  # the loss backward is the last pass
        for name in self.kron:
            self.reps[name].record(cap.batch(name, n, 1.0, main))
        self.previous = (inputs.detach(), targets.detach())
        return loss, logits

    def _secant_pass(self, inputs: Tensor, targets: Tensor) -> None:
        with LayerCapture(self.kron, keep_outputs=True) as cap:
            logits = forward_keep_buffers(unwrap(self.model), inputs)
            cap.backward_to_outputs(self.loss_fn(logits, targets), [None])
        for name in self.kron:
            self.reps[name].secant(cap.batch(name, inputs.shape[0]), self.damping)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        prev = state["previous"]
        device = next(iter(self.modules.values())).weight.device
        self.previous = None if prev is None else (prev[0].to(device), prev[1].to(device))


@register("kbfgs")
def kbfgs(model: nn.Module, loss_fn: nn.Module, **config: Any) -> KbfgsGradients:
    """K-BFGS; see :class:`KbfgsGradients` (options of :class:`CurvatureGradients`)."""
    return KbfgsGradients(model, loss_fn, **config)
