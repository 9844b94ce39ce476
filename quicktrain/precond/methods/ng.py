"""Natural-gradient methods: the Fisher of per-example gradients in a dense, block, unit-wise or diagonal
representation, with a Cholesky, SMW or elementwise solve.

The curvature-based methods as configurations of curvature × representation × solver.

=============  ============================================  ================  ===============
name           representation (Linear/Conv2d, Embedding, norm)  solver          default Fisher
=============  ============================================  ================  ===============
kfac           Kronecker, Kronecker (diag A), unit-wise     Cholesky / eigen  mc
ekfac          eigen-corrected Kronecker, Kronecker, unit    eigh              mc
skfac          Kronecker rows, Kronecker, unit-wise          SMW               mc
full_ng        one dense Fisher of all parameters           Cholesky          mc
smw_ng         one Fisher of all parameters from its rows   SMW               emp
layerwise_ng   dense block per module                        Cholesky          mc
seng           rows per module, randomly sketched           SMW               emp
unitwise_ng    unit-wise blocks everywhere                   Cholesky          mc
diag_ng        diagonal                                      elementwise       mc
=============  ============================================  ================  ===============

Every factory takes the common options of :class:`~quicktrain.precond.makers.CurvatureGradients`
(``damping``, ``curvature_interval``, ``inverse_interval``, ``warmup``, ``ema_decay``, ``fisher_type``,
``n_mc_samples``, ``ignore_modules``, ``unsupported``, ``seed``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from quicktrain.precond.capture import SUPPORTED_TYPES
from quicktrain.precond.makers import CurvatureGradients, no_ema
from quicktrain.precond.registry import register
from quicktrain.precond.representations import Diagonal, LayerBlock, UnitWise

__all__ = ["diag_ng", "full_ng", "layerwise_ng", "seng", "smw_ng", "unitwise_ng"]


@register("full_ng")
def full_ng(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """Natural gradient with the dense Fisher of all parameters: ``Δθ = (F + λI)^{-1} ∇θ`` (small models)."""
    return CurvatureGradients(model, loss_fn, method="full_ng", reps=None, full="cholesky",
                              fisher_type=fisher_type, **config)


@register("smw_ng")
def smw_ng(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "emp", **config: Any) -> CurvatureGradients:
    """Natural gradient of all parameters by Sherman–Morrison–Woodbury on the per-example gradients
    (exact ``(F+λI)^{-1}∇θ`` for the batch's Fisher; cheap when the batch is smaller than the parameters)."""
    no_ema("smw_ng", config)
    return CurvatureGradients(model, loss_fn, method="smw_ng", reps=None, full="smw", fisher_type=fisher_type,
                              **config)


@register("layerwise_ng")
def layerwise_ng(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "mc",
                 **config: Any) -> CurvatureGradients:
    """Layer-wise natural gradient: a dense Fisher block per module, damped Cholesky inverse."""
    reps = {t: LayerBlock for t in SUPPORTED_TYPES}
    return CurvatureGradients(model, loss_fn, method="layerwise_ng", reps=reps, fisher_type=fisher_type, **config)


@register("seng")
def seng(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "emp", max_rows: int | None = None,
         **config: Any) -> CurvatureGradients:
    """SENG (Yang et al., 2022): layer-wise empirical natural gradient by SMW on (sketched) per-example rows.

    Args:
        model: the model.
        loss_fn: the loss.
        fisher_type: ``emp`` (default).
        max_rows: keep a random subset of at most this many rows per layer (None keeps all).
        **config: common options.
    """
    no_ema("seng", config)
    reps = {t: partial(LayerBlock, solver="smw", max_rows=max_rows) for t in SUPPORTED_TYPES}
    return CurvatureGradients(model, loss_fn, method="seng", reps=reps, fisher_type=fisher_type, **config)


@register("unitwise_ng")
def unitwise_ng(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "mc",
                **config: Any) -> CurvatureGradients:
    """Unit-wise natural gradient (Ollivier, 2015): per-unit blocks in every layer."""
    reps = {t: UnitWise for t in SUPPORTED_TYPES}
    return CurvatureGradients(model, loss_fn, method="unitwise_ng", reps=reps, fisher_type=fisher_type, **config)


@register("diag_ng")
def diag_ng(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """Diagonal natural gradient: ``Δθ = ∇θ / (diag F + λ)``."""
    reps = {t: Diagonal for t in SUPPORTED_TYPES}
    return CurvatureGradients(model, loss_fn, method="diag_ng", reps=reps, fisher_type=fisher_type, **config)
