"""Whole-slide reading on the real OpenSlide test slide CMU-1-Small-Region.svs (Aperio, one level
2220 x 2967, JPEG tiles 240 x 240, MPP 0.499 in the ImageDescription)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipelines.background import mask_shape, tiles_with_data
from pipelines.errors import InputError
from pipelines.sources.slide import choose_level, inspect_slide, read_slide_box, tissue_mask, working_shape
from pipelines.tiling import Box, TileGrid
from training import SLIDE, shared_data

@pytest.fixture(scope="module")
def slide() -> Path:
    return shared_data(SLIDE)


@pytest.fixture(scope="module")
def level0(slide) -> np.ndarray:
    """tifffile's own decode of the slide's level 0, (H, W, 3)."""
    with tifffile.TiffFile(slide) as tif:
        return tif.pages[0].asarray()


def test_levels_and_mpp(slide):
    info = inspect_slide(slide)
    assert info.level_dimensions == ((2220, 2967),)
    assert info.level_downsamples == (1.0,)
    assert info.mpp_x == pytest.approx(0.499) and info.mpp_y == pytest.approx(0.499)
    assert info.vendor == "aperio"


def test_region_equals_tifffile_decode(slide, level0):
    # Crosses tile borders (tiles are 240 px) on both axes.
    region = Box((100, 200), (700, 731))
    pixels = read_slide_box(str(slide), 0, region)
    assert pixels.shape == (3, 600, 531) and pixels.dtype == np.uint8
    # tiffslide decodes the same JPEG tiles through the same imagecodecs as tifffile: exact.
    np.testing.assert_array_equal(pixels, level0[100:700, 200:731].transpose(2, 0, 1))


def test_region_past_the_edge_is_white(slide, level0):
    pixels = read_slide_box(str(slide), 0, Box((2900, 2180), (3000, 2260)))
    np.testing.assert_array_equal(pixels[:, :67, :40], level0[2900:, 2180:].transpose(2, 0, 1))
    assert (pixels[:, 67:, :] == 255).all() and (pixels[:, :, 40:] == 255).all()


def test_resampled_region_is_the_area_average(slide, level0):
    info = inspect_slide(slide)
    level, scale = choose_level(info, 0.998)
    assert (level, scale) == (0, 2.0)
    assert working_shape(info, level, scale) == (1484, 1110)
    pixels = read_slide_box(str(slide), level, Box((50, 100), (170, 333)), scale)
    blocks = level0[100:340, 200:666].astype(np.float64).reshape(120, 2, 233, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(pixels, np.rint(blocks).astype(np.uint8).transpose(2, 0, 1))


def test_resampling_does_not_depend_on_the_region(slide):
    """A working pixel depends only on its own footprint, whatever region it is read with."""
    whole = read_slide_box(str(slide), 0, Box((0, 0), (300, 300)), 2.004)
    part = read_slide_box(str(slide), 0, Box((117, 93), (251, 300)), 2.004)
    assert np.abs(whole[:, 117:251, 93:300].astype(int) - part).max() <= 1


def test_choose_level_on_one_level(slide):
    info = inspect_slide(slide)
    assert choose_level(info, None) == (0, 1.0)
    assert choose_level(info, 0.5) == (0, 1.0)  # 0.2% off: within tolerance, no resampling
    assert choose_level(info, 1.0) == (0, pytest.approx(1.0 / 0.499))
    assert choose_level(info, 0.25) == (0, pytest.approx(0.25 / 0.499))


def test_pyramid_level_and_tiff_resolution(slide, level0, tmp_path):
    """A two-level tiled TIFF with its pixel size only in the resolution tags (pixels per cm)."""
    coarse = level0[:2966, :2220].reshape(1483, 2, 1110, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    path = tmp_path / "pyramid.tif"
    resolution = (1e4 / 0.5, 1e4 / 0.5)
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), photometric="rgb", subifds=1, resolution=resolution,
                  resolutionunit="CENTIMETER")
        tif.write(coarse, tile=(256, 256), photometric="rgb", subfiletype=1, resolution=resolution,
                  resolutionunit="CENTIMETER")
    info = inspect_slide(path)
    assert info.level_dimensions == ((2220, 2967), (1110, 1483))
    assert info.mpp_x == pytest.approx(0.5)
    level, scale = choose_level(info, 1.0)
    assert level == 1 and scale == pytest.approx(1.0, abs=0.01)
    assert choose_level(info, 0.9) == (0, pytest.approx(1.8))
    pixels = read_slide_box(str(path), 1, Box((333, 251), (600, 700)))
    np.testing.assert_array_equal(pixels, coarse[333:600, 251:700].transpose(2, 0, 1))


@pytest.mark.parametrize("unit,size", [("µm", 0.25), ("nm", 250.0)])
def test_a_pyramidal_ome_tiff_gives_its_pixel_size_from_the_ome_metadata(slide, level0, tmp_path, unit, size):
    """QuPath and bfconvert write pyramids as OME-TIFF (sub-IFDs) whose pixel size is in the
    OME-XML only (PhysicalSizeX/Y): before, 'has no microns-per-pixel metadata' for any card
    with input.mpp."""
    coarse = level0[:2966, :2220].reshape(1483, 2, 1110, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    path = tmp_path / "exported.ome.tif"
    metadata = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
                "PhysicalSizeY": size, "PhysicalSizeYUnit": unit}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(level0, tile=(256, 256), photometric="rgb", subifds=1, metadata=metadata)
        tif.write(coarse, tile=(256, 256), photometric="rgb", subfiletype=1)
    info = inspect_slide(path)
    assert info.level_dimensions == ((2220, 2967), (1110, 1483))
    assert info.mpp_x == pytest.approx(0.25) and info.mpp_y == pytest.approx(0.25)
    assert choose_level(info, 0.5) == (1, 1.0)


def test_missing_mpp_is_an_input_error(level0, tmp_path):
    path = tmp_path / "no_resolution.tif"
    tifffile.imwrite(path, level0, tile=(240, 240), photometric="rgb")
    info = inspect_slide(path)
    assert info.mpp_x is None
    assert choose_level(info, None) == (0, 1.0)
    with pytest.raises(InputError, match="no microns-per-pixel metadata.*needs 0.5 µm/px") as caught:
        choose_level(info, 0.5)
    assert caught.value.path == str(path)


def test_tissue_mask(slide):
    info = inspect_slide(slide)
    mask = tissue_mask(str(slide), 8)
    assert mask.dtype == bool
    assert mask.shape == mask_shape(working_shape(info, 0, 1.0), 8) == (371, 278)
    assert 0.2 < mask.mean() < 0.8
    # Glass is white: the cells called tissue are much darker and more saturated than the rest.
    with tifffile.TiffFile(slide) as tif:
        grey = tif.pages[0].asarray()[:2960, :2216].mean(axis=2).reshape(370, 8, 277, 8).mean(axis=(1, 3))
    assert grey[mask[:370, :277]].mean() < grey[~mask[:370, :277]].mean() - 25
    grid = TileGrid(working_shape(info, 0, 1.0), 256, 0.25)
    kept = tiles_with_data(grid, mask, 8)
    assert 0 < len(kept) < len(grid)


def test_tissue_mask_on_a_resampled_working_image(slide):
    info = inspect_slide(slide)
    mask = tissue_mask(str(slide), 16, level=0, scale=2.0)
    assert mask.shape == mask_shape(working_shape(info, 0, 2.0), 16) == (93, 70)
    full = tissue_mask(str(slide), 32)  # the same cells in level-0 pixels
    assert (mask == full).mean() > 0.97


def test_tissue_mask_needs_a_pyramid(slide):
    with pytest.raises(InputError, match="no pyramid level small enough") as caught:
        tissue_mask(str(slide), 64, max_pixels=1_000_000)
    assert caught.value.path == str(slide)


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_slide_is_an_input_error(slide, tmp_path, keep):
    data = slide.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: int(len(data) * keep)])
    for call in (
        lambda: inspect_slide(path),
        lambda: read_slide_box(str(path), 0, Box((0, 0), (240, 240))),
        lambda: tissue_mask(str(path), 8),
    ):
        with pytest.raises(InputError, match="not a readable slide") as caught:
            call()
        assert caught.value.path == str(path)


def test_not_a_slide_is_an_input_error(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("not a slide\n" * 100)
    with pytest.raises(InputError, match="not a readable slide"):
        inspect_slide(path)
    with pytest.raises(InputError, match="no such file"):
        inspect_slide(tmp_path / "missing.svs")
