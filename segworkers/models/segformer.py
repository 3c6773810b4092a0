"""SegFormer (Xie et al., 2021, "SegFormer: Simple and Efficient Design for Semantic
Segmentation with Transformers", NeurIPS).

A hierarchical Mix Transformer (MiT) encoder (Sec. 3.1) produces features at 1/4, 1/8, 1/16
and 1/32 of the input; a lightweight all-MLP decoder (Sec. 3.2) brings them to one width,
upsamples them to 1/4, fuses them and predicts the classes, and the 1/4 logits are bilinearly
resized to the input size. The variants B0..B5 differ only in the encoder's widths and depths
and the decoder's width (Sec. 3.1, Appendix "Mix Transformer" Table 6; Table 1).

Sizes: the overlapping patch embeddings pad by kernel // 2, so a stage-i grid is
ceil(H / stride_i) for any H; the logits always come back at the input size. With H and W
divisible by 32 (`output_stride`) every grid tiles the input exactly. Otherwise the last grid
cell of each stage covers padding, the key/value reduction drops grid rows and columns left
over by its stride, and the final resize squeezes the ceil(H / 4) cells of the 1/4 grid,
which stand for 4 * ceil(H / 4) pixels, onto H pixels: the predictions drift towards the
far edge by up to 3 px there. Each stage's grid must be at least as large
as its reduction ratio, which for the default ratios means H, W >= 29.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segworkers.models.registry import register

# Table 6 of the paper (and the official mit_b0..b5 configs): per-stage widths, depths and the
# width of the all-MLP decoder (Sec. 4.1: C = 256 for B0/B1, 768 otherwise).
VARIANTS: dict[str, dict] = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder_dim=256),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_dim=768),
    "b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder_dim=768),
    "b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_dim=768),
    "b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_dim=768),
}

# The official MiT uses eps=1e-6 in its transformer blocks and stage norms, and the PyTorch
# default in the patch embeddings and the key/value reduction.
BLOCK_NORM_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016) on a residual branch, per sample; the paper's
    training setup (Sec. 4.1, following the official code) uses it in every MiT block."""

    def __init__(self, probability: float):
        super().__init__()
        self.probability = probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.probability == 0.0:
            return x
        keep = 1.0 - self.probability
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class OverlapPatchEmbed(nn.Module):
    """Overlapped patch merging (Sec. 3.1): a strided convolution whose kernel is larger than
    its stride, so neighbouring patches share pixels and local continuity is kept, then
    LayerNorm. Returns tokens (N, h*w, C) and the grid size."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a sequence shortened by
    reduction_ratio**2 (Sec. 3.1, Eq. 2): a reduction_ratio-strided convolution over the token
    grid followed by LayerNorm, which cuts the cost from O(N^2) to O(N^2 / R)."""

    def __init__(self, dim: int, num_heads: int, reduction_ratio: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.reduction_ratio = reduction_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if reduction_ratio > 1:
            self.reduction = nn.Conv2d(dim, dim, reduction_ratio, stride=reduction_ratio)
            self.reduction_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, dim = x.shape
        queries = self.q(x)
        context = x
        if self.reduction_ratio > 1:
            if min(height, width) < self.reduction_ratio:
                raise ValueError(
                    f"token grid {height}x{width} is smaller than the reduction ratio "
                    f"{self.reduction_ratio}; the input is too small for SegFormer"
                )
            grid = x.transpose(1, 2).reshape(batch, dim, height, width)
            context = self.reduction_norm(self.reduction(grid).flatten(2).transpose(1, 2))
        keys, values = self.kv(context).chunk(2, dim=-1)
        head_dim = dim // self.num_heads
        split = [t.reshape(batch, -1, self.num_heads, head_dim).transpose(1, 2) for t in (queries, keys, values)]
        attended = F.scaled_dot_product_attention(*split)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class MixFFN(nn.Module):
    """Mix-FFN (Sec. 3.1, Eq. 3): a 3x3 depthwise convolution between the two linear layers
    leaks enough zero-padding location information that no positional encoding is needed, so
    the encoder works at any test resolution."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        batch, _, hidden = x.shape
        x = self.depthwise(x.transpose(1, 2).reshape(batch, hidden, height, width))
        return self.fc2(F.gelu(x.flatten(2).transpose(1, 2)))


class MixTransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + Mix-FFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, reduction_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attention = EfficientSelfAttention(dim, num_heads, reduction_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.ffn = MixFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.norm1(x), height, width))
        return x + self.drop_path(self.ffn(self.norm2(x), height, width))


class MixTransformerStage(nn.Module):
    """One encoder stage (Sec. 3.1): overlapping patch merging, transformer blocks, LayerNorm;
    returns the feature map (N, C, h, w)."""

    def __init__(self, in_channels, dim, num_heads, mlp_ratio, reduction_ratio, drop_paths, kernel, stride):
        """One block per entry of drop_paths, each with that stochastic-depth rate."""
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, kernel, stride)
        self.blocks = nn.ModuleList(
            MixTransformerBlock(dim, num_heads, mlp_ratio, reduction_ratio, p) for p in drop_paths
        )
        self.norm = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, height, width = self.patch_embed(x)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        return self.norm(tokens).transpose(1, 2).reshape(x.shape[0], -1, height, width)


class MixTransformer(nn.Module):
    """MiT encoder (Sec. 3.1): four stages at strides 4, 8, 16, 32. The first patch merging
    uses K=7, S=4, P=3 and the later ones K=3, S=2, P=1; the stochastic-depth rate grows
    linearly from 0 to drop_path_rate over all blocks, as in the official implementation."""

    def __init__(
        self,
        in_channels: int,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratios: Sequence[float],
        reduction_ratios: Sequence[int],
        drop_path_rate: float,
    ):
        super().__init__()
        if not len(embed_dims) == len(depths) == len(num_heads) == len(mlp_ratios) == len(reduction_ratios):
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios and reduction_ratios need one entry per stage")
        total = sum(depths)
        drop_paths = [drop_path_rate * i / max(1, total - 1) for i in range(total)]  # linear 0 -> rate
        self.stages = nn.ModuleList()
        previous = in_channels
        for i, (dim, depth, heads, ratio, reduction) in enumerate(
            zip(embed_dims, depths, num_heads, mlp_ratios, reduction_ratios)
        ):
            first = sum(depths[:i])
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            self.stages.append(
                MixTransformerStage(
                    previous, dim, heads, ratio, reduction, drop_paths[first : first + depth], kernel, stride
                )
            )
            previous = dim
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _init_weights(module: nn.Module) -> None:
    """The official MiT initialisation: truncated normal (std 0.02) for linear layers, He
    (fan-out) normal for convolutions, unit LayerNorm, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and module.bias is not None:
        nn.init.zeros_(module.bias)


class AllMLPDecoder(nn.Module):
    """All-MLP decoder (Sec. 3.2, Eq. 4): a linear layer per stage to a common width C,
    bilinear upsampling to 1/4, concatenation, a linear fusion (1x1 convolution with
    BatchNorm and ReLU, as in the official head), dropout and a linear classifier."""

    def __init__(self, in_dims: Sequence[int], dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.project = nn.ModuleList(nn.Linear(d, dim) for d in in_dims)
        self.fuse = nn.Sequential(
            nn.Conv2d(dim * len(in_dims), dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        unified = []
        for project, feature in zip(self.project, features):
            tokens = project(feature.flatten(2).transpose(1, 2))
            x = tokens.transpose(1, 2).reshape(feature.shape[0], -1, *feature.shape[2:])
            unified.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        # The official head concatenates the deepest stage first.
        fused = self.fuse(torch.cat(unified[::-1], dim=1))
        return self.classify(self.dropout(fused))


class SegFormer(nn.Module):
    """MiT encoder + all-MLP decoder; logits at 1/4 are resized to the input size (Sec. 3.2)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        decoder_dim: int,
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        reduction_ratios: Sequence[int] = (8, 4, 2, 1),
        drop_path_rate: float = 0.1,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.encoder = MixTransformer(
            in_channels, embed_dims, depths, num_heads, mlp_ratios, reduction_ratios, drop_path_rate
        )
        self.decoder = AllMLPDecoder(embed_dims, decoder_dim, num_classes, dropout)
        self.output_stride = 4 * 2 ** (len(embed_dims) - 1)
        self.halo = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.encoder(x))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


def _builder(variant: str):
    def build(num_classes: int, in_channels: int, **options) -> SegFormer:
        """SegFormer-{variant}; options override the variant's configuration (any SegFormer
        argument, e.g. drop_path_rate, or embed_dims/depths for a small test model)."""
        return SegFormer(num_classes, in_channels, **{**VARIANTS[variant], **options})

    build.__name__ = build.__qualname__ = f"segformer_{variant}"
    build.__doc__ = build.__doc__.format(variant=variant.upper())
    return build


for _variant in VARIANTS:
    register(f"segformer_{_variant}")(_builder(_variant))
