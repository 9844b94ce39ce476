"""Gradient preconditioning: curvature × representation × solver, as gradient makers.

Use a method by name with :func:`make`; it returns a gradient maker for the training loop
(:class:`quicktrain.train.hooks.GradientMaker`): ``maker.forward_backward(x, y)`` leaves the preconditioned
gradient in every ``p.grad`` and all state is in ``maker.state_dict()``.

>>> from torch import nn
>>> from quicktrain import precond
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> maker = precond.make("kfac", model, nn.CrossEntropyLoss(), damping=1e-3)

Layers, arrows downwards only: :mod:`~quicktrain.precond.methods` (one file per method, registered in
:mod:`~quicktrain.precond.registry`) → :mod:`~quicktrain.precond.makers` (the maker loop) →
:mod:`~quicktrain.precond.representations` (one file per way of storing curvature) →
:mod:`~quicktrain.precond.capture` (hooks recording layer inputs and output gradients),
:mod:`~quicktrain.precond.curvature` (matrix-free products at the network output),
:mod:`~quicktrain.precond.distributed` and :mod:`~quicktrain.precond._math` (one equation per function).
Applications built on the curvature (EWC, importance, pruning) live in :mod:`quicktrain.curvature_apps`.
"""

from quicktrain.precond import methods  # noqa: F401  (registers every method)
from quicktrain.precond.capture import KRON_TYPES, NORM_TYPES, SUPPORTED_TYPES
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
from quicktrain.precond.makers import CurvatureGradients, PlainGradients
from quicktrain.precond.methods.shampoo import ShampooGradients
from quicktrain.precond.registry import UnknownOptionError, list_methods, make, register
from quicktrain.precond.representations import (
    Diagonal,
    KronEmbedding,
    KronFactored,
    LayerBlock,
    Representation,
    UnitWise,
)

__all__ = [
    # methods
    "CurvatureGradients",
    "PlainGradients",
    "ShampooGradients",
    "UnknownOptionError",
    "list_methods",
    "make",
    "register",
    # curvature representations of a model (EWC, OBD, analysis)
    "CurvatureEstimate",
    "compute_curvature",
    "Diagonal",
    "KronEmbedding",
    "KronFactored",
    "LayerBlock",
    "Representation",
    "UnitWise",
    "KRON_TYPES",
    "NORM_TYPES",
    "SUPPORTED_TYPES",
    # matrix-free queries
    "FisherType",
    "fisher_vp",
    "ggn_vp",
    "hessian_vp",
    "hutchinson_trace",
    "output_sqrt",
    "top_eigenvalues",
]
