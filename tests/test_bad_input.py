"""Bad input stops `segpipe segment` with one line naming the file, exit code 2, and nothing
left behind that looks like a finished result."""

import importlib.resources
import re
import shutil

import numpy as np
import pytest
import rasterio
import tifffile
import torch
import yaml

from flows.archive_flow import run_night
from flows.cli import main
from flows.options import RunOptions
from pipelines.model_card import load_card
from pipelines.stats import read_table
from test_stitching import conv_net, torchscript_card


def run_segment(capsys, src, out, model="s2-cloud"):
    code = main(["segment", str(src), "--model", str(model), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_nothing_published(out, stem):
    """No image folder, no statistics rows, no work folder left (a run that began has its date
    registered in stats/_runs, which a re-run of the same run id keeps)."""
    assert not (out / stem).exists()
    assert not list((out / "stats").rglob("*.parquet"))
    assert not (out / ".work").exists() or not any((out / ".work").iterdir())


def test_missing_source(capsys, tmp_path):
    code, err = run_segment(capsys, tmp_path / "nope.tif", tmp_path / "out")
    assert code == 2
    assert err == [f"segpipe: error: {tmp_path / 'nope.tif'}: no such file"]
    assert not (tmp_path / "out").exists()


def test_file_that_is_not_an_image(capsys, tmp_path):
    src = tmp_path / "garbage.tif"
    src.write_bytes(b"this is not a tiff" * 100)
    code, err = run_segment(capsys, src, tmp_path / "out")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"segpipe: error: {src}: not a readable raster")


@pytest.mark.parametrize("name", ["empty.tif", "empty.png", "empty.nii.gz", "empty.svs"])
def test_an_empty_file_says_it_is_empty(capsys, tmp_path, name):
    """A download that never started left 0 bytes: GDAL said 'not recognized as being in a
    supported file format'."""
    src = tmp_path / name
    src.touch()
    code, err = run_segment(capsys, src, tmp_path / "out")
    assert (code, err) == (2, [f"segpipe: error: {src}: is empty (0 bytes): a copy or download that did not finish?"])


def test_a_folder_given_to_segment_says_run_is_for_folders(capsys, sentinel_scene, tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    shutil.copy(sentinel_scene, folder / "scene.tif")
    code, err = run_segment(capsys, folder, tmp_path / "out")
    assert code == 2
    assert err == [f"segpipe: error: {folder}: is a folder, neither an image nor a Zarr store: `segpipe run` "
                   f"segments the images in a folder"], err


@pytest.mark.parametrize("folder, expected", [
    ("series", "a DICOM series: convert it to NIfTI first (dcm2niix -z y -o OUT FOLDER)"),
    ("S2B_MSIL2A_20240101T000000.SAFE", "a Sentinel-2 .SAFE product: stack its band files into one image"),
])
def test_folders_of_formats_segpipe_does_not_read_say_how_to_convert_them(capsys, tmp_path, folder, expected):
    given = tmp_path / folder
    given.mkdir()
    (given / "IM000001.dcm").write_bytes(b"\0" * 128 + b"DICM")
    code, err = run_segment(capsys, given, tmp_path / "out")
    assert code == 2 and err == [f"segpipe: error: {given}: is a folder, neither an image nor a Zarr store: {expected}"
                                 + err[0].split(expected, 1)[1]], err


def test_truncated_geotiff_fails_during_ingest_and_leaves_nothing(ray_cluster, capsys, sentinel_scene, tmp_path):
    # Tiled and compressed, its directory first (as GDAL writes it): the file opens, and reading
    # the tiles past the cut fails.
    whole = tmp_path / "whole.tif"
    with rasterio.open(sentinel_scene) as scene:
        profile, pixels = scene.profile, scene.read()
    with rasterio.open(whole, "w", **{**profile, "tiled": True, "blockxsize": 64, "blockysize": 64,
                                      "compress": "deflate"}) as copy:
        copy.write(pixels)
    src = tmp_path / "truncated.tif"
    data = whole.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with rasterio.open(src) as opened:
        assert opened.count == pixels.shape[0], "the directory is before the cut"
    out = tmp_path / "out"
    code, err = run_segment(capsys, src, out)
    errors = [line for line in err if line.startswith("segpipe: error:")]
    assert code == 2 and len(errors) == 1 and err[-1] == errors[0], err
    assert errors[0].startswith(f"segpipe: error: {src}: cannot read rows ")
    # GDAL's own reason, not rasterio's "See previous exception for details" (none is shown)
    assert "previous exception" not in errors[0] and "TIFFFillTile" in errors[0], errors[0]
    assert_nothing_published(out, "truncated")


def test_card_naming_a_missing_weights_file(capsys, sentinel_scene, tmp_path):
    card = yaml.safe_load(open(load_card("s2-cloud").source))
    card["weights"] = "weights/missing.onnx"
    card_path = tmp_path / "card.yaml"
    card_path.write_text(yaml.safe_dump(card))
    code, err = run_segment(capsys, sentinel_scene, tmp_path / "out", model=card_path)
    assert code == 2
    assert err == [
        f"segpipe: error: {tmp_path / 'weights' / 'missing.onnx'}: weights file named by model card {card_path} does not exist"
    ]
    assert not (tmp_path / "out").exists()


def test_unknown_builtin_card(capsys, sentinel_scene, tmp_path):
    code, err = run_segment(capsys, sentinel_scene, tmp_path / "out", model="no-such-model")
    assert code == 2 and len(err) == 1
    assert ("no-such-model: no such model card file, and not a built-in card (s2-cloud, s2-cloud-4b, s2-cloud-l1c, "
            "s2-cloud-l1c-4b)") in err[0]


def test_a_training_folder_is_a_card_and_a_weights_file_is_not(capsys, tmp_path):
    """`--model DIR` (what `segpipe train --out DIR` made) said 'Is a directory'; a weights file
    given as the card ended in a UnicodeDecodeError traceback."""
    from pipelines.errors import InputError

    folder = tmp_path / "trained"
    folder.mkdir()
    card_path = torchscript_card(folder, conv_net(2, 6, 3), 2, 6, 3, tile=64)
    card_path.rename(folder / "card.yaml")
    assert load_card(folder) == load_card(folder / "card.yaml")
    for given, expected in ((folder / "net.ts", "is not a model card (YAML text) but a binary file"),
                            (tmp_path, "is a folder without card.yaml")):
        with pytest.raises(InputError, match=re.escape(f"{given}: {expected}")):
            load_card(given)


def test_band_count_that_does_not_match_the_card(capsys, sentinel_scene, tmp_path):
    with rasterio.open(sentinel_scene) as src:
        profile, rgb = src.profile, src.read([3, 2, 1])
    three_bands = tmp_path / "rgb.tif"
    profile.update(count=3)
    with rasterio.open(three_bands, "w", **profile) as dst:
        dst.write(rgb)
    code, err = run_segment(capsys, three_bands, tmp_path / "out")
    assert code == 2
    assert err == [
        f"segpipe: error: {three_bands}: has 3 band(s) but model card {load_card('s2-cloud').source} needs bands [1, 2, 3, 4, 5, 6]"
    ]
    assert not (tmp_path / "out").exists()


def test_a_failed_rerun_keeps_the_previous_complete_result(ray_cluster, capsys, sentinel_scene, tmp_path):
    """A good run publishes; a later run of the same name on a corrupt file fails and leaves
    the earlier result as it was."""
    src = tmp_path / "scene.tif"
    shutil.copy(sentinel_scene, src)
    out = tmp_path / "out"
    assert main(["segment", str(src), "--model", "s2-cloud", "--out", str(out)]) == 0
    before = (out / "scene" / "labels.tif").read_bytes()
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    code, _ = run_segment(capsys, src, out)
    assert code == 2
    assert (out / "scene" / "labels.tif").read_bytes() == before
    assert not any((out / ".work").iterdir())


def test_tile_size_a_fixed_size_model_cannot_take(capsys, sentinel_scene, tmp_path):
    code = main(["segment", str(sentinel_scene), "--model", "s2-cloud", "--out", str(tmp_path / "o"), "--tile", "128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"segpipe: error: {load_card('s2-cloud').source}: model 's2-cloud' takes only 256-pixel tiles, not 128"]


def test_a_tiff_cut_before_its_directory_is_one_line_on_the_terminal(sentinel_scene, tmp_path):
    """In a process of its own, as a user runs it: tifffile's warning about the same file
    ("invalid offset to first page") was printed above segpipe's error."""
    import os
    import subprocess
    import sys

    src = tmp_path / "cut.tif"
    data = sentinel_scene.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    environment = {**os.environ, "SEGPIPE_SERVER": "off"}
    done = subprocess.run([sys.executable, "-m", "flows", "segment", str(src), "--model", "s2-cloud", "--out",
                           str(tmp_path / "out"), "--device", "cpu"], env=environment, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and \
        done.stderr.startswith(f"segpipe: error: {src}: not a readable raster"), done.stderr


# --- models that answer NaN ---------------------------------------------------------------------

BRIGHT = 62  # raw nuclei pixel value above which NanWhereBright answers NaN


class NanWhereBright(torch.nn.Module):
    """A small conv net that answers NaN wherever the (normalised) pixel is brighter than BRIGHT:
    finite on a tile of zeros, so it passes the check before the run and fails in the blocks."""

    def __init__(self):
        super().__init__()
        self.net = conv_net(2, 1, 3)
        # torchscript_card's normalisation: (value * 1e-3 - 1.5) / 0.5; halfway between two values
        self.threshold = ((BRIGHT + 0.5) * 1e-3 - 1.5) / 0.5

    def forward(self, x):
        logits = self.net(x)
        band = x[:, :1]
        # Below threshold + 1 too (every pixel is; a tile of zeros is not)
        bright = (band > self.threshold) & (band < self.threshold + 1)
        return torch.where(bright, torch.full_like(logits, float("nan")), logits)


def nuclei_pixels() -> np.ndarray:
    return tifffile.imread(str(importlib.resources.files("stardist") / "data" / "images" / "img2d.tif"))


def test_a_model_with_a_nan_weight_is_refused_before_any_work(capsys, tmp_path):
    pixels = nuclei_pixels()
    src = tmp_path / "nuclei.tif"
    tifffile.imwrite(src, pixels)
    net = conv_net(2, 1, 3)
    with torch.no_grad():
        net[2].weight[1, 3, 0, 0] = float("nan")  # one weight of the last layer: every output is NaN
    card = torchscript_card(tmp_path, net, 2, 1, 3, tile=128)
    code, err = run_segment(capsys, src, tmp_path / "out", model=card)
    assert code == 2
    assert err == [f"segpipe: error: {card}: the model answers a tile of zeros with NaN or infinity (49,152 of "
                   f"49,152 values): its weights are damaged or diverged"], err
    assert_nothing_published(tmp_path / "out", "nuclei")


def test_a_model_answering_nan_fails_that_image_and_the_night_goes_on(ray_cluster, prefect_server, capsys, tmp_path):
    """Before, NaN compared false in the argmax: those pixels became class 0, counted and written
    as a finished result."""
    pixels = nuclei_pixels()
    archive = tmp_path / "archive"
    archive.mkdir()
    tifffile.imwrite(archive / "bright.tif", pixels)
    tifffile.imwrite(archive / "dim.tif", pixels // 4)  # at most 58: no pixel above BRIGHT
    card = torchscript_card(tmp_path, NanWhereBright().eval(), 2, 1, 3, tile=128)
    answered_nan = int((pixels > BRIGHT).sum())
    assert 0 < answered_nan < pixels.size // 4

    code, err = run_segment(capsys, archive / "bright.tif", tmp_path / "alone", model=card)
    errors = [line for line in err if line.startswith("segpipe: error:")]
    assert code == 2 and errors == [
        f"segpipe: error: {card}: the model answered NaN or infinity for {answered_nan:,} of the {pixels.size:,} "
        f"valid pixels of rows 0:512, cols 0:512: damaged or diverged weights"], err
    assert_nothing_published(tmp_path / "alone", "bright")

    night = tmp_path / "night"
    report = run_night(str(archive), str(card), str(night), RunOptions(run_id="nan-night"))
    assert report["done"] == ["dim"] and list(report["failed"]) == [str(archive / "bright.tif")], report
    assert "the model answered NaN or infinity" in report["failed"][str(archive / "bright.tif")]
    assert not (night / "bright").exists()
    with rasterio.open(night / "dim" / "labels.tif") as labels:
        assert labels.read(1).shape == pixels.shape
    rows = read_table(night / "stats", "image_class").to_pylist()
    assert {row["image"] for row in rows} == {"dim"}
