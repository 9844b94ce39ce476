"""Base supervision for the giant: train the network it contracts to on every step, the giant as extra help.

NetAug (Cai et al., ICLR 2022), which NetBooster builds on, trains the tiny model's weights :math:`W_t` on its
own loss plus the loss of a larger model that contains them,

.. math::

    W_t \\leftarrow W_t - \\eta \\Big( \\frac{\\partial \\mathcal{L}(W_t)}{\\partial W_t}
        + \\lambda \\frac{\\partial \\mathcal{L}([W_t, W_a])}{\\partial W_t} \\Big),

so the tiny model never stops being trained for itself. In NetBooster's giant the network it contracts to is
the giant at PLT slope 1 (every block affine, :mod:`quicktrain.boost.contract`), and the larger model is the
giant at the current slope :math:`\\alpha(t)`. :class:`BaseSupervisedGradients` minimises

.. math::

    \\mathcal{L} = \\ell\\big(f_{1}(x), y\\big) + \\lambda\\, \\ell\\big(f_{\\alpha}(x), y\\big)

with :math:`f_a` the giant at slope :math:`a` (the same weights): two forward/backward passes while
:math:`\\alpha < 1`, one plain pass once the slope is 1 or the model has no PLT activations (after
contraction). Without it the weights are trained only through :math:`f_\\alpha`, and what they compute at
slope 1 is trained only from the PLT window on (``benchmarks/boost_probe.py`` measures how far behind that
leaves it). BatchNorm running statistics are updated by both passes; the contracted network's statistics are
those of the last steps, where the two slopes agree.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from quicktrain.train.hooks import GradientMaker, GradientMakerFactory, unwrap

from .plt import PLTActivation, plt_activations


class BaseSupervisedGradients:
    """Gradient maker for :math:`\\ell(f_1(x), y) + \\lambda\\, \\ell(f_\\alpha(x), y)` (module docstring).

    Follows :class:`quicktrain.train.hooks.GradientMaker`; returns the loss and logits of :math:`f_1`, the
    network being trained for deployment. The current slope :math:`\\alpha` is read from the model's PLT
    activations (set by :class:`quicktrain.boost.BoostTransform` at the step's start) and restored after the
    slope-1 pass. The two passes call ``backward`` separately (gradients add up in ``p.grad``), so under DDP
    each pass is averaged across ranks and the sum is the average of the sums.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *, weight: float = 1.0) -> None:
        _check_weight(weight)
        self.model, self.loss_fn, self.weight = model, loss_fn, weight
        self.acts: list[PLTActivation] = list(plt_activations(unwrap(model)).values())

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        slopes = [act.negative_slope for act in self.acts]
        for act in self.acts:
            act.set(1.0)
        try:
            logits = self.model(inputs)
            loss = self.loss_fn(logits, targets)
            loss.backward()
        finally:
            for act, slope in zip(self.acts, slopes, strict=True):
                act.set(slope)
        # no PLT activations, or all already linear: f_alpha is f_1 and the one pass was all of it
        if self.weight and any(s != 1.0 for s in slopes):
            (self.weight * self.loss_fn(self.model(inputs), targets)).backward()
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state != self.state_dict():
            raise ValueError(f"base-supervision settings differ from the checkpoint's: {state} vs {self.state_dict()}")


def _check_weight(weight: float) -> None:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"base-supervision weight must be a finite number >= 0 (e.g. 1.0), got {weight!r}")


def base_supervision(weight: float = 1.0) -> GradientMakerFactory:
    """A :data:`~quicktrain.train.hooks.GradientMakerFactory` for :class:`BaseSupervisedGradients`.

    Args:
        weight: :math:`\\lambda`, the weight of the giant's loss at the current slope (NetAug's
            :math:`\\alpha`; 1 = equal weight, 0 = train only the slope-1 network, i.e. the ``linear`` ablation).

    Example:
        >>> hooks = Hooks(gradients=base_supervision(1.0), transforms=[BoostTransform()])  # doctest: +SKIP
    """
    _check_weight(weight)

    def factory(model: nn.Module, loss_fn: nn.Module) -> GradientMaker:
        return BaseSupervisedGradients(model, loss_fn, weight=weight)

    return factory


__all__ = ["BaseSupervisedGradients", "base_supervision"]
