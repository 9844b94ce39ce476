"""SKFAC (Tang et al., "SKFAC: Training Neural Networks With Faster Kronecker-Factored Approximate Curvature",
CVPR 2021): Kronecker factors kept as their rows and inverted by Sherman–Morrison–Woodbury."""

from __future__ import annotations

from typing import Any

from torch import nn

from quicktrain.precond.makers import CurvatureGradients, no_ema, type_map
from quicktrain.precond.registry import register
from quicktrain.precond.representations import KronEmbedding, SmwKronFactored, UnitWise

__all__ = ["skfac"]


@register("skfac")
def skfac(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """SKFAC (Tang et al., 2021): Kronecker factors from their rows, inverted by SMW (latest batch only)."""
    no_ema("skfac", config)
    reps = type_map(SmwKronFactored, KronEmbedding, UnitWise)
    return CurvatureGradients(model, loss_fn, method="skfac", reps=reps, fisher_type=fisher_type, **config)
