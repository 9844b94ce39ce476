"""Ways of storing the curvature of one module (or of the whole model), one file each.

Every representation follows :class:`~quicktrain.precond.representations.base.Representation`:
``update(batch, decay)`` on curvature steps, ``update_inverse(damping)`` on inverse steps, then
``precondition(damping)`` writes ``(C + damping)^{-1} ∇θ`` into ``p.grad``; all state is in ``state_dict()``.
"""

from quicktrain.precond.representations.base import Representation, ema, first_nonfinite, require_finite
from quicktrain.precond.representations.dense import FullModel, LayerBlock, flat_rows
from quicktrain.precond.representations.diag import Diagonal
from quicktrain.precond.representations.eigen_adam import EmbeddingEigenAdam, KronEigenAdam, ParamAdam, check_adam
from quicktrain.precond.representations.ekfac import EigenCorrectedKron, ekfac_scales
from quicktrain.precond.representations.kbfgs import KronBfgs, bfgs_inverse_update, damped_bfgs_update
from quicktrain.precond.representations.kron import (
    KronEmbedding,
    KronFactored,
    SmwKronFactored,
    kron_dims,
    kron_grad_matrix,
    kron_sandwich_grad,
    kron_set_grad,
)
from quicktrain.precond.representations.unitwise import UnitWise

__all__ = [
    "Diagonal",
    "EigenCorrectedKron",
    "EmbeddingEigenAdam",
    "FullModel",
    "KronBfgs",
    "KronEigenAdam",
    "KronEmbedding",
    "KronFactored",
    "LayerBlock",
    "ParamAdam",
    "Representation",
    "SmwKronFactored",
    "UnitWise",
    "bfgs_inverse_update",
    "check_adam",
    "damped_bfgs_update",
    "ekfac_scales",
    "ema",
    "first_nonfinite",
    "flat_rows",
    "kron_dims",
    "kron_grad_matrix",
    "kron_sandwich_grad",
    "kron_set_grad",
    "require_finite",
]
