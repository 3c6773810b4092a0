"""labels.tif in pixel coordinates: the labels of plain images, and on request of the other 2D
sources without georeferencing (slides, Zarr). The same tiled, overviewed TIFF as a scene's,
with the pixel size in the resolution tags where the source has one."""

from __future__ import annotations

from pathlib import Path

from pipelines.outputs import Output, OutputContext
from pipelines.sources import Source
from pipelines.outputs.labels_cog import write_labels_cog


def write(context: OutputContext, folder: Path) -> None:
    write_labels_cog(context.labels, folder / OUTPUT.file, None, None, context.card.classes,
                     pixel_size_um(context.source), context.provenance)


def pixel_size_um(source: Source) -> tuple[float, float] | None:
    """The source's physical pixel size in µm (for a TIFF's resolution tags), where it has one."""
    size = source.pixel_size
    return tuple(micrometres(value, unit) for value, unit in size) if size else None


def micrometres(value: float, unit: str) -> float:
    return value * MICROMETRES_PER_UNIT[unit]


MICROMETRES_PER_UNIT = {"µm": 1.0, "um": 1.0, "μm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


OUTPUT = Output("labels-tiff", "labels.tif", write, spatial_dims=(2,),
                description="class per pixel, tiled TIFF in pixel coordinates")
