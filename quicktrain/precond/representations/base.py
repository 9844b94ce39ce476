"""The common interface of a curvature representation of one module (or of the whole model).

A representation owns its statistics and inverses as tensors in a ``state_dict``; nothing is stored on the
module. The maker calls, per step: ``update(batch, decay)`` on curvature steps, ``update_inverse(damping)``
on inverse steps, then ``precondition(damping)``, which replaces each ``p.grad`` by ``(C + damping)^{-1} p.grad``
in the representation's structure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from quicktrain.precond.capture import LayerBatch

__all__ = ["Representation", "ema", "first_nonfinite", "require_finite"]


def ema(old: Tensor | None, new: Tensor, decay: float) -> Tensor:
    """Exponential moving average ``decay * old + (1 - decay) * new``; ``new`` itself when there is no old."""
    if old is None or decay == 0.0:
        return new
    return old.mul(decay).add_(new, alpha=1.0 - decay)


def require_finite(t: Tensor, what: str, layer: str, step: int) -> Tensor:
    """Raise ``FloatingPointError`` naming layer and step when ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"non-finite {what} in layer {layer!r} at step {step}; lower the learning "
                                 "rate or raise the damping")
    return t


def first_nonfinite(named: list[tuple[str, Tensor]]) -> str | None:
    """Name of the first tensor that holds NaN or Inf, or None (one device sync when all are finite).

    The fast path reads each tensor once through its sum, which is non-finite whenever an entry is; only when
    a sum is non-finite (an entry is, or finite entries overflowed) are the entries themselves checked.
    """
    if not named or bool(torch.isfinite(torch.stack([t.sum() for _, t in named])).all()):
        return None
    return next((name for name, t in named if not bool(torch.isfinite(t).all())), None)


class Representation:
    """Base class: the curvature of one module's parameters in some structure.

    Args:
        name: module name (used in errors and state keys).
        module: the module.

    Subclasses list their tensor state names in ``_state`` (``None`` until first computed).
    """

    _state: tuple[str, ...] = ()
    needs_per_example: bool = False

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.step = 0
        for key in self._state:
            setattr(self, key, None)

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters(recurse=False) if p.requires_grad}

    def update(self, batch: LayerBatch, decay: float) -> None:
        raise NotImplementedError

    def update_inverse(self, damping: float) -> None:
        raise NotImplementedError

    def precondition(self, damping: float) -> None:
        raise NotImplementedError

    def mvp(self, vecs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Curvature (undamped) times per-parameter vectors ``{param name: tensor}``."""
        raise NotImplementedError(f"{type(self).__name__} has no matrix-vector product")

    def grads(self) -> dict[str, Tensor]:
        out = {}
        for n, p in self.params.items():
            if p.grad is None:
                raise RuntimeError(f"parameter {self.name}.{n} has no gradient after backward; it is unused by "
                                   "the loss: pass ignore_modules=[...] for it")
            out[n] = p.grad
        return out

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._state}

    def to(self, device: torch.device | str) -> Representation:
        """Move every state tensor to ``device`` (in place); returns ``self``."""
        for k in self._state:
            setattr(self, k, _to(getattr(self, k), torch.device(device)))
        return self

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self._state) - set(state)
        if missing:
            raise KeyError(f"state of layer {self.name!r} lacks {sorted(missing)}")
        device = next(iter(self.params.values())).device
        for k in self._state:
            setattr(self, k, _to(state[k], device))


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, Tensor):
        return v.to(device)
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    return v
