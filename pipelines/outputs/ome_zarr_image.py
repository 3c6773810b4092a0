"""image.ome.zarr of a slide: the image at the resolution segmented, with the labels inside it
under labels/<card name>, so that napari and QuPath open both from one folder."""

from __future__ import annotations

from pathlib import Path

from pipelines.ome_zarr import write_ome_zarr_image, write_ome_zarr_labels
from pipelines.outputs import Output, OutputContext


def write(context: OutputContext, folder: Path) -> None:
    path = folder / OUTPUT.file
    write_ome_zarr_image(context.image, path, context.name, pixel_size=context.source.pixel_size,
                         channel_names=context.image_band_names)
    card = context.card
    write_ome_zarr_labels(context.labels, path, card.name, [(c.id, c.name, c.color) for c in card.classes],
                          pixel_size=context.source.pixel_size)


OUTPUT = Output("ome-zarr-image", "image.ome.zarr", write, copies_image=True,
                description="the image segmented and its labels, OME-Zarr 0.5")
