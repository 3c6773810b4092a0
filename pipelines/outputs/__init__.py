"""What a run writes for each image, one module per output behind one small interface.

    outputs = resolve_outputs(("labels", "preview", "probabilities"), source)
    for output in outputs:
        output.write(context, folder)        # writes folder / output.file

An output names the entry it makes in the image's folder, what it needs (the spatial
dimensions it can write, the class probabilities from the segment stage) and how it writes.
"labels" stands for the labels output of the source's kind (`Source.labels_output`): a COG for
scenes, OME-Zarr for slides and Zarr sources, NIfTI for volumes. An output the source cannot
have (a TIFF of a volume) is left out, and of two outputs with the same file the first wins
(labels-tiff of a scene is its labels.tif). Adding an output = one module + one entry in
OUTPUTS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.sources import Source

DEFAULT_OUTPUTS = ("labels", "preview")


@dataclass(frozen=True)
class OutputContext:
    """What an output may read."""

    name: str
    """The image's name."""
    source: Source
    card: ModelCard
    labels: object
    """The label array (zarr), (H, W) or (D, H, W) uint8, nodata 255."""
    image: object
    """The array the model read (zarr), (band, *spatial)."""
    image_bands: tuple[int, ...] | None
    """0-based channels of `image` that are the card's bands, in its order; None: all of them."""
    probability_store: str | None
    """The segment stage's uint8 class probabilities (a Zarr store path or URL), when an output needs them."""
    image_band_names: tuple[str | None, ...] = ()
    """The names of the channels of `image`, where known."""
    provenance: dict[str, str] = field(default_factory=dict)
    """Where the labels come from: model, model_version, model_digest, run_id, segpipe_version."""
    options: dict = field(default_factory=dict)
    """Options of the outputs (`simplify`: the polygons' tolerance in pixels)."""
    pictures: dict = field(default_factory=dict)
    """What outputs drew, by output name (the preview's PIL image, as saved), for the caller to
    reuse without decoding the file again (the run report's thumbnails)."""


@dataclass(frozen=True)
class Output:
    name: str
    file: str
    """The file or folder it makes in the image's output folder."""
    write: Callable[[OutputContext, Path], None]
    """Writes `folder / file`; `folder` is a local staging folder, published whole afterwards."""
    spatial_dims: tuple[int, ...] = (2, 3)
    needs_probabilities: bool = False
    description: str = ""
    required: bool = True
    """False for an output an image is complete without (the preview): when it cannot be
    written, the image's labels and statistics still are, with a warning."""
    takes_work_store: bool = False
    """It moves a work store into the folder (the probabilities): written after the others."""
    copies_image: bool = False
    """It copies the image store as it is (OME-Zarr image): the image is ingested into one,
    never read in place."""


# Names that stand for the output(s) that fit the source.
ALIASES = {
    "labels": lambda source: (source.labels_output,),
    "polygons": lambda source: ("polygons-geoparquet",) if source.crs_wkt else ("polygons-geojson",),
}


def resolve_outputs(names: tuple[str, ...] | list[str], source: Source) -> tuple[Output, ...]:
    resolved: dict[str, Output] = {}
    for name in names:
        for concrete in ALIASES[name](source) if name in ALIASES else (name,):
            output = output_named(concrete)
            if len(source.shape) in output.spatial_dims and output.file not in resolved:
                resolved[output.file] = output
    return tuple(sorted(resolved.values(), key=lambda output: output.takes_work_store))


def outputs_left_out(names: tuple[str, ...] | list[str], source: Source) -> list[str]:
    """The outputs asked for that the source cannot have (polygons or confidence of a volume)."""
    return [concrete for name in names for concrete in (ALIASES[name](source) if name in ALIASES else (name,))
            if len(source.shape) not in output_named(concrete).spatial_dims]


def output_named(name: str) -> Output:
    if name not in OUTPUTS:
        raise InputError(name, f"no such output (known: {', '.join([*ALIASES, *OUTPUTS])})")
    return OUTPUTS[name]


def check_output_names(names: tuple[str, ...] | list[str]) -> None:
    for name in names:
        if name not in ALIASES:
            output_named(name)


def _outputs() -> dict[str, Output]:
    from pipelines.outputs import confidence, labels_cog, labels_tiff, nifti_labels, ome_zarr_image, ome_zarr_labels
    from pipelines.outputs import polygons, preview, probabilities

    found = (labels_cog.OUTPUT, labels_tiff.OUTPUT, ome_zarr_image.OUTPUT, ome_zarr_labels.OUTPUT,
             nifti_labels.OUTPUT, preview.OUTPUT, probabilities.OUTPUT, confidence.OUTPUT, polygons.GEOPARQUET,
             polygons.GEOPACKAGE, polygons.QUPATH)
    return {output.name: output for output in found}


# Last: the output modules import the interface above.
OUTPUTS: dict[str, Output] = _outputs()
