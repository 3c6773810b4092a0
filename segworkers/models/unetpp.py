"""UNet++ (Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image Segmentation",
DLMIA 2018; and "UNet++: Redesigning Skip Connections to Exploit Multiscale Features in Image
Segmentation", IEEE TMI 2019).

Sec. 2 (DLMIA): the encoder and decoder of a U-Net are joined by nested, dense skip pathways.
Node X(i,j) (i: down-sampling level, j: convolution block along the skip pathway) computes

    X(i,0) = H(D(X(i-1,0)))                                  (the encoder; D: 2x2 max pooling)
    X(i,j) = H([X(i,0), ..., X(i,j-1), U(X(i+1,j-1))])      j > 0

with H a convolution block followed by its activation (as in U-Net: two 3x3 convolutions with
ReLU; the papers' parameter count implies two convolutions per node), U a 2x2 up-convolution and
[.] concatenation. Sec. 3 fixes the widths: the blocks of level i have 32 * 2**i filters
(32 .. 512). Deep supervision appends a 1x1 convolution to X(0,1) .. X(0,4), and the loss is
applied to each of them: in training mode the network then returns the list of their logits.
At inference it runs in "accurate mode" (the heads' segmentation maps averaged) or "fast mode"
(one head), and choosing head L prunes the network to UNet++ L_L: only the nodes with
i + j <= L are evaluated (DLMIA Sec. 2, TMI Sec. III-C).

The authors' code (MrGiovanni/UNetPlusPlus) adds dropout and L2 weight decay inside each block
and uses ELU; neither is in the papers and neither changes the parameter count (9,041,601 with
one input channel and one class, Table 1: 9.04M).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segworkers.models.registry import register
from segworkers.models.unet import DoubleConv, require_multiple

DEPTH = 4


class UNetPlusPlus(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        base_features: int = 32,
        deep_supervision: bool = False,
        prune_level: int | None = None,
    ):
        super().__init__()
        widths = [base_features * 2**i for i in range(DEPTH + 1)]
        self.pool = nn.MaxPool2d(2)
        self.nodes = nn.ModuleDict()
        self.up = nn.ModuleDict()
        for j in range(DEPTH + 1):
            for i in range(DEPTH + 1 - j):
                if j == 0:
                    inputs = in_channels if i == 0 else widths[i - 1]
                else:
                    self.up[node_key(i, j)] = nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                    inputs = (j + 1) * widths[i]
                self.nodes[node_key(i, j)] = DoubleConv(inputs, widths[i], padding=1)
        head_levels = range(1, DEPTH + 1) if deep_supervision else [DEPTH]
        self.heads = nn.ModuleDict({str(level): nn.Conv2d(widths[0], num_classes, 1) for level in head_levels})
        self.output_stride = 2**DEPTH
        self.halo = 0
        self.prune_level = prune_level

    @property
    def prune_level(self) -> int | None:
        """None: the full network (averaging the heads in eval mode under deep supervision);
        L in 1..4: UNet++ L_L, evaluated only up to node X(0,L) and read from its head (in
        training mode under deep supervision: the heads 1..L)."""
        return self._prune_level

    @prune_level.setter
    def prune_level(self, level: int | None) -> None:
        if level is not None and str(level) not in self.heads:
            raise ValueError(
                f"prune_level {level} needs a trained head on X(0,{level}); heads exist for levels "
                f"{', '.join(self.heads)} (pruning below level {DEPTH} needs deep_supervision=True)"
            )
        self._prune_level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        level = self.prune_level or DEPTH
        require_multiple(x.shape[2:], 2**level, f"UNet++ L{level}")
        nodes: dict[tuple[int, int], torch.Tensor] = {}
        # Column by column: X(i,j) needs only earlier columns (the encoder X(i,0) the node above).
        for j in range(level + 1):
            for i in range(level + 1 - j):
                if j == 0:
                    inputs = x if i == 0 else self.pool(nodes[i - 1, 0])
                else:
                    upsampled = self.up[node_key(i, j)](nodes[i + 1, j - 1])
                    inputs = torch.cat([*(nodes[i, k] for k in range(j)), upsampled], dim=1)
                nodes[i, j] = self.nodes[node_key(i, j)](inputs)
        deeply_supervised = len(self.heads) > 1
        if deeply_supervised and (self.training or self.prune_level is None):
            logits = [self.heads[str(j)](nodes[0, j]) for j in range(1, level + 1)]
            return logits if self.training else average_probabilities(logits)
        return self.heads[str(level)](nodes[0, level])


def node_key(i: int, j: int) -> str:
    return f"x{i}_{j}"


def average_probabilities(logits: list[torch.Tensor]) -> torch.Tensor:
    """Logits whose softmax (sigmoid, for one channel) is the mean of the heads' probabilities:
    the accurate mode averages the segmentation maps, not the logits."""
    stacked = torch.stack(logits)
    if stacked.shape[2] == 1:
        return torch.logsumexp(F.logsigmoid(stacked), 0) - torch.logsumexp(F.logsigmoid(-stacked), 0)
    return torch.logsumexp(F.log_softmax(stacked, dim=2), 0) - math.log(len(logits))


@register("unetpp")
def unetpp(
    num_classes: int,
    in_channels: int,
    base_features: int = 32,
    deep_supervision: bool = False,
    prune_level: int | None = None,
) -> UNetPlusPlus:
    return UNetPlusPlus(num_classes, in_channels, base_features, deep_supervision, prune_level)
