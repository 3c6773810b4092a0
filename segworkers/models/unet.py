"""U-Net (Ronneberger et al., 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation"), in its common same-size variant.

Section 2 of the paper: a contracting path of repeated pairs of 3x3 convolutions with ReLU and
2x2 max pooling that doubles the features (64 .. 1024), an expansive path of 2x2
up-convolutions that halve them, concatenation with the skip features, and a final 1x1
convolution to the classes. `unet_padded` pads the 3x3 convolutions so the output has the
input's size (inputs must be divisible by 16).
"""

from __future__ import annotations

import torch
from torch import nn

from segworkers.models import register


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, padding: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=padding),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=padding),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    output_stride = 1

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
        self.halo = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, decode, skip in zip(self.up, self.decode, reversed(skips[:-1])):
            x = up(x)
            x = decode(torch.cat([center_crop(skip, x.shape[-2:]), x], dim=1))
        return self.head(x)


def center_crop(x: torch.Tensor, size) -> torch.Tensor:
    top = (x.shape[-2] - size[0]) // 2
    left = (x.shape[-1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


@register("unet_padded")
def unet_padded(num_classes: int, in_channels: int, base_features: int = 64, depth: int = 4) -> UNet:
    return UNet(num_classes, in_channels, base_features=base_features, depth=depth, padding=1)
