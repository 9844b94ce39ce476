"""K-FAC (Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature", ICML
2015; KFC for convolutions, Grosse & Martens, ICML 2016): Kronecker factors for Linear/Conv2d and Embedding,
unit-wise blocks for normalisation layers (§6.3 of the paper for the damping):

.. math:: \\Delta W = (G + \\tfrac{\\sqrt\\lambda}{\\pi} I)^{-1}\\, \\nabla W\\, (A + \\pi\\sqrt\\lambda I)^{-1}
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from quicktrain.precond.makers import CurvatureGradients, RepresentationMap, type_map
from quicktrain.precond.registry import register
from quicktrain.precond.representations import KronEmbedding, KronFactored, UnitWise

__all__ = ["kfac", "kron_map"]


def kron_map(solver: str = "cholesky", pi_damping: bool = True, bias: str = "augment",
             weight_sharing: str = "expand", low_rank: bool = False,
             statistics_fraction: float = 1.0) -> RepresentationMap:
    """K-FAC's map: Kronecker for Linear/Conv2d (attention projections included) and Embedding, unit-wise for
    normalisation layers."""
    return type_map(partial(KronFactored, solver=solver, pi_damping=pi_damping, bias=bias,
                            weight_sharing=weight_sharing, low_rank=low_rank,
                            statistics_fraction=statistics_fraction),
                     partial(KronEmbedding, pi_damping=pi_damping), UnitWise)


@register("kfac")
def kfac(model: nn.Module, loss_fn: nn.Module, *, solver: str = "cholesky", pi_damping: bool = True,
         bias: str = "augment", weight_sharing: str = "expand", low_rank: bool = True,
         statistics_fraction: float = 1.0, fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """K-FAC (Martens & Grosse, 2015; KFC for conv): ``ΔW = (G+√λ/π I)^{-1} ∇W (A+π√λ I)^{-1}``.

    Args:
        model: the model.
        loss_fn: the loss.
        solver: ``cholesky`` or ``eigen`` for the damped factor inverses.
        pi_damping: split the damping between the factors by π (``False``: ``√λ`` each).
        bias: ``augment`` (bias column in ``A``) or ``separate`` (bias preconditioned by ``G`` only).
        weight_sharing: ``expand`` (default) or ``reduce``: how tokens and conv positions enter the factors
            (see :class:`~quicktrain.precond.representations.kron.KronFactored`).
        low_rank: with ``ema_decay=0``, solve by Sherman–Morrison–Woodbury against the rows of an input factor
            that the batch cannot fill (dimension above its rows); the same step as the dense solve, cheaper.
        statistics_fraction: ``f ∈ (0, 1]``: the Linear/Conv2d factors from the first ``⌈f·N⌉`` examples of each
            curvature batch, as that sub-batch's own estimate (a different, noisier estimator; ``1`` is the
            whole batch). Cheaper Gram products; the forward and backward passes are the same.
        fisher_type: ``mc`` (default), ``emp`` or ``exact``.
        **config: common options.
    """
    reps = kron_map(solver, pi_damping, bias, weight_sharing, low_rank, statistics_fraction)
    return CurvatureGradients(model, loss_fn, method="kfac", reps=reps, fisher_type=fisher_type, **config)
