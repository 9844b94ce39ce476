"""MCU-scale networks (tens of kilobytes of weights), the regime NetAug and NetBooster target: too small
to fit Fashion-MNIST, so their training accuracy stays well below a larger network's.

* ``mobilenetv2_mcu``: MobileNetV2 (Sandler et al., 2018) at width 0.25 with the first five stages of
  Table 2 (up to 24 channels), a 128-channel last layer and a stride-2 stem; about 50 k parameters.
* ``tinycnn``: three ``conv3x3-BN-ReLU`` layers of 8, 16 and 32 channels with two max pools, global
  average pooling and a linear classifier; about 6 k parameters.
* ``microcnn``: ``tinycnn`` at half the width (4, 8 and 16 channels); about 1.7 k parameters, small enough
  that more training steps stop paying (its accuracy plateaus), the case where only more capacity can help.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models._utils import _make_divisible

from .mobilenet import INVERTED_RESIDUAL_SETTING, InvertedResidual, conv_bn_act
from .registry import Shape, register_model
from .small import conv_bn_relu


class MobileNetV2MCU(nn.Module):
    """MobileNetV2 truncated after ``stages`` stages of Table 2, with a narrow last layer.

    Args:
        in_channels: input channels.
        num_classes: classifier outputs.
        width_mult: channel multiplier (channels rounded to multiples of 8, as torchvision does).
        stages: how many rows of :data:`INVERTED_RESIDUAL_SETTING` to keep.
        last_channels: width of the final 1x1 layer before pooling.
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, width_mult: float = 0.25, stages: int = 5,
        last_channels: int = 128,
    ) -> None:
        super().__init__()
        channels = _make_divisible(32 * width_mult, 8)
        features: list[nn.Module] = [conv_bn_act(in_channels, channels, 3, 2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING[:stages]:
            out_channels = _make_divisible(c * width_mult, 8)
            for i in range(n):
                features.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
        features.append(conv_bn_act(channels, last_channels, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class TinyCNN(nn.Sequential):
    """``conv-BN-ReLU`` at 8, 16, 32 channels (max pool after the first two), global pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__(
            conv_bn_relu(in_channels, widths[0]),
            nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(widths[0], widths[1]),
            nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(widths[1], widths[2]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[2], num_classes),
        )


@register_model("mobilenetv2_mcu")
def mobilenetv2_mcu(*, num_classes: int, in_shape: Shape) -> MobileNetV2MCU:
    """MobileNetV2 at width 0.25, five stages, 128 last channels (about 50 k parameters for 10 classes)."""
    return MobileNetV2MCU(in_shape[0], num_classes)


@register_model("tinycnn")
def tinycnn(*, num_classes: int, in_shape: Shape) -> TinyCNN:
    """Three-layer CNN of 8, 16 and 32 channels (about 6 k parameters for 10 classes)."""
    return TinyCNN(in_shape[0], num_classes)


@register_model("microcnn")
def microcnn(*, num_classes: int, in_shape: Shape) -> TinyCNN:
    """``tinycnn`` at half the width: 4, 8 and 16 channels (about 1.7 k parameters for 10 classes)."""
    return TinyCNN(in_shape[0], num_classes, widths=(4, 8, 16))
