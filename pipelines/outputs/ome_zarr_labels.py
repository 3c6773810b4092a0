"""labels.ome.zarr: a label multiscale in the source's units, for Zarr sources (the source is
never modified; a viewer opens it beside the source)."""

from __future__ import annotations

from pathlib import Path

from pipelines.ome_zarr import write_ome_zarr_labels
from pipelines.outputs import Output, OutputContext


def write(context: OutputContext, folder: Path) -> None:
    card = context.card
    write_ome_zarr_labels(context.labels, folder / OUTPUT.file, card.name,
                          [(c.id, c.name, c.color) for c in card.classes], pixel_size=context.source.pixel_size)


OUTPUT = Output("ome-zarr-labels", "labels.ome.zarr", write, description="the labels, OME-Zarr 0.5 label image")
