"""``sgd``: the plain gradient with the makers' interface (a baseline and the default)."""

from __future__ import annotations

from typing import Any

from torch import nn

from quicktrain.precond.makers import PlainGradients
from quicktrain.precond.registry import register

__all__ = ["sgd"]


@register("sgd")
def sgd(model: nn.Module, loss_fn: nn.Module, **config: Any) -> PlainGradients:
    """No preconditioning (the plain gradient), with the makers' interface."""
    return PlainGradients(model, loss_fn, **config)
