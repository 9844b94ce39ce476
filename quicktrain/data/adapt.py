"""The one place where image size and channels are adapted to what a model needs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

Shape = tuple[int, int, int]


class Adapter(nn.Module):
    """Turns batches of shape ``[B, *data_shape]`` into ``[B, *model_shape]``.

    One channel is repeated to three (grey to RGB); images smaller than the model needs are resized up
    bilinearly (``antialias`` off: upsampling only). Anything else (e.g. RGB to grey, shrinking) raises.
    """

    def __init__(self, data_shape: Shape, model_shape: Shape) -> None:
        super().__init__()
        (c_in, h_in, w_in), (c_out, h_out, w_out) = data_shape, model_shape
        if c_in != c_out and not (c_in == 1 and c_out == 3):
            raise ValueError(f"cannot adapt {c_in}-channel images to a {c_out}-channel model")
        if h_out < h_in or w_out < w_in:
            raise ValueError(f"cannot shrink {h_in}x{w_in} images to {h_out}x{w_out}")
        self.data_shape, self.model_shape = tuple(data_shape), tuple(model_shape)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"expected a batch of shape [B, {self.data_shape}], got {list(x.shape)}")
        if self.model_shape[1:] != self.data_shape[1:]:
            x = F.interpolate(x, size=self.model_shape[1:], mode="bilinear", align_corners=False)
        if self.model_shape[0] != self.data_shape[0]:
            x = x.expand(-1, self.model_shape[0], -1, -1)
        return x

    @property
    def is_identity(self) -> bool:
        """True when the data already has the model's shape."""
        return self.data_shape == self.model_shape


def adapt(x: Tensor, model_shape: Shape) -> Tensor:
    """Adapt a batch ``x`` of images to ``model_shape``; see :class:`Adapter`."""
    return Adapter(tuple(x.shape[1:]), model_shape)(x)
