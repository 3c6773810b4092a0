"""confidence.tif: how sure the model was of each pixel's class, the highest of its class
probabilities (x 255, uint8) beside the labels, so that users can mask uncertain pixels. A COG
like the labels (the source's CRS and transform where it has them, else its pixel size in the
resolution tags; overviews by average);
0 is nodata, where the labels are nodata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from rasterio.enums import Resampling

from pipelines.outputs import Output, OutputContext
from pipelines.outputs.labels_cog import write_uint8_cog
from pipelines.outputs.labels_tiff import pixel_size_um

NODATA = 0


def write(context: OutputContext, folder: Path) -> None:
    probabilities = zarr.open_array(context.probability_store, mode="r")
    source = context.source

    def highest(box) -> np.ndarray:
        return np.asarray(probabilities[(slice(None), *box.slices())]).max(axis=0)

    write_uint8_cog(highest, context.labels.shape, context.labels.shards, folder / OUTPUT.file, source.crs_wkt,
                    source.transform, NODATA, Resampling.average,
                    pixel_size_um=None if source.crs_wkt else pixel_size_um(source), provenance=context.provenance)


OUTPUT = Output("confidence", "confidence.tif", write, spatial_dims=(2,), needs_probabilities=True,
                description="the highest class probability x 255 per pixel, uint8 COG")
