"""Progressive Linearization Tuning (PLT): activations whose negative slope is annealed from 0 to 1.

NetBooster (Yu et al., 2023) removes the non-linearities of the expanded blocks while training continues.
Every activation inserted by :func:`quicktrain.boost.expand` is a :class:`PLTActivation`,

.. math::

    \\phi_\\alpha(x) = \\max(x, 0) + \\alpha \\min(x, 0) =
        \\begin{cases} x & x \\ge 0 \\\\ \\alpha x & x < 0 \\end{cases}

i.e. a leaky ReLU with negative slope :math:`\\alpha`. At :math:`\\alpha = 0` it is a ReLU; at
:math:`\\alpha = 1` it is exactly the identity, so the block around it is affine and folds into the layer
before it (:mod:`quicktrain.boost.contract`). :func:`plt_slope` gives :math:`\\alpha` as a pure function of
training progress.

References:
    Z. Yu, Y. Fu, J. Yuan, H. You, Y. Lin. NetBooster: Empowering Tiny Deep Learning By Standing on the
    Shoulders of Deep Giants. DAC 2023, arXiv:2306.13586.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PLTActivation(nn.Module):
    """Leaky ReLU whose negative slope is saved with the model and changed in place by :meth:`set`.

    The slope lives twice: as a Python float that the forward hands to the fused ``F.leaky_relu`` kernel
    (one pass forward and one backward, where ``torch.where`` with a tensor slope took five and was 70% of a
    giant's CPU step), and as a persistent buffer ``slope`` so it is part of ``state_dict`` and survives
    resume; loading a ``state_dict`` updates the float. Change it with :meth:`set` or
    :func:`set_slope` (no host sync on CUDA), not by writing the buffer. At slope 1 the forward returns ``x``
    bit for bit, because ``x * 1 == x`` in IEEE arithmetic.

    Args:
        slope: initial negative slope :math:`\\alpha \\in [0, 1]` (0 = ReLU, 1 = identity).
    """

    slope: Tensor

    def __init__(self, slope: float = 0.0) -> None:
        super().__init__()
        _check_slope(slope)
        self.negative_slope = float(slope)
        self.register_buffer("slope", torch.tensor(float(slope)))

    def set(self, slope: float) -> None:
        """Set the negative slope (the float the forward uses and the saved buffer)."""
        _check_slope(slope)
        self.negative_slope = float(slope)
        self.slope.fill_(self.negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "slope" in state_dict:
            self.negative_slope = float(self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.negative_slope:.4g}"


def _check_slope(slope: float) -> None:
    if not (math.isfinite(slope) and 0.0 <= slope <= 1.0):
        raise ValueError(f"PLT slope must be in [0, 1], got {slope}")


def plt_slope(t: float, start: float, end: float) -> float:
    """The PLT negative slope at time ``t``: 0 before ``start``, 1 from ``end`` on, linear in between.

    .. math::

        \\alpha(t) = \\operatorname{clip}\\Big(\\frac{t - t_\\text{start}}{t_\\text{end} - t_\\text{start}},
        0, 1\\Big)

    ``t``, ``start`` and ``end`` share one unit (fraction of training, step or epoch). ``start == end``
    gives a hard switch at ``end``.

    Args:
        t: current time.
        start: time at which linearisation begins (slope still 0 there).
        end: time at which the slope reaches exactly 1.

    Returns:
        The slope :math:`\\alpha(t) \\in [0, 1]`.

    Raises:
        ValueError: if ``end < start``.

    Example:
        >>> plt_slope(0.6, 0.5, 0.7)
        0.5
    """
    if end < start:
        raise ValueError(f"PLT window must have start <= end, got start={start}, end={end}")
    if t >= end:
        return 1.0
    if t <= start:
        return 0.0
    return (t - start) / (end - start)


def plt_activations(model: nn.Module) -> dict[str, PLTActivation]:
    """All :class:`PLTActivation` modules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PLTActivation)}


def set_slope(model: nn.Module, slope: float) -> int:
    """Set the negative slope of every PLT activation in ``model``; returns how many were set."""
    _check_slope(slope)
    acts = plt_activations(model)
    for act in acts.values():
        act.set(slope)
    return len(acts)


def get_slopes(model: nn.Module) -> dict[str, float]:
    """The current slope of every PLT activation in ``model`` by qualified name."""
    return {name: act.negative_slope for name, act in plt_activations(model).items()}


__all__ = ["PLTActivation", "get_slopes", "plt_activations", "plt_slope", "set_slope"]
