"""Gradient preconditioning: curvature × representation × solver, as gradient makers.

Use a method by name with :func:`make`; it returns a gradient maker for the training loop
(:class:`quicktrain.train.hooks.GradientMaker`): ``maker.forward_backward(x, y)`` leaves the preconditioned
gradient in every ``p.grad`` and all state is in ``maker.state_dict()``.

>>> from torch import nn
>>> from quicktrain import precond
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> maker = precond.make("kfac", model, nn.CrossEntropyLoss(), damping=1e-3)
"""

from quicktrain.precond.curvature import (
    FisherType,
    fisher_vp,
    ggn_vp,
    hessian_vp,
    hutchinson_trace,
    output_sqrt,
    top_eigenvalues,
)
from quicktrain.precond.estimate import CurvatureEstimate, compute_curvature
from quicktrain.precond.ewc import EWCPenalty, consolidated, consolidation_hooks, run_initializer
from quicktrain.precond.importance import (
    channel_magnitude,
    channel_saliency,
    curvature_diagonal,
    magnitude_scores,
    obd_saliency,
)
from quicktrain.precond.maker import CurvatureGradients, PlainGradients, list_methods, make, register
from quicktrain.precond.prune import prune_run

__all__ = [
    # methods
    "CurvatureGradients",
    "PlainGradients",
    "list_methods",
    "make",
    "register",
    # curvature representations of a model (EWC, OBD, analysis)
    "CurvatureEstimate",
    "compute_curvature",
    # continual learning (EWC) and importance/pruning from the curvature
    "EWCPenalty",
    "consolidated",
    "consolidation_hooks",
    "run_initializer",
    "channel_magnitude",
    "channel_saliency",
    "curvature_diagonal",
    "magnitude_scores",
    "obd_saliency",
    "prune_run",
    # matrix-free queries
    "FisherType",
    "fisher_vp",
    "ggn_vp",
    "hessian_vp",
    "hutchinson_trace",
    "output_sqrt",
    "top_eigenvalues",
]
