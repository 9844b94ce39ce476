"""Two baseline models: a multi-layer perceptron and a small convolutional network."""

from __future__ import annotations

import math

from torch import nn

from .registry import Shape, register_model


class MLP(nn.Sequential):
    """Flatten, then ``Linear -> ReLU`` per hidden width, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 128)) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)


def conv_bn_relu(in_channels: int, out_channels: int, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    """``3x3 conv (no bias) -> norm -> ReLU``, padding 1 so the spatial size is kept."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Two ``conv-BN-ReLU-maxpool`` stages, a 4x4 adaptive pool and a two-layer classifier."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, widths[0]),
            nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(widths[0], widths[1]),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[1] * 16, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("mlp")
def mlp(*, num_classes: int, in_shape: Shape) -> MLP:
    """MLP with hidden widths 256 and 128 on the flattened input."""
    return MLP(math.prod(in_shape), num_classes)


@register_model("cnn")
def cnn(*, num_classes: int, in_shape: Shape) -> SmallCNN:
    """Small CNN (32 and 64 channels, about 0.15 M parameters)."""
    return SmallCNN(in_shape[0], num_classes)
