"""preview.png: a small picture to look at, the image with its class overlay and a legend
(volumes: the middle slice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from PIL import Image, ImageDraw, ImageFont

from pipelines.model_card import ClassInfo
from pipelines.outputs import Output, OutputContext
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
    # One read of the range of bands shown, not one per band (a chunk holds every band anyway;
    # a list of bands would take Zarr's slow orthogonal path).
    first = min(rgb_bands)
    pixels = np.asarray(image[first : max(rgb_bands) + 1, ::step, ::step])
    rgb = stretch(np.stack([pixels[band - first] for band in rgb_bands], axis=-1))
    if rgb.shape[-1] == 1:  # grey
        rgb = np.repeat(rgb, 3, axis=-1)
    elif rgb.shape[-1] == 2:  # false colour: red = first, green = second, blue = their mean (SAR: VV, VH)
        rgb = np.concatenate([rgb, rgb.mean(axis=-1, keepdims=True)], axis=-1)
    label_view = labels[::step, ::step]
    palette = np.zeros((256, 3), dtype=np.float32)
    for c in classes:
        palette[c.id] = c.color
    # The overlay's share of each colour, weighed once per class, not once per pixel (the same numbers).
    overlay = (OVERLAY_ALPHA * palette)[label_view]
    blend = np.where(
        (label_view != NODATA_LABEL)[..., None],
        (1 - OVERLAY_ALPHA) * rgb + overlay,
        rgb,
    )
    picture = Image.fromarray(blend.round().astype(np.uint8))
    # Fast zlib: a preview is looked at, not archived (level 6 took half the finalize stage).
    draw_legend(picture, classes).save(path, compress_level=1)


def stretch(rgb: np.ndarray) -> np.ndarray:
    """2-98 percentile contrast stretch per band to 0..255 float; values that are no finite
    number (NaN, inf) are left out of the percentiles and drawn black."""
    if not np.issubdtype(rgb.dtype, np.floating):  # every value finite: no mask to make and apply
        rgb = rgb.astype(np.float32)
        low, high = np.stack([np.percentile(rgb[..., band], [2, 98]) for band in range(rgb.shape[-1])], axis=-1)
        return np.clip((rgb - low) / np.maximum(high - low, 1e-6), 0, 1) * 255
    rgb = rgb.astype(np.float32)
    finite = np.isfinite(rgb)
    # Per band, the percentiles of its finite values (np.nanpercentile's numbers, without its
    # slow path along an axis); a band with no finite value at all is black.
    bounds = [np.percentile(band[ok], [2, 98]) if ok.any() else np.zeros(2, rgb.dtype)
              for band, ok in zip(np.moveaxis(rgb, -1, 0), np.moveaxis(finite, -1, 0))]
    low, high = np.stack(bounds, axis=-1)
    stretched = np.clip((rgb - low) / np.maximum(high - low, 1e-6), 0, 1) * 255
    return np.where(finite, stretched, 0)


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


def write(context: OutputContext, folder: Path) -> None:
    bands = context.card.preview_bands
    if context.image_bands is not None:
        bands = tuple(context.image_bands[p] for p in bands)
    image, labels = context.image, context.labels
    if len(labels.shape) == 3:
        middle = labels.shape[0] // 2
        image, labels = image[:, middle], labels[middle]
    render_preview(image, labels, bands, context.card.classes, folder / OUTPUT.file)


OUTPUT = Output("preview", "preview.png", write, description="the image with the class overlay and a legend",
                required=False)
