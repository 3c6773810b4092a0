"""CUDA out-of-memory inside a block: the predictor halves its batch and redoes the block.

The OOM is simulated (no GPU here): the real TorchScript model runs behind a wrapper that
raises torch.cuda.OutOfMemoryError for batches larger than two tiles, as a GPU would above
some batch size."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
import zarr

from flows.synthetic import write_small_net_card
from pipelines.model_card import load_card
from pipelines.tiling import Box, TileGrid
from pipelines.zarr_stores import create_label_store
from segworkers.predictor import BlockJob, BlockPredictor
from segworkers.tile_models import TileModel

TILE = 64


def block_job(sentinel_scene, folder) -> BlockJob:
    with rasterio.open(sentinel_scene) as dataset:
        pixels = (dataset.read([3, 2, 1]).astype(np.float32) / 20).clip(0, 255).astype(np.uint8)
    image = zarr.create_array(store=str(folder / "image.zarr"), shape=pixels.shape, dtype="uint8",
                              chunks=(3, TILE, TILE), attributes={"nodata": None})
    image[:] = pixels
    shape = pixels.shape[1:]
    create_label_store(folder / "labels.zarr", shape, chunk=TILE, block=256, attributes={})
    block = Box((0, 0), shape)
    tiles = tuple(TileGrid(shape, TILE, 0.25).tiles_touching(block))
    return BlockJob(str(folder / "image.zarr"), str(folder / "labels.zarr"), block, tiles, TILE)


def test_out_of_memory_halves_the_batch_and_redoes_the_block(sentinel_scene, tmp_path):
    card = load_card(write_small_net_card(tmp_path, tile=TILE))
    job = block_job(sentinel_scene, tmp_path)
    assert len(job.tiles) > 8

    reference = BlockPredictor(card, batch_size=2).segment(job)
    expected = zarr.open_array(job.label_store)[:]

    predictor = BlockPredictor(card, batch_size=8)
    real_model, calls = predictor.model, []

    def runs_out_above_two(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_model.forward(batch)

    predictor.model = TileModel(runs_out_above_two, real_model.halo, real_model.device)
    zarr.open_array(job.label_store, mode="r+")[:] = 255
    result = predictor.segment(job)

    assert predictor.batch_size == 2 and calls[:2] == [8, 4] and set(calls[2:]) == {2}
    assert np.array_equal(zarr.open_array(job.label_store)[:], expected)
    assert np.array_equal(result.class_counts, reference.class_counts)


def test_out_of_memory_at_batch_one_is_an_error(sentinel_scene, tmp_path):
    card = load_card(write_small_net_card(tmp_path, tile=TILE))
    job = block_job(sentinel_scene, tmp_path)
    predictor = BlockPredictor(card, batch_size=1)

    def always_out(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    predictor.model = TileModel(always_out, 0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predictor.segment(job)
