"""The shared training loop and its extension points."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, lr_at
from .hooks import (
    AutogradGradients,
    GradientMaker,
    GradientMakerFactory,
    Hooks,
    Initializer,
    ModelTransform,
    Transform,
    unwrap,
)
from .loop import NonFiniteLossError, RunResult, evaluate, fit, make_optimizer, pick_device
from .recipe import load_recipe

__all__ = [
    # loop
    "fit",
    "evaluate",
    "make_optimizer",
    "pick_device",
    "RunResult",
    "NonFiniteLossError",
    "TrainConfig",
    "lr_at",
    "load_recipe",
    # extension points
    "Hooks",
    "AutogradGradients",
    "GradientMaker",
    "GradientMakerFactory",
    "Initializer",
    "ModelTransform",
    "Transform",
    "unwrap",
    # checkpoints
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
]
