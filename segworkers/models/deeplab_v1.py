"""DeepLab v1 (Chen, Papandreou, Kokkinos, Murphy & Yuille, ICLR 2015, "Semantic Image
Segmentation with Deep Convolutional Nets and Fully Connected CRFs"), DeepLab-LargeFOV.

Sec. 3.1: VGG16 made atrous, so that it computes scores at output stride 8 (pool4 and pool5
do not subsample, conv5 is dilated by 2; see `segworkers.models.vgg`), and "simple bilinear
interpolation to increase the resolution by a factor of 8 at no computational cost" brings
the scores to the image's size. Sec. 4.1 and Table 2, DeepLab-LargeFOV: fc6 subsampled to a
3x3 kernel with input stride (rate) 12 and 1024 channels, fc7 1x1 with 1024 channels, both with
dropout, and fc8 scoring the classes; 20.5M parameters for 21 classes. The fully connected
CRF of Sec. 3.2 post-processes the scores and is not part of the network.

The bilinear upsampling is pixel-centre aligned (`align_corners=False`), which matches the
2x2 subsampling poolings: for H and W divisible by 8 (`output_stride`) the stride-8 scores
sit on the centres of 8 x 8 input blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segworkers.models.registry import register
from segworkers.models.vgg import VGG16, ConvolutionalisedClassifier

LARGE_FOV_RATE = 12


class DeepLabV1(nn.Module):
    """width: VGG16's first-stage channels (64 in the paper); the others scale with it, fc6 and
    fc7 have 16 * width channels (1024 in the paper)."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 64, dropout: float = 0.5):
        super().__init__()
        self.backbone = VGG16(in_channels, width, output_stride=8)
        self.classifier = ConvolutionalisedClassifier(
            self.backbone.channels[-1], 16 * width, num_classes, kernel_size=3, dilation=LARGE_FOV_RATE, dropout=dropout
        )
        self.output_stride = self.backbone.output_stride
        self.halo = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.classifier(self.backbone(x)[-1])
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


@register("deeplab_v1")
def deeplab_v1(num_classes: int, in_channels: int, width: int = 64, dropout: float = 0.5) -> DeepLabV1:
    return DeepLabV1(num_classes, in_channels, width=width, dropout=dropout)
