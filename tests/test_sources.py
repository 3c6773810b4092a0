"""Every kind of source through `segpipe segment`: a real CT volume to NIfTI with its affine and
mm³, a real whole-slide image to OME-Zarr labels with µm², tissue detection skipping glass."""


import dataclasses
import json

import nibabel as nib
import rasterio
import numpy as np
import pytest
import yaml
import zarr

from flows.cli import main
from pipelines.errors import InputError
from pipelines.sources.slide import choose_level, inspect_slide, working_shape
from pipelines.stats import read_stats, read_table
from pipelines.tiling import Box
from pipelines.sources.volume import inspect_volume, read_volume_box
from test_stitching import conv_net, reference_labels, torchscript_card
from training import CT_VOLUME, SLIDE, shared_data



def test_a_volume_comes_back_as_nifti_with_the_source_affine(ray_cluster, tmp_path, capsys):
    ct = shared_data(CT_VOLUME)
    card = torchscript_card(tmp_path, conv_net(3, 1, 4), 3, 1, 4, tile=16, overlap=0.5)
    assert main(["segment", str(ct), "--model", str(card), "--out", str(tmp_path / "out"), "--block", "32"]) == 0
    written = nib.load(tmp_path / "out" / "example_ct_sm" / "labels.nii.gz")
    source = nib.load(ct)
    np.testing.assert_array_equal(written.affine, source.affine)
    assert written.shape == source.shape
    info = inspect_volume(ct)
    volume = read_volume_box(ct, Box((0, 0, 0), info.shape))
    expected = reference_labels(card, volume)  # (D, H, W)
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), expected)
    stats = read_stats(tmp_path / "out" / "stats").to_pylist()
    assert sum(r["pixel_count"] for r in stats) == volume[0].size
    for row in stats:
        assert row["area_unit"] == "mm3" and row["area"] == pytest.approx(row["pixel_count"] * 27.0)
    assert (tmp_path / "out" / "example_ct_sm" / "preview.png").exists()


def test_a_slide_comes_back_as_ome_zarr_labels_in_square_microns(ray_cluster, tmp_path, capsys):
    slide_path = shared_data(SLIDE)
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    card_path = torchscript_card(tmp_path, conv_net(2, 3, 2), 2, 3, 2, tile=128, name="slide-net")
    card = yaml.safe_load(card_path.read_text())
    card["input"].update(scale=1 / 255, mean=[0.5] * 3, std=[0.25] * 3, mpp=1.0)
    card_path.write_text(yaml.safe_dump(card))
    # A QuPath annotation (GeoJSON without a CRS, in pixels of level 0): the slide's left half.
    regions = tmp_path / "annotations.geojson"
    regions.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"name": "left half"},
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1110, 0], [1110, 2967], [0, 2967], [0, 0]]]}}]}))
    assert main(["segment", str(slide_path), "--model", str(card_path), "--out", str(tmp_path / "out"), "--tiff",
                 "--regions", str(regions)]) == 0
    out = capsys.readouterr().out
    skipped = int(out.split(" skipped")[0].split()[-1])
    assert skipped > 0, "glass tiles are never sent to the model"

    labels_root = tmp_path / "out" / "CMU-1-Small-Region" / "image.ome.zarr"
    level0 = zarr.open_array(str(labels_root / "labels" / "slide-net" / "0"))[:]
    opened = list(Reader(parse_url(str(labels_root)))())  # what a viewer opening the folder gets
    assert len(opened) >= 2 and opened[0].data[0].shape == (3, *level0.shape)
    assert opened[0].data[1].shape == (3, (level0.shape[0] + 1) // 2, (level0.shape[1] + 1) // 2)
    assert any("labels" in str(node.zarr) for node in opened[1:])
    slide = inspect_slide(slide_path)
    assert level0.shape == working_shape(slide, *choose_level(slide, 1.0))  # resampled to 1.0 µm/px
    assert level0.shape == (round(2967 * slide.mpp_x), round(2220 * slide.mpp_x))
    axes = zarr.open_group(str(labels_root / "labels" / "slide-net")).attrs["ome"]["multiscales"][0]["axes"]
    assert [a.get("unit") for a in axes] == ["micrometer", "micrometer"]
    with rasterio.open(tmp_path / "out" / "CMU-1-Small-Region" / "labels.tif") as tiff:
        np.testing.assert_array_equal(tiff.read(1), level0)
    stats = read_stats(tmp_path / "out" / "stats").to_pylist()
    for row in stats:
        assert row["area_unit"] == "um2"
        assert row["area"] == pytest.approx(row["pixel_count"] * 1.0**2)
        assert row["pixel_count"] == int((level0 == row["class_id"]).sum())
    # The annotation is in level-0 pixels, the labels at 1.0 µm/px: a label pixel is in the
    # region when its centre, in level-0 pixels, is (before: taken in label pixels, the
    # annotation covered every column).
    level, scale = choose_level(slide, 1.0)
    factor = slide.level_downsamples[level] * scale
    left = (np.arange(level0.shape[1]) + 0.5) * factor < 1110
    assert 0 < left.sum() < level0.shape[1] - 500
    region_rows = read_table(tmp_path / "out" / "stats", "region_class").to_pylist()
    in_region = level0[:, left]
    assert {row["class_id"]: row["pixel_count"] for row in region_rows} == {
        class_id: int((in_region == class_id).sum()) for class_id in range(2)}


def test_bands_chosen_by_name_match_the_same_bands_by_index(ray_cluster, sentinel_scene, tmp_path, capsys):
    """The demo scene's bands carry descriptions (blue ... swir2): a card may name them."""
    by_index = torchscript_card(tmp_path, conv_net(2, 4, 3), 2, 4, 3, tile=64, name="by-index")
    card = yaml.safe_load(by_index.read_text())
    card["input"]["bands"] = [3, 2, 1, 4]
    by_index.write_text(yaml.safe_dump(card))
    card["input"]["bands"] = ["red", "Green", "blue", "nir"]
    by_name = tmp_path / "by-name.yaml"
    by_name.write_text(yaml.safe_dump(card))
    labels = {}
    for name, path in (("index", by_index), ("name", by_name)):
        assert main(["segment", str(sentinel_scene), "--model", str(path), "--out", str(tmp_path / name)]) == 0
        with rasterio.open(tmp_path / name / "sentinel2_scene" / "labels.tif") as out:
            labels[name] = out.read(1)
    np.testing.assert_array_equal(labels["index"], labels["name"])

    card["input"]["bands"] = ["red", "green", "blue", "thermal"]
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(card))
    capsys.readouterr()
    assert main(["segment", str(sentinel_scene), "--model", str(unknown), "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"segpipe: error: {sentinel_scene}: has no band named 'thermal' (its band names: blue, green, red, nir, "
        f"swir1, swir2) that card {unknown} asks for"
    )


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_a_zarr_array_is_segmented_in_place(ray_cluster, sentinel_scene, segmented_scene, tmp_path, capsys,
                                            zarr_format):
    """The scene's six bands as a plain (channel, y, x) Zarr array: read where it is, not
    ingested, same labels as the GeoTIFF run. Zarr v2 stores too (before: 'scene.zarr/zarr.json:
    no such file')."""
    with rasterio.open(sentinel_scene) as src:
        pixels = src.read()
    source = tmp_path / "scene.zarr"
    zarr.create_array(str(source), data=pixels, chunks=(6, 64, 64), zarr_format=zarr_format)
    before = sorted(p.name for p in source.rglob("*"))
    capsys.readouterr()
    assert main(["segment", str(source), "--model", "s2-cloud", "--out", str(tmp_path / "out")]) == 0
    # One note on the terminal, not a library warning: the array says nothing of its pixel size.
    assert f"note: {source} gives no physical pixel size: areas are counted in pixels (px)" in capsys.readouterr().err
    nodes = zarr.open_group(str(tmp_path / "out" / "scene" / "labels.ome.zarr" / "labels" / "s2-cloud"))
    with rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif") as reference:
        expected = reference.read(1)
    zero_is_nodata = np.all(pixels == 0, axis=0)  # a plain array has no nodata value: no pixel is masked
    assert not zero_is_nodata.any()
    np.testing.assert_array_equal(nodes["0"][:], expected)
    assert sorted(p.name for p in source.rglob("*")) == before
    assert read_stats(tmp_path / "out" / "stats").to_pylist()[0]["area_unit"] == "px"

    # `segpipe evaluate` reads the OME-Zarr labels (before: only labels.tif and labels.nii.gz),
    # as a store given by name and in an output root, with the class names of its metadata.
    references = tmp_path / "references"
    references.mkdir()
    shifted = expected.copy()
    shifted[:50] = np.where(shifted[:50] == 255, 255, (shifted[:50] + 1) % 3)
    with rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif") as reference:
        profile = dict(reference.profile, driver="GTiff")
    with rasterio.open(references / "scene.tif", "w", **profile) as target:
        target.write(shifted, 1)
    for prediction in (tmp_path / "out" / "scene" / "labels.ome.zarr", tmp_path / "out"):
        capsys.readouterr()
        assert main(["evaluate", str(prediction), "--reference", str(references if prediction.name == "out" else
                                                                     references / "scene.tif"), "--format", "json"]) == 0
        [scored] = [entry for entry in json.loads(capsys.readouterr().out) if entry["image"] == "scene"]
        rows = scored["classes"]
        assert [row["class_name"] for row in rows] == ["clear", "cloud", "shadow"]
        valid = shifted != 255
        agreeing = int((shifted[valid] == expected[valid]).sum())
        assert sum(row["true_positives"] for row in rows) == agreeing < valid.sum()


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_an_ome_zarr_image_gives_labels_in_its_units(ray_cluster, tmp_path, version):
    """OME-Zarr 0.5 (Zarr v3) and 0.4 (Zarr v2, what most tools write today: before, it failed
    with 'zarr.json: no such file')."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    from training import nuclei_halves

    x, _, _, _ = nuclei_halves()
    image = (x[0].numpy() * 200 + 20).clip(0, 255).astype(np.uint8)  # (1, 512, 256)
    root = tmp_path / "nuclei.ome.zarr"
    group = zarr.open_group(str(root), mode="w", zarr_format=3 if version == "0.5" else 2)
    write_image(image, group, axes="cyx", fmt=FormatV05() if version == "0.5" else FormatV04())
    attrs = group.attrs.asdict()
    ome = attrs["ome"] if version == "0.5" else attrs  # the image was taken at 0.5 µm per pixel
    assert ome["multiscales"][0].get("version", version) == version
    for axis in ome["multiscales"][0]["axes"][1:]:
        axis["unit"] = "micrometer"
    for dataset in ome["multiscales"][0]["datasets"]:
        scale = dataset["coordinateTransformations"][0]["scale"]
        scale[1:] = [s * 0.5 for s in scale[1:]]
    if version == "0.5":
        group.attrs["ome"] = ome
    else:
        group.attrs["multiscales"] = ome["multiscales"]
    card = torchscript_card(tmp_path, conv_net(2, 1, 2), 2, 1, 2, tile=64)
    assert main(["segment", str(root), "--model", str(card), "--out", str(tmp_path / "out")]) == 0
    labels = zarr.open_group(str(tmp_path / "out" / "nuclei" / "labels.ome.zarr" / "labels" / "net"))
    axes = labels.attrs["ome"]["multiscales"][0]["axes"]
    assert [a.get("unit") for a in axes] == ["micrometer", "micrometer"]
    level0 = labels["0"][:]
    assert level0.shape == (512, 256)
    for row in read_stats(tmp_path / "out" / "stats").to_pylist():
        assert row["area_unit"] == "um2"
        assert row["area"] == pytest.approx(int((level0 == row["class_id"]).sum()) * 0.25)


def scene_copy(sentinel_scene, path, **profile_changes):
    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read()
    profile.update(profile_changes)
    return path, profile, pixels


def test_a_scene_mask_is_honoured(ray_cluster, sentinel_scene, tmp_path):
    """An internal mask band (no nodata value) marks pixels the model must not count."""
    path, profile, pixels = scene_copy(sentinel_scene, tmp_path / "masked.tif", nodata=None)
    mask = np.full((200, 300), 255, dtype=np.uint8)
    mask[20:80, 150:260] = 0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
        dst.write_mask(mask)
    assert main(["segment", str(path), "--model", "s2-cloud", "--out", str(tmp_path / "out")]) == 0
    with rasterio.open(tmp_path / "out" / "masked" / "labels.tif") as out:
        labels = out.read(1)
    assert (labels[mask == 0] == 255).all() and (labels[mask > 0] != 255).all()
    assert sum(r["pixel_count"] for r in read_stats(tmp_path / "out" / "stats").to_pylist()) == int((mask > 0).sum())


def test_scale_and_offset_are_applied(sentinel_scene, tmp_path):
    from pipelines.model_card import load_card
    from pipelines.sources import open_source

    path, profile, pixels = scene_copy(sentinel_scene, tmp_path / "scaled.tif")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
        dst.scales = [0.5] * 6
        dst.offsets = [10.0] * 6
    # A card of scale 1 takes the file's values: raw x scale + offset.
    info = open_source(path, dataclasses.replace(load_card("s2-cloud"), scale=1.0))
    region = info.read((1, 4), Box((0, 0), (200, 300)))
    assert info.dtype == "float32" and np.isnan(info.nodata)
    valid = ~np.all(pixels == 0, axis=0)
    np.testing.assert_allclose(region[:, valid], pixels[[0, 3]][:, valid] * 0.5 + 10.0)
    # A card that scales raw values by another factor would apply a second scale: refused.
    with pytest.raises(InputError, match="declares scale 0.5 and offset 10 for the bands model card"):
        open_source(path, load_card("s2-cloud"))
