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

from pipelines.background import add_box_to_mask, mask_shape, valid_pixels
from pipelines.sources import Source
from pipelines.tiling import Box, block_partition

NODATA_LABEL = 255
SPATIAL_NAMES = {2: ("y", "x"), 3: ("z", "y", "x")}


def ingest_source(
    source: Source,
    bands: tuple[int, ...],
    store_path: str | None,
    chunk: int,
    block: int,
    on_block_done: Callable[[Box], None] = lambda box: None,
    max_threads: int = 4,
    done: frozenset[tuple[int, ...]] = frozenset(),
    nodata: float | None = None,
) -> np.ndarray:
    """Copy the selected bands of a source into a sharded Zarr v3 array (band, *spatial), one
    block (= one shard) at a time.

    Dask copies one block per task, each reading its own box of the source, so memory is
    bounded by (threads x block) and every shard has one writer. `on_block_done(box)` is
    called after each block is written. Resuming, `done` holds the start of every block
    already copied into the existing store: those are read back from it for the mask instead
    of from the source. `nodata` marks pixels without data (default: the source's own). Returns
    the low-resolution mask of valid pixels (pipelines.background) gathered on the way.
    Without a `store_path` nothing is copied: the source is only read for the mask (a source
    the model reads in place).
    """
    nodata = source.nodata if nodata is None else nodata
    dims = len(source.shape)
    attributes = {"source": source.uri, "kind": source.kind, "bands": list(bands), "nodata": nodata}
    if source.crs_wkt:
        attributes.update(crs_wkt=source.crs_wkt, transform=list(source.transform))
    if store_path is None:
        image = None
    elif done:
        image = zarr.open_array(str(store_path), mode="r+")
    else:
        image = zarr.create_array(
            store=str(store_path),
            shape=(len(bands), *source.shape),
            dtype=source.dtype,
            chunks=(len(bands), *(chunk,) * dims),
            shards=(len(bands), *(block,) * dims),
            fill_value=store_fill_value(nodata, source.dtype),
            dimension_names=("band", *SPATIAL_NAMES[dims]),
            attributes=attributes,
            overwrite=True,
        )

    mask = np.zeros(mask_shape(source.shape), dtype=bool)
    mask_lock = threading.Lock()

    def copy_block(box: Box) -> None:
        if not source.holds_data(box):  # nothing stored there: the store's fill value is nodata
            on_block_done(box)
            return
        if box.start in done:
            pixels = image[(slice(None), *box.slices())]
        else:
            pixels = source.read(bands, box)
            if image is not None:
                image[(slice(None), *box.slices())] = pixels
        valid = valid_pixels(pixels, nodata)
        with mask_lock:  # low-resolution cells can straddle two blocks
            add_box_to_mask(mask, box, valid)
        on_block_done(box)

    blocks = block_partition(source.shape, (block,) * dims)
    if len(blocks) == 1:  # a small image: dask's scheduling would cost more than the copy
        copy_block(blocks[0])
        return mask
    dask.compute(*[dask.delayed(copy_block)(box) for box in blocks], scheduler="threads", num_workers=max_threads)
    return mask


def store_fill_value(nodata: float | None, dtype: str) -> float:
    """What blocks never written read as: the source's nodata where the dtype can hold it."""
    if nodata is not None and (np.isnan(nodata) if np.issubdtype(np.dtype(dtype), np.floating)
                               else np.can_cast(np.min_scalar_type(nodata), dtype) and float(nodata).is_integer()):
        return nodata
    return 0


def store_blocks(store_path: str | Path) -> list[Box]:
    """The output blocks of a label array: its shards."""
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


class LabelsInMemory:
    """An image's labels held in memory, read like the label store they stand for: its shape,
    dtype and shards (the output block), every pixel never written NODATA_LABEL, and each read a
    fresh array (a writer may change what it reads). For small images, whose round trip through
    a Zarr store cost more CPU than their outputs (flows.run.ImageRun.works_in_memory)."""

    def __init__(self, shape: tuple[int, ...], block: int):
        self.array = np.full(shape, NODATA_LABEL, dtype=np.uint8)
        self.shards = (block,) * len(shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def write(self, box: Box, labels: np.ndarray) -> None:
        self.array[box.slices()] = labels

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self.array[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.array(self.array, dtype=dtype)


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


def read_padded(image: zarr.Array, box: Box, bands: tuple[int, ...] | None = None) -> np.ndarray:
    """Read (band, *box) from the image (all bands, or the 0-based `bands`); parts outside the
    image are mirrored from inside.

    The mirror is about the image edge, so the same tile reads the same values whichever
    block asks for it.
    """
    spatial = image.shape[1:]
    inside = box.intersection(Box((0,) * len(spatial), spatial))
    return mirror_pad(image[(list(bands) if bands is not None else slice(None), *inside.slices())], inside, box)


def read_padded_source(source: Source, bands: tuple[int, ...], box: Box) -> np.ndarray:
    """read_padded of the 1-based `bands` of a source read in place: the same pixels as from
    the store ingest would have copied them into."""
    inside = box.intersection(Box((0,) * len(source.shape), source.shape))
    return mirror_pad(np.asarray(source.read(bands, inside), dtype=source.dtype), inside, box)


def mirror_pad(data: np.ndarray, inside: Box, box: Box) -> np.ndarray:
    """`data`, read at `inside`, grown to `box` by mirroring about the image edge."""
    pads = [(0, 0)] + [(a - r0, r1 - b) for a, b, r0, r1 in zip(inside.start, inside.stop, box.start, box.stop)]
    if any(p != (0, 0) for p in pads):
        data = np.pad(data, pads, mode="reflect" if min(inside.shape) > 1 else "edge")
    return data
