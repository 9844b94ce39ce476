"""quicktrain: cheaper neural-network training.

Parts: :mod:`quicktrain.ghn` (predicted initialisation), :mod:`quicktrain.precond` (gradient
preconditioning), :mod:`quicktrain.boost` (NetBooster), :mod:`quicktrain.kron` (Kronecker SGD); shared
:mod:`quicktrain.data`, :mod:`quicktrain.models` and :mod:`quicktrain.train`.

Sub-packages load on first use, so ``import quicktrain`` (and ``quicktrain --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_SUBPACKAGES = ("data", "models", "train")
_EXPORTS = {"get_dataset": "data", "get_model": "models", "fit": "train", "TrainConfig": "train"}
__all__ = [*_SUBPACKAGES, *_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'quicktrain' has no attribute {name!r}")
