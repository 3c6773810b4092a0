"""Small training loops on real data, to show that an architecture actually learns.

2D: the nuclei image and label mask that `stardist` ships (512 x 512), as binary foreground;
the model trains on random crops of the left half and is measured on the right half.
3D: the CT volume and organ labels in ../shared/data/volumes (shared_data(CT_VOLUME), ...).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CT_VOLUME = "volumes/example_ct_sm.nii.gz"
CT_LABELS = "volumes/example_ct_sm_seg.nii.gz"
SLIDE = "slides/CMU-1-Small-Region.svs"


def shared_data(relative: str) -> Path:
    """A file of ../shared/data; the test skips, saying why, when the folder is absent."""
    import pytest

    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (../shared/data is not beside this checkout)")
    return path


def nuclei_halves() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train image, train mask, test image, test mask): image (1, 1, 512, 256) float, mask (512, 256) long."""
    import tifffile

    root = Path(importlib.util.find_spec("stardist").submodule_search_locations[0]) / "data" / "images"
    image = tifffile.imread(root / "img2d.tif").astype(np.float32)
    mask = (tifffile.imread(root / "mask2d.tif") > 0).astype(np.int64)
    low, high = np.percentile(image, [1, 99.8])
    image = ((image - low) / (high - low)).astype(np.float32)
    x = torch.from_numpy(image)[None, None]
    y = torch.from_numpy(mask)
    return x[..., :256], y[:, :256], x[..., 256:], y[:, 256:]


def random_crops(x: torch.Tensor, y: torch.Tensor, size: int, count: int, generator: torch.Generator):
    """count random (size x size ...) crops of x (1, C, *spatial) and y (*spatial)."""
    spatial = y.shape
    starts = [torch.randint(0, s - size + 1, (count,), generator=generator) for s in spatial]
    xs, ys = [], []
    for i in range(count):
        window = tuple(slice(int(st[i]), int(st[i]) + size) for st in starts)
        xs.append(x[(0, slice(None), *window)])
        ys.append(y[window])
    return torch.stack(xs), torch.stack(ys)


def train(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    crop: int,
    batch: int = 4,
    lr: float = 1e-3,
    class_weights: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """Adam on random crops with cross-entropy; the target is center-cropped to the output size
    for models whose output is smaller than their input."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        inputs, targets = random_crops(x, y, crop, batch, generator)
        logits = model(inputs)
        targets = center_crop(targets, logits.shape[2:])
        loss = F.cross_entropy(logits, targets, weight=class_weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def center_crop(t: torch.Tensor, size) -> torch.Tensor:
    offsets = [(have - want) // 2 for have, want in zip(t.shape[-len(size):], size)]
    window = tuple(slice(o, o + s) for o, s in zip(offsets, size))
    return t[(..., *window)]


def foreground_iou(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    prediction, truth = prediction.bool(), truth.bool()
    return float((prediction & truth).sum()) / max(1, float((prediction | truth).sum()))


def dice(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    prediction, truth = prediction.bool(), truth.bool()
    return 2 * float((prediction & truth).sum()) / max(1, float(prediction.sum() + truth.sum()))


@torch.no_grad()
def predict_padded(model: torch.nn.Module, x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Argmax labels for x, reflect-padded up to a multiple of the model's stride and cropped back."""
    spatial = x.shape[2:]
    pads = []
    for size in reversed(spatial):
        pads += [0, (-size) % multiple]
    logits = model(F.pad(x, pads, mode="reflect") if any(pads) else x)
    return logits.argmax(1)[(0, *tuple(slice(0, s) for s in spatial))]
