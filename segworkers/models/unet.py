"""U-Net (Ronneberger et al., 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation"): the original network and its common same-size variant.

Section 2 of the paper: a contracting path of repeated pairs of 3x3 convolutions with ReLU and
2x2 max pooling that doubles the features (64 .. 1024), an expansive path of 2x2
up-convolutions that halve them, concatenation with the (cropped) skip features, and a final
1x1 convolution to the classes: 23 convolutional layers in total for depth 4.

- `unet` is the paper's network: unpadded ("valid") 3x3 convolutions, so the output is smaller
  than the input (572 -> 388) and each skip is center-cropped to the up-convolved map. The
  lost border is the model's `halo`; `output_size` and `valid_input_size` tell the tiler which
  tile sizes fit (Sec. 2: every 2x2 pooling must meet an even size).
- `unet_padded` pads the 3x3 convolutions so the output has the input's size (inputs must be
  divisible by 2**depth).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from segworkers.models.registry import register


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, padding: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=padding),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=padding),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Side lengths through the network, with d = depth and t = pixels one DoubleConv trims
    (4 unpadded, 0 padded): a bottom map of side b comes from an input of side
    2**d * b + t * (2**(d+1) - 1) and gives an output of side 2**d * b - t * (2**d - 1).
    For the paper's network (d = 4, t = 4) that is 572 -> 388 at b = 28, and the halo,
    half their difference, is t * (3 * 2**d - 2) / 2 = 92 for every b."""

    def __init__(self, num_classes: int, in_channels: int, base_features: int = 64, depth: int = 4, padding: int = 1):
        super().__init__()
        features = [base_features * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        previous = in_channels
        for width in features:
            self.down.append(DoubleConv(previous, width, padding))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(w * 2, w, 2, stride=2) for w in reversed(features[:-1]))
        self.decode = nn.ModuleList(DoubleConv(w * 2, w, padding) for w in reversed(features[:-1]))
        self.head = nn.Conv2d(features[0], num_classes, 1)
        self.depth = depth
        self.trim = 4 * (1 - padding)
        self.output_stride = 2**depth
        self.halo = self.trim * (3 * 2**depth - 2) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():  # sizes are tensors while tracing, and a trace keeps no checks
            for size in x.shape[2:]:
                self.output_size(size)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, decode, skip in zip(self.up, self.decode, reversed(skips[:-1])):
            x = up(x)
            x = decode(torch.cat([center_crop(skip, x.shape[-2:]), x], dim=1))
        return self.head(x)

    def output_size(self, input_size: int) -> int:
        """Side length of the output for an input side length; ValueError naming the valid
        input sizes nearest to it when some pooling would meet an odd size or the output
        would vanish."""
        bottom, remainder = divmod(input_size - self._input_size(0), 2**self.depth)
        if remainder or bottom < self._smallest_bottom():
            nearby = [self._input_size(b) for b in (bottom, bottom + 1) if b >= self._smallest_bottom()]
            nearby = nearby or [self._input_size(self._smallest_bottom())]
            raise ValueError(
                f"U-Net (depth {self.depth}, {'padded' if self.trim == 0 else 'unpadded'}) cannot take input size "
                f"{input_size}; valid input sizes near it: {', '.join(map(str, nearby))}"
            )
        return self._output_size(bottom)

    def valid_input_size(self, output_size: int) -> int:
        """The smallest valid input side length whose output covers at least `output_size`
        pixels (exactly `output_size` when it is itself a valid output size); the output is
        centered in the input, `halo` pixels in from each side."""
        bottom = math.ceil((output_size - self._output_size(0)) / 2**self.depth)
        return self._input_size(max(bottom, self._smallest_bottom()))

    def _input_size(self, bottom: int) -> int:
        return 2**self.depth * bottom + self.trim * (2 ** (self.depth + 1) - 1)

    def _output_size(self, bottom: int) -> int:
        return 2**self.depth * bottom - self.trim * (2**self.depth - 1)

    def _smallest_bottom(self) -> int:
        return math.ceil((1 - self._output_size(0)) / 2**self.depth)


def center_crop(x: torch.Tensor, size) -> torch.Tensor:
    top = (x.shape[-2] - size[0]) // 2
    left = (x.shape[-1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


def require_multiple(spatial: Sequence[int], multiple: int, model: str) -> None:
    """ValueError naming the nearest valid sizes unless every spatial size is a positive
    multiple of `multiple` (the product of a same-size network's poolings)."""
    if torch.jit.is_tracing():  # sizes are tensors while tracing, and a trace keeps no checks
        return
    for size in spatial:
        if size % multiple or size == 0:
            nearby = [s for s in (size // multiple * multiple, (size // multiple + 1) * multiple) if s > 0]
            raise ValueError(
                f"{model} needs spatial sizes divisible by {multiple}, got {tuple(spatial)}; "
                f"valid sizes near {size}: {', '.join(map(str, nearby))}"
            )


@register("unet")
def unet(num_classes: int, in_channels: int, base_features: int = 64, depth: int = 4) -> UNet:
    return UNet(num_classes, in_channels, base_features=base_features, depth=depth, padding=0)


@register("unet_padded")
def unet_padded(num_classes: int, in_channels: int, base_features: int = 64, depth: int = 4) -> UNet:
    return UNet(num_classes, in_channels, base_features=base_features, depth=depth, padding=1)
