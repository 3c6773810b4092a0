"""A small PNG to look at: the image, its class overlay and a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from PIL import Image, ImageDraw, ImageFont

from pipelines.model_card import ClassInfo
from pipelines.zarr_stores import NODATA_LABEL

OVERLAY_ALPHA = 0.45


def render_preview(
    image: zarr.Array,
    labels: zarr.Array,
    rgb_bands: tuple[int, ...],
    classes: tuple[ClassInfo, ...],
    path: Path,
    max_side: int = 1024,
) -> None:
    height, width = labels.shape
    step = max(1, -(-max(height, width) // max_side))
    rgb = stretch(np.stack([image[band, ::step, ::step] for band in rgb_bands], axis=-1))
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    label_view = labels[::step, ::step]
    palette = np.zeros((256, 3), dtype=np.float32)
    for c in classes:
        palette[c.id] = c.color
    colours = palette[label_view]
    blend = np.where(
        (label_view != NODATA_LABEL)[..., None],
        (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colours,
        rgb,
    )
    picture = Image.fromarray(blend.round().astype(np.uint8))
    draw_legend(picture, classes).save(path)


def stretch(rgb: np.ndarray) -> np.ndarray:
    """2-98 percentile contrast stretch per band to 0..255 float."""
    rgb = rgb.astype(np.float32)
    low, high = np.percentile(rgb, [2, 98], axis=(0, 1))
    return np.clip((rgb - low) / np.maximum(high - low, 1e-6), 0, 1) * 255


def draw_legend(picture: Image.Image, classes: tuple[ClassInfo, ...]) -> Image.Image:
    font = ImageFont.load_default()
    row = 18
    legend_height = row * len(classes) + 8
    canvas = Image.new("RGB", (max(picture.width, 160), picture.height + legend_height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, c in enumerate(classes):
        top = picture.height + 4 + i * row
        draw.rectangle([6, top, 20, top + 12], fill=c.color, outline="black")
        draw.text((28, top), f"{c.id} {c.name}", fill="black", font=font)
    return canvas
