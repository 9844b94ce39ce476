"""K-FAC's curvature and Kronecker representation with SOAP's solver: Adam in the eigenbasis of the K-FAC
factors (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", 2024, with K-FAC's ``A`` and ``G``,
Martens & Grosse, 2015, in place of Shampoo's ``g gᵀ`` and ``gᵀ g``):

.. math:: g' = Q_G^\\top g\\, Q_A, \\quad v \\leftarrow \\beta_2 v + (1-\\beta_2) g'^2, \\quad
    \\Delta W = Q_G \\frac{g'}{\\sqrt{\\hat v} + \\epsilon} Q_A^\\top

(see :mod:`~quicktrain.precond.representations.eigen_adam`; the momentum is the optimizer's).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from quicktrain.precond.makers import CurvatureGradients, type_map
from quicktrain.precond.registry import register
from quicktrain.precond.representations import EmbeddingEigenAdam, KronEigenAdam, ParamAdam

__all__ = ["kfac_soap"]


@register("kfac_soap")
def kfac_soap(model: nn.Module, loss_fn: nn.Module, *, beta1: float = 0.0, beta2: float = 0.95, eps: float = 1e-8,
              max_dim: int = 2048, bias: str = "augment", weight_sharing: str = "expand",
              statistics_fraction: float = 1.0, fisher_type: str = "mc", **config: Any) -> CurvatureGradients:
    """Adam in the K-FAC eigenbasis: ``ΔW = Q_G (g'/(√v̂+ε)) Q_Aᵀ``, ``g' = Q_Gᵀ ∇W Q_A``.

    The K-FAC factors are refreshed every ``curvature_interval`` steps (moving average ``ema_decay``), their
    eigenbases every ``inverse_interval`` steps (the second moment re-projected onto the new basis), the second
    moment at every step. Apply the result with SGD (with momentum: the first moment is the optimizer's), at
    Adam-like learning rates. Normalisation layers get Adam in the parameter basis, Embeddings the eigenbasis
    of their output factor; root-level parameters keep the plain gradient (or, with ``grafting="adam"``,
    RMSprop's step size). ``damping`` has no effect (the eigenvectors of ``A + λI`` are ``A``'s).

    Args:
        model: the model.
        loss_fn: the loss.
        beta1: ``β₁`` of a first moment kept in the rotated basis as SOAP keeps it (re-projected exactly when the
            basis changes; then apply with momentum-free SGD); 0 (default) keeps none, for the optimizer's
            momentum (LaProp's order).
        beta2: ``β₂`` of the second moment (SOAP's default, 0.95).
        eps: Adam's ``ε``.
        max_dim: factors of a larger dimension are not computed and their side keeps the identity basis
            (SOAP's ``max_precond_dim``).
        bias: ``augment`` (bias column in ``A``) or ``separate`` (the bias rotated by ``Q_G`` only).
        weight_sharing: ``expand`` or ``reduce`` (as in ``kfac``).
        statistics_fraction: factors from the first ``⌈f·N⌉`` examples of each curvature batch (as in ``kfac``).
        fisher_type: ``mc`` (default), ``emp`` or ``exact``: the curvature whose factors give the basis.
        **config: common options.
    """
    adam = {"beta1": beta1, "beta2": beta2, "eps": eps}
    reps = type_map(partial(KronEigenAdam, **adam, max_dim=max_dim, bias=bias, weight_sharing=weight_sharing,
                            statistics_fraction=statistics_fraction),
                    partial(EmbeddingEigenAdam, **adam, max_dim=max_dim), partial(ParamAdam, **adam))
    return CurvatureGradients(model, loss_fn, method="kfac_soap", reps=reps, fisher_type=fisher_type, **config)
