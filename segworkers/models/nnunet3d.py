"""No New-Net (Isensee et al., "No New-Net", MICCAI BrainLes 2018, LNCS 11384): a 3D U-Net
(Cicek et al., 2016) with minor modifications, trained on 128^3 patches.

Sec. 2.2 and Fig. 1 fix the architecture:
- two 3x3x3 convolutions per resolution, each followed by instance normalisation (the batch
  of two 128^3 patches is too small for batch statistics) and leaky ReLU with negative slope
  1e-2; padded, so the output has the input's size;
- 30 feature maps at the highest resolution, doubled after each of four 2x2x2 max poolings
  (30, 60, 120, 240, 480);
- in the localisation pathway the second convolution of each level halves the feature maps
  before upsampling (480 -> 240 at the bottom, 240 -> 120, ...), so the upsampled maps match
  the skip features they are concatenated with and the decoder costs less memory;
- trilinear upsampling instead of transposed convolutions (no learned upsampling);
- a 1x1x1 convolution to the classes.

Deep supervision (optional, off by default) follows the authors' BraTS 2017 network and
nnU-Net: a 1x1x1 head on every decoder level below full resolution; in training mode the
network then returns the logits of all levels, full resolution first, each at its own
resolution. `base_features` and `depth` (the number of poolings; 30 and 4 in the paper) shrink
the network for quick training.

Parameter count with the paper's setting (4 MRI modalities in, 3 region outputs, affine
instance normalisation): 14,493,063, counted layer by layer from the description above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segworkers.models.registry import register
from segworkers.models.unet import require_multiple


class ConvNormAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(1e-2, inplace=True),
        )


class Stage(nn.Sequential):
    """Two ConvNormAct; `out_channels` differs from `mid_channels` where the localisation
    pathway reduces the feature maps before upsampling."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int):
        super().__init__(ConvNormAct(in_channels, mid_channels), ConvNormAct(mid_channels, out_channels))


class NoNewNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        base_features: int = 30,
        depth: int = 4,
        deep_supervision: bool = False,
    ):
        super().__init__()
        widths = [base_features * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(
            Stage(in_channels if i == 0 else widths[i - 1], widths[i], widths[i]) for i in range(depth)
        )
        self.pool = nn.MaxPool3d(2)
        self.bottom = Stage(widths[depth - 1], widths[depth], widths[depth - 1])
        self.decoder = nn.ModuleList(
            Stage(2 * widths[i], widths[i], widths[max(i - 1, 0)]) for i in reversed(range(depth))
        )
        self.head = nn.Conv3d(widths[0], num_classes, 1)
        self.auxiliary_heads = nn.ModuleList(
            nn.Conv3d(widths[i - 1], num_classes, 1) for i in range(1, depth) if deep_supervision
        )
        self.output_stride = 2**depth
        self.halo = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        require_multiple(x.shape[2:], self.output_stride, "No New-Net")
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        decoded = []
        for stage, skip in zip(self.decoder, reversed(skips)):
            upsampled = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = stage(torch.cat([skip, upsampled], dim=1))
            decoded.append(x)
        logits = self.head(x)
        if not (self.training and len(self.auxiliary_heads)):
            return logits
        # decoded[-2] is level 1 (half resolution), decoded[-3] level 2, ...
        return [logits] + [head(decoded[-2 - i]) for i, head in enumerate(self.auxiliary_heads)]


@register("nnunet3d")
def nnunet3d(
    num_classes: int, in_channels: int, base_features: int = 30, depth: int = 4, deep_supervision: bool = False
) -> NoNewNet:
    return NoNewNet(num_classes, in_channels, base_features, depth, deep_supervision)
