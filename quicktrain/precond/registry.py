"""The method registry: :func:`register`, :func:`make`, :func:`list_methods`.

It imports no method: each method module in :mod:`quicktrain.precond.methods` registers itself on import, and
``quicktrain.precond`` imports that package, so every method is registered before this module can be used.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["UnknownOptionError", "list_methods", "make", "register"]

_REGISTRY: dict[str, Callable[..., Any]] = {}
# Python's wording when a keyword reaches a callable that has no such parameter
_UNEXPECTED_KEYWORD = re.compile(r"([\w.]+)\(\) got an unexpected keyword argument '(\w+)'")


class UnknownOptionError(ValueError):
    """An option passed to :func:`make` that the method does not take; ``option`` names it."""

    def __init__(self, method: str, option: str, factory: Callable[..., Any], refused_by: str) -> None:
        super().__init__(
            f"preconditioner {method!r} has no option {option!r}; its options are the keyword arguments of "
            f"{factory.__module__}.{factory.__qualname__} and {refused_by.removesuffix('.__init__')}"
        )
        self.method = method
        self.option = option


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
        UnknownOptionError: an option the method does not take (a ``ValueError``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown preconditioner {name!r}; choose from {list_methods()}")
    factory = _REGISTRY[name]
    try:
        return factory(model, loss_fn, **config)
    except TypeError as e:
        # the factories forward options to their maker's constructor, so a misspelt or foreign option surfaces
        # as that constructor's TypeError; only one naming an option the caller passed is the caller's mistake
        match = _UNEXPECTED_KEYWORD.search(str(e))
        if match is None or match.group(2) not in config:
            raise
        raise UnknownOptionError(name, match.group(2), factory, match.group(1)) from None
