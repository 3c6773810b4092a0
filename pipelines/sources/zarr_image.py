"""Zarr sources: a (channel, *spatial) Zarr array, or level 0 of an OME-Zarr image, read in
place (locally or on s3://) by the workers: no ingest, and the source is never modified."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from pipelines.areas import PixelAreas
from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.sources import Source, SourceKind
from pipelines.tiling import Box

UNIT_SYMBOLS = {"micrometer": "um", "millimeter": "mm", "nanometer": "nm", "centimeter": "cm", "meter": "m"}


@dataclass(frozen=True)
class ZarrImage:
    array_path: str
    shape: tuple[int, ...]
    """(channel, *spatial)."""
    dtype: str
    pixel_size: tuple[float, ...] = ()
    unit: str | None = None
    """Symbol of the spatial unit of pixel_size (e.g. um), when the OME-Zarr metadata gives one."""


def open_zarr_image(uri: str, spatial_dims: int) -> ZarrImage:
    """A plain Zarr array (channel, *spatial), or the full-resolution array of an OME-Zarr image
    (NGFF 0.4 or 0.5 `multiscales`, its level-0 scale and units giving the pixel size)."""
    try:
        node = zarr.open(uri, mode="r")
    except Exception as exc:
        raise InputError(uri, f"not a readable Zarr store ({exc})") from exc
    pixel_size, unit, array_path = (), None, uri
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            raise InputError(uri, "is a Zarr group without OME-Zarr multiscales metadata")
        image = multiscales[0]
        level0 = image["datasets"][0]
        node = node[level0["path"]]
        array_path = f"{uri}/{level0['path']}"
        axes = image.get("axes", [])
        space = [a for a in axes if isinstance(a, dict) and a.get("type") == "space"]
        scales = next((t["scale"] for t in level0.get("coordinateTransformations", []) if t["type"] == "scale"), None)
        if space and scales:
            pixel_size = tuple(scales[-len(space):])
            unit = UNIT_SYMBOLS.get(space[-1].get("unit"))
    shape = tuple(node.shape)
    if len(shape) == spatial_dims:
        raise InputError(uri, f"has no channel axis: segpipe reads (channel, *spatial) arrays, this one is {shape}")
    if len(shape) != spatial_dims + 1:
        raise InputError(uri, f"has shape {shape}; a {spatial_dims}D model card needs (channel, *spatial)")
    return ZarrImage(array_path, shape, str(node.dtype), pixel_size, unit)


@dataclass(frozen=True)
class ZarrSource(Source):
    uri: str
    image: ZarrImage
    kind = "zarr"
    labels_output = "ome-zarr-labels"
    nodata = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.image.shape[1:]

    @property
    def count(self) -> int:
        return self.image.shape[0]

    @property
    def dtype(self) -> str:
        return self.image.dtype

    @property
    def in_place_store(self) -> str:
        return self.image.array_path

    @property
    def pixel_size(self) -> tuple[tuple[float, str], ...] | None:
        if not self.image.unit:
            return None
        return tuple((size, self.image.unit) for size in self.image.pixel_size)

    def read(self, bands: tuple[int, ...], box: Box) -> np.ndarray:
        array = zarr.open_array(self.image.array_path, mode="r")
        return np.asarray(array[([b - 1 for b in bands], *box.slices())])

    def pixel_areas(self) -> PixelAreas:
        """In the OME-Zarr unit (um2, mm3, ...) where there is one, else pixels."""
        if not self.image.unit:
            return super().pixel_areas()
        unit = f"{self.image.unit}{len(self.shape)}"
        return PixelAreas(unit, np.full(self.shape[0], float(np.prod(self.image.pixel_size))))


def open_zarr_source(uri: str, card: ModelCard) -> ZarrSource:
    return ZarrSource(uri, open_zarr_image(uri, card.spatial_dims))


KIND = SourceKind("zarr", open_zarr_source, suffixes=(".zarr",), read_in_place=True)
