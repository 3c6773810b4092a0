"""`segpipe evaluate` reads references as users have them: another integer type with its own
nodata value, floating point with NaN, NIfTI volumes stored as floats or with a fourth axis of
one; and refuses, naming the file and the first pixel, what holds no class ids (a colour mask,
fractions, values above 255 or below 0) instead of casting it into classes."""

import json

import nibabel as nib
import numpy as np
import pytest
import rasterio

from flows.cli import main
from pipelines.errors import InputError
from pipelines.evaluation import evaluate
from training import CT_LABELS, shared_data


def write_like(template, path, array, **changes):
    """`array` as a GeoTIFF on the grid of the raster `template`."""
    with rasterio.open(template) as source:
        profile = {"driver": "GTiff", "height": source.height, "width": source.width, "crs": source.crs,
                   "transform": source.transform}
    count = 1 if array.ndim == 2 else array.shape[0]
    profile.update({"count": count, "dtype": array.dtype, "nodata": None, **changes})
    with rasterio.open(path, "w", **profile) as target:
        target.write(array if array.ndim == 3 else array[None])
    return path


@pytest.fixture(scope="module")
def predicted(segmented_scene, tmp_path_factory):
    """The segmented scene's labels.tif, and a reference that differs from it: class ids shifted
    in a band of rows, so the confusion has more than one cell."""
    labels = segmented_scene / "sentinel2_scene" / "labels.tif"
    with rasterio.open(labels) as source:
        values = source.read(1)
    reference = values.copy()
    reference[60:90] = (reference[60:90] + 1) % 3
    return labels, reference


def confusion_of(prediction, reference):
    return evaluate(prediction, reference).confusion


def test_the_references_own_nodata_and_nan_are_left_out_like_255(predicted, tmp_path):
    labels, reference = predicted
    unlabelled = np.zeros(reference.shape, dtype=bool)
    unlabelled[10:25] = True
    unlabelled[:, 200:230] = True
    with_255 = np.where(unlabelled, 255, reference).astype(np.uint8)
    expected = confusion_of(labels, write_like(labels, tmp_path / "uint8.tif", with_255))
    assert 0 < expected.sum() < (~unlabelled).sum() + 1 and expected.sum() == (~unlabelled & (reference != 255)).sum()
    assert np.count_nonzero(expected - np.diag(np.diag(expected))) > 0  # the shifted rows disagree

    int16 = np.where(unlabelled, -1, reference.astype(np.int16))
    assert (confusion_of(labels, write_like(labels, tmp_path / "int16.tif", int16, nodata=-1)) == expected).all()
    uint16 = np.where(unlabelled, 9999, reference.astype(np.uint16))
    assert (confusion_of(labels, write_like(labels, tmp_path / "u16.tif", uint16, nodata=9999)) == expected).all()
    floats = np.where(unlabelled, np.nan, reference.astype(np.float32))
    assert (confusion_of(labels, write_like(labels, tmp_path / "nan.tif", floats)) == expected).all()
    floats_nodata = np.where(unlabelled, -3.5, reference.astype(np.float64))
    nodata_path = write_like(labels, tmp_path / "f64.tif", floats_nodata, nodata=-3.5)
    assert (confusion_of(labels, nodata_path) == expected).all()


@pytest.mark.parametrize("kind", ["above 255", "below 0", "fraction"])
def test_values_that_are_no_class_ids_are_refused_naming_the_first_pixel(predicted, tmp_path, capsys, kind):
    labels, reference = predicted
    if kind == "fraction":
        values = reference.astype(np.float32)
        values[120, 33:40] = 0.5  # a probability map, or labels resampled with bilinear interpolation
        value, why = "0.5", "not a whole number: class ids are integers"
    else:
        values = reference.astype(np.int16)
        values[120, 33:40] = 300 if kind == "above 255" else -2
        value, why = ("300" if kind == "above 255" else "-2"), "not a class id (0-254; 255 = not labelled)"
    path = write_like(labels, tmp_path / "reference.tif", values, nodata=-1 if kind == "above 255" else None)
    code = main(["evaluate", str(labels), "--reference", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"segpipe: error: {path}: holds the value {value} at row 120, column 33 (and at least 6 more): "
                   f"{why}"]


def test_a_colour_mask_is_refused_not_read_as_its_red_band(predicted, tmp_path, capsys):
    labels, reference = predicted
    palette = np.array([[0, 0, 0], [255, 255, 255], [90, 90, 90]], dtype=np.uint8)
    colours = np.moveaxis(palette[np.minimum(reference, 2)], -1, 0)
    path = write_like(labels, tmp_path / "colours.tif", colours)
    assert main(["evaluate", str(labels), "--reference", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"segpipe: error: {path}: has 3 bands: a labels raster is one band of class ids (a colour-coded mask must "
        f"first be turned into class ids; `gdal_translate -b N` takes one band)")


def test_nifti_references_as_floats_or_with_a_fourth_axis_of_one(tmp_path):
    organs = shared_data(CT_LABELS)
    volume = nib.load(organs)
    ids = np.asarray(volume.dataobj).astype(np.uint8)
    itself = evaluate(organs, organs)
    assert itself.confusion.sum() == (ids != 255).sum()
    assert (itself.confusion == np.diag(np.diag(itself.confusion))).all()
    assert len(itself.class_names) == int(ids.max()) + 1

    as_floats = tmp_path / "floats.nii.gz"
    nib.save(nib.Nifti1Image(ids.astype(np.float32), volume.affine), as_floats)
    assert (evaluate(organs, as_floats).confusion == itself.confusion).all()
    one_more_axis = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(ids[..., None], volume.affine), one_more_axis)
    assert (evaluate(organs, one_more_axis).confusion == itself.confusion).all()

    one_hot = tmp_path / "one_hot.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([ids == 0, ids != 0], axis=-1).astype(np.uint8), volume.affine), one_hot)
    with pytest.raises(InputError) as refused:
        evaluate(organs, one_hot)
    assert str(refused.value).startswith(f"{one_hot}: is a 4D volume ({', '.join(map(str, ids.shape))}, 2): a labels "
                                         f"volume is 3D")
    resampled = tmp_path / "resampled.nii.gz"
    fractions = ids.astype(np.float32)
    fractions[40, 50, 12] = 2.25
    nib.save(nib.Nifti1Image(fractions, volume.affine), resampled)
    with pytest.raises(InputError, match=r"holds the value 2\.25 at voxel \(40, 50, 12\): not a whole number"):
        evaluate(organs, resampled)


def test_a_nifti_is_compared_with_a_tiff_stack_or_zarr_volume_axis_for_axis(tmp_path):
    """A NIfTI's (i, j, k) are the (x, y, z) of a TIFF stack's or Zarr array's (z, y, x), as
    segpipe writes a stack's labels. Before, GDAL read the stack's first page (the grids
    differed) and a Zarr volume was refused."""
    import tifffile
    import zarr

    organs = shared_data(CT_LABELS)
    zyx = np.asarray(nib.load(organs).dataobj).astype(np.uint8).transpose(2, 1, 0)
    itself = evaluate(organs, organs).confusion
    changed = zyx.copy()
    z, y, x = 20, 54, 86  # one voxel of the liver made spleen: its (i, j, k) is (86, 54, 20)
    assert (changed[z, y, x], changed[z, y, x + 1]) == (5, 5)
    changed[z, y, x] = 1
    stack, array = tmp_path / "organs.tif", tmp_path / "organs.zarr"
    tifffile.imwrite(stack, changed)
    zarr.create_array(str(array), data=changed, chunks=(8, 64, 64))
    expected = itself.copy()
    expected[5, 5] -= 1
    expected[5, 1] += 1
    for reference in (stack, array):
        assert (evaluate(reference, organs).confusion == expected).all()  # rows: the reference
        assert (evaluate(organs, reference).confusion == expected.T).all()

    wide = changed.astype(np.uint16)
    wide[z, y, x] = 300
    tifffile.imwrite(stack, wide)
    with pytest.raises(InputError, match=r"organs.tif: holds the value 300 at voxel \(20, 54, 86\)"):
        evaluate(organs, stack)


def test_the_same_grid_written_by_another_tool_is_the_same_grid(predicted, tmp_path):
    """A reference saved with an ESRI .prj's WKT of the same CRS (no EPSG code) and its origin
    rounded by another writer was refused as 'another CRS or transform'; half a pixel off is
    another grid still."""
    from affine import Affine
    from rasterio.crs import CRS

    scene_labels, reference = predicted
    with rasterio.open(scene_labels) as source:
        values, transform = source.read(1), source.transform
    # A projection without an EPSG code (a national Lambert conformal conic), as GDAL writes its
    # WKT and as an ESRI .prj does: the same CRS, in words that differ.
    lambert = CRS.from_proj4("+proj=lcc +lat_1=33 +lat_2=45 +lat_0=39 +lon_0=-96 +datum=WGS84 +units=m +no_defs")
    esri = CRS.from_wkt(lambert.to_wkt(version="WKT1_ESRI"))
    assert str(esri) != str(lambert) and esri == lambert
    labels = write_like(scene_labels, tmp_path / "labels.tif", values, crs=lambert)
    nudged = Affine(transform.a, 0, transform.c + 1e-7, 0, transform.e, transform.f - 1e-7)
    same = write_like(scene_labels, tmp_path / "same.tif", reference, crs=esri, transform=nudged)
    exact = write_like(scene_labels, tmp_path / "exact.tif", reference, crs=lambert)
    assert (confusion_of(labels, same) == confusion_of(labels, exact)).all()
    shifted = write_like(scene_labels, tmp_path / "shifted.tif", reference, crs=lambert,
                         transform=Affine(transform.a, 0, transform.c + transform.a / 2, 0, transform.e, transform.f))
    with pytest.raises(InputError, match="is not on the grid of the reference"):
        evaluate(labels, shifted)


def test_training_reads_a_labels_files_own_nodata_and_nan_as_not_labelled(predicted, sentinel_scene, tmp_path):
    """segpipe train's labels go through the same reading: the file's nodata value and NaN are not
    labelled (255), whatever the file's type, so training and evaluate count the same pixels."""
    import zarr

    from flows.training_run import probe_card
    from pipelines.model_card import ClassInfo
    from pipelines.training_data import TrainingPair, prepare_pair

    labels, reference = predicted
    card = probe_card(tuple(ClassInfo(i, name, (i * 80, 0, 0)) for i, name in enumerate(("clear", "cloud", "shadow"))))
    unlabelled = np.zeros(reference.shape, dtype=bool)
    unlabelled[30:70, 100:180] = True
    variants = {
        "uint8": np.where(unlabelled, 255, reference).astype(np.uint8),
        "int16": np.where(unlabelled, -1, reference.astype(np.int16)),
        "float32": np.where(unlabelled, np.nan, reference.astype(np.float32)),
    }
    prepared = {}
    for name, values in variants.items():
        path = write_like(labels, tmp_path / f"{name}.tif", values, **({"nodata": -1} if name == "int16" else {}))
        prepared[name] = prepare_pair(TrainingPair(str(sentinel_scene), str(path)), card, str(tmp_path / name))
    expected = tuple(int((variants["uint8"] == c).sum()) for c in range(3))
    assert all(p.class_pixels == expected for p in prepared.values()), {n: p.class_pixels for n, p in prepared.items()}
    stored = {n: np.asarray(zarr.open_array(p.label_store, mode="r")[0]) for n, p in prepared.items()}
    assert all((s == stored["uint8"]).all() for s in stored.values())
    assert (stored["uint8"][unlabelled] == 255).all()


def test_training_refuses_a_colour_mask(predicted, sentinel_scene, tmp_path):
    from flows.training_run import probe_card
    from pipelines.model_card import ClassInfo
    from pipelines.training_data import TrainingPair, prepare_pair

    labels, reference = predicted
    card = probe_card((ClassInfo(0, "clear", (0, 0, 0)), ClassInfo(1, "cloud", (255, 255, 255))))
    colours = np.repeat(np.where(reference == 1, 255, 0).astype(np.uint8)[None], 3, axis=0)
    path = write_like(labels, tmp_path / "colours.tif", colours)
    with pytest.raises(InputError) as refused:
        prepare_pair(TrainingPair(str(sentinel_scene), str(path)), card, str(tmp_path / "prepared"))
    assert str(refused.value) == (f"{path}: has 3 bands: a labels raster is one band of class ids (a colour-coded "
                                  f"mask must first be turned into class ids)")


def test_label_files_on_object_storage_name_their_classes_and_are_evaluated(s3_server, predicted, tmp_path):
    """segpipe train --labels s3://... takes the class names from the label files themselves
    (before: 'no such file' unless --classes was given); evaluate reads s3:// rasters and volumes."""
    import boto3

    from pipelines.training_data import TrainingPair, label_classes

    labels, reference = predicted
    bucket = "segpipe-label-files"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(labels), bucket, "masks/scene.tif")
    s3.upload_file(f"{labels}.aux.xml", bucket, "masks/scene.tif.aux.xml")
    plain = write_like(labels, tmp_path / "plain.tif", reference.astype(np.uint8))
    s3.upload_file(str(plain), bucket, "plain/scene.tif")

    named = label_classes([TrainingPair("s3://x/scene.tif", f"s3://{bucket}/masks/scene.tif")])
    assert [c.name for c in named] == ["clear", "cloud", "shadow"]
    assert named == label_classes([TrainingPair("scene.tif", str(labels))])  # the same names and colours as locally
    numbered = label_classes([TrainingPair("s3://x/scene.tif", f"s3://{bucket}/plain/scene.tif")])
    assert [c.name for c in numbered] == [f"class{i}" for i in range(int(reference.max()) + 1)]

    on_s3 = evaluate(f"s3://{bucket}/masks/scene.tif", plain)
    assert (on_s3.confusion == evaluate(labels, plain).confusion).all()
    assert on_s3.class_names == ("clear", "cloud", "shadow")
    organs = shared_data(CT_LABELS)
    s3.upload_file(str(organs), bucket, "volumes/organs.nii.gz")
    volume_on_s3 = evaluate(f"s3://{bucket}/volumes/organs.nii.gz", organs)
    assert (volume_on_s3.confusion == evaluate(organs, organs).confusion).all()


def test_evaluate_takes_an_output_root_and_references_on_object_storage(s3_server, predicted, tmp_path, capsys):
    """`segpipe evaluate s3://.../root --reference s3://.../refs --out s3://...`: the image folders
    of a root on object storage against references there, as for a local root (before: 'no such
    labels file or output root' for anything on s3://)."""
    import io

    import boto3
    import pyarrow.parquet as pq

    labels, reference = predicted
    bucket = "segpipe-evaluated-root"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    local_root, local_refs = tmp_path / "root", tmp_path / "refs"
    (local_root / "sentinel2_scene").mkdir(parents=True)
    (local_root / "stats").mkdir()
    local_refs.mkdir()
    for name in ("labels.tif", "labels.tif.aux.xml"):
        (local_root / "sentinel2_scene" / name).write_bytes((labels.parent / name).read_bytes())
        s3.upload_file(str(labels.parent / name), bucket, f"root/sentinel2_scene/{name}")
    (local_root / "stats" / "x.parquet").write_bytes(b"not labels")
    s3.upload_file(str(local_root / "stats" / "x.parquet"), bucket, "root/stats/x.parquet")
    mask = write_like(labels, local_refs / "sentinel2_scene_mask.tif", reference.astype(np.uint8))
    s3.upload_file(str(mask), bucket, "refs/sentinel2_scene_mask.tif")

    def evaluated(*arguments: str) -> list:
        capsys.readouterr()
        assert main(["evaluate", *arguments, "--format", "json"]) == 0
        return json.loads(capsys.readouterr().out)

    here = evaluated(str(local_root), "--reference", str(local_refs))
    there = evaluated(f"s3://{bucket}/root", "--reference", f"s3://{bucket}/refs", "--out", f"s3://{bucket}/scores")
    assert there == here and len(here) > 0
    written = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key="scores/evaluation.parquet")["Body"].read()))
    assert set(written["image"].to_pylist()) == {"sentinel2_scene"}
    one_file = evaluated(f"s3://{bucket}/root/sentinel2_scene/labels.tif", "--reference", str(mask))
    assert one_file == here
    capsys.readouterr()
    assert main(["evaluate", f"s3://{bucket}/nothing-here", "--reference", str(local_refs)]) == 2
    assert "nothing-here: no such labels file or output root" in capsys.readouterr().err
