"""Zarr v3 stores of the pipeline: the ingested image and the label output.

Both are chunked on the tile grid and sharded by output block. A write rewrites a whole shard,
so every array is created (with its metadata) before any worker starts, and each shard has
exactly one writer: the block that it covers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import dask
import numpy as np
import zarr

from pipelines.background import add_region_to_mask, mask_shape, valid_pixels
from pipelines.sources import SourceInfo, read_source_region
from pipelines.tiling import Region, block_partition

NODATA_LABEL = 255
SPATIAL_NAMES = {2: ("y", "x"), 3: ("z", "y", "x")}


def ingest_source(
    info: SourceInfo,
    bands: tuple[int, ...],
    store_path: Path,
    chunk: int,
    shard: int,
    on_shard_done: Callable[[Region], None] = lambda region: None,
    max_threads: int = 4,
    done: frozenset[tuple[int, ...]] = frozenset(),
) -> np.ndarray:
    """Copy the selected bands of a source into a sharded Zarr v3 array (band, *spatial).

    Dask copies one shard per task, each reading its own region of the source, so memory is
    bounded by (threads x shard) and every shard has one writer. `on_shard_done(region)` is
    called after each shard is written. Resuming, `done` holds the start of every shard
    already copied into the existing store: those are read back from it for the mask instead
    of from the source. Returns the low-resolution mask of valid pixels
    (pipelines.background) gathered on the way.
    """
    dims = len(info.shape)
    attributes = {"source": info.uri, "kind": info.kind, "bands": list(bands), "nodata": info.nodata}
    if info.kind == "scene":
        attributes.update(crs_wkt=info.detail.crs_wkt, transform=list(info.detail.transform))
    if done:
        image = zarr.open_array(str(store_path), mode="r+")
    else:
        image = zarr.create_array(
            store=str(store_path),
            shape=(len(bands), *info.shape),
            dtype=info.dtype,
            chunks=(len(bands), *(chunk,) * dims),
            shards=(len(bands), *(shard,) * dims),
            fill_value=0,
            dimension_names=("band", *SPATIAL_NAMES[dims]),
            attributes=attributes,
            overwrite=True,
        )

    mask = np.zeros(mask_shape(info.shape), dtype=bool)
    mask_lock = threading.Lock()

    def copy_shard(region: Region) -> None:
        if region.start in done:
            pixels = image[(slice(None), *region.slices())]
        else:
            pixels = read_source_region(info, bands, region)
            image[(slice(None), *region.slices())] = pixels
        valid = valid_pixels(pixels, info.nodata)
        with mask_lock:  # low-resolution cells can straddle two shards
            add_region_to_mask(mask, region, valid)
        on_shard_done(region)

    shards = block_partition(info.shape, (shard,) * dims)
    dask.compute(*[dask.delayed(copy_shard)(region) for region in shards], scheduler="threads", num_workers=max_threads)
    return mask


def shard_regions(store_path: Path) -> list[Region]:
    """The label array's shards: the output blocks."""
    array = zarr.open_array(str(store_path), mode="r")
    return block_partition(array.shape, array.shards)


def create_label_store(store_path: Path, shape: tuple[int, ...], chunk: int, block: int, attributes: dict) -> zarr.Array:
    """The uint8 label array, one shard per output block; pixels never written read as NODATA_LABEL."""
    return zarr.create_array(
        store=str(store_path),
        shape=shape,
        dtype="uint8",
        chunks=(chunk,) * len(shape),
        shards=(block,) * len(shape),
        fill_value=NODATA_LABEL,
        dimension_names=SPATIAL_NAMES[len(shape)],
        attributes=attributes,
        overwrite=True,
    )


def create_probability_store(
    store_path: Path, num_classes: int, shape: tuple[int, ...], chunk: int, block: int, attributes: dict
) -> zarr.Array:
    """uint8-quantised class probabilities (class, *spatial), sharded like the labels."""
    return zarr.create_array(
        store=str(store_path),
        shape=(num_classes, *shape),
        dtype="uint8",
        chunks=(num_classes, *(chunk,) * len(shape)),
        shards=(num_classes, *(block,) * len(shape)),
        fill_value=0,
        dimension_names=("class", *SPATIAL_NAMES[len(shape)]),
        attributes={**attributes, "scale": 1 / 255},
        overwrite=True,
    )


def read_padded(image: zarr.Array, region: Region, bands: tuple[int, ...] | None = None) -> np.ndarray:
    """Read (band, *region) from the image (all bands, or the 0-based `bands`); parts outside the
    image are mirrored from inside.

    The mirror is about the image edge, so the same tile reads the same values whichever
    block asks for it.
    """
    spatial = image.shape[1:]
    inside = region.intersection(Region((0,) * len(spatial), spatial))
    data = image[(list(bands) if bands is not None else slice(None), *inside.slices())]
    pads = [(0, 0)] + [(a - r0, r1 - b) for a, b, r0, r1 in zip(inside.start, inside.stop, region.start, region.stop)]
    if any(p != (0, 0) for p in pads):
        data = np.pad(data, pads, mode="reflect" if min(inside.shape) > 1 else "edge")
    return data
