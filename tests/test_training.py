"""`segpipe train` and `segpipe evaluate` on real data: labelled images in, a card that `segment`
uses unchanged out; Ray Train workers, a killed run resumed to the same weights, slides with
QuPath annotations, volumes, bad pairs in one line."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import rasterio
import tifffile
import yaml
from rasterio.transform import from_origin
from safetensors.numpy import load_file, save_file

from flows.cli import main
from training import CT_LABELS, CT_VOLUME, SLIDE, shared_data

REPO = Path(__file__).resolve().parents[1]
LIVER = 5  # TotalSegmentator's label of the liver in the CT's organ labels


@pytest.fixture(scope="module")
def nuclei_halves(tmp_path_factory) -> dict[str, Path]:
    """The stardist nuclei image (512 x 512 uint16, no georeferencing) and its mask as
    foreground / background, cut into a left half to train on and a right half to test on."""
    folder = tmp_path_factory.mktemp("nuclei")
    images = importlib.resources.files("stardist") / "data" / "images"
    image = tifffile.imread(str(images / "img2d.tif"))
    mask = (tifffile.imread(str(images / "mask2d.tif")) > 0).astype(np.uint8)
    paths = {}
    for half, columns in (("left", slice(0, 256)), ("right", slice(256, 512))):
        paths[half] = folder / f"{half}.tif"
        paths[f"{half}_mask"] = folder / f"{half}_mask.tif"
        tifffile.imwrite(paths[half], image[:, columns])
        tifffile.imwrite(paths[f"{half}_mask"], mask[:, columns])
    return paths


def evaluation(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert main(["evaluate", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def nuclei_model(ray_cluster, nuclei_halves, tmp_path_factory) -> tuple[Path, str, str]:
    """`segpipe train` of a U-Net on the left half: (its folder, stdout, stderr)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("trained") / "nuclei-model"
    stdout, stderr = io.StringIO(), io.StringIO()
    from flows.progress import console

    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), console.capture() as terminal:
        assert main(["train", "--images", str(nuclei_halves["left"]), "--labels", str(nuclei_halves["left_mask"]),
                     "--architecture", "unet_padded", "--architecture-options", "base_features=16,depth=3",
                     "--classes", "background,nucleus", "--tile", "96", "--epochs", "3", "--steps-per-epoch", "40",
                     "--learning-rate", "0.002", "--out", str(out)]) == 0
    return out, stdout.getvalue(), stderr.getvalue() + terminal.get()


def test_a_unet_trained_on_one_half_segments_the_other(nuclei_model, nuclei_halves, tmp_path, capsys):
    out, stdout, stderr = nuclei_model
    assert "epoch 3/3: loss" in stderr and f"card:    {out / 'card.yaml'}" in stdout

    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["format"] == "registry" and card["architecture"] == "unet_padded"
    assert [c["name"] for c in card["classes"]] == ["background", "nucleus"]
    assert card["training"]["data"] == [{"image": str(nuclei_halves["left"]), "labels": str(nuclei_halves["left_mask"])}]
    assert card["training"]["epochs"] == 3 and card["training"]["validation"]["iou/nucleus"] > 0.5
    history = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    table = pd.read_parquet(out / "metrics.parquet")
    assert len(table) == 3 * 2 and set(table["class_name"]) == {"background", "nucleus"}
    assert table.query("epoch == 3 and class_name == 'nucleus'")["iou"].item() == pytest.approx(
        history[-1]["iou/nucleus"])
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The card works unchanged with segment; evaluate scores the held-out half.
    segmented = tmp_path / "segmented"
    assert main(["segment", str(nuclei_halves["right"]), "--model", str(out / "card.yaml"), "--out",
                 str(segmented)]) == 0
    labels = segmented / "right" / "labels.tif"
    [scores] = evaluation(capsys, str(labels), "--reference", str(nuclei_halves["right_mask"]))
    nucleus = next(row for row in scores["classes"] if row["class_name"] == "nucleus")
    print(f"held-out half: nucleus IoU {nucleus['iou']:.3f}, Dice {nucleus['dice']:.3f}")
    assert nucleus["iou"] >= 0.8

    # An output root against a folder of references matched by image name; Parquet tables too.
    references = tmp_path / "references"
    references.mkdir()
    (references / "right_mask.tif").write_bytes(nuclei_halves["right_mask"].read_bytes())
    tables = tmp_path / "tables"
    [by_name] = evaluation(capsys, str(segmented), "--reference", str(references), "--out", str(tables))
    assert by_name == scores
    rows = pd.read_parquet(tables / "evaluation.parquet")
    assert rows.query("class_name == 'nucleus'")["iou"].item() == pytest.approx(nucleus["iou"])
    confusion = pd.read_parquet(tables / "confusion.parquet")
    with rasterio.open(labels) as written:
        predicted = written.read(1)
    truth = tifffile.imread(nuclei_halves["right_mask"])
    both = (predicted == 1) & (truth == 1)
    assert confusion.query("reference_class == 'nucleus' and predicted_class == 'nucleus'")["pixels"].item() == both.sum()
    assert main(["evaluate", str(labels), "--reference", str(nuclei_halves["right_mask"])]) == 0
    assert "confusion (rows: reference, columns: predicted)" in capsys.readouterr().out


def test_no_new_net_learns_the_liver_of_a_ct_volume(ray_cluster, tmp_path, capsys):
    ct = shared_data(CT_VOLUME)
    organs = nibabel.load(shared_data(CT_LABELS))
    liver = tmp_path / "liver.nii.gz"
    nibabel.save(nibabel.Nifti1Image((np.asanyarray(organs.dataobj) == LIVER).astype(np.uint8), organs.affine), liver)
    out = tmp_path / "liver-model"
    # A Hounsfield window for the soft tissue; no flips: a CT's left and right differ.
    assert main(["train", "--images", str(ct), "--labels", str(liver), "--architecture", "nnunet3d",
                 "--architecture-options", "base_features=8,depth=3", "--classes", "background,liver", "--tile", "48",
                 "--epochs", "3", "--steps-per-epoch", "30", "--batch", "2", "--learning-rate", "0.01", "--validation-tiles", "8",
                 "--clip=-200,300", "--augment", "none", "--out", str(out)]) == 0
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["spatial_dims"] == 3 and card["input"]["clip"] == [-200.0, 300.0]
    segmented = tmp_path / "segmented"
    assert main(["segment", str(ct), "--model", str(out / "card.yaml"), "--out", str(segmented)]) == 0
    [scores] = evaluation(capsys, str(segmented / "example_ct_sm" / "labels.nii.gz"), "--reference", str(liver))
    organ = next(row for row in scores["classes"] if row["class_name"] == "liver")
    print(f"nnunet3d: liver Dice {organ['dice']:.3f}")
    assert organ["dice"] >= 0.8


TINY = ["--architecture", "unet_padded", "--architecture-options", "base_features=4,depth=2", "--classes",
        "background,nucleus", "--tile", "64", "--batch", "2", "--steps-per-epoch", "4", "--validation-tiles", "4",
        "--seed", "7"]


def test_two_workers_killed_mid_run_resume_to_the_weights_of_an_uninterrupted_run(ray_cluster, nuclei_halves,
                                                                                  tmp_path, capsys):
    import ray

    pair = ["--images", str(nuclei_halves["left"]), "--labels", str(nuclei_halves["left_mask"])]
    options = [*TINY, "--epochs", "3", "--workers", "2", "--threads", "1"]
    uninterrupted = tmp_path / "uninterrupted"
    assert main(["train", *pair, *options, "--out", str(uninterrupted)]) == 0

    killed = tmp_path / "killed"
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", *pair, *options, "--out", str(killed)],
                              cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoints" / "training" / "epoch-0001" / "state.json").exists():
            assert time.monotonic() < deadline and driver.poll() is None, "the killed run's first checkpoints"
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert not (killed / "card.yaml").exists()

    assert main(["train", *pair, *options, "--out", str(killed)]) == 2
    assert "holds a training run already: --resume continues it" in capsys.readouterr().err
    assert main(["train", *pair, "--epochs", "5", "--out", str(killed), "--resume"]) == 2
    assert "--epochs: differs from the run being resumed" in capsys.readouterr().err
    assert main(["train", "--images", str(nuclei_halves["right"]), "--out", str(killed), "--resume"]) == 2
    assert "--images: differs from the run being resumed" in capsys.readouterr().err
    assert main(["train", "--images", str(nuclei_halves["left"]), *options, "--out", str(tmp_path / "new")]) == 2
    assert "--labels: required to start a training run" in capsys.readouterr().err
    # Only --out and --resume, as the README says: the images, labels and options are the run's
    # (before: "the following arguments are required: --images, --labels").
    assert main(["train", "--out", str(killed), "--resume"]) == 0

    resumed, whole = load_file(str(killed / "weights.safetensors")), load_file(str(uninterrupted / "weights.safetensors"))
    assert resumed.keys() == whole.keys()
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)
    def scores(folder: Path) -> list[dict]:  # every epoch's metrics but its speed
        return [{k: v for k, v in m.items() if k != "tiles_per_second"}
                for m in json.loads((folder / "metrics.json").read_text())]

    assert [m["epoch"] for m in scores(killed)] == [1, 2, 3]
    assert scores(killed) == scores(uninterrupted)


def test_a_diverging_run_stops_in_one_line_and_writes_no_card(ray_cluster, nuclei_halves, tmp_path, capsys):
    """Before, a learning rate far too high trained to a loss of NaN, wrote a card of NaN weights
    and exited 0."""
    pair = ["--images", str(nuclei_halves["left"]), "--labels", str(nuclei_halves["left_mask"])]
    out = tmp_path / "diverged"
    capsys.readouterr()
    assert main(["train", *pair, *TINY, "--epochs", "2", "--learning-rate", "1e9", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segpipe: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "segpipe: error: --learning-rate: the training loss became nan at epoch 1, step "), errors
    assert "no card is written; a lower --learning-rate usually helps" in errors[0]
    assert not (out / "card.yaml").exists() and not (out / "weights.safetensors").exists()


def test_a_loss_over_no_labelled_pixel_is_zero_with_zero_gradients():
    """A coarse deep-supervision head that misses a tile's few labelled pixels, or a validation
    tile of sparse annotations: cross-entropy over no pixel is NaN, which would read as a
    diverged run."""
    import torch

    from pipelines.training_data import NOT_LABELLED
    from segworkers.training import loss_of

    logits = torch.randn((2, 3, 16, 16), requires_grad=True)
    loss = loss_of(logits, torch.full((2, 16, 16), NOT_LABELLED), 3)
    loss.backward()
    assert loss.item() == 0.0 and str(loss.item()) == "0.0" and logits.grad.abs().sum().item() == 0.0
    labelled = torch.full((2, 16, 16), NOT_LABELLED)
    labelled[0, 8, 8] = 1
    assert torch.isfinite(loss_of(logits, labelled, 3)) and loss_of(logits, labelled, 3).item() > 0


# QuPath's GeoJSON (level-0 pixels): a stretch of stroma and a stretch of glass on the CMU slide.
def qupath_annotations() -> dict:
    def rectangle(x0, y0, x1, y1):
        return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}

    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a1", "geometry": rectangle(720, 2080, 960, 2560),
         "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [200, 0, 100]}}},
        {"type": "Feature", "id": "a2", "geometry": rectangle(80, 1600, 480, 2400),
         "properties": {"objectType": "annotation", "classification": {"name": "Glass", "colorRGB": -16711936}}},
    ]}


def test_a_slide_with_qupath_annotations_trains_at_the_cards_resolution(ray_cluster, tmp_path, capsys):
    slide = shared_data(SLIDE)
    annotations = tmp_path / "CMU-1-Small-Region.geojson"
    document = qupath_annotations()
    # What QuPath projects hold besides: an unclassified region of interest, a count of points,
    # an annotation whose geometry was lost (each failed the run with a traceback or "class None").
    document["features"] += [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [2000, 0], [2000, 2900], [0, 0]]]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[800, 2100], [900, 2200]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}}},
        {"type": "Feature", "geometry": None, "properties": {"classification": {"name": "Glass"}}},
    ]
    annotations.write_text(json.dumps(document))
    out = tmp_path / "slide-model"
    capsys.readouterr()
    assert main(["train", "--images", str(slide), "--labels", str(annotations), *TINY[:4], "--tile", "64",
                 "--mpp", "2.0", "--epochs", "1", "--steps-per-epoch", "3", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().err.split())
    assert f"note: {annotations}: 1 annotation(s) without a class left out (they label no pixel)" in printed
    assert f"note: {annotations}: 2 point, line or empty annotation(s) left out (they cover no area)" in printed
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["input"]["mpp"] == 2.0 and card["input"]["bands"] == [1, 2, 3]
    assert card["classes"] == [{"id": 0, "name": "Tissue", "color": "#c80064"},
                               {"id": 1, "name": "Glass", "color": "#00ff00"}]
    segmented = tmp_path / "segmented"
    assert main(["segment", str(slide), "--model", str(out / "card.yaml"), "--out", str(segmented)]) == 0
    import zarr

    labels = zarr.open_group(str(segmented / "CMU-1-Small-Region" / "image.ome.zarr"))["labels"]
    level = labels[next(iter(labels.group_keys()))]["0"]
    # Segmented, as trained, at 2 µm per pixel: about a quarter of level 0 (0.499 µm).
    assert np.allclose(level.shape, (2967 * 0.499 / 2, 2220 * 0.499 / 2), atol=1)
    assert set(np.unique(level[:])) <= {0, 1, 255}


def write_geotiff(path: Path, pixels: np.ndarray, crs: str = "EPSG:32719", origin=(600000, 4700000)) -> Path:
    with rasterio.open(path, "w", driver="GTiff", height=pixels.shape[-2], width=pixels.shape[-1], count=1,
                       dtype=pixels.dtype, crs=crs, transform=from_origin(*origin, 10, 10)) as dst:
        dst.write(pixels, 1)
    return path


@pytest.mark.parametrize("case", ["grid", "crs", "half a pixel", "values", "unlabelled", "missing label"])
def test_bad_pairs_are_one_line_naming_the_files(ray_cluster, tmp_path, capsys, case):
    image = write_geotiff(tmp_path / "scene.tif", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[:, 32:] = 1
    if case == "grid":
        label_file, expected = write_geotiff(tmp_path / "scene_mask.tif", labels[:, :48]), "not the same grid"
    elif case == "crs":
        label_file, expected = write_geotiff(tmp_path / "scene_mask.tif", labels, "EPSG:4326"), "another CRS"
    elif case == "half a pixel":  # 5 m off on 10 m pixels: passed a relative tolerance of 1e-5 at x = 600,000
        label_file, expected = write_geotiff(tmp_path / "scene_mask.tif", labels, origin=(600005, 4700000)), \
            "is not on the grid of its image"
    elif case == "values":
        labels[0, 0] = 7
        label_file, expected = write_geotiff(tmp_path / "scene_mask.tif", labels), "label values 7 that are not among"
    elif case == "unlabelled":
        label_file, expected = write_geotiff(tmp_path / "scene_mask.tif", labels * 0 + 255), "has no labelled pixel"
    else:
        write_geotiff(tmp_path / "other.tif", labels.astype(np.uint16))
        write_geotiff(tmp_path / "scene_labels.tif", labels)
        image = label_file = tmp_path
        expected = "other.tif: has no label file in"
    capsys.readouterr()
    assert main(["train", "--images", str(image), "--labels", str(label_file), *TINY, "--epochs", "1",
                 "--out", str(tmp_path / "model")]) == 2
    printed = capsys.readouterr().err
    [error] = [line for line in printed.splitlines() if line.startswith("segpipe: error: ")]
    assert expected in error and "Traceback" not in printed, printed
    assert str(label_file if case != "missing label" else tmp_path / "other.tif") in error
    assert not (tmp_path / "model" / "card.yaml").exists()


@pytest.mark.parametrize("mask, named", [("mask2d.tif", False), ("mask3d.tif", False), ("mask2d.tif", True)])
def test_an_instance_mask_is_refused_in_one_line_before_any_training(ray_cluster, tmp_path, capsys, mask, named):
    """StarDist's example masks give every nucleus its own id (125 ids up to 183 in 2D, 51 in
    3D): trained as they are, they made a card of 184 classes without a word. With classes
    named, the ids beyond them are refused, saying why there are so many."""
    images = importlib.resources.files("stardist") / "data" / "images"
    image, label_file = tmp_path / "nuclei.tif", tmp_path / "nuclei_mask.tif"
    shutil.copy(images / mask.replace("mask", "img"), image)
    shutil.copy(images / mask, label_file)
    capsys.readouterr()
    options = TINY if named else [o for o in TINY if o not in ("--classes", "background,nucleus")]
    if mask == "mask3d.tif":
        options = [*options, "--tile", "16"]
    assert main(["train", "--images", str(image), "--labels", str(label_file), *options, "--epochs", "1",
                 "--out", str(tmp_path / "model")]) == 2
    printed = capsys.readouterr().err
    [error] = [line for line in printed.splitlines() if line.startswith("segpipe: error: ")]
    expected = "an instance mask, one id per object, must first be turned into class ids" if named else \
        "looks like an instance mask"
    assert str(label_file) in error and expected in error and "Traceback" not in printed, printed
    assert not (tmp_path / "model" / "card.yaml").exists()


def test_a_3d_network_reads_tiff_stacks_as_volumes_and_a_2d_one_refuses_a_volume(ray_cluster, tmp_path, capsys):
    """StarDist's 3D example (a tifffile stack whose axes say Q, not Z) was taken as a 2D image
    for nnunet3d ("a 2D card reads one plane"); unet_padded given the CT is refused up front."""
    images = importlib.resources.files("stardist") / "data" / "images"
    stack, label_stack = tmp_path / "nuclei.tif", tmp_path / "nuclei_mask.tif"
    shutil.copy(images / "img3d.tif", stack)
    tifffile.imwrite(label_stack, (tifffile.imread(str(images / "mask3d.tif")) > 0).astype(np.uint8))
    assert main(["train", "--images", str(stack), "--labels", str(label_stack), "--architecture", "nnunet3d",
                 "--architecture-options", "base_features=4,depth=2", "--classes", "background,nucleus", "--tile",
                 "16", "--batch", "2", "--steps-per-epoch", "2", "--validation-tiles", "2", "--epochs", "1",
                 "--out", str(tmp_path / "model")]) == 0
    assert yaml.safe_load((tmp_path / "model" / "card.yaml").read_text())["spatial_dims"] == 3
    capsys.readouterr()
    assert main(["train", "--images", str(shared_data(CT_VOLUME)), "--labels", str(shared_data(CT_LABELS)), *TINY,
                 "--out", str(tmp_path / "flat")]) == 2
    assert capsys.readouterr().err.strip() == (f"segpipe: error: {shared_data(CT_VOLUME)}: is a volume, and "
                                               "unet_padded is a 2D network: train a 3D one (--architecture nnunet3d)")


def test_organ_labels_without_names_are_classes_not_instances():
    """The CT's 41 organs are small and many too, but lie around each other: numbered classes."""
    from pipelines.training_data import TrainingPair, label_classes

    classes = label_classes([TrainingPair(str(shared_data(CT_VOLUME)), str(shared_data(CT_LABELS)))])
    largest = int(np.asarray(nibabel.load(shared_data(CT_LABELS)).dataobj).max())
    assert [c.name for c in classes] == [f"class{i}" for i in range(largest + 1)]


def test_the_training_chart_keeps_the_scores_visible_with_many_classes(recwarn):
    """40 classes' IoU and Dice used to be 80 legend entries over the curves (constrained layout
    gave up); now each class is named once, beside the axes, and one epoch has one tick."""
    import io
    from types import SimpleNamespace

    from PIL import Image

    from flows.training_run import metrics_chart
    from pipelines.model_card import ClassInfo, default_colour

    for count, epochs in ((2, 1), (40, 3)):
        classes = tuple(ClassInfo(i, f"class{i}", default_colour(i)) for i in range(count))
        history = [{"epoch": e, "loss": 1 / e, "validation_loss": 1.2 / e, **{f"iou/{c.name}": 0.5 for c in classes},
                    **{f"dice/{c.name}": 0.6 for c in classes}} for e in range(1, epochs + 1)]
        with Image.open(io.BytesIO(metrics_chart(history, SimpleNamespace(classes=classes)))) as picture:
            assert picture.width > 1000 + 100 * (count > 20)  # wider for a second column of names
    assert not [w for w in recwarn if "constrained_layout" in str(w.message)]


def test_a_model_trained_into_object_storage_segments_from_there(ray_cluster, s3_server, nuclei_halves, tmp_path):
    import boto3

    from pipelines import storage

    boto3.client("s3").create_bucket(Bucket="segpipe-models")
    out = "s3://segpipe-models/nuclei"
    assert main(["train", "--images", str(nuclei_halves["left"]), "--labels", str(nuclei_halves["left_mask"]), *TINY,
                 "--epochs", "1", "--out", out]) == 0
    files = set(storage.list_files(out))
    assert {"card.yaml", "weights.safetensors", "metrics.json", "metrics.parquet", "metrics.png", "training.json",
            "checkpoints/training/epoch-0001/state.json"} <= files
    assert not any(name.startswith(".prepared") for name in files)
    segmented = tmp_path / "segmented"
    assert main(["segment", str(nuclei_halves["right"]), "--model", f"{out}/card.yaml", "--out", str(segmented)]) == 0
    with rasterio.open(segmented / "right" / "labels.tif") as labels:
        assert set(np.unique(labels.read(1))) <= {0, 1}
        by_card = labels.read(1)
    # The prefix itself, as a local training folder is taken (its card.yaml).
    assert main(["segment", str(nuclei_halves["right"]), "--model", out, "--out", str(tmp_path / "by-prefix")]) == 0
    with rasterio.open(tmp_path / "by-prefix" / "right" / "labels.tif") as labels:
        np.testing.assert_array_equal(labels.read(1), by_card)


@pytest.mark.parametrize("network", [
    ["--architecture", "Unet", "--encoder", "resnet18", "--architecture-options", "encoder_depth=3,decoder_channels=[32,16,8]"],
    ["--architecture", "lraspp_mobilenet_v3_large", "--bands", "1,1,1"],
], ids=["smp", "torchvision"])
def test_smp_and_torchvision_networks_train_into_cards_segment_uses(ray_cluster, nuclei_halves, tmp_path, network):
    out = tmp_path / "model"
    assert main(["train", "--images", str(nuclei_halves["left"]), "--labels", str(nuclei_halves["left_mask"]),
                 *network, "--classes", "background,nucleus", "--tile", "64", "--batch", "2", "--epochs", "1",
                 "--steps-per-epoch", "2", "--validation-tiles", "2", "--out", str(out)]) == 0
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["format"] == ("smp" if "--encoder" in network else "torchvision")
    segmented = tmp_path / "segmented"
    assert main(["segment", str(nuclei_halves["right"]), "--model", str(out / "card.yaml"), "--out", str(segmented)]) == 0
    assert (segmented / "right" / "labels.tif").is_file()


def test_fine_tuning_starts_from_the_cards_weights(nuclei_model, nuclei_halves, tmp_path, capsys):
    pair = ["--images", str(nuclei_halves["left"]), "--labels", str(nuclei_halves["left_mask"])]
    base = nuclei_model[0]
    tuned = tmp_path / "tuned"
    # A learning rate too small to move any weight: what comes out is what went in.
    assert main(["train", *pair, "--fine-tune", str(base / "card.yaml"), "--classes", "background,nucleus",
                 "--epochs", "1", "--steps-per-epoch", "2", "--learning-rate", "1e-12", "--out", str(tuned)]) == 0
    before, after = load_file(str(base / "weights.safetensors")), load_file(str(tuned / "weights.safetensors"))
    for name in before:
        np.testing.assert_allclose(after[name], before[name], atol=1e-6, err_msg=name)
    card = yaml.safe_load((tuned / "card.yaml").read_text())
    assert card["architecture_options"] == {"base_features": 16, "depth": 3} and card["tile"]["size"] == 96
    assert card["input"]["mean"] == yaml.safe_load((base / "card.yaml").read_text())["input"]["mean"]

    # A card whose weights hold a NaN (a diverged run saved before this was checked) is refused
    # before any training, naming the file and the tensor.
    poisoned = tmp_path / "poisoned"
    shutil.copytree(base, poisoned, ignore=shutil.ignore_patterns("checkpoints"))
    weights = dict(before)
    name = sorted(weights)[1]
    weights[name] = weights[name].copy()
    weights[name].flat[0] = np.nan
    save_file(weights, str(poisoned / "weights.safetensors"))
    capsys.readouterr()
    assert main(["train", *pair, "--fine-tune", str(poisoned / "card.yaml"), "--classes", "background,nucleus",
                 "--epochs", "1", "--out", str(tmp_path / "from-nan")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"segpipe: error: {poisoned / 'weights.safetensors'}: holds NaN or infinity in 1 tensor(s) ({name}): "
        f"there is nothing to fine-tune from")

    # A card whose weights file was copied only in part says so (before: a traceback of
    # safetensors' "incomplete metadata").
    whole = (base / "weights.safetensors").read_bytes()
    (poisoned / "weights.safetensors").write_bytes(whole[: len(whole) // 3])
    assert main(["train", *pair, "--fine-tune", str(poisoned / "card.yaml"), "--classes", "background,nucleus",
                 "--epochs", "1", "--out", str(tmp_path / "from-cut")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"segpipe: error: {poisoned / 'weights.safetensors'}: the file is cut short or damaged ({len(whole) // 3} "
        f"bytes of the {len(whole)} its header names); copy it again")
