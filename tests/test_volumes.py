"""3D volume input and output on the real CT volume and its organ labels (../shared/data/volumes)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr

from pipelines.errors import InputError
from pipelines.tiling import Box
from pipelines.outputs.nifti_labels import write_labels_nifti
from pipelines.sources.volume import inspect_volume, read_volume_box, voxel_volume
from training import CT_LABELS, CT_VOLUME, shared_data



@pytest.fixture
def ct() -> Path:
    return shared_data(CT_VOLUME)


@pytest.fixture
def ct_labels() -> Path:
    return shared_data(CT_LABELS)


def as_dhw(path: Path) -> np.ndarray:
    """The whole volume through nibabel, (i, j, k) -> (D, H, W)."""
    return np.asarray(nib.load(path).dataobj).transpose(2, 1, 0)


def test_inspect_nifti_reads_shape_spacing_and_affine(ct):
    info = inspect_volume(ct)
    assert info.format == "nifti"
    assert info.shape == (30, 101, 122)
    assert info.channels == 1 and info.dtype == "int16"
    assert info.spacing == (3.0, 3.0, 3.0)
    assert info.stem == "example_ct_sm"
    nifti_affine = nib.load(ct).affine
    affine = np.array(info.affine)
    assert affine.shape == (4, 4)
    # voxel (d, h, w) and nibabel's voxel (i, j, k) = (w, h, d) are the same point in the world
    for d, h, w in [(0, 0, 0), (29, 100, 121), (7, 55, 3)]:
        np.testing.assert_array_equal(affine @ [d, h, w, 1], nifti_affine @ [w, h, d, 1])


@pytest.mark.parametrize(
    "start, stop",
    [
        ((0, 0, 0), (30, 101, 122)),
        ((2, 10, 20), (9, 50, 100)),
        ((29, 100, 121), (30, 101, 122)),
        ((10, 0, 61), (11, 101, 122)),
    ],
)
def test_region_reads_equal_slices_of_the_whole_volume(ct, start, stop):
    region = Box(start, stop)
    voxels = read_volume_box(ct, region)
    assert voxels.shape == (1, *region.shape) and voxels.dtype == np.int16
    np.testing.assert_array_equal(voxels[0], as_dhw(ct)[region.slices()])


def test_region_outside_the_volume_is_refused(ct):
    with pytest.raises(IndexError):
        read_volume_box(ct, Box((0, 0, 0), (31, 10, 10)))


@pytest.mark.parametrize("suffix, as_zarr", [(".nii.gz", True), (".nii", False)])
def test_labels_written_on_the_source_grid_round_trip(ct, ct_labels, tmp_path, suffix, as_zarr):
    source = inspect_volume(ct)
    labels = as_dhw(ct_labels)
    assert labels.dtype == np.uint8 and len(np.unique(labels)) > 10
    if as_zarr:  # slabs then follow the chunk depth: 4 planes, the last slab short
        array = zarr.create_array(
            tmp_path / "labels.zarr", shape=labels.shape, chunks=(4, 101, 122), dtype="uint8"
        )
        array[:] = labels
        labels_in = array
    else:
        labels_in = labels
    out = tmp_path / f"labels{suffix}"
    write_labels_nifti(labels_in, out, source)

    written, original = nib.load(out), nib.load(ct_labels)
    assert written.shape == original.shape == (122, 101, 30)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
    np.testing.assert_array_equal(written.affine, nib.load(ct).affine)
    np.testing.assert_array_equal(written.header.get_sform(), nib.load(ct).affine)
    np.testing.assert_allclose(written.header.get_qform(), nib.load(ct).affine, atol=1e-4)
    assert written.header["sform_code"] > 0 and written.header["qform_code"] > 0
    assert inspect_volume(out).affine == source.affine


def test_labels_of_another_shape_are_refused(ct, tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_labels_nifti(np.zeros((30, 101, 121), np.uint8), tmp_path / "x.nii.gz", inspect_volume(ct))


def test_voxel_volume_from_spacing(ct):
    assert voxel_volume(inspect_volume(ct)) == (27.0, "mm3")


@pytest.fixture
def ct_tiff(ct, tmp_path) -> Path:
    """The CT written as an ImageJ stack: 3 mm slices, 3 mm pixels (resolution in pixels per mm)."""
    path = tmp_path / "ct.tif"
    tifffile.imwrite(
        path,
        as_dhw(ct),
        imagej=True,
        resolution=(1 / 3, 1 / 3),
        metadata={"spacing": 3.0, "unit": "mm", "axes": "ZYX"},
    )
    return path


def test_tiff_stack_reads_shape_spacing_and_data(ct, ct_tiff):
    info = inspect_volume(ct_tiff)
    assert info.format == "tiff"
    assert (info.shape, info.channels, info.dtype) == ((30, 101, 122), 1, "int16")
    assert info.spacing == (3.0, 3.0, 3.0)
    np.testing.assert_array_equal(info.affine, np.diag([3.0, 3.0, 3.0, 1.0]))
    assert voxel_volume(info) == (27.0, "mm3")
    region = Box((5, 17, 40), (12, 80, 122))
    np.testing.assert_array_equal(read_volume_box(ct_tiff, region)[0], as_dhw(ct)[region.slices()])


def test_tiff_without_spacing_reports_voxels(ct, tmp_path):
    path = tmp_path / "channels.tif"
    volume = as_dhw(ct)
    tifffile.imwrite(path, np.stack([volume, volume // 2], axis=1), imagej=True, metadata={"axes": "ZCYX"})
    info = inspect_volume(path)
    assert (info.shape, info.channels, info.spacing) == ((30, 101, 122), 2, None)
    np.testing.assert_array_equal(info.affine, np.eye(4))
    assert voxel_volume(info) == (1.0, "px")
    region = Box((3, 0, 0), (5, 101, 122))
    voxels = read_volume_box(path, region)
    np.testing.assert_array_equal(voxels[0], volume[3:5])
    np.testing.assert_array_equal(voxels[1], volume[3:5] // 2)


def test_truncated_nifti_is_an_input_error_naming_the_file(ct, tmp_path):
    truncated = tmp_path / "truncated.nii.gz"
    data = ct.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated") as error:
        inspect_volume(truncated)
    assert error.value.path == str(truncated) and str(error.value).startswith(str(truncated))
    with pytest.raises(InputError) as error:
        read_volume_box(truncated, Box((0, 0, 0), (30, 101, 122)))
    assert error.value.path == str(truncated)


def test_truncated_tiff_is_an_input_error(ct_tiff, tmp_path):
    truncated = tmp_path / "truncated.tif"
    data = ct_tiff.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated") as error:
        inspect_volume(truncated)
    assert error.value.path == str(truncated)


def test_a_damaged_compressed_slice_is_an_input_error_naming_the_voxels(tmp_path):
    """The stack opens (every page is there), but one slice's deflate stream is damaged: reading
    the boxes that touch it fails with the file and the voxels, and the slices before it read."""
    voxels = np.random.default_rng(0).integers(0, 255, (8, 64, 64), dtype=np.uint8)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, voxels, compression="zlib", imagej=True, metadata={"axes": "ZYX"})
    with tifffile.TiffFile(stack) as tif:
        offset = tif.pages[4].dataoffsets[0]
    data = bytearray(stack.read_bytes())
    data[offset + 2: offset + 40] = bytes(b ^ 0xFF for b in data[offset + 2: offset + 40])
    stack.write_bytes(bytes(data))
    assert inspect_volume(stack).shape == (8, 64, 64)
    with pytest.raises(InputError) as error:
        read_volume_box(str(stack), Box((0, 0, 0), (8, 64, 64)))
    assert error.value.path == str(stack)
    assert str(error.value).startswith(f"{stack}: cannot read voxels (0, 0, 0)-(8, 64, 64) ("), str(error.value)
    np.testing.assert_array_equal(read_volume_box(str(stack), Box((0, 0, 0), (4, 64, 64)))[0], voxels[:4])


def test_garbage_with_a_nifti_name_is_an_input_error(tmp_path):
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError) as error:
        inspect_volume(garbage)
    assert error.value.path == str(garbage)


def test_unsupported_extension_is_an_input_error(ct, tmp_path):
    other = tmp_path / "example_ct_sm.mha"
    other.write_bytes(ct.read_bytes())
    with pytest.raises(InputError, match="unsupported volume format") as error:
        inspect_volume(other)
    assert error.value.path == str(other)
    with pytest.raises(InputError, match="unsupported volume format"):
        read_volume_box(other, Box((0, 0, 0), (1, 1, 1)))


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        inspect_volume(tmp_path / "absent.nii.gz")


def test_a_2d_card_given_a_volume_is_refused_before_any_work(ct, tmp_path, capsys):
    """Before: the volume was tiled in 3D and the 2D model failed on the first batch with
    conv2d's traceback."""
    from flows.cli import main
    from test_stitching import conv_net, torchscript_card

    card = torchscript_card(tmp_path, conv_net(2, 1, 2), 2, 1, 2, 32)
    out = tmp_path / "out"
    assert main(["segment", str(ct), "--model", str(card), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"segpipe: error: {ct}: is a 3D volume (122 x 101 x 30) but model card {card} segments 2D images "
                   f"(spatial_dims: 2)"], err
    assert not out.exists()
