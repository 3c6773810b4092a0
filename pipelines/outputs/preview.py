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
    image,
    labels: zarr.Array,
    rgb_bands: tuple[int, ...],
    classes: tuple[ClassInfo, ...],
    path: Path,
    max_side: int = 1024,
) -> Image.Image:
    """`image`: (band, y, x), a Zarr array or pipelines.sources.SourcePixels (a source read in
    place). Returns the picture saved."""
    height, width = labels.shape
    step = max(1, -(-max(height, width) // max_side))
    # One read of the range of bands shown, not one per band (a chunk holds every band anyway;
    # a list of bands would take Zarr's slow orthogonal path).
    first = min(rgb_bands)
    pixels = np.asarray(image[first : max(rgb_bands) + 1, ::step, ::step])
    shown = np.stack([pixels[band - first] for band in rgb_bands], axis=-1)
    picture = Image.fromarray(preview_pixels(shown, np.asarray(labels[::step, ::step]), classes))
    # Fast zlib: a preview is looked at, not archived (level 6 took half the finalize stage).
    canvas = draw_legend(picture, classes)
    canvas.save(path, compress_level=1)
    return canvas


def preview_pixels(shown: np.ndarray, labels: np.ndarray, classes: tuple[ClassInfo, ...]) -> np.ndarray:
    """(H, W, 3) uint8: the bands shown (H, W, 1-3) stretched, with the classes' colours over
    them. 8-bit grey or RGB go through a table of every value and label (overlaid_by_table),
    the rest are computed pixel by pixel; both give the same bytes."""
    if shown.dtype == np.uint8 and shown.shape[-1] in (1, 3):
        return overlaid_by_table(shown, labels, classes)
    return overlaid(shown, labels, classes)


def overlaid(shown: np.ndarray, labels: np.ndarray, classes: tuple[ClassInfo, ...]) -> np.ndarray:
    rgb = stretch(shown)
    if rgb.shape[-1] == 1:  # grey
        rgb = np.repeat(rgb, 3, axis=-1)
    elif rgb.shape[-1] == 2:  # false colour: red = first, green = second, blue = their mean (SAR: VV, VH)
        rgb = np.concatenate([rgb, rgb.mean(axis=-1, keepdims=True)], axis=-1)
    # The overlay's share of each colour, weighed once per class, not once per pixel (the same numbers).
    overlay = overlay_shares(classes)[labels]
    blend = np.where((labels != NODATA_LABEL)[..., None], (1 - OVERLAY_ALPHA) * rgb + overlay, rgb)
    return blend.round().astype(np.uint8)


def overlaid_by_table(shown: np.ndarray, labels: np.ndarray, classes: tuple[ClassInfo, ...]) -> np.ndarray:
    """overlaid() of 8-bit bands: the same arithmetic on each of the 256 values x 256 labels
    once, then one lookup per pixel (a tenth of the time on a 512 x 512 image)."""
    bands = [np.ascontiguousarray(shown[..., band]) for band in range(shown.shape[-1])]
    tables = [band_stretch_table(band)[:, None] for band in bands]
    shares = overlay_shares(classes)
    has_class = np.arange(256)[None, :] != NODATA_LABEL
    picture = np.empty((*labels.shape, 3), dtype=np.uint8)
    for channel in range(3):
        band = channel if len(bands) == 3 else 0
        stretched = tables[band]
        table = np.where(has_class, (1 - OVERLAY_ALPHA) * stretched + shares[None, :, channel], stretched)
        # One flat lookup of value * 256 + label: three times as fast as a 2D fancy index.
        picture[..., channel] = np.take(table.round().astype(np.uint8).ravel(), (bands[band].astype(np.intp) << 8) | labels)
    return picture


def overlay_shares(classes: tuple[ClassInfo, ...]) -> np.ndarray:
    """(256, 3) float32: OVERLAY_ALPHA times each label's colour (black for labels of no class)."""
    palette = np.zeros((256, 3), dtype=np.float32)
    for c in classes:
        palette[c.id] = c.color
    return OVERLAY_ALPHA * palette


PERCENTILES = (2, 98)
"""The contrast stretch maps these percentiles of each band to 0 and 255."""


def stretch(rgb: np.ndarray) -> np.ndarray:
    """PERCENTILES contrast stretch per band to 0..255 float64; values that are no finite
    number (NaN, inf) are left out of the percentiles and drawn black. 8- and 16-bit bands go
    through a table of every value (band_stretch_table), others pixel by pixel (stretch_pixels):
    the same numbers."""
    if rgb.dtype in (np.uint8, np.uint16):
        bands = [np.ascontiguousarray(rgb[..., band]) for band in range(rgb.shape[-1])]
        return np.stack([band_stretch_table(band)[band] for band in bands], axis=-1)
    if not np.issubdtype(rgb.dtype, np.floating):  # every value finite: no mask to make and apply
        return stretch_pixels(rgb)
    rgb = rgb.astype(np.float32)
    finite = np.isfinite(rgb)
    # Per band, the percentiles of its finite values (np.nanpercentile's numbers, without its
    # slow path along an axis); a band with no finite value at all is black.
    bounds = [np.percentile(band[ok], PERCENTILES) if ok.any() else np.zeros(2, rgb.dtype)
              for band, ok in zip(np.moveaxis(rgb, -1, 0), np.moveaxis(finite, -1, 0))]
    low, high = np.stack(bounds, axis=-1)
    stretched = np.clip((rgb - low) / np.maximum(high - low, 1e-6), 0, 1) * 255
    return np.where(finite, stretched, 0)


def stretch_pixels(rgb: np.ndarray) -> np.ndarray:
    """stretch() of integer bands, computed for each pixel."""
    rgb = rgb.astype(np.float32)
    low, high = np.stack([np.percentile(rgb[..., band], PERCENTILES) for band in range(rgb.shape[-1])], axis=-1)
    return np.clip((rgb - low) / np.maximum(high - low, 1e-6), 0, 1) * 255


def band_stretch_table(band: np.ndarray) -> np.ndarray:
    """For an 8- or 16-bit band: the stretched value of every value its dtype has, as
    stretch_pixels computes it (its percentiles from the band's histogram)."""
    size = np.iinfo(band.dtype).max + 1
    low, high = histogram_percentiles(np.bincount(band.ravel(), minlength=size))
    return np.clip((np.arange(size, dtype=np.float32) - low) / np.maximum(high - low, 1e-6), 0, 1) * 255


def histogram_percentiles(counts: np.ndarray) -> np.ndarray:
    """np.percentile(values, PERCENTILES) (float64, method "linear") of integer values given as
    their counts (counts[v]: how many are v): the same numbers, from the two order statistics
    around each percentile and numpy's interpolation between them, without sorting a value."""
    n = int(counts.sum())
    virtual = (n - 1) * np.true_divide(PERCENTILES, 100)
    previous = np.floor(virtual)
    at_end = virtual >= n - 1  # past the last value: numpy takes the last one
    previous_index = np.where(at_end, n - 1, previous).astype(np.intp)
    next_index = np.where(at_end, n - 1, previous + 1).astype(np.intp)
    # The k-th smallest value is the first whose cumulative count exceeds k.
    cumulative = np.cumsum(counts)
    lower = np.searchsorted(cumulative, previous_index, side="right").astype(np.float32)
    upper = np.searchsorted(cumulative, next_index, side="right").astype(np.float32)
    gamma = virtual - np.where(at_end, -1, previous)  # as numpy computes it (its index is -1 there)
    difference = upper - lower
    result = lower + difference * gamma
    from_above = gamma >= 0.5  # numpy interpolates down from the upper value there
    result[from_above] = (upper - difference * (1 - gamma))[from_above]
    return result


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
    context.pictures[OUTPUT.name] = render_preview(image, labels, bands, context.card.classes, folder / OUTPUT.file)


OUTPUT = Output("preview", "preview.png", write, description="the image with the class overlay and a legend",
                required=False)
