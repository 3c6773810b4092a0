"""Right answers on the images users have: the built-in cards and the demo's data, slide glass as
nodata, images without georeferencing (plain TIFF, OME-TIFF, PNG), 1- and 2-band cards,
undeclared nodata, 4D NIfTI, and STAC catalogues."""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import torch
import yaml
from rio_cogeo.cogeo import cog_validate
from torch import nn

from flows.archive_flow import run_night
from flows.cli import main
from flows.demo_scene import BANDS
from pipelines.errors import InputError
from pipelines.model_card import builtin_card_names, load_card
from pipelines.sources.image import inspect_image, read_image_box
from pipelines.stats import read_table
from pipelines.tiling import Box
from test_stitching import conv_net, reference_labels, torchscript_card

REPO = Path(__file__).resolve().parents[1]

UKIS_MODELS = ("6b_l2a", "6b_l1c", "4b_l2a", "4b_l1c")


def per_class(root: Path, image: str) -> dict[str, int]:
    rows = read_table(root / "stats", "image_class").to_pylist()
    return {row["class_name"]: row["pixel_count"] for row in rows if row["image"] == image}


# --- the built-in cards and the demo ---------------------------------------------------------------

def test_every_model_the_package_ships_has_a_card_naming_its_processing_level():
    package = importlib.resources.files("ukis_csmask")
    cards = {load_card(name).weights.name: load_card(name) for name in builtin_card_names()}
    for model in UKIS_MODELS:
        card = cards[f"model_{model}.onnx"]
        shipped = json.loads((package / f"model_{model}.json").read_text())
        statistics = shipped["data"]["dataset_statistics"]
        assert card.version == shipped["model"]["version"]
        assert card.processing_level == model.split("_")[1].upper()
        assert list(card.band_names) == statistics["band_names"] and card.in_channels == len(statistics["band_names"])
        assert list(card.mean) == statistics["img"][0] and list(card.std) == statistics["img"][1]


def test_the_demo_card_fits_the_demo_scene_and_the_other_level_is_flagged(ray_cluster, sentinel_scene, tmp_path,
                                                                          capsys):
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "l1c")]) == 0
    counts = per_class(tmp_path / "l1c", "sentinel2_scene")
    assert counts["clear"] / sum(counts.values()) > 0.95, counts  # a cloud-free scene of arid hills
    assert "tagged processing level" not in capsys.readouterr().err

    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud", "--out", str(tmp_path / "l2a")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert any("is tagged processing level L1C, but card s2-cloud is made for L2A data" in line
               and "s2-cloud-l1c" in line for line in notes), notes


def test_an_image_smaller_than_a_fixed_tile_is_noted(ray_cluster, sentinel_scene, tmp_path, capsys):
    """s2-cloud takes 256 x 256 tiles only: a 100 x 100 crop is mostly mirror to it, and 33 % of
    its pixels got another label than inside the scene, without a word."""
    crop = tmp_path / "crop.tif"
    with rasterio.open(sentinel_scene) as source:
        window = rasterio.windows.Window(100, 0, 100, 100)
        profile = dict(source.profile, width=100, height=100, transform=source.window_transform(window))
        with rasterio.open(crop, "w", **profile) as target:
            target.write(source.read(window=window))
    for image, noted in ((crop, True), (sentinel_scene, False)):  # the scene: 300 x 200, wider than a tile
        capsys.readouterr()
        assert main(["segment", str(image), "--model", "s2-cloud-l1c", "--out", str(tmp_path / image.stem)]) == 0
        expected = (f"note: {image} is 100 x 100 px, smaller than the 256-px tile that model card s2-cloud-l1c takes "
                    "(its input size is fixed): the tile is filled by mirroring the image")
        assert (expected in capsys.readouterr().err) == noted


# --- slides: glass is nodata -------------------------------------------------------------------------

def constant_card(folder: Path, **input_fields) -> Path:
    """A model that always answers class 1 of 3, whatever it sees."""
    net = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    torch.jit.trace(net.eval(), torch.zeros(1, 3, 128, 128)).save(str(folder / "constant.ts"))
    card = {"name": "constant", "format": "torchscript", "weights": "constant.ts", "tile": {"size": 128},
            "input": {"bands": [1, 2, 3], "scale": 1 / 255, **input_fields},
            "classes": [{"id": i, "name": f"class{i}"} for i in range(3)]}
    (folder / "constant.yaml").write_text(yaml.safe_dump(card))
    return folder / "constant.yaml"


def test_slide_glass_is_nodata_and_not_counted(ray_cluster, tmp_path):
    import zarr

    from training import SLIDE, shared_data

    card = constant_card(tmp_path, mpp=1.0)
    out = tmp_path / "out"
    assert main(["segment", str(shared_data(SLIDE)), "--model", str(card), "--out", str(out)]) == 0
    labels = zarr.open_group(str(out / "CMU-1-Small-Region" / "image.ome.zarr"))["labels/constant/0"][:]
    values, counts = np.unique(labels, return_counts=True)
    assert set(values) == {1, 255}, "the model answers 1 everywhere it ran; glass it skipped is nodata"
    glass = counts[list(values).index(255)] / labels.size
    assert 0.2 < glass < 0.8
    assert per_class(out, "CMU-1-Small-Region") == {"class0": 0, "class1": int((labels == 1).sum()), "class2": 0}


# --- images without georeferencing ---------------------------------------------------------------

@pytest.fixture
def nuclei(tmp_path) -> tuple[Path, np.ndarray]:
    """The stardist nuclei image (512 x 512 uint16, a plain TIFF without georeferencing)."""
    source = importlib.resources.files("stardist") / "data" / "images" / "img2d.tif"
    path = tmp_path / "nuclei.tif"
    shutil.copy(str(source), path)
    return path, tifffile.imread(path)


def test_a_plain_tiff_is_segmented_in_its_pixel_grid(ray_cluster, nuclei, tmp_path, capsys):
    path, pixels = nuclei
    card = torchscript_card(tmp_path, conv_net(2, 1, 3), 2, 1, 3, tile=128)
    out = tmp_path / "out"
    assert main(["segment", str(path), "--model", str(card), "--out", str(out), "--block", "256"]) == 0
    err = capsys.readouterr().err
    assert f"note: {path} has no georeferencing: segmented in pixel coordinates, areas in pixels" in err
    assert "Warning" not in err.replace("FutureWarning", ""), "a note, not a library warning dump"
    with rasterio.open(out / "nuclei" / "labels.tif") as labels:
        assert labels.crs is None and (labels.height, labels.width) == pixels.shape
        assert labels.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        # Pyramidal down to one 512-pixel tile: this 512 x 512 image is that tile already.
        assert labels.overviews(1) == [] and labels.block_shapes[0] == (512, 512)
        written = labels.read(1)
    assert cog_validate(str(out / "nuclei" / "labels.tif"), strict=True)[0]
    np.testing.assert_array_equal(written, reference_labels(card, pixels[None]))
    rows = read_table(out / "stats", "image_class").to_pylist()
    assert {row["area_unit"] for row in rows} == {"px"} and sum(row["pixel_count"] for row in rows) == pixels.size


NO_WARNING_DUMP = """
import sys
from pathlib import Path
import numpy as np
import zarr
from pipelines.model_card import load_card
from pipelines.outputs.labels_cog import write_labels_cog
from pipelines.sources import open_source
from pipelines.tiling import Box

card = load_card(sys.argv[2])
source = open_source(sys.argv[1], card)
pixels = source.read((1,), Box((0, 0), source.shape))
labels = zarr.create_array(store=sys.argv[3] + "/labels.zarr", shape=source.shape, dtype="uint8", chunks=(256, 256),
                           shards=(512, 512))
labels[:] = (pixels[0] > np.median(pixels)).astype("uint8")
write_labels_cog(labels, Path(sys.argv[3]) / "labels.tif", None, None, card.classes)
"""


def test_an_image_without_georeferencing_is_read_and_written_without_gdals_warning_dump(nuclei, tmp_path):
    """In a process of its own, as the CLI runs: pytest's own warning capture would hide it."""
    path, _ = nuclei
    card = torchscript_card(tmp_path, conv_net(2, 1, 3), 2, 1, 3, tile=128)
    done = subprocess.run([sys.executable, "-c", NO_WARNING_DUMP, str(path), str(card), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr.replace("FutureWarning", ""), done.stderr
    with rasterio.open(tmp_path / "labels.tif") as written:
        assert written.crs is None and written.read(1).any()


def test_an_ome_tiff_gives_channels_by_name_and_areas_in_square_microns(ray_cluster, nuclei, tmp_path):
    _, pixels = nuclei
    ome = tmp_path / "cells.ome.tif"
    two_channels = np.stack([pixels, pixels[::-1]])
    tifffile.imwrite(ome, two_channels, ome=True, metadata={
        "axes": "CYX", "Channel": {"Name": ["membrane", "DAPI"]}, "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25,
        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    card_path = torchscript_card(tmp_path, conv_net(2, 1, 3), 2, 1, 3, tile=128)
    card = yaml.safe_load(card_path.read_text())
    card["input"]["bands"] = ["dapi"]  # by the channel's name, any case
    card_path.write_text(yaml.safe_dump(card))
    out = tmp_path / "out"
    assert main(["segment", str(ome), "--model", str(card_path), "--out", str(out)]) == 0
    with rasterio.open(out / "cells" / "labels.tif") as labels:
        written = labels.read(1)
        assert labels.tags()["TIFFTAG_RESOLUTIONUNIT"].startswith("3")  # pixels per centimetre
        assert float(labels.tags()["TIFFTAG_XRESOLUTION"]) == pytest.approx(1e4 / 0.25)
    np.testing.assert_array_equal(written, reference_labels(card_path, pixels[::-1][None]))
    rows = read_table(out / "stats", "image_class").to_pylist()
    assert {row["area_unit"] for row in rows} == {"um2"}
    assert sum(row["area"] for row in rows) == pytest.approx(pixels.size * 0.25 * 0.25)


def test_a_cut_tiled_tiff_names_the_rows_it_cannot_read(nuclei, tmp_path):
    """A microscopy TIFF read through tifffile (not GDAL), cut after its directory: the window that reaches
    the missing tiles is an InputError naming the file, the rows and columns, and the reason."""
    _, pixels = nuclei
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, pixels, tile=(64, 64), compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    info = inspect_image(str(cut))
    assert info.reader == "tifffile", "the directory is before the cut"
    height, width = info.shape
    with pytest.raises(InputError) as caught:
        read_image_box(info, (1,), Box((0, 0), (height, width)))
    assert caught.value.path == str(cut)
    assert str(caught.value).startswith(f"{cut}: cannot read rows 0:{height}, cols 0:{width} ("), str(caught.value)
    first_tile = read_image_box(info, (1,), Box((0, 0), (64, 64)))  # before the cut: read as written
    np.testing.assert_array_equal(first_tile, pixels[None, :64, :64])


def test_a_png_and_a_scene_without_a_crs_are_plain_images(ray_cluster, sentinel_scene, tmp_path, capsys):
    import skimage.data

    png = Path(skimage.data.__file__).parent / "ihc.png"
    card = torchscript_card(tmp_path, conv_net(2, 3, 3), 2, 3, 3, tile=128)
    assert main(["segment", str(png), "--model", str(card), "--out", str(tmp_path / "out")]) == 0
    with rasterio.open(tmp_path / "out" / "ihc" / "labels.tif") as labels, rasterio.open(png) as source:
        assert (labels.height, labels.width) == (source.height, source.width)

    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read()
    del profile["crs"]
    scene = tmp_path / "nocrs.tif"
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    capsys.readouterr()
    assert main(["segment", str(scene), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "out")]) == 0
    assert f"note: {scene} has no georeferencing" in capsys.readouterr().err
    with rasterio.open(tmp_path / "out" / "nocrs" / "labels.tif") as labels:
        assert labels.crs is None and labels.shape == pixels.shape[1:]


def test_a_palette_image_is_read_as_its_colours(ray_cluster, tmp_path):
    """A GIF, a palette PNG or a palette TIFF stores indices into a colour table: the model read
    the indices (the order in which the writer listed the colours) as if they were intensities.
    They now give the labels and preview of the same picture in RGB; a palette PNG as a training
    label keeps its indices (VOC's masks store class ids so)."""
    import skimage.data
    from PIL import Image

    cat = Image.open(Path(skimage.data.__file__).parent / "chelsea.png").convert("RGB").quantize(200)
    cat.convert("RGB").save(tmp_path / "rgb.png")
    cat.save(tmp_path / "palette.png")
    cat.save(tmp_path / "palette.gif")
    cat.save(tmp_path / "palette.tif")
    assert not (np.asarray(cat)[..., None] == np.asarray(cat.convert("RGB"))).all(axis=2).all()  # indices != colours
    card = torchscript_card(tmp_path, conv_net(2, 3, 3), 2, 3, 3, tile=128)
    outputs = {}
    for name in ("rgb.png", "palette.png", "palette.gif", "palette.tif"):
        assert main(["segment", str(tmp_path / name), "--model", str(card), "--out", str(tmp_path / name[-3:])]) == 0
        folder = tmp_path / name[-3:] / name.split(".")[0]
        outputs[name] = [(folder / file).read_bytes() for file in ("labels.tif", "preview.png")]
    assert outputs["palette.png"] == outputs["palette.gif"] == outputs["palette.tif"] == outputs["rgb.png"]
    info = inspect_image(str(tmp_path / "palette.png"))
    assert (info.channels, info.channel_names, info.indices().channels) == (3, ("red", "green", "blue"), 1)
    indices = read_image_box(info.indices(), (1,), Box((0, 0), (40, 50)))[0]
    np.testing.assert_array_equal(indices, np.asarray(cat)[:40, :50])


def test_transparent_pixels_of_an_rgba_image_are_nodata(ray_cluster, tmp_path, capsys):
    """An RGBA PNG or TIFF (a drone export, a picture with its background cut out): its
    transparent pixels were segmented as black ones and counted; they are nodata now, as a
    GeoTIFF's alpha mask is."""
    import skimage.data
    from PIL import Image

    rgba = np.asarray(Image.open(Path(skimage.data.__file__).parent / "ihc.png").convert("RGBA")).copy()
    rgba[:100, :, 3] = 0  # the top 100 rows transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    tifffile.imwrite(tmp_path / "cut.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    card = torchscript_card(tmp_path, conv_net(2, 3, 3), 2, 3, 3, tile=128)
    for name in ("cut.png", "cut.tif"):
        capsys.readouterr()
        out = tmp_path / name.replace(".", "-")
        assert main(["segment", str(tmp_path / name), "--model", str(card), "--out", str(out), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["valid_pixels"] == rgba.shape[0] * rgba.shape[1] - 100 * rgba.shape[1]
        with rasterio.open(out / "cut" / "labels.tif") as labels:
            written = labels.read(1)
        assert (written[:100] == 255).all() and (written[100:] != 255).all()
    # Opaque everywhere (a picture saved as RGBA): its alpha says nothing, black stays a colour.
    rgba[:, :, 3] = 255
    rgba[:20, :20, :3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    assert inspect_image(str(tmp_path / "opaque.png")).alpha is None
    assert main(["segment", str(tmp_path / "opaque.png"), "--model", str(card), "--out", str(tmp_path / "o")]) == 0
    with rasterio.open(tmp_path / "o" / "opaque" / "labels.tif") as labels:
        assert (labels.read(1) != 255).all()


def test_a_stack_of_planes_without_georeferencing_says_it_is_a_stack(nuclei, tmp_path, capsys):
    """A z-stack given to a 2D card is an image of the wrong dimension, not a scene without a CRS."""
    path, pixels = nuclei
    stack = tmp_path / "zstack.tif"
    tifffile.imwrite(stack, np.stack([pixels[:64, :64]] * 3), metadata={"axes": "ZYX"})
    card = torchscript_card(tmp_path, conv_net(2, 1, 2), 2, 1, 2, tile=32)
    assert main(["segment", str(stack), "--model", str(card), "--out", str(tmp_path / "out")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith(f"segpipe: error: {stack}: is a stack") and "spatial_dims: 3" in line, line


# --- band counts and previews --------------------------------------------------------------------

@pytest.mark.parametrize("bands", [[4], [4, 5]])
def test_one_and_two_band_cards_get_a_preview(bands, ray_cluster, sentinel_scene, tmp_path):
    from PIL import Image

    card = torchscript_card(tmp_path, conv_net(2, len(bands), 3), 2, len(bands), 3, tile=64)
    content = yaml.safe_load(card.read_text())
    content["input"]["bands"] = bands
    for entry in content["classes"]:  # grey classes: what is not grey in the picture is the image's colour
        entry["color"] = "#808080"
    card.write_text(yaml.safe_dump(content))
    assert main(["segment", str(sentinel_scene), "--model", str(card), "--out", str(tmp_path / "out")]) == 0
    preview = Image.open(tmp_path / "out" / "sentinel2_scene" / "preview.png")
    assert preview.mode == "RGB" and preview.width == 300
    picture = np.asarray(preview)[:200].astype(int)  # above the legend
    grey = (np.abs(picture[..., 0] - picture[..., 1]) <= 1) & (np.abs(picture[..., 1] - picture[..., 2]) <= 1)
    # One band: grey; two: false colour.
    assert grey.mean() > 0.95 if len(bands) == 1 else grey.mean() < 0.5


def test_a_preview_that_fails_never_fails_the_image(ray_cluster, sentinel_scene, tmp_path, monkeypatch, caplog):
    from pipelines.outputs import preview

    def broken(*arguments, **keywords):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(preview, "render_preview", broken)
    out = tmp_path / "out"
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud-l1c", "--out", str(out)]) == 0
    assert (out / "sentinel2_scene" / "labels.tif").is_file() and not (out / "sentinel2_scene" / "preview.png").exists()
    assert any("no preview.png" in record.getMessage() for record in caplog.records)
    [record] = [json.loads(p.read_text()) for p in (out / ".manifest").glob("*.json")]
    assert [Path(p).name for p in record["outputs"]] == ["labels.tif"]


# --- nodata a file does not declare ----------------------------------------------------------------

def test_a_nodata_value_the_file_does_not_declare(ray_cluster, sentinel_scene, tmp_path):
    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read()
    pixels[:, :20, :] = 0  # a zero border, and no nodata tag
    profile.pop("nodata")
    scene = tmp_path / "border.tif"
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    undeclared, declared = tmp_path / "undeclared", tmp_path / "declared"
    assert main(["segment", str(scene), "--model", "s2-cloud-l1c", "--out", str(undeclared)]) == 0
    assert main(["segment", str(scene), "--model", "s2-cloud-l1c", "--out", str(declared), "--nodata", "0"]) == 0
    assert sum(per_class(undeclared, "border").values()) == 200 * 300, "the border is counted as land"
    assert sum(per_class(declared, "border").values()) == 180 * 300
    with rasterio.open(declared / "border" / "labels.tif") as labels:
        assert (labels.read(1)[:20] == 255).all()

    card = yaml.safe_load(Path(load_card("s2-cloud-l1c").source).read_text())
    card["weights"] = str(load_card("s2-cloud-l1c").weights)
    card["input"]["nodata"] = 0
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(card))
    by_card = tmp_path / "by-card"
    assert main(["segment", str(scene), "--model", str(tmp_path / "card.yaml"), "--out", str(by_card)]) == 0
    assert per_class(by_card, "border") == per_class(declared, "border")

    # The model sees the declared nodata as the bands' means, not as zeros: the labels are those
    # of the scene with its border at the means (float32, so the means are exact).
    card = load_card("s2-cloud-l1c")
    means = (np.asarray(card.mean, np.float32) / np.float32(card.scale)).astype(np.float32)
    at_means = pixels.astype(np.float32)
    at_means[:, :20, :] = means[:, None, None]
    profile.update(dtype="float32")
    with rasterio.open(tmp_path / "means.tif", "w", **profile) as dst:
        dst.write(at_means)
    assert main(["segment", str(tmp_path / "means.tif"), "--model", "s2-cloud-l1c", "--out", str(declared)]) == 0
    with rasterio.open(declared / "border" / "labels.tif") as labels, \
            rasterio.open(declared / "means" / "labels.tif") as expected:
        np.testing.assert_array_equal(labels.read(1)[20:], expected.read(1)[20:])


def test_a_scene_declaring_the_sentinel2_offset_is_read_in_the_cards_units(segmented_scene, sentinel_scene, tmp_path,
                                                                             capsys):
    """Sentinel-2 products of processing baseline 04.00 (since 2022) hold DN + 1000, and files that
    say so declare scale 0.0001 and offset -0.1 (reflectance = DN x scale + offset). Before, the
    file's scale and the card's (0.0001: raw DN to reflectance) were both applied: the model saw
    values 10,000 times too small. Now such a file gives the labels of the same reflectance stored
    the old way (DN, no offset), byte for byte; the same DN + 1000 without the tags does not (the
    offset matters); and a scale the card does not share is refused."""
    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read()
    shifted = np.where(pixels == 0, 0, pixels + 1000).astype(np.uint16)  # nodata 0 stays

    def scene(name: str, scale: float | None, offset: float | None) -> Path:
        path = tmp_path / f"{name}.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(shifted)
            if scale is not None:
                dst.scales, dst.offsets = (scale,) * dst.count, (offset,) * dst.count
        return path

    def labels_of(root: Path, name: str) -> np.ndarray:
        with rasterio.open(root / name / "labels.tif") as labels:
            return labels.read(1)

    expected = labels_of(segmented_scene, "sentinel2_scene")
    capsys.readouterr()
    assert main(["segment", str(scene("baseline4", 0.0001, -0.1)), "--model", "s2-cloud", "--out",
                 str(tmp_path / "out")]) == 0
    assert "declares scale 0.0001 and offset -0.1 for the card's bands: read as raw value - 1000" in capsys.readouterr().err
    np.testing.assert_array_equal(labels_of(tmp_path / "out", "baseline4"), expected)

    assert main(["segment", str(scene("untagged", None, None)), "--model", "s2-cloud", "--out",
                 str(tmp_path / "out")]) == 0
    assert (labels_of(tmp_path / "out", "untagged") != expected).sum() > 100, "the offset changes the answer"

    landsat = scene("landsat", 0.0000275, -0.2)
    capsys.readouterr()
    assert main(["segment", str(landsat), "--model", "s2-cloud", "--out", str(tmp_path / "out")]) == 2
    refused = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.startswith(f"segpipe: error: {landsat}: declares scale 2.75e-05 and offset -0.2 for the bands "
                              f"model card ") and "scales raw values by 0.0001 itself" in refused


def test_a_virtual_raster_stacking_band_files_is_an_image_of_the_archive(ray_cluster, prefect_server, sentinel_scene,
                                                                         segmented_scene, tmp_path):
    """Bands kept in files of their own are stacked with `gdalbuildvrt -separate` into a .vrt:
    an archive of such stacks was listed as empty (only GeoTIFFs and the like were listed). The
    stack is a scene like the GeoTIFF it stands for: the same labels."""
    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read()
    bands = tmp_path / "bands"
    bands.mkdir()
    for index, name in enumerate(BANDS):
        with rasterio.open(bands / f"{name}.tif", "w", **dict(profile, count=1)) as dst:
            dst.write(pixels[index : index + 1])
    archive = tmp_path / "archive"
    archive.mkdir()
    height, width = pixels.shape[1:]
    # What `gdalbuildvrt -separate` writes: one band per file, each its file's band 1.
    band_elements = "".join(
        f'<VRTRasterBand dataType="UInt16" band="{index + 1}"><NoDataValue>0</NoDataValue><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">../bands/{name}.tif</SourceFilename><SourceBand>1</SourceBand>'
        f'<SrcRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/>'
        f'<DstRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/></SimpleSource></VRTRasterBand>'
        for index, name in enumerate(BANDS))
    (archive / "stack.vrt").write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{profile["crs"].to_wkt()}</SRS>'
        f'<GeoTransform>{", ".join(map(repr, profile["transform"].to_gdal()))}</GeoTransform>'
        f"{band_elements}</VRTDataset>")
    report = run_night(str(archive), "s2-cloud", str(tmp_path / "out"))
    assert report["done"] == ["stack"] and report["failed"] == {}
    with rasterio.open(tmp_path / "out" / "stack" / "labels.tif") as labels, \
            rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif") as expected:
        np.testing.assert_array_equal(labels.read(1), expected.read(1))


def test_jpeg_2000_images_are_listed_and_sentinel2_band_files_are_left_out_with_a_note(
        ray_cluster, prefect_server, sentinel_scene, segmented_scene, tmp_path):
    """Orthophotos are often JPEG 2000 (.jp2) of several bands: an archive of them was listed as
    empty. A Sentinel-2 product's band files (one band each) are left out, with a note on how to
    stack them, instead of failing one by one."""
    from pipelines.sources import list_archive, nothing_found_note

    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read()
    jp2 = {key: profile[key] for key in ("crs", "transform", "width", "height", "count", "dtype", "nodata")}
    archive, bands = tmp_path / "archive", tmp_path / "IMG_DATA"
    archive.mkdir()
    bands.mkdir()
    with rasterio.open(archive / "ortho.jp2", "w", driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES", **jp2) as dst:
        dst.write(pixels)  # lossless: the scene's own values
    for name in ("T19HCC_20240101T143731_B02.jp2", "T19HCC_20240101T143731_B8A_20m.jp2"):
        with rasterio.open(bands / name, "w", driver="JP2OpenJPEG", **dict(jp2, count=1)) as dst:
            dst.write(pixels[:1])
        shutil.copy(bands / name, archive / name)
    assert [Path(uri).name for uri in list_archive(archive)] == ["ortho.jp2"]
    report = run_night(str(archive), "s2-cloud", str(tmp_path / "out"))
    assert report["done"] == ["ortho"] and report["failed"] == {}
    with rasterio.open(tmp_path / "out" / "ortho" / "labels.tif") as labels, \
            rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif") as expected:
        np.testing.assert_array_equal(labels.read(1), expected.read(1))
    assert list_archive(bands) == []
    assert nothing_found_note(bands).startswith(f"{bands}: left out 2 Sentinel-2 band file(s) (")
    assert "gdalbuildvrt -separate -resolution highest" in nothing_found_note(bands)


# --- 4D NIfTI --------------------------------------------------------------------------------------

def test_a_4d_nifti_says_which_channel_a_one_band_card_reads(ray_cluster, tmp_path, capsys):
    import nibabel as nib

    from training import CT_VOLUME, shared_data

    ct = nib.load(shared_data(CT_VOLUME))
    volume = np.asarray(ct.dataobj).astype(np.int16)
    four_d = tmp_path / "ct4d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([volume, -volume], axis=-1), ct.affine), four_d)
    card = torchscript_card(tmp_path, conv_net(3, 1, 2), 3, 1, 2, tile=16)
    assert main(["segment", str(four_d), "--model", str(card), "--out", str(tmp_path / "out"), "--block", "32"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert f"note: {four_d} has 2 bands; card net reads band(s) 1" in notes


# --- STAC --------------------------------------------------------------------------------------

def stac_catalogue(scene: Path, folder: Path, coarse: tuple[str, ...] = (), missing: str | None = None,
                   offset_tagged: bool = False) -> Path:
    """A static STAC catalogue (pystac) of one item: the scene's six bands as separate COGs,
    `coarse` ones at 20 m (every other pixel), the band `missing` deleted after writing. With
    `offset_tagged`, the bands hold DN + 1000 and declare scale 0.0001 and offset -0.1, as
    Sentinel-2 COGs of processing baseline 04.00 and later do."""
    import pystac
    from affine import Affine

    with rasterio.open(scene) as src:
        profile, pixels = src.profile, src.read()
    if offset_tagged:
        pixels = np.where(pixels == profile["nodata"], pixels, pixels + 1000).astype(pixels.dtype)
    item = pystac.Item(id="S2_scene", geometry=None, bbox=None, datetime=dt.datetime(2026, 11, 1),
                       properties={"processing:level": "L1C"})
    for index, name in enumerate(BANDS):
        band = pixels[index : index + 1]
        band_profile = dict(profile, driver="COG", count=1, compress="deflate")
        band_profile.pop("blockxsize", None), band_profile.pop("blockysize", None), band_profile.pop("tiled", None)
        if name in coarse:
            band = band[:, ::2, ::2]
            band_profile.update(height=band.shape[1], width=band.shape[2],
                                transform=profile["transform"] * Affine.scale(2))
        path = folder / "assets" / f"{name}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", **band_profile) as dst:
            dst.write(band)
            if offset_tagged:
                dst.scales, dst.offsets = (0.0001,), (-0.1,)
        common = {"swir1": "swir16", "swir2": "swir22"}.get(name, name)
        item.add_asset(name, pystac.Asset(href=str(path), media_type=pystac.MediaType.COG, roles=["data"],
                                          extra_fields={"eo:bands": [{"name": name, "common_name": common}]}))
    catalogue = pystac.Catalog(id="archive", description="the real scene, one COG per band")
    catalogue.add_item(item)
    catalogue.normalize_and_save(str(folder / "catalog"), catalog_type=pystac.CatalogType.SELF_CONTAINED)
    if missing:
        (folder / "assets" / f"{missing}.tif").unlink()
    return folder / "catalog" / "catalog.json"


def test_a_stac_catalogue_is_segmented_like_the_scene_it_was_made_of(ray_cluster, prefect_server, sentinel_scene,
                                                                     tmp_path):
    catalogue = stac_catalogue(sentinel_scene, tmp_path / "stac")
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "scene")]) == 0
    assert main(["segment", str(catalogue), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "item")]) == 0
    with rasterio.open(tmp_path / "scene" / "sentinel2_scene" / "labels.tif") as a, \
            rasterio.open(tmp_path / "item" / "S2_scene" / "labels.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
        assert a.crs == b.crs and a.transform == b.transform

    report = run_night(str(catalogue), "s2-cloud-l1c", str(tmp_path / "night"))
    assert report["done"] == ["S2_scene"] and report["failed"] == {}
    again = run_night(str(catalogue), "s2-cloud-l1c", str(tmp_path / "night"))
    assert again["skipped"] == ["S2_scene"], "keyed by the item and its assets"

    # An item collection (a saved search) holds items without files of their own.
    collection = tmp_path / "search.json"
    item = json.loads(next((tmp_path / "stac" / "catalog").rglob("S2_scene.json")).read_text())
    for asset in item["assets"].values():
        asset["href"] = str((tmp_path / "stac" / "catalog" / "S2_scene" / asset["href"]).resolve())
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    report = run_night(str(collection), "s2-cloud-l1c", str(tmp_path / "search"))
    assert report["done"] == ["S2_scene"]
    with rasterio.open(tmp_path / "search" / "S2_scene" / "labels.tif") as c, \
            rasterio.open(tmp_path / "scene" / "sentinel2_scene" / "labels.tif") as a:
        np.testing.assert_array_equal(a.read(1), c.read(1))


def test_stac_assets_declaring_the_sentinel2_offset_are_read_like_the_scene(ray_cluster, sentinel_scene, tmp_path,
                                                                            capsys):
    """COGs of DN + 1000 that declare scale 0.0001 and offset -0.1 give, through a STAC item, the labels of the scene stored without the offset, one
    band of them at 20 m included (its nodata stays nodata once scaled)."""
    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read()
    pixels[:, :30, :40] = profile["nodata"]  # a corner without data
    holed = tmp_path / "holed.tif"
    with rasterio.open(holed, "w", **profile) as dst:
        dst.write(pixels)
    catalogue = stac_catalogue(holed, tmp_path / "stac", coarse=("swir2",), offset_tagged=True)
    plain = stac_catalogue(holed, tmp_path / "plain", coarse=("swir2",))
    capsys.readouterr()
    assert main(["segment", str(catalogue), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "tagged")]) == 0
    assert "read as raw value - 1000" in capsys.readouterr().err
    assert main(["segment", str(plain), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "plain-out")]) == 0
    with rasterio.open(tmp_path / "tagged" / "S2_scene" / "labels.tif") as a, \
            rasterio.open(tmp_path / "plain-out" / "S2_scene" / "labels.tif") as b:
        tagged, expected = a.read(1), b.read(1)
    np.testing.assert_array_equal(tagged, expected)
    assert (expected[:30, :40] == 255).all() and (expected != 255).sum() == 200 * 300 - 30 * 40


def test_stac_assets_at_another_resolution_are_resampled_and_missing_ones_fail_alone(
        ray_cluster, prefect_server, sentinel_scene, tmp_path, capsys):
    coarse = stac_catalogue(sentinel_scene, tmp_path / "coarse", coarse=("swir1", "swir2"))
    assert main(["segment", str(coarse), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "out")]) == 0
    with rasterio.open(tmp_path / "out" / "S2_scene" / "labels.tif") as labels, rasterio.open(sentinel_scene) as src:
        assert labels.shape == src.shape and labels.transform == src.transform

    broken = stac_catalogue(sentinel_scene, tmp_path / "broken", missing="nir")
    assert main(["segment", str(broken), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "b")]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segpipe: error:")]
    assert "nir.tif" in line and "no such file" in line
    report = run_night(str(broken), "s2-cloud-l1c", str(tmp_path / "night"))
    assert report["done"] == [] and len(report["failed"]) == 1


def test_stac_documents_in_an_archive_folder_are_read_for_what_they_are(ray_cluster, prefect_server, sentinel_scene,
                                                                        tmp_path):
    """A folder whose root holds catalog.json is that catalogue (its assets are no images of their
    own); a JSON sidecar is no image; an item collection's items without a unique id each have
    their own address, and one that is no item fails alone."""
    from pipelines.sources import list_archive

    stac = tmp_path / "stac"
    stac_catalogue(sentinel_scene, stac)
    catalogue_folder = stac / "catalog"
    assert list_archive(str(catalogue_folder)) == list_archive(str(catalogue_folder / "catalog.json"))
    report = run_night(str(catalogue_folder), "s2-cloud-l1c", str(tmp_path / "folder"))
    assert report["done"] == ["S2_scene"] and report["failed"] == {}

    sidecar = tmp_path / "sidecar"
    sidecar.mkdir()
    scene = shutil.copy(sentinel_scene, sidecar / "scene.tif")
    (sidecar / "scene_metadata.json").write_text(json.dumps({"acquired": "2026-11-01", "sensor": "MSI"}))
    assert list_archive(str(sidecar)) == [str(scene)]

    item = json.loads(next(catalogue_folder.rglob("S2_scene.json")).read_text())
    for asset in item["assets"].values():
        asset["href"] = str((catalogue_folder / "S2_scene" / asset["href"]).resolve())
    without_id = {key: value for key, value in item.items() if key != "id"}
    search = tmp_path / "search.json"  # a saved search across two collections: one id twice
    search.write_text(json.dumps({"type": "FeatureCollection", "features": [item, item, without_id]}))
    assert list_archive(str(search)) == [f"{search}#S2_scene@0", f"{search}#S2_scene@1", f"{search}#@2"]
    report = run_night(str(search), "s2-cloud-l1c", str(tmp_path / "search-out"))
    assert len(report["done"]) == 2 and len(set(report["done"])) == 2
    [(uri, why)] = report["failed"].items()
    assert uri == f"{search}#@2" and "no STAC item" in why
