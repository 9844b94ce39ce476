"""EKFAC (George et al., "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis",
NeurIPS 2018): eigenvalue-corrected Kronecker blocks for Linear/Conv2d (eq. 10–11)."""

from __future__ import annotations

from typing import Any

from torch import nn

from quicktrain.precond.makers import CurvatureGradients, type_map
from quicktrain.precond.registry import register
from quicktrain.precond.representations import EigenCorrectedKron, KronEmbedding, UnitWise

__all__ = ["ekfac"]


@register("ekfac")
def ekfac(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """EKFAC (George et al., 2018) for Linear/Conv2d; K-FAC for Embedding; unit-wise for norm layers."""
    reps = type_map(EigenCorrectedKron, KronEmbedding, UnitWise)
    return CurvatureGradients(model, loss_fn, method="ekfac", reps=reps, fisher_type=fisher_type, **config)
