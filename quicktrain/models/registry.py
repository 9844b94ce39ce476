"""Registry of models by name: quicktrain's own small models and every torchvision classifier as ``tv:NAME``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

Shape = tuple[int, int, int]
Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """How to build a model and what input it needs.

    Attributes:
        builder: ``builder(num_classes=..., in_shape=(C, H, W)) -> nn.Module``.
        channels: input channels the model needs, or ``None`` for "whatever the data has".
        min_size: smallest height/width the model accepts; smaller images are resized up to it.
    """

    builder: Builder
    channels: int | None = None
    min_size: int = 1


_MODELS: dict[str, ModelInfo] = {}
TV_PREFIX = "tv:"

# torchvision models whose spatial reductions need larger inputs than the 32-pixel default, and the
# constructor arguments that make them build for small images without auxiliary heads.
_TV_MIN_SIZE = {"inception_v3": 75, "alexnet": 63, "maxvit_t": 224}
# Models whose input side must be a multiple of a patch or window size.
_TV_MULTIPLE = {"vit_b_16": 16, "vit_l_16": 16, "vit_b_32": 32, "vit_l_32": 32, "vit_h_14": 14, "maxvit_t": 224}
_TV_KWARGS = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}


def register_model(name: str, *, channels: int | None = None, min_size: int = 1) -> Callable[[Builder], Builder]:
    """Decorator that registers ``builder`` under ``name``; a duplicate name raises."""

    def decorate(builder: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelInfo(builder, channels, min_size)
        return builder

    return decorate


def list_models(*, include_torchvision: bool = False) -> list[str]:
    """Sorted names of the registered models (plus ``tv:NAME`` for every torchvision classifier)."""
    names = sorted(_MODELS)
    if include_torchvision:
        names += [TV_PREFIX + n for n in list_torchvision_models()]
    return names


def list_torchvision_models() -> list[str]:
    """Sorted names of torchvision's classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``; unknown names raise with the list of valid ones."""
    if name.startswith(TV_PREFIX):
        tv_name = name.removeprefix(TV_PREFIX)
        if tv_name not in list_torchvision_models():
            raise ValueError(
                f"Unknown torchvision model {tv_name!r}; choose from {list_torchvision_models()} (as 'tv:NAME')"
            )
        return ModelInfo(_torchvision_builder(tv_name), channels=3, min_size=_TV_MIN_SIZE.get(tv_name, 32))
    if name not in _MODELS:
        raise ValueError(
            f"Unknown model {name!r}; choose from {list_models()} or 'tv:NAME' for a torchvision classifier"
        )
    return _MODELS[name]


def input_shape(name: str, data_shape: Shape) -> Shape:
    """The input shape ``(C, H, W)`` that model ``name`` needs for data of shape ``data_shape``."""
    info = model_info(name)
    channels, height, width = data_shape
    multiple = _TV_MULTIPLE.get(name.removeprefix(TV_PREFIX), 1) if name.startswith(TV_PREFIX) else 1
    height, width = (-(-max(side, info.min_size) // multiple) * multiple for side in (height, width))
    return (info.channels or channels, height, width)


def get_model(name: str, *, num_classes: int, in_shape: Shape) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes and inputs of shape ``in_shape = (C, H, W)``.

    ``in_shape`` is the shape the model will see, i.e. already passed through :func:`input_shape`.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    expected = input_shape(name, in_shape)
    if tuple(in_shape) != expected:
        raise ValueError(
            f"model {name!r} needs inputs of shape {expected}, got {tuple(in_shape)}; "
            "adapt the data with quicktrain.data.adapt(...) to models.input_shape(name, data_shape)"
        )
    return model_info(name).builder(num_classes=num_classes, in_shape=tuple(in_shape))


def _torchvision_builder(tv_name: str) -> Builder:
    def build(*, num_classes: int, in_shape: Shape) -> nn.Module:
        kwargs = dict(_TV_KWARGS.get(tv_name, {}))
        if tv_name.startswith("vit_"):
            kwargs["image_size"] = in_shape[1]
        if tv_name.startswith("maxvit"):
            kwargs["input_size"] = in_shape[1:]
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)

    return build
