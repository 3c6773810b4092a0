"""OME-Zarr label export: a class-label array as an NGFF 0.5 multiscale label image.

Version: OME-Zarr (NGFF) 0.5, https://ngff.openmicroscopy.org/0.5/. It is Zarr v3 (the format of
every other store of the pipeline) with the OME metadata under the `ome` key of a group's
attributes and the version once, at `ome.version`. ome-zarr-py 0.18 writes 0.5 by default and
reads 0.4 and 0.5; napari-ome-zarr reads through ome-zarr-py. Sections followed:
- "labels" metadata (#labels-md): `<image>/labels` lists its label images in `ome.labels`.
- "image-label" metadata (#label-md): `colors` (label-value + rgba 0-255), `properties`
  (label-value + anything; here the class name under "class", the key of the spec's example),
  `source.image` (the path of the image, relative to the label group).
- "multiscales" metadata (#multiscale-md): `axes` (#axes-md: name, type "space", unit from the
  UDUNITS-2 names the spec lists), `datasets` from highest to lowest resolution, each with a
  `scale` and a `translation` coordinateTransformation (#trafo-md), and `type`, the
  downscaling method.

Labels are written into `<root>/labels/<name>`. When `<root>` already is an NGFF 0.5 image, the
labels belong to it (`source.image` = "../../") and take its pixel size unless one is given. When
`<root>` has no image, the label image stands alone: a reader opens `<root>/labels` (or
`<root>/labels/<name>`) and gets a complete multiscale label image; `<root>` itself is a plain
Zarr group, which ome-zarr's Reader skips, because the spec has no image-less parent and a fake
image would be data that was never measured.

Pyramid: each level is the previous one reduced by 2 along every spatial axis (the last row or
column of an odd axis stands alone), each output pixel taking the most frequent class of its
2x2 (2x2x2) block: class ids are never averaged. The nodata label only wins where the whole block
is nodata; ties go to the block's first pixel in C order. Levels are computed shard by shard from
the level before, so memory depends on the shard size, never on the image size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from pipelines.errors import InputError
from pipelines.tiling import Box, block_partition

NGFF_VERSION = "0.5"
AXIS_NAMES = {2: ("y", "x"), 3: ("z", "y", "x")}
CHUNK = {2: 256, 3: 64}
SHARD = {2: 2048, 3: 128}
SMALLEST_LEVEL = 256
"""The automatic pyramid stops once the longest axis is at most this many pixels."""

SPATIAL_UNITS = {
    "nm": "nanometer",
    "µm": "micrometer",
    "μm": "micrometer",
    "um": "micrometer",
    "mm": "millimeter",
    "cm": "centimeter",
    "m": "meter",
    "km": "kilometer",
}
"""The spatial units accepted: these abbreviations and the NGFF (UDUNITS-2) names they stand for."""


def write_ome_zarr_labels(
    labels,
    root: Path,
    name: str,
    classes: Sequence[tuple[int, str, tuple[int, int, int]]],
    pixel_size: Sequence[tuple[float, str]] | None = None,
    levels: int | None = None,
    nodata_label: int = 255,
) -> None:
    """Write `labels` ((H, W) or (D, H, W) uint8, a zarr array or numpy) as `<root>/labels/<name>`.

    classes: (id, name, (r, g, b)) per class, for the `colors` and `properties` of image-label;
    the nodata label is added as transparent. pixel_size: (value, unit) per axis, in axis order;
    None takes the pixel size of the image at `root` if there is one, else 1 without units.
    levels: pyramid levels including full resolution; None halves until the longest axis is at
    most SMALLEST_LEVEL. An existing label image of the same name is replaced.
    """
    shape = tuple(int(s) for s in labels.shape)
    if len(shape) not in AXIS_NAMES or np.dtype(labels.dtype) != np.uint8:
        raise ValueError(f"labels must be a 2D or 3D uint8 array, got {labels.dtype} of shape {shape}")
    if levels is None:
        levels = 1 + max(0, math.ceil(math.log2(max(shape) / SMALLEST_LEVEL)))
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    axis_names = AXIS_NAMES[len(shape)]

    image = _existing_image(root)
    if image is not None:
        _check_same_extent(root, image, axis_names, shape)
    if pixel_size is not None:
        if len(pixel_size) != len(shape):
            raise ValueError(f"pixel_size needs one (value, unit) per axis of {shape}, got {pixel_size}")
        scale = [float(value) for value, _ in pixel_size]
        translation = [0.0] * len(shape)
        units = [_unit_name(unit) for _, unit in pixel_size]
    elif image is not None:
        scale, translation, units = _image_pixel_size(image, axis_names)
    else:
        scale, translation, units = [1.0] * len(shape), [0.0] * len(shape), [None] * len(shape)

    root_group = image if image is not None else zarr.open_group(str(root), mode="a", zarr_format=3)
    labels_group = root_group.require_group("labels")
    label_group = labels_group.create_group(name, overwrite=True)

    previous = _copy_level_zero(labels, label_group, nodata_label)
    for level in range(1, levels):
        previous = _downsample_level(previous, label_group, str(level), nodata_label)

    # Metadata last: a reader never sees datasets that are not written yet.
    factors = [2**level for level in range(levels)]
    multiscale = {
        "name": name,
        "axes": [
            {"name": axis, "type": "space", **({"unit": unit} if unit else {})}
            for axis, unit in zip(axis_names, units)
        ],
        "datasets": [
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [s * factor for s in scale]},
                    # A level pixel covers `factor` level-0 pixels; its centre is theirs.
                    {
                        "type": "translation",
                        "translation": [t + s * (factor - 1) / 2 for s, t in zip(scale, translation)],
                    },
                ],
            }
            for level, factor in enumerate(factors)
        ],
        "type": "mode",
        "metadata": {
            "description": "most frequent class of each 2x2(x2) block; nodata only where the whole block is",
            "nodata_label": nodata_label,
        },
    }
    image_label = {
        "colors": [{"label-value": int(i), "rgba": [*map(int, rgb), 255]} for i, _, rgb in classes]
        + [{"label-value": nodata_label, "rgba": [0, 0, 0, 0]}],
        "properties": [{"label-value": int(i), "class": str(class_name)} for i, class_name, _ in classes]
        + [{"label-value": nodata_label, "class": "nodata"}],
    }
    if image is not None:
        image_label["source"] = {"image": "../../"}
    label_group.attrs["ome"] = {
        "version": NGFF_VERSION,
        "multiscales": [multiscale],
        "image-label": image_label,
    }

    listed = labels_group.attrs.get("ome", {}).get("labels", [])
    labels_group.attrs["ome"] = {"version": NGFF_VERSION, "labels": [*[n for n in listed if n != name], name]}


def write_ome_zarr_image(
    image,
    root: Path,
    name: str,
    pixel_size: Sequence[tuple[float, str]] | None = None,
    levels: int | None = None,
    channel_names: Sequence[str | None] = (),
) -> None:
    """Write a (channel, *spatial) image (zarr array or numpy) as an NGFF multiscale image at
    `root`, so that labels written into it afterwards open together in a viewer.

    The `omero` rendering metadata names the channels (`channel_names`) and gives each a colour
    and a display window (the dtype's range for integers): channels named red, green and blue
    render as an RGB picture (an H&E slide), others in grey.

    Level 0 is copied shard by shard; each coarser level is the 2x2(x2) mean of the one before
    (edge pixels repeated for odd sizes), built one shard at a time: memory does not grow with
    the image.
    """
    shape = tuple(int(s) for s in image.shape)
    spatial = shape[1:]
    if len(spatial) not in AXIS_NAMES:
        raise ValueError(f"image must be (channel, *spatial) with 2 or 3 spatial axes, got {shape}")
    if levels is None:
        levels = 1 + max(0, math.ceil(math.log2(max(spatial) / SMALLEST_LEVEL)))
    axis_names = AXIS_NAMES[len(spatial)]
    scale = [float(v) for v, _ in pixel_size] if pixel_size else [1.0] * len(spatial)
    units = [_unit_name(u) for _, u in pixel_size] if pixel_size else [None] * len(spatial)
    group = zarr.open_group(str(root), mode="w", zarr_format=3)

    def create(path: str, level_shape: tuple[int, ...]) -> zarr.Array:
        ndim = len(level_shape) - 1
        return group.create_array(
            path, shape=level_shape, dtype=image.dtype, chunks=(1, *(CHUNK[ndim],) * ndim),
            shards=(level_shape[0], *(SHARD[ndim],) * ndim), fill_value=0, dimension_names=("c", *axis_names),
        )

    previous = create("0", shape)
    for box in block_partition(spatial, previous.shards[1:]):
        previous[(slice(None), *box.slices())] = np.asarray(image[(slice(None), *box.slices())])
    for level in range(1, levels):
        current = create(str(level), (shape[0], *(-(-s // 2) for s in previous.shape[1:])))
        for box in block_partition(current.shape[1:], current.shards[1:]):
            window = tuple(slice(2 * a, min(2 * b, s)) for a, b, s in zip(box.start, box.stop, previous.shape[1:]))
            block = np.asarray(previous[(slice(None), *window)], dtype=np.float32)
            pads = [(0, 0)] + [(0, 2 * n - have) for n, have in zip(box.shape, block.shape[1:])]
            block = np.pad(block, pads, mode="edge")
            cells = block.reshape([shape[0]] + [v for n in box.shape for v in (n, 2)])
            mean = cells.mean(axis=tuple(range(2, 2 + 2 * len(box.shape), 2)))
            if np.issubdtype(image.dtype, np.integer):
                mean = np.rint(mean)
            current[(slice(None), *box.slices())] = mean.astype(image.dtype)
        previous = current

    factors = [2**level for level in range(levels)]
    group.attrs["ome"] = {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": "c", "type": "channel"}]
            + [{"name": a, "type": "space", **({"unit": u} if u else {})} for a, u in zip(axis_names, units)],
            "datasets": [
                {
                    "path": str(level),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0] + [s * factor for s in scale]},
                        {"type": "translation", "translation": [0.0] + [s * (factor - 1) / 2 for s in scale]},
                    ],
                }
                for level, factor in enumerate(factors)
            ],
            "type": "mean",
        }],
        "omero": omero_rendering(shape[0], image.dtype, channel_names),
    }


CHANNEL_COLOURS = {"red": "FF0000", "green": "00FF00", "blue": "0000FF"}


def omero_rendering(channels: int, dtype, names: Sequence[str | None]) -> dict:
    """The `omero` block: per channel a label, a colour and a window."""
    dtype = np.dtype(dtype)
    low, high = (np.iinfo(dtype).min, np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else (0.0, 1.0)
    names = list(names) + [None] * (channels - len(names))
    colours = [CHANNEL_COLOURS.get((name or "").lower(), "FFFFFF") for name in names]
    rgb = sorted(colours) == sorted(CHANNEL_COLOURS.values())
    return {
        "channels": [
            {"label": name or f"channel {index}", "color": colour if rgb or channels == 1 else "FFFFFF",
             "active": rgb or index == 0, "window": {"min": low, "max": high, "start": low, "end": high}}
            for index, (name, colour) in enumerate(zip(names, colours))
        ],
        "rdefs": {"model": "color" if rgb else "greyscale", "defaultZ": 0, "defaultT": 0},
    }


def mode_downsample(block: np.ndarray, nodata_label: int) -> np.ndarray:
    """Halve every axis of an even-shaped label block: the most frequent class of each 2x2(x2) cell.

    Nodata counts only where the whole cell is nodata; ties go to the cell's first pixel (C order).
    """
    out_shape = [s // 2 for s in block.shape]
    ndim = block.ndim
    cells = block.reshape([v for s in out_shape for v in (s, 2)])
    samples = cells.transpose([*range(0, 2 * ndim, 2), *range(1, 2 * ndim, 2)]).reshape(*out_shape, 2**ndim)
    votes = np.empty(samples.shape, dtype=np.uint8)
    for j in range(samples.shape[-1]):
        votes[..., j] = (samples == samples[..., j : j + 1]).sum(axis=-1, dtype=np.uint8)
    votes[samples == nodata_label] = 0
    pick = votes.argmax(axis=-1)
    return np.take_along_axis(samples, pick[..., None], axis=-1)[..., 0]


def _create_level(group: zarr.Group, path: str, shape: tuple[int, ...], nodata_label: int) -> zarr.Array:
    ndim = len(shape)
    return group.create_array(
        path,
        shape=shape,
        dtype="uint8",
        chunks=(CHUNK[ndim],) * ndim,
        shards=(SHARD[ndim],) * ndim,
        fill_value=nodata_label,
        dimension_names=AXIS_NAMES[ndim],
    )


def _copy_level_zero(labels, group: zarr.Group, nodata_label: int) -> zarr.Array:
    level = _create_level(group, "0", tuple(labels.shape), nodata_label)
    for box in block_partition(level.shape, level.shards):
        level[box.slices()] = np.asarray(labels[box.slices()])
    return level


def _downsample_level(source: zarr.Array, group: zarr.Group, path: str, nodata_label: int) -> zarr.Array:
    """One shard of the new level at a time, each from its 2x window of the level before."""
    level = _create_level(group, path, tuple(-(-s // 2) for s in source.shape), nodata_label)
    for box in block_partition(level.shape, level.shards):
        window = Box(
            tuple(2 * a for a in box.start),
            tuple(min(2 * b, s) for b, s in zip(box.stop, source.shape)),
        )
        block = np.full([2 * s for s in box.shape], nodata_label, dtype=np.uint8)
        block[tuple(slice(0, s) for s in window.shape)] = source[window.slices()]
        level[box.slices()] = mode_downsample(block, nodata_label)
    return level


def _existing_image(root: Path) -> zarr.Group | None:
    """The NGFF image group at root, opened for writing, or None when root holds no image."""
    try:
        group = zarr.open_group(str(root), mode="r")
    except FileNotFoundError:
        return None
    if group.metadata.zarr_format != 3:
        raise InputError(
            root, "a Zarr v2 (OME-Zarr 0.4 or older) store; labels are written as OME-Zarr 0.5 (Zarr v3)"
        )
    if "multiscales" not in group.attrs.get("ome", {}):
        return None
    return zarr.open_group(str(root), mode="a", zarr_format=3)


def _check_same_extent(
    root: Path, image: zarr.Group, axis_names: tuple[str, ...], shape: tuple[int, ...]
) -> None:
    """The labels must cover the image's level 0 pixel for pixel along its spatial axes."""
    multiscale = image.attrs["ome"]["multiscales"][0]
    names = [axis["name"] for axis in multiscale["axes"]]
    if not set(axis_names) <= set(names):
        raise InputError(root, f"image axes {names} lack the label axes {list(axis_names)}")
    full = image[multiscale["datasets"][0]["path"]].shape
    extent = tuple(full[names.index(axis)] for axis in axis_names)
    if extent != shape:
        raise InputError(root, f"image is {extent} along {list(axis_names)}, labels are {shape}")


def _image_pixel_size(
    image: zarr.Group, axis_names: tuple[str, ...]
) -> tuple[list[float], list[float], list[str | None]]:
    """Scale, translation and units of the image's level 0 along the label axes."""
    multiscale = image.attrs["ome"]["multiscales"][0]
    names = [axis["name"] for axis in multiscale["axes"]]
    transforms = {t["type"]: t for t in multiscale["datasets"][0]["coordinateTransformations"]}
    scale = transforms["scale"]["scale"]
    translation = transforms.get("translation", {}).get("translation", [0.0] * len(names))
    index = [names.index(axis) for axis in axis_names]
    return (
        [float(scale[i]) for i in index],
        [float(translation[i]) for i in index],
        [multiscale["axes"][i].get("unit") for i in index],
    )


def _unit_name(unit: str) -> str:
    if unit in SPATIAL_UNITS.values():
        return unit
    if unit in SPATIAL_UNITS:
        return SPATIAL_UNITS[unit]
    accepted = sorted({*SPATIAL_UNITS, *SPATIAL_UNITS.values()})
    raise ValueError(f"unknown spatial unit {unit!r}; use one of {accepted}")
