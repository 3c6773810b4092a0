"""probabilities.zarr: the class probabilities the segment stage blended, uint8 (probability x
255), (class, *spatial), sharded like the labels; 0 for every class where the label is nodata."""

from __future__ import annotations

from pathlib import Path

from pipelines import storage
from pipelines.outputs import Output, OutputContext


def write(context: OutputContext, folder: Path) -> None:
    """The store is already written: it moves (or is copied down from object storage)."""
    target = folder / OUTPUT.file
    if storage.is_remote(context.probability_store):
        fs, path = storage.filesystem(context.probability_store)
        fs.get(path.rstrip("/") + "/", str(target), recursive=True)
    else:
        Path(context.probability_store).replace(target)


OUTPUT = Output("probabilities", "probabilities.zarr", write, needs_probabilities=True,
                description="uint8 class probabilities (x 255)", takes_work_store=True)
