"""Extension points of the training loop.

The loop in :mod:`quicktrain.train.loop` knows nothing about any part of quicktrain. Parts attach here:

* an **initialiser** fills a freshly built model's parameters (``--init ghn``);
* a **gradient maker** runs forward and backward for one batch and leaves the gradient that the optimizer
  should apply in ``p.grad`` (plain autograd, or a preconditioner from ``--precond``);
* **model transforms** may replace the model before, during and after training (``--boost``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn


class GradientMaker(Protocol):
    """Runs forward and backward on one batch and leaves the gradient to apply in each ``p.grad``."""

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(loss, logits)``, both detached; ``loss`` is the scalar mean loss of the batch."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


GradientMakerFactory = Callable[[nn.Module, nn.Module], GradientMaker]
"""``factory(model, loss_fn) -> GradientMaker``; called again whenever a transform replaces the model."""

Initializer = Callable[[nn.Module, Tensor], None]
"""``init(model, example_inputs)`` fills ``model``'s parameters in place (example inputs are one batch)."""


class ModelTransform(Protocol):
    """Replaces the model at fixed points of the schedule (e.g. NetBooster's expand and contract).

    Every method returns the model to train from then on (the same object when nothing changes). When the
    returned model is a different object, the loop builds a new optimizer and gradient maker for it.
    """

    def before_training(self, model: nn.Module) -> nn.Module: ...

    def on_step_start(self, model: nn.Module, step: int, total_steps: int) -> nn.Module: ...

    def after_training(self, model: nn.Module) -> nn.Module: ...

    def rebuild(self, model: nn.Module) -> nn.Module:
        """After ``load_state_dict`` on resume: return ``model`` (as built by ``before_training``) changed
        into the architecture this transform had when its state was saved; its weights get overwritten."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Transform:
    """A :class:`ModelTransform` that changes nothing: subclass it and override only the points you need."""

    def before_training(self, model: nn.Module) -> nn.Module:
        return model

    def on_step_start(self, model: nn.Module, step: int, total_steps: int) -> nn.Module:
        return model

    def after_training(self, model: nn.Module) -> nn.Module:
        return model

    def rebuild(self, model: nn.Module) -> nn.Module:
        return model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


class AutogradGradients:
    """The plain gradient maker: ``loss_fn(model(x), y).backward()``."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        self.model = model
        self.loss_fn = loss_fn

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(inputs)
        loss = self.loss_fn(logits, targets)
        loss.backward()
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"plain autograd has no state, got keys {sorted(state)}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``torch.compile``) wrapper, else ``model``."""
    inner = getattr(model, "module", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and inner is not None:
        return inner
    return getattr(model, "_orig_mod", model)


@dataclass
class Hooks:
    """What the parts plug into one run of :func:`quicktrain.train.fit`."""

    init: Initializer | None = None
    gradients: GradientMakerFactory = AutogradGradients
    transforms: list[ModelTransform] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What each attached part will do, one line each, for the run's start-up summary."""


__all__ = [
    "AutogradGradients",
    "Hooks",
    "GradientMaker",
    "GradientMakerFactory",
    "Initializer",
    "ModelTransform",
    "Transform",
    "unwrap",
]
