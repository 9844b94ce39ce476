"""MobileNetV2 (Sandler et al., 2018) at width 0.35, the tiny-ML setting used by NetAug and NetBooster."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models._utils import _make_divisible

from .registry import Shape, register_model

# (expansion t, output channels c, repeats n, stride s) of Table 2 in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn_act(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """``conv (no bias) -> BatchNorm -> ReLU6`` with "same" padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expand, depthwise 3x3, linear pointwise project; a residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(in_channels, hidden, 1))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images: the stem and the first strided stage keep stride 1 below 64 pixels."""

    def __init__(self, in_channels: int, num_classes: int, width_mult: float = 0.35, small_input: bool = True):
        super().__init__()
        channels = _make_divisible(32 * width_mult, 8)
        last_channels = _make_divisible(1280 * max(1.0, width_mult), 8)
        features: list[nn.Module] = [conv_bn_act(in_channels, channels, 3, 1 if small_input else 2)]
        for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            out_channels = _make_divisible(c * width_mult, 8)
            stride = 1 if small_input and stage == 1 else s
            for i in range(n):
                features.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, t))
                channels = out_channels
        features.append(conv_bn_act(channels, last_channels, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("mobilenetv2_tiny")
def mobilenetv2_tiny(*, num_classes: int, in_shape: Shape) -> MobileNetV2:
    """MobileNetV2 at width 0.35 (about 0.4 M parameters for 10 classes)."""
    return MobileNetV2(in_shape[0], num_classes, width_mult=0.35, small_input=min(in_shape[1:]) < 64)
