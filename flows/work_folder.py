"""An image's work folder, <out>/.work/<image>-<key>/: the intermediate stores and what has been
done, so that an interrupted run resumes where it stopped.

    image.zarr/          the ingested source (not for sources read in place)
    ingested/<block>     one empty marker per block copied into image.zarr
    valid_lowres.npy     the low-resolution mask of what there is to segment (ingest's last step)
    labels.zarr/         the labels, one shard per output block
    probabilities.zarr/  the class probabilities, when an output needs them
    blocks/<block>.json  one record per output block segmented: its class counts and areas
    state.json           the key and block geometry the folder was made with
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipelines import storage
from pipelines.tiling import Box
from pipelines.zarr_stores import LabelsInMemory
from segworkers.predictor import BlockResult


def block_id(box: Box) -> str:
    return "_".join(str(s) for s in box.start)


@dataclass(frozen=True)
class WorkFolder:
    path: str
    """A local folder or an s3:// prefix."""

    in_memory = False

    @property
    def image_store(self) -> str:
        return storage.join(self.path, "image.zarr")

    @property
    def label_store(self) -> str:
        return storage.join(self.path, "labels.zarr")

    @property
    def probability_store(self) -> str:
        return storage.join(self.path, "probabilities.zarr")

    @property
    def background_mask(self) -> str:
        return storage.join(self.path, "valid_lowres.npy")

    @property
    def ingested_dir(self) -> str:
        return storage.join(self.path, "ingested")

    @property
    def blocks_dir(self) -> str:
        return storage.join(self.path, "blocks")

    @property
    def state_file(self) -> str:
        return storage.join(self.path, "state.json")

    def prepare(self, state: dict) -> bool:
        """Keep the folder of an interrupted run when it was made with the same `state` (key and
        block geometry, so its blocks and records still apply); otherwise start it afresh.
        Returns True when resuming."""
        if storage.exists(self.state_file):
            try:
                if json.loads(storage.read_bytes(self.state_file)) == state:
                    return True
            except ValueError:
                pass  # a torn state file: start again
        storage.remove_tree(self.path)
        storage.write_whole(self.state_file, json.dumps(state).encode())
        return False

    def remove(self) -> None:
        storage.remove_tree(self.path)

    # ingest

    def ingested_blocks(self) -> frozenset[tuple[int, ...]]:
        """The starts of the blocks already copied into image.zarr (none when it is gone)."""
        if not storage.exists(storage.join(self.image_store, "zarr.json")):
            return frozenset()
        return frozenset(tuple(int(v) for v in name.split("_"))
                         for name in storage.list_names(self.ingested_dir) if not name.startswith("."))

    def mark_ingested(self, box: Box) -> None:
        storage.write_whole(storage.join(self.ingested_dir, block_id(box)), b"")

    def has_background_mask(self) -> bool:
        return storage.exists(self.background_mask)

    def save_background_mask(self, mask: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, mask)
        storage.write_whole(self.background_mask, buffer.getvalue())

    def load_background_mask(self) -> np.ndarray | None:
        if not self.has_background_mask():
            return None
        return np.load(io.BytesIO(storage.read_bytes(self.background_mask)))

    # segment

    def write_block_record(self, result: BlockResult) -> None:
        """After the block's labels are in their shard: what its worker counted (JSON floats
        round-trip exactly, so resumed statistics are byte-identical)."""
        record = {"start": list(result.block.start), "stop": list(result.block.stop), "tiles_run": result.tiles_run,
                  "class_counts": result.class_counts.tolist(),
                  "class_areas": None if result.class_areas is None else result.class_areas.tolist()}
        storage.write_whole(storage.join(self.blocks_dir, f"{block_id(result.block)}.json"), json.dumps(record).encode())

    def labels(self):
        """The label store, for the outputs and the region counts to read."""
        import zarr

        return zarr.open_array(self.label_store, mode="r")

    def block_records(self) -> dict[tuple[int, ...], BlockResult]:
        records = {}
        for name in storage.list_names(self.blocks_dir):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            record = json.loads(storage.read_bytes(storage.join(self.blocks_dir, name)))
            areas = record["class_areas"]
            records[tuple(record["start"])] = BlockResult(
                Box(tuple(record["start"]), tuple(record["stop"])), np.asarray(record["class_counts"], dtype=np.int64),
                record["tiles_run"], None if areas is None else np.asarray(areas, dtype=np.float64),
            )
        return records


class WorkInMemory:
    """What a work folder holds, kept in this process instead, for an image small enough to be
    redone whole (flows.run.ImageRun.works_in_memory): its mask and its labels, which come back
    with the block results instead of going through a Zarr store. Nothing of it outlives the
    process, so a run killed before such an image is done segments it again; the images done
    (in the manifest) are not redone."""

    in_memory = True
    label_store = None
    probability_store = None

    def __init__(self):
        self.background_mask: np.ndarray | None = None
        self.label_array: LabelsInMemory | None = None

    def prepare(self, state: dict) -> bool:
        return False

    def remove(self) -> None:
        self.background_mask = self.label_array = None

    def has_background_mask(self) -> bool:
        return self.background_mask is not None

    def save_background_mask(self, mask: np.ndarray) -> None:
        self.background_mask = mask

    def load_background_mask(self) -> np.ndarray | None:
        return self.background_mask

    def create_labels(self, shape: tuple[int, ...], block: int) -> None:
        self.label_array = LabelsInMemory(shape, block)

    def write_block_record(self, result: BlockResult) -> None:
        self.label_array.write(result.block, result.labels)

    def labels(self) -> LabelsInMemory:
        return self.label_array

    def block_records(self) -> dict[tuple[int, ...], BlockResult]:
        return {}


def remove_stale_work_folders(out_root: str, is_done: Callable[[str], bool]) -> list[str]:
    """Remove the work folders of images that are done (a run killed while removing one leaves
    it behind) and of none at all (no state: killed before it had one). Folders of unfinished
    images stay: the next run of them resumes there. Returns the folders removed."""
    work_root = storage.join(out_root, ".work")
    removed = []
    for name in storage.list_names(work_root):
        folder = WorkFolder(storage.join(work_root, name))
        try:
            key = json.loads(storage.read_bytes(folder.state_file)).get("key")
        except (FileNotFoundError, ValueError, AttributeError):
            key = None
        if key is None or is_done(key):
            folder.remove()
            removed.append(folder.path)
    return removed
