"""The data plane: readers, Zarr stores, tile grid, blending, writers, statistics; no Ray, no Prefect."""

import warnings

from rasterio.errors import NotGeoreferencedWarning

# segpipe tells the user itself, in one note, that an image has no georeferencing (and segments
# it in pixel coordinates); GDAL's warning on every open and write of such a file says it again
# as a two-line dump. One filter for the package: warnings.catch_warnings is not thread-safe,
# and readers and writers run on threads.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
