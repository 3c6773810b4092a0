"""ResNet encoder (He et al., 2016, "Deep Residual Learning for Image Recognition") for dense
prediction, as the DeepLab family uses it.

Table 1 and Sec. 4.1 of the paper: a 7x7 stride-2 convolution and a 3x3 stride-2 max pooling,
then four stages of bottleneck blocks (1x1 reduction, 3x3, 1x1 expansion by 4; "Deeper
Bottleneck Architectures") with 64, 128, 256 and 512 base channels; stages 2-4 halve the
resolution in their first block. ResNet-50 has 3-4-6-3 blocks, ResNet-101 3-4-23-3. Shortcuts
are identities, or 1x1 projections where the shape changes (option B, Sec. 3.3). Batch
normalisation follows every convolution and weights are initialised as in He et al. 2015
(Sec. 3.4). The classifier (global pooling and fc) is left out: this is an encoder.

Dense prediction (DeepLab v2 Sec. 3.1, DeepLab v3 Sec. 3.1): `output_stride=16` removes the
stride of the last stage and dilates its 3x3 convolutions by 2; `output_stride=8` does the
same to the third stage too, with rates 2 and 4, so the field of view is kept while the
resolution is not lost. DeepLab v3's multi-grid (Sec. 3.2) multiplies the last stage's rates
by per-block unit rates.

The stride sits in the 3x3 convolution, as in the TF-slim ResNet that DeepLab v3 used, not in
the first 1x1 of the original Caffe model: a strided 1x1 convolution ignores three pixels in
four. The parameter count is the same either way.
"""

from __future__ import annotations

import torch
from torch import nn

LAYOUTS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
EXPANSION = 4
# How many of the last stages trade their stride for dilation.
DILATED_STAGES = {32: 0, 16: 1, 8: 2}


class ConvBN(nn.Sequential):
    """Convolution without bias (the batch norm that follows has one), batch norm, optional ReLU;
    padded so that a stride-1 convolution keeps the size at any dilation."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1, relu: bool = True
    ):
        padding = dilation * (kernel_size - 1) // 2
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        out_channels = channels * EXPANSION
        self.residual = nn.Sequential(
            ConvBN(in_channels, channels, 1),
            ConvBN(channels, channels, 3, stride, dilation),
            ConvBN(channels, out_channels, 1, relu=False),
        )
        reshaped = stride != 1 or in_channels != out_channels
        self.shortcut = ConvBN(in_channels, out_channels, 1, stride, relu=False) if reshaped else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """forward(x) returns the features of the four stages: the first at stride 4 (DeepLab v3+'s
    low-level features), the last at `output_stride`. `channels` lists their widths.

    width: base channels (64 in the paper); every stage scales with it.
    multi_grid: unit rates of the last stage's blocks (DeepLab v3 Sec. 3.2), one per block.
    """

    def __init__(
        self,
        in_channels: int,
        layout: str = "resnet101",
        output_stride: int = 32,
        width: int = 64,
        multi_grid: tuple[int, ...] = (1, 1, 1),
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown ResNet layout {layout!r}; known: {', '.join(LAYOUTS)}")
        if output_stride not in DILATED_STAGES:
            raise ValueError(f"output_stride must be one of {sorted(DILATED_STAGES)}, not {output_stride}")
        blocks = LAYOUTS[layout]
        if len(multi_grid) != blocks[-1]:
            raise ValueError(f"multi_grid needs one unit rate per block of the last stage ({blocks[-1]}): {multi_grid}")
        self.stem = nn.Sequential(ConvBN(in_channels, width, 7, stride=2), nn.MaxPool2d(3, stride=2, padding=1))
        self.stages = nn.ModuleList()
        self.channels = []
        previous, dilation = width, 1
        first_dilated = len(blocks) - DILATED_STAGES[output_stride]
        for index, count in enumerate(blocks):
            channels = width * 2**index
            stride = 1 if index == 0 else 2
            if index >= first_dilated:
                dilation, stride = dilation * stride, 1
            unit_rates = multi_grid if index == len(blocks) - 1 else (1,) * count
            stage = []
            for block, unit_rate in enumerate(unit_rates):
                stage.append(Bottleneck(previous, channels, stride if block == 0 else 1, dilation * unit_rate))
                previous = channels * EXPANSION
            self.stages.append(nn.Sequential(*stage))
            self.channels.append(previous)
        self.output_stride = output_stride
        init_he(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def init_he(module: nn.Module) -> None:
    """He et al. 2015 ("Delving Deep into Rectifiers") normal initialisation for the convolutions
    feeding ReLUs; batch norm starts as the identity."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
