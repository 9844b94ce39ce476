"""Grafting (Agarwal et al., "Disentangling Adaptive Gradient Methods from Learning Rates", 2020; Distributed
Shampoo, Shi et al., 2023, §2.2): a preconditioner's direction ``S`` with the norm of another method's step
``D`` on the same group of parameters,

.. math:: \\Delta = \\frac{\\lVert D \\rVert}{\\lVert S \\rVert}\\, S,

``sgd``: ``D = G``; ``adam``: ``D = G / (\\sqrt{\\hat v} + 10^{-8})``, ``v ← β₂ v + (1-β₂) G²`` bias-corrected,
``β₂ = 0.999`` (RMSprop's direction: the optimizer's momentum is applied after the maker). The step size of
every group is then the grafted method's, and the preconditioner only chooses the direction within the group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quicktrain.precond._math import adam_direction

__all__ = ["GRAFTING", "Grafting"]

GRAFTING = ("none", "sgd", "adam")
_BETA2 = 0.999


class Grafting:
    """The grafted method's steps ``D`` by parameter name (Adam's second moments are its state).

    Args:
        kind: ``none``, ``sgd`` or ``adam``.
    """

    def __init__(self, kind: str) -> None:
        if kind not in GRAFTING:
            raise ValueError(f"Unknown grafting={kind!r}; choose from {list(GRAFTING)}")
        self.kind = kind
        self.second_moment: dict[str, Tensor] = {}

    def direction(self, name: str, g: Tensor, step: int) -> Tensor | None:
        """``D`` for the gradient ``g`` of parameter ``name`` at step ``step`` (from 0); None without grafting."""
        if self.kind == "none":
            return None
        if self.kind == "sgd":
            return g.clone()  # the caller may overwrite g's storage with the preconditioned gradient
        d, _, self.second_moment[name] = adam_direction(g, None, self.second_moment.get(name), step, 0.0, _BETA2,
                                                        1e-8)
        return d

    @staticmethod
    def scale(directions: list[Tensor], steps: list[Tensor]) -> Tensor:
        """``‖S‖⁻¹ ‖D‖`` over a group of tensors: the factor that gives the directions ``S`` the steps' norm."""
        s = torch.stack([t.square().sum() for t in directions]).sum().sqrt()
        d = torch.stack([t.square().sum() for t in steps]).sum().sqrt()
        return d / s.clamp_min(torch.finfo(s.dtype).tiny)

    def state_dict(self) -> dict[str, Tensor]:
        return self.second_moment

    def load_state_dict(self, state: dict[str, Tensor], devices: dict[str, torch.device]) -> None:
        self.second_moment = {n: v.to(devices[n]) for n, v in state.items()}
