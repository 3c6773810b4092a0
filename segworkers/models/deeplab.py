"""DeepLab v2, v3 and v3+: a dilated ResNet encoder (segworkers.models.resnet), a head of
parallel atrous convolutions (ASPP), and bilinear upsampling of the logits to the input size.

- `deeplab_v2` (Chen et al., TPAMI 2017, "DeepLab: Semantic Image Segmentation with Deep
  Convolutional Nets, Atrous Convolution, and Fully Connected CRFs"): ResNet-101 at output
  stride 8 (Sec. 3.1) and ASPP-L (Sec. 3.2, Fig. 4): four 3x3 atrous convolutions at rates 6,
  12, 18 and 24, each straight to class scores as in the released DeepLab-ResNet-101 model,
  fused by summation. The fully connected CRF (Sec. 3.3) is post-processing and the
  multi-scale input training (Sec. 4.1) a training scheme; neither belongs to the network.
- `deeplab_v3` (Chen et al., 2017, "Rethinking Atrous Convolution for Semantic Image
  Segmentation"): ResNet-50/101 at output stride 16 (or 8) with multi-grid (1, 2, 4) in the last
  stage (Sec. 3.2, the best setting of Table 7), and the improved ASPP of Sec. 3.3: a 1x1 and three
  3x3 convolutions at rates 6, 12, 18 (doubled at output stride 8) plus image-level features
  (global average pooling, 1x1 convolution, upsampling), 256 channels, batch norm everywhere,
  concatenated and projected by a 1x1 convolution, then a 1x1 classifier.
- `deeplab_v3plus` (Chen et al., ECCV 2018, "Encoder-Decoder with Atrous Separable Convolution
  for Semantic Image Segmentation"): the v3 encoder and the decoder of Sec. 3.1 (Fig. 2):
  the stride-4 low-level features reduced to 48 channels by a 1x1 convolution, concatenated
  with the upsampled encoder output, refined by two 3x3 convolutions of 256 channels, then
  classified and upsampled by 4. The backbone is ResNet (the paper's Sec. 4.1 experiments),
  not the aligned Xception of Sec. 3.2, so the convolutions are ordinary, not separable.

`width` scales the whole network (64 = the papers' sizes): the ResNet base channels, the
256-channel ASPP and decoder (4 x width) and the 48 low-level channels (3/4 x width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segworkers.models.registry import register
from segworkers.models.resnet import ConvBN, ResNet

V2_RATES = (6, 12, 18, 24)
V3_RATES = (6, 12, 18)  # at output stride 16; they scale inversely with it (v3 Sec. 3.3)


class SummedASPP(nn.Module):
    """DeepLab v2's ASPP: every branch predicts class scores, and the scores are added."""

    def __init__(self, encoder_channels: list[int], num_classes: int, rates: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(encoder_channels[-1], num_classes, 3, padding=rate, dilation=rate) for rate in rates
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return sum(branch(features[-1]) for branch in self.branches)


class ASPP(nn.Module):
    """DeepLab v3's ASPP (Sec. 3.3): a 1x1 branch, one 3x3 branch per rate, image pooling, and a
    1x1 projection of their concatenation."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBN(in_channels, channels, 1)] + [ConvBN(in_channels, channels, 3, dilation=rate) for rate in rates]
        )
        self.image_pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBN(in_channels, channels, 1))
        self.project = ConvBN(channels * (len(rates) + 2), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bilinear upsampling of a 1x1 map is a broadcast.
        pooled = self.image_pooling(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class Decoder(nn.Module):
    """DeepLab v3+'s decoder (Sec. 3.1): few low-level channels, so that they do not outweigh
    the encoder's rich features, then two 3x3 convolutions to refine."""

    def __init__(self, low_level_in: int, low_level_channels: int, channels: int):
        super().__init__()
        self.reduce = ConvBN(low_level_in, low_level_channels, 1)
        self.refine = nn.Sequential(
            ConvBN(channels + low_level_channels, channels, 3),
            ConvBN(channels, channels, 3),
        )

    def forward(self, low_level: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        encoded = upsample(encoded, low_level.shape[-2:])
        return self.refine(torch.cat([self.reduce(low_level), encoded], dim=1))


class ASPPHead(nn.Module):
    """ASPP on the last encoder features, with v3+'s decoder when low_level_channels is given,
    and a 1x1 classifier."""

    def __init__(
        self,
        encoder_channels: list[int],
        num_classes: int,
        rates: tuple[int, ...],
        channels: int,
        low_level_channels: int | None = None,
    ):
        super().__init__()
        self.aspp = ASPP(encoder_channels[-1], channels, rates)
        self.decoder = (
            None if low_level_channels is None else Decoder(encoder_channels[0], low_level_channels, channels)
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.aspp(features[-1])
        if self.decoder is not None:
            x = self.decoder(features[0], x)
        return self.classifier(x)


class DeepLab(nn.Module):
    """Encoder, head, and bilinear upsampling of the head's logits to the input size.

    Any input size gives same-size logits; inputs divisible by `output_stride` keep the feature
    grid aligned with the pixels. halo is 0: the receptive field covers the whole tile, so no
    finite margin makes tiles exact; a model card can still ask for context.
    """

    def __init__(self, encoder: ResNet, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.output_stride = encoder.output_stride
        self.halo = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample(self.head(self.encoder(x)), x.shape[-2:])


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@register("deeplab_v2")
def deeplab_v2(num_classes: int, in_channels: int, backbone: str = "resnet101", width: int = 64) -> DeepLab:
    encoder = ResNet(in_channels, backbone, output_stride=8, width=width)
    return DeepLab(encoder, SummedASPP(encoder.channels, num_classes, V2_RATES))


def deeplab_v3_family(
    num_classes: int,
    in_channels: int,
    backbone: str,
    output_stride: int,
    width: int,
    multi_grid: tuple[int, ...],
    decoder: bool,
) -> DeepLab:
    encoder = ResNet(in_channels, backbone, output_stride, width, tuple(multi_grid))
    rates = tuple(rate * 16 // output_stride for rate in V3_RATES)
    low_level_channels = 3 * width // 4 if decoder else None
    head = ASPPHead(encoder.channels, num_classes, rates, channels=4 * width, low_level_channels=low_level_channels)
    return DeepLab(encoder, head)


@register("deeplab_v3")
def deeplab_v3(
    num_classes: int,
    in_channels: int,
    backbone: str = "resnet101",
    output_stride: int = 16,
    width: int = 64,
    multi_grid: tuple[int, ...] = (1, 2, 4),
) -> DeepLab:
    return deeplab_v3_family(num_classes, in_channels, backbone, output_stride, width, multi_grid, decoder=False)


@register("deeplab_v3plus")
def deeplab_v3plus(
    num_classes: int,
    in_channels: int,
    backbone: str = "resnet101",
    output_stride: int = 16,
    width: int = 64,
    multi_grid: tuple[int, ...] = (1, 2, 4),
) -> DeepLab:
    return deeplab_v3_family(num_classes, in_channels, backbone, output_stride, width, multi_grid, decoder=True)
