"""Model zoo: ``get_model(name, num_classes=..., in_shape=(C, H, W))`` for own models and ``tv:NAME``."""

from . import mcu, mobilenet, resnet, small, vit  # noqa: F401  (registers the models)
from .registry import (
    TV_PREFIX,
    ModelInfo,
    get_model,
    input_shape,
    list_models,
    list_torchvision_models,
    model_info,
    register_model,
)

__all__ = [
    # registry
    "get_model",
    "input_shape",
    "list_models",
    "list_torchvision_models",
    "model_info",
    "register_model",
    "ModelInfo",
    "TV_PREFIX",
]
