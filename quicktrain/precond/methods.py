"""The curvature-based methods as configurations of curvature × representation × solver.

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

Every factory takes the common options of :class:`~quicktrain.precond.maker.CurvatureGradients`
(``damping``, ``curvature_interval``, ``inverse_interval``, ``warmup``, ``ema_decay``, ``fisher_type``,
``n_mc_samples``, ``ignore_modules``, ``unsupported``, ``seed``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from quicktrain.precond.ekfac import EigenCorrectedKron
from quicktrain.precond.kfac import KronEmbedding, KronFactored, SmwKronFactored
from quicktrain.precond.maker import CurvatureGradients, PlainGradients, RepresentationMap, register
from quicktrain.precond.natural_gradient import Diagonal, LayerBlock, UnitWise
from quicktrain.precond.stats import KRON_TYPES, NORM_TYPES, SUPPORTED_TYPES

__all__ = ["kron_map"]


def _per_type(kron, embedding, norm) -> RepresentationMap:
    out: RepresentationMap = {t: kron for t in KRON_TYPES}
    out[nn.Embedding] = embedding
    out.update({t: norm for t in NORM_TYPES})
    return out


def kron_map(solver: str = "cholesky", pi_damping: bool = True, bias: str = "augment") -> RepresentationMap:
    """K-FAC's map: Kronecker for Linear/Conv2d and Embedding, unit-wise for normalisation layers."""
    return _per_type(partial(KronFactored, solver=solver, pi_damping=pi_damping, bias=bias),
                     partial(KronEmbedding, pi_damping=pi_damping), UnitWise)


@register("sgd")
def sgd(model: nn.Module, loss_fn: nn.Module, **config: Any) -> PlainGradients:
    """No preconditioning (the plain gradient), with the makers' interface."""
    return PlainGradients(model, loss_fn, **config)


@register("kfac")
def kfac(model: nn.Module, loss_fn: nn.Module, *, solver: str = "cholesky", pi_damping: bool = True,
         bias: str = "augment", fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """K-FAC (Martens & Grosse, 2015; KFC for conv): ``ΔW = (G+√λ/π I)^{-1} ∇W (A+π√λ I)^{-1}``.

    Args:
        model: the model.
        loss_fn: the loss.
        solver: ``cholesky`` or ``eigen`` for the damped factor inverses.
        pi_damping: split the damping between the factors by π (``False``: ``√λ`` each).
        bias: ``augment`` (bias column in ``A``) or ``separate`` (bias preconditioned by ``G`` only).
        fisher_type: ``mc`` (default), ``emp`` or ``exact``.
        **config: common options.
    """
    reps = kron_map(solver, pi_damping, bias)
    return CurvatureGradients(model, loss_fn, method="kfac", reps=reps, fisher_type=fisher_type, **config)


@register("ekfac")
def ekfac(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """EKFAC (George et al., 2018) for Linear/Conv2d; K-FAC for Embedding; unit-wise for norm layers."""
    reps = _per_type(EigenCorrectedKron, KronEmbedding, UnitWise)
    return CurvatureGradients(model, loss_fn, method="ekfac", reps=reps, fisher_type=fisher_type, **config)


@register("skfac")
def skfac(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """SKFAC (Tang et al., 2021): Kronecker factors from their rows, inverted by SMW (latest batch only)."""
    if config.get("ema_decay") not in (None, 0.0):
        raise ValueError("skfac keeps the rows of the latest curvature batch only; ema_decay must be 0 or unset")
    config["ema_decay"] = 0.0
    reps = _per_type(SmwKronFactored, KronEmbedding, UnitWise)
    return CurvatureGradients(model, loss_fn, method="skfac", reps=reps, fisher_type=fisher_type, **config)


@register("full_ng")
def full_ng(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """Natural gradient with the dense Fisher of all parameters: ``Δθ = (F + λI)^{-1} ∇θ`` (small models)."""
    return CurvatureGradients(model, loss_fn, method="full_ng", reps=None, full="cholesky",
                              fisher_type=fisher_type, **config)


@register("smw_ng")
def smw_ng(model: nn.Module, loss_fn: nn.Module, *, fisher_type: str = "emp", **config: Any) -> CurvatureGradients:
    """Natural gradient of all parameters by Sherman–Morrison–Woodbury on the per-example gradients
    (exact ``(F+λI)^{-1}∇θ`` for the batch's Fisher; cheap when the batch is smaller than the parameters)."""
    _no_ema("smw_ng", config)
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
    _no_ema("seng", config)
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


def _no_ema(method: str, config: dict[str, Any]) -> None:
    if config.get("ema_decay") not in (None, 0.0):
        raise ValueError(f"{method} keeps the rows of the latest curvature batch only; ema_decay must be 0 or unset")
    config["ema_decay"] = 0.0
