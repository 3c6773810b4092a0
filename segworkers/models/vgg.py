"""VGG16 (Simonyan & Zisserman, 2015, "Very Deep Convolutional Networks for Large-Scale Image
Recognition"), configuration D, as the feature extractor of FCN and DeepLab v1.

Table 1, column D: five stages of 3x3 convolutions with ReLU (2, 2, 3, 3 and 3 of them, with
64, 128, 256, 512 and 512 channels), stride 1 and padding 1 so a convolution keeps the size
(Sec. 2.1), each stage closed by 2x2 max pooling with stride 2. `forward` returns the five
pooled outputs, pool1 .. pool5, so FCN can score pool3 and pool4 for its skips. The three
fully connected layers become convolutions in both segmentation networks (FCN Sec. 3.1,
DeepLab v1 Sec. 3.1): `ConvolutionalisedClassifier`.

Atrous VGG (DeepLab v1 Sec. 3.1): "we skip subsampling after the last two max-pooling layers
... and modify the convolutional filters in the layers that follow them by introducing zeros
to increase their length (2x in the last three convolutional layers and 4x in the first fully
connected layer)". `output_stride=8` does that: pool4 and pool5 keep the resolution and conv5
is dilated by 2 (fc6 would need rate 4 to see what it sees at stride 32; DeepLab-LargeFOV
picks its own rate). A pooling that keeps the resolution uses a centred 3x3 window with
padding 1, as the released DeepLab model does. The subsampling poolings keep VGG's 2x2
windows, so a stride-s feature is centred on its s x s block of input pixels and pixel-centre
bilinear upsampling lines up with the input; the released DeepLab model instead uses 3x3
windows everywhere and inputs of size 32k - 31.

No pretrained weights are loaded here, so convolutions are initialised for training from
scratch: He et al. 2015 ("Delving Deep into Rectifiers", Sec. 2.2), which trains VGG-like
nets without the staged initialisation of VGG Sec. 3.1; biases start at zero (VGG Sec. 3.1).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

STAGE_DEPTHS = (2, 2, 3, 3, 3)
# Channels of each stage as multiples of the first stage's (64 in the paper).
STAGE_WIDTHS = (1, 2, 4, 8, 8)


class ConvReLU(nn.Sequential):
    """Convolution and ReLU, padded so that it keeps the size at any dilation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size - 1) // 2, dilation=dilation)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        super().__init__(conv, nn.ReLU(inplace=True))


class VGGStage(nn.Sequential):
    """`depth` 3x3 convolutions with ReLU, then max pooling: 2x2 with stride 2, or a centred
    3x3 window with stride 1 where the stage keeps the resolution (atrous VGG)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, dilation: int = 1, subsample: bool = True):
        convs = [ConvReLU(in_channels if i == 0 else out_channels, out_channels, 3, dilation) for i in range(depth)]
        pool = nn.MaxPool2d(2) if subsample else nn.MaxPool2d(3, stride=1, padding=1)
        super().__init__(*convs, pool)


class VGG16(nn.Module):
    """forward(x) returns [pool1, ..., pool5]; `channels` lists their widths.

    width: channels of the first stage (64 in the paper); the others scale with it.
    output_stride: 32 (the classifier network), 16 or 8 (atrous: the last one or two stages
    keep the resolution and the layers after them are dilated).
    """

    def __init__(self, in_channels: int, width: int = 64, output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, not {output_stride}")
        self.stages = nn.ModuleList()
        self.channels = []
        previous, stride, dilation = in_channels, 1, 1
        for depth, multiple in zip(STAGE_DEPTHS, STAGE_WIDTHS):
            subsample = stride < output_stride
            self.stages.append(VGGStage(previous, width * multiple, depth, dilation, subsample))
            if subsample:
                stride *= 2
            else:
                dilation *= 2
            previous = width * multiple
            self.channels.append(previous)
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ConvolutionalisedClassifier(nn.Sequential):
    """VGG's fully connected layers as convolutions: fc6 (kernel_size x kernel_size, dilated by
    `dilation`) and fc7 (1x1) with ReLU and dropout 0.5 (VGG Sec. 3.1), then a 1x1 convolution
    to the class scores in place of the 1000-way fc8."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int, kernel_size: int, dilation: int = 1, dropout: float = 0.5):
        super().__init__(
            OrderedDict(
                fc6=ConvReLU(in_channels, hidden, kernel_size, dilation),
                drop6=nn.Dropout(dropout),
                fc7=ConvReLU(hidden, hidden, 1),
                drop7=nn.Dropout(dropout),
                score=nn.Conv2d(hidden, num_classes, 1),
            )
        )
