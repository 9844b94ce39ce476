"""NetBooster (Yu, Fu, Yuan, You, Lin, DAC 2023, arXiv:2306.13586): expand a tiny network into a deep giant,
train it, linearise the inserted blocks progressively (PLT), and contract them exactly back.

Usage::

    giant = expand(tiny, ratio=4)        # tiny is not modified; blocks start as identities
    ...                                  # train the giant, annealing set_slope(giant, a) from 0 to 1
    tiny2 = contract(giant)              # same state_dict keys and shapes as tiny, equal to the giant (eval)

In a run, :class:`BoostTransform` does all of this through the training loop's model-transform hooks.
"""

from .contract import block_affine, blocks_affine, bn_affine, check_linearised, contract, fold_affine
from .expand import BoostedLayer, ExpansionBlock, ExpansionPlan, boosted_layers, expand, is_giant, plan_expansion
from .kd import DistillationGradients, distillation, distillation_loss
from .macs import count_macs, count_params
from .plt import PLTActivation, get_slopes, plt_activations, plt_slope, set_slope
from .schedule import BoostTransform
from .supervision import BaseSupervisedGradients, base_supervision

__all__ = [
    # expansion
    "expand",
    "plan_expansion",
    "ExpansionPlan",
    "ExpansionBlock",
    "BoostedLayer",
    "boosted_layers",
    "is_giant",
    # progressive linearisation
    "PLTActivation",
    "plt_slope",
    "set_slope",
    "get_slopes",
    "plt_activations",
    # contraction
    "contract",
    "check_linearised",
    "bn_affine",
    "block_affine",
    "blocks_affine",
    "fold_affine",
    # training
    "BoostTransform",
    "BaseSupervisedGradients",
    "base_supervision",
    "DistillationGradients",
    "distillation",
    "distillation_loss",
    # cost
    "count_macs",
    "count_params",
]
