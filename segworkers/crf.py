"""Fully connected CRF post-processing (Krähenbühl & Koltun, 2011, "Efficient Inference in Fully
Connected CRFs with Gaussian Edge Potentials"), as DeepLab v1/v2 apply it to the network's
class probabilities.

Model (Krähenbühl & Koltun, Sec. 2; DeepLab v2, Sec. 3.3, Eq. 2-3): unary -log P and a Potts
pairwise term weighted by two Gaussian kernels, an appearance kernel over position and colour,
w1 exp(-|p_i - p_j|^2 / 2 theta_alpha^2 - |I_i - I_j|^2 / 2 theta_beta^2), and a smoothness kernel
over position only, w2 exp(-|p_i - p_j|^2 / 2 theta_gamma^2).

Inference (Krähenbühl & Koltun, Sec. 3, Algorithm 1): mean field, where each message is a
Gaussian filter of the current marginals. As in the reference implementation the DeepLab
parameters were tuned with (Krähenbühl's densecrf code that ships with DeepLab), each filter
response is normalised per pixel by the filter response of a constant image, i.e. a weighted
mean over all pixels, the pixel itself included. With the paper's unnormalised sum w1 = 4 would
be multiplied by the thousands of pixels inside theta_alpha = 121 and swamp the unaries.

Filtering:
- smoothness kernel: an exact separable Gaussian convolution, truncated at 5 theta_gamma
  (neglected weight below 1e-5 of the total);
- appearance kernel: the permutohedral lattice (Adams, Baek & Davis, 2010, "Fast
  High-Dimensional Filtering Using the Permutohedral Lattice", Sec. 3-4), as in the
  reference code: splat with barycentric weights onto the lattice enclosing each
  d-dimensional feature, blur with [1 2 1] / 4 along each of the d + 1 lattice directions,
  slice back. It is an approximation of the Gaussian; tests/test_crf.py measures it against
  brute-force O(N^2) filtering.

Defaults: DeepLab v1 (Sec. 4) and v2 (Sec. 4.1) fix w2 = 3, theta_gamma = 3 and 10 mean-field
iterations and cross-validate w1, theta_alpha, theta_beta; the defaults here are the values of
the released DeepLab-LargeFOV PASCAL VOC configuration, w1 = 4, theta_alpha = 121, theta_beta = 5.
theta_beta is in the image's own intensity units: 5 assumes 0-255 intensities.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SMOOTHNESS_TRUNCATION = 5.0
PROBABILITY_FLOOR = 1e-8


def dense_crf(
    probabilities: np.ndarray,
    image: np.ndarray,
    *,
    iterations: int = 10,
    w_appearance: float = 4.0,
    theta_alpha: float = 121.0,
    theta_beta: float = 5.0,
    w_smoothness: float = 3.0,
    theta_gamma: float = 3.0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Marginals (K, H, W) float32 after mean-field inference.

    probabilities: (K, H, W) class probabilities (e.g. the softmax of the logits);
    image: (H, W, C) or (H, W) intensities, uint8 or float, in the units of theta_beta.
    """
    if probabilities.ndim != 3:
        raise ValueError(f"probabilities must be (K, H, W), got shape {probabilities.shape}")
    pixels = image.reshape(*image.shape[:2], -1)
    if pixels.shape[:2] != probabilities.shape[1:]:
        raise ValueError(f"image {image.shape[:2]} and probabilities {probabilities.shape[1:]} differ in size")
    classes, height, width = probabilities.shape
    probabilities = torch.as_tensor(np.asarray(probabilities, dtype=np.float32), device=device)
    unary = -torch.log(probabilities.clamp_min(PROBABILITY_FLOOR)).reshape(classes, -1)

    appearance = PermutohedralLattice(appearance_features(pixels, theta_alpha, theta_beta, device))
    smoothness = SeparableGaussian(height, width, theta_gamma, device)

    marginals = torch.softmax(-unary, dim=0)
    for _ in range(iterations):
        # Potts compatibility: the penalty for label l is the kernel mass on every other label,
        # which up to a constant per pixel (cancelled by the softmax) is minus the mass on l.
        agreement = appearance.mean(marginals).mul_(w_appearance)
        agreement.add_(smoothness.mean(marginals), alpha=w_smoothness).sub_(unary)
        marginals = torch.softmax(agreement, dim=0)
    return marginals.reshape(classes, height, width).cpu().numpy()


def appearance_features(pixels: np.ndarray, theta_alpha: float, theta_beta: float, device) -> torch.Tensor:
    """(N, 2 + C) features (y / theta_alpha, x / theta_alpha, I / theta_beta) in float64, so that the
    lattice coordinates round the same way on every device."""
    height, width, channels = pixels.shape
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    position = torch.stack([y, x], dim=-1).reshape(-1, 2) / theta_alpha
    colour = torch.as_tensor(np.asarray(pixels, dtype=np.float64), device=device).reshape(-1, channels) / theta_beta
    return torch.cat([position, colour], dim=1)


class SeparableGaussian:
    """Normalised Gaussian filter over pixel positions, exact up to the truncation."""

    def __init__(self, height: int, width: int, theta: float, device):
        self.radius = max(1, math.ceil(SMOOTHNESS_TRUNCATION * theta))
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32, device=device)
        self.taps = torch.exp(-0.5 * (offsets / theta) ** 2)
        self.shape = (height, width)
        self.norm = self.filter(torch.ones(1, height * width, device=device))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        channels = values.shape[0]
        # Depthwise convolution in channels-last layout: several times faster on CPU than a
        # batch of single-channel planes.
        planes = values.reshape(1, channels, *self.shape).contiguous(memory_format=torch.channels_last)
        rows = self.taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        columns = self.taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
        planes = F.conv2d(planes, rows, padding=(self.radius, 0), groups=channels)
        planes = F.conv2d(planes, columns, padding=(0, self.radius), groups=channels)
        return planes.reshape(values.shape)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """(K, N) -> kernel-weighted mean of values over all pixels, for every pixel."""
        return self.filter(values).div_(self.norm)


class PermutohedralLattice:
    """Gaussian filtering of (K, N) values whose N points have (N, d) features, already divided by
    the kernel's standard deviations (Adams, Baek & Davis, 2010).

    Built once per image: the d + 1 enclosing lattice vertices of each point with their
    barycentric weights, and for each lattice vertex its two neighbours along each of the d + 1
    lattice directions. Vertices are numbered 0..M-1; index M stands for an absent neighbour
    and always holds zero.
    """

    def __init__(self, features: torch.Tensor):
        points, d = features.shape
        keys, self.weights = enclosing_simplices(features)
        # The d + 1 lattice coordinates of a vertex sum to zero, so the first d identify it.
        index = LatticeIndex(keys[..., :d].reshape(-1, d))
        self.size = index.size
        self.vertices = index.ids.reshape(d + 1, points)
        occurrence = torch.arange(index.ids.numel(), device=features.device)
        first = torch.zeros(self.size, dtype=torch.long, device=features.device)
        first.scatter_reduce_(0, index.ids, occurrence, "amin", include_self=False)
        distinct = keys.reshape(-1, d + 1)[first]
        # Lattice direction j joins a vertex to the vertices -/+ (1, ..., 1, -d, 1, ..., 1), -d at j.
        steps = 1 - (d + 1) * torch.eye(d + 1, dtype=torch.long, device=features.device)
        self.neighbours = [
            [index.lookup((distinct + sign * step)[:, :d], missing=self.size) for sign in (-1, 1)] for step in steps
        ]
        self.norm = self.filter(torch.ones(1, points, dtype=torch.float32, device=features.device))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Splat (K, N) values onto the lattice, blur, slice back: (K, N)."""
        # One scratch buffer for the (K, N) products: fresh allocations of that size cost more
        # than the arithmetic.
        scratch = torch.empty_like(values)
        lattice = values.new_zeros(values.shape[0], self.size + 1)
        for vertices, weights in zip(self.vertices, self.weights):
            lattice.index_add_(1, vertices, torch.mul(values, weights, out=scratch))
        blurred = torch.zeros_like(lattice)
        for backward, forward in self.neighbours:
            torch.add(lattice.index_select(1, backward), lattice.index_select(1, forward), out=blurred[:, : self.size])
            blurred[:, : self.size].mul_(0.25).add_(lattice[:, : self.size], alpha=0.5)
            lattice, blurred = blurred, lattice
        sliced = torch.zeros_like(values)
        for vertices, weights in zip(self.vertices, self.weights):
            sliced.addcmul_(torch.index_select(lattice, 1, vertices, out=scratch), weights)
        return sliced

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """(K, N) -> kernel-weighted mean of values over all points, for every point."""
        return self.filter(values).div_(self.norm)


def enclosing_simplices(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point: the (d + 1) vertices (d + 1, N, d + 1) of the lattice simplex enclosing its
    elevated feature, in lattice coordinates, and their barycentric weights (d + 1, N) float32.

    Adams et al., Sec. 3.1 (elevation onto the hyperplane sum(x) = 0, scaled so the blur below
    has unit standard deviation) and Sec. 4 / Conway & Sloane (nearest remainder-0 point,
    simplex from the ranking of the differences).
    """
    points, d = features.shape
    levels = d + 1
    device = features.device
    k = torch.arange(1, d + 1, dtype=torch.float64, device=device)
    scaled = features * (levels * math.sqrt(2.0 / 3.0) / torch.sqrt(k * (k + 1)))
    # Row i - 1 of the basis is e_0 + ... + e_(i-1) - i e_i: orthogonal vectors in the hyperplane.
    basis = torch.zeros(d, levels, dtype=torch.float64, device=device)
    for i in range(1, d + 1):
        basis[i - 1, :i] = 1.0
        basis[i - 1, i] = -float(i)
    elevated = scaled @ basis

    rounded = torch.round(elevated / levels)
    remainder0 = rounded * levels
    excess = rounded.sum(1).long()
    # rank[i]: how many coordinates lie further above their remainder-0 point than coordinate i;
    # a nonzero excess moves the point back onto the hyperplane.
    order = torch.argsort(remainder0 - elevated, dim=1, stable=True)
    rank = torch.argsort(order, dim=1) + excess[:, None]
    below, above = rank < 0, rank > d
    rank = rank + levels * below - levels * above
    remainder0 = remainder0 + levels * below - levels * above

    offset = (elevated - remainder0) / levels
    barycentric = torch.zeros(points, levels + 1, dtype=torch.float64, device=device)
    barycentric.scatter_add_(1, d - rank, offset)
    barycentric.scatter_add_(1, d + 1 - rank, -offset)
    barycentric[:, 0] += 1.0 + barycentric[:, levels]

    remainder = torch.arange(levels, device=device).view(levels, 1, 1)
    vertices = remainder0.long().unsqueeze(0) + remainder - levels * (rank.unsqueeze(0) > d - remainder)
    return vertices, barycentric[:, :levels].T.float().contiguous()


class LatticeIndex:
    """Dense ids 0..M-1 of the distinct integer rows of keys (P, d), and look-up of other rows.

    The columns are folded into one mixed-radix int64 per row and re-numbered densely (sorted
    unique) whenever the next column would overflow, so any coordinate range works while the
    usual case costs a single sort.
    """

    def __init__(self, keys: torch.Tensor):
        self.stages = []
        ids = torch.zeros(keys.shape[0], dtype=torch.long, device=keys.device)
        count, column = 1, 0
        while column < keys.shape[1]:
            radix, stage = count, []
            while column < keys.shape[1]:
                low, high = int(keys[:, column].min()), int(keys[:, column].max())
                span = high - low + 1
                if radix * span >= 2**62 and stage:
                    break
                ids = ids * span + (keys[:, column] - low)
                stage.append((column, low, span))
                radix *= span
                column += 1
            distinct, ids = torch.unique(ids, sorted=True, return_inverse=True)
            self.stages.append((stage, distinct))
            count = distinct.numel()
        self.ids, self.size = ids, count

    def lookup(self, queries: torch.Tensor, missing: int) -> torch.Tensor:
        """Ids of the rows of queries (Q, d); `missing` for rows not among the keys."""
        ids = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
        found = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device)
        for stage, distinct in self.stages:
            for column, low, span in stage:
                shifted = queries[:, column] - low
                found &= (shifted >= 0) & (shifted < span)
                ids = ids * span + shifted
            position = torch.searchsorted(distinct, ids).clamp_max(distinct.numel() - 1)
            found &= distinct[position] == ids
            ids = torch.where(found, position, 0)
        return ids.masked_fill_(~found, missing)
