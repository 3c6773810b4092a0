"""Fully convolutional networks (Long, Shelhamer & Darrell, CVPR 2015, "Fully Convolutional
Networks for Semantic Segmentation"; TPAMI 2016): FCN-32s, FCN-16s and FCN-8s on VGG16.

Sec. 3.1 and 4.1: VGG16's fully connected layers become convolutions, fc6 7x7 with 4096
channels and fc7 1x1 with 4096, dropout kept where the classifier had it (Sec. 4.3), and a
1x1 convolution scores the classes at stride 32 in place of fc8. FCN-32s upsamples these
scores straight to the image.

Sec. 4.2 (skips): FCN-16s scores pool4 with a 1x1 convolution, upsamples the stride-32 scores
2x and sums the two; FCN-8s does the same once more with pool3. "The new parameters acting on
pool4 are zero-initialized so that the net starts with unmodified predictions", and Sec. 4.3
zero-initialises the class scoring layer too; so all score layers start at zero here.

Upsampling (Sec. 3.3, 4.3 "Dense Prediction"): "Final layer deconvolutional filters are fixed
to bilinear interpolation, while intermediate upsampling layers are initialized to bilinear
upsampling, and then learned." The 2x fusing layers are therefore transposed convolutions
initialised to bilinear interpolation and learned. The final upsampling is fixed bilinear
interpolation done by `F.interpolate` (pixel-centre aligned): it equals the fixed
deconvolution away from the border, where it replicates instead of fading to zero, and
has no parameters (the reference's fixed deconvolution holds 21 x 21 x 16 x 16 frozen weights
for FCN-8s).

Sizes: the reference pads conv1_1 by 100 pixels and crops the upsampled scores, so that any
input size gives scores of that size. Here every convolution keeps the size instead (3x3 with
padding 1, fc6 7x7 with padding 3) and the 2x deconvolutions double exactly, so for H and W
divisible by 32 (`output_stride`) pool-k has exactly H / 2^k rows, skips add without cropping
and the output has the input's size. Parameter counts are the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segworkers.models.registry import register
from segworkers.models.vgg import VGG16, ConvolutionalisedClassifier

# VGG16 stages whose pooled outputs the skips score, coarse to fine: pool4, pool3.
SKIP_STAGES = (3, 2)


def bilinear_kernel(factor: int) -> torch.Tensor:
    """The (2f - f % 2)^2 filter that makes a stride-f transposed convolution interpolate
    bilinearly between pixel centres."""
    size = 2 * factor - factor % 2
    ramp = 1 - (torch.arange(size, dtype=torch.float32) - (size - 1) / 2).abs() / factor
    return ramp[:, None] * ramp[None, :]


class BilinearUpsampling(nn.ConvTranspose2d):
    """Learnable `factor`x upsampling of `channels` score maps, initialised so that each map
    is bilinearly interpolated from itself (FCN Sec. 3.3); padded so that the output is
    exactly `factor` times the input, aligned on pixel centres."""

    def __init__(self, channels: int, factor: int):
        size = 2 * factor - factor % 2
        super().__init__(channels, channels, size, stride=factor, padding=(size - factor) // 2, bias=False)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[range(channels), range(channels)] = bilinear_kernel(factor)


class FCN(nn.Module):
    """skips: 0 (FCN-32s), 1 (FCN-16s, pool4) or 2 (FCN-8s, pool4 and pool3).
    width: VGG16's first-stage channels (64 in the paper); the others scale with it, fc6 and
    fc7 have 64 * width channels (4096 in the paper)."""

    def __init__(self, num_classes: int, in_channels: int, skips: int, width: int = 64, dropout: float = 0.5):
        super().__init__()
        if skips not in (0, 1, 2):
            raise ValueError(f"skips must be 0, 1 or 2, not {skips}")
        self.backbone = VGG16(in_channels, width)
        self.classifier = ConvolutionalisedClassifier(self.backbone.channels[-1], 64 * width, num_classes, kernel_size=7, dropout=dropout)
        stages = SKIP_STAGES[:skips]
        self.skip_scores = nn.ModuleList(nn.Conv2d(self.backbone.channels[s], num_classes, 1) for s in stages)
        self.upsample2x = nn.ModuleList(BilinearUpsampling(num_classes, 2) for _ in stages)
        self.skip_stages = stages
        for score in [self.classifier.score, *self.skip_scores]:
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        self.output_stride = self.backbone.output_stride
        self.halo = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        scores = self.classifier(features[-1])
        for upsample, score, stage in zip(self.upsample2x, self.skip_scores, self.skip_stages):
            scores = upsample(scores) + score(features[stage])
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


@register("fcn32s")
def fcn32s(num_classes: int, in_channels: int, width: int = 64, dropout: float = 0.5) -> FCN:
    return FCN(num_classes, in_channels, skips=0, width=width, dropout=dropout)


@register("fcn16s")
def fcn16s(num_classes: int, in_channels: int, width: int = 64, dropout: float = 0.5) -> FCN:
    return FCN(num_classes, in_channels, skips=1, width=width, dropout=dropout)


@register("fcn8s")
def fcn8s(num_classes: int, in_channels: int, width: int = 64, dropout: float = 0.5) -> FCN:
    return FCN(num_classes, in_channels, skips=2, width=width, dropout=dropout)
