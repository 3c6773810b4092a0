import itertools

import numpy as np
import pytest

from pipelines.blending import BlockAccumulator, gaussian_weights
from pipelines.tiling import Box, TileGrid, axis_origins, block_partition


@pytest.mark.parametrize("size", [1, 200, 256, 257, 300, 1000, 4097])
@pytest.mark.parametrize("tile,overlap", [(256, 0.25), (256, 0.0), (64, 0.5)])
def test_axis_origins_cover_the_axis_with_the_last_tile_flush(size, tile, overlap):
    origins = axis_origins(size, tile, overlap)
    assert origins[0] == 0
    assert list(origins) == sorted(set(origins))
    if size <= tile:
        assert origins == (0,)
        return
    assert origins[-1] == size - tile
    stride = round(tile * (1 - overlap))
    assert all(b - a <= stride for a, b in zip(origins, origins[1:]))
    covered = np.zeros(size, dtype=bool)
    for o in origins:
        covered[o : o + tile] = True
    assert covered.all()


def test_tiles_touching_a_block_are_exactly_the_overlapping_tiles():
    grid = TileGrid((700, 500), 128, 0.25)
    all_tiles = [grid.tile(origin) for origin in itertools.product(*grid.origins)]
    for block in block_partition(grid.shape, (256, 256)):
        expected = [t for t in all_tiles if t.intersection(block) is not None]
        assert grid.tiles_touching(block) == expected


def test_block_partition_covers_every_pixel_once():
    shape = (1000, 777)
    hits = np.zeros(shape, dtype=int)
    for block in block_partition(shape, (256, 512)):
        hits[block.slices()] += 1
    assert (hits == 1).all()


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
    w = gaussian_weights((64, 64))
    assert w.dtype == np.float32
    assert w.max() == pytest.approx(1.0)
    assert np.unravel_index(w.argmax(), w.shape) in {(31, 31), (31, 32), (32, 31), (32, 32)}
    assert (w > 0).all()
    np.testing.assert_array_equal(w, w[::-1, ::-1])
    assert w[0, 0] < 0.01 * w[32, 32]


def test_blocks_blend_to_the_same_labels_as_the_whole_image():
    """Accumulating per block gives bit-identical labels to one accumulator over the image."""
    rng = np.random.default_rng(0)
    grid = TileGrid((300, 260), 64, 0.5)
    weights = gaussian_weights((64, 64))
    tiles = [grid.tile(o) for o in itertools.product(*grid.origins)]
    probabilities = {t: rng.random((4, 64, 64), dtype=np.float32) for t in tiles}

    whole = BlockAccumulator(Box((0, 0), grid.shape), 4, weights)
    for t in tiles:
        whole.add(t, probabilities[t])
    for block_side in (64, 128, 192):
        stitched = np.full(grid.shape, 99, dtype=np.uint8)
        for block in block_partition(grid.shape, (block_side, block_side)):
            part = BlockAccumulator(block, 4, weights)
            for t in grid.tiles_touching(block):
                part.add(t, probabilities[t])
            stitched[block.slices()] = part.labels()
        np.testing.assert_array_equal(stitched, whole.labels())


@pytest.mark.parametrize("classes", [4, 40])
def test_a_blocks_labels_and_counts_of_its_own_pixels_are_those_taken_from_the_whole_accumulator(classes,
                                                                                                 monkeypatch):
    """take_labels' quicker path: the argmax of only the block's pixels (not the halo around it)
    and, on the CPU for up to 32 classes, counts made class by class, are the labels and per-row
    counts of the argmax of everything sliced and of one bincount (ties and nodata included; 2D
    and 3D)."""
    import torch

    from segworkers import device_blocks
    from segworkers.device_blocks import label_statistics

    generator = torch.Generator().manual_seed(classes)
    for shape, region in (((70, 90), (slice(7, 63), slice(11, 80))), ((9, 30, 40), (slice(1, 8), slice(3, 27), slice(0, 40)))):
        accumulated = Box((0,) * len(shape), shape)
        accumulator = BlockAccumulator(accumulated, classes, torch.ones(shape))
        accumulator.sums = torch.rand((classes, *shape), generator=generator).mul(4).round()  # many equal maxima
        valid = torch.rand(accumulator.sums[(0, *region)].shape, generator=generator) > 0.2
        labels = accumulator.labels(region)
        assert torch.equal(labels, accumulator.labels()[region])
        quick = label_statistics(labels, valid, classes, 255)
        monkeypatch.setattr(device_blocks, "COUNTED_CLASS_BY_CLASS", 0)
        reference = label_statistics(labels, valid, classes, 255)
        monkeypatch.undo()
        assert torch.equal(quick[0], reference[0]) and torch.equal(quick[1], reference[1])
        assert int(quick[1].sum()) == int(valid.sum()) and (quick[0][~valid] == 255).all()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_labels_say_where_a_class_score_is_not_finite(kind):
    """NaN compares false, so the argmax alone gives such a pixel the first class; the highest
    score that with_highest gives is not finite just there (NaN in any class, or a class at
    infinity), and the labels are the same as without it."""
    import torch

    rng = np.random.default_rng(3)
    sums = rng.random((4, 30, 40)).astype(np.float32)
    sums[2, 5, 7] = np.nan
    sums[0, 9, 9] = np.inf
    sums[3, 20, 30] = -np.inf  # only the lowest score: the other classes decide, and the pixel is not flagged
    sums[:, 25, 1] = np.nan
    expected = np.zeros((30, 40), dtype=bool)
    expected[5, 7] = expected[9, 9] = expected[25, 1] = True
    block = Box((0, 0), (30, 40))
    weights = np.ones((30, 40), np.float32) if kind == "numpy" else torch.ones((30, 40))
    accumulator = BlockAccumulator(block, 4, weights)
    accumulator.sums = sums if kind == "numpy" else torch.from_numpy(sums)
    region = (slice(2, 28), slice(0, 35))
    labels, highest = accumulator.labels(region, with_highest=True)
    as_numpy = (lambda a: a) if kind == "numpy" else (lambda a: a.numpy())
    np.testing.assert_array_equal(~np.isfinite(as_numpy(highest)), expected[region])
    finite = np.isfinite(sums).all(0)[region]
    np.testing.assert_array_equal(as_numpy(highest)[finite], sums.max(0)[region][finite])
    np.testing.assert_array_equal(as_numpy(labels), as_numpy(accumulator.labels(region)))
