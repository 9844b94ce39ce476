"""CIFAR-style ResNet-20 (He et al., 2016, Sec. 4.2): three stages of 16, 32, 64 channels, n=3 blocks each."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .registry import Shape, register_model

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a norm layer follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; a 1x1 projection when the shape changes (option B)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = norm_layer(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class CifarResNet(nn.Module):
    """ResNet for small images: a 3x3 stem, ``len(blocks)`` stages, global average pooling, a linear head."""

    def __init__(
        self,
        blocks: tuple[int, ...],
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...] = (16, 32, 64),
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks and widths must have the same length, got {blocks} and {widths}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(channels, width, stride, norm_layer)]
            stage += [BasicBlock(width, width, 1, norm_layer) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(depth: int, *, num_classes: int, in_shape: Shape) -> CifarResNet:
    """ResNet-``depth`` for small images, ``depth = 6n + 2`` (20, 32, 44, 56, 110, ..., 6n+2)."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), in_shape[0], num_classes)


@register_model("resnet20")
def resnet20(*, num_classes: int, in_shape: Shape) -> CifarResNet:
    """ResNet-20 (0.27 M parameters)."""
    return cifar_resnet(20, num_classes=num_classes, in_shape=in_shape)
