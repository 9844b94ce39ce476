"""The method registry: :func:`register`, :func:`make`, :func:`list_methods`.

It imports no method: each method module in :mod:`quicktrain.precond.methods` registers itself on import, and
``quicktrain.precond`` imports that package, so every method is registered before this module can be used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["list_methods", "make", "register"]

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a maker factory ``factory(model, loss_fn, **config)`` under ``name`` (duplicates raise)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"preconditioner {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_methods() -> list[str]:
    """Names accepted by :func:`make`, sorted."""
    return sorted(_REGISTRY)


def make(name: str, model: nn.Module, loss_fn: nn.Module, **config: Any):
    """Build the gradient maker ``name`` for ``model`` and ``loss_fn``.

    Args:
        name: one of :func:`list_methods`.
        model: the model (may be wrapped in ``DistributedDataParallel``).
        loss_fn: the loss module.
        **config: method options, e.g. ``damping``, ``curvature_interval``, ``inverse_interval``, ``warmup``,
            ``ema_decay``, ``fisher_type``, ``ignore_modules``, ``unsupported`` (see each method's factory).

    Returns:
        A :class:`quicktrain.train.hooks.GradientMaker`.

    Raises:
        ValueError: unknown name.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown preconditioner {name!r}; choose from {list_methods()}")
    return _REGISTRY[name](model, loss_fn, **config)
