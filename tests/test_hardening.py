"""The inputs and faults users meet, on the real scene: names that would overwrite the root's own
files or each other, numbers that are not numbers, cards and weights that cannot work, errors
raised inside Ray workers, a disk that turns read-only mid-run, credentials, a locked-down SQL
prompt, glob characters in a root, a driver killed with -9, and headers that lie."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr

from flows.archive_flow import run_night
from flows.cli import main
from flows.options import RunOptions
from flows.synthetic import write_small_net_card
from pipelines.model_card import load_card
from pipelines.stats import read_table

REPO = Path(__file__).resolve().parents[1]
S2_CARD = load_card("s2-cloud")


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("segpipe: error:")]


def write_crop(scene: Path, path: Path, size: int = 64, offset: int = 0) -> Path:
    """A size x size crop of the scene with its bands, nodata and georeferencing."""
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(scene) as src:
        profile = dict(src.profile, width=size, height=size,
                       transform=src.transform * Affine.translation(offset, offset))
        pixels = src.read(window=((offset, offset + size), (offset, offset + size)))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


def s2_card_with(tmp_path: Path, **changes) -> Path:
    """The built-in s2-cloud card with some fields changed (dotted names reach into sections)."""
    card = yaml.safe_load(Path(S2_CARD.source).read_text())
    card["weights"] = str(S2_CARD.weights)
    for dotted, value in changes.items():
        section = card
        *parents, leaf = dotted.split(".")
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


# --- 1. names ----------------------------------------------------------------------------------

NASTY_NAMES = ["stats.tif", "runs.tif", ".manifest.tif", ".work.tif", "a.tif", "a.TIFF", ".tif", "..tif", "...tif",
               "new\nline.tif"]


def manifest_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / ".manifest").glob("*.json"))]


def test_image_names_never_land_on_the_roots_entries_nor_on_each_other(ray_cluster, prefect_server, sentinel_scene,
                                                                      tmp_path):
    root = tmp_path / "root"
    first = tmp_path / "night-1"
    write_crop(sentinel_scene, first / "first.tif")
    assert run_night(str(first), "s2-cloud", str(root), RunOptions(run_id="night-1"))["done"] == ["first"]

    nasty = tmp_path / "night-2"
    for offset, name in enumerate(NASTY_NAMES):
        write_crop(sentinel_scene, nasty / name, offset=offset * 8)
    report = run_night(str(nasty), "s2-cloud", str(root), RunOptions(run_id="night-2"))
    listed = [name for name in NASTY_NAMES if not name.startswith(".")]  # hidden names are not listed
    assert report["failed"] == {} and len(report["done"]) == len(listed)
    for name in NASTY_NAMES:  # given by name, a hidden one is segmented all the same
        if name.startswith("."):
            assert main(["-q", "segment", str(nasty / name), "--model", "s2-cloud", "--out", str(root),
                         "--run-id", "night-2"]) == 0
    same_stem = tmp_path / "night-3"
    for folder in ("sub1", "sub2"):
        write_crop(sentinel_scene, same_stem / folder / "b.tif", offset=16 if folder == "sub1" else 24)
    report = run_night(str(same_stem / "*" / "b.tif"), "s2-cloud", str(root), RunOptions(run_id="night-3"))
    assert report["failed"] == {} and len(report["done"]) == 2

    # The root's own entries are what they were: every night's statistics, reports and records.
    assert (root / "stats").is_dir() and (root / "runs").is_dir() and (root / ".manifest").is_dir()
    assert sorted(p.name for p in (root / "runs").iterdir() if not p.name.startswith("night-2-")) == [
        f"night-{n}.{suffix}" for n in (1, 2, 3) for suffix in ("html", "json")]
    records = manifest_records(root)
    assert len(records) == 1 + len(NASTY_NAMES) + 2
    rows = read_table(root / "stats", "image_class")
    assert set(rows["run_id"].to_pylist()) == {"night-1", "night-2", "night-3"}

    # Every image has a folder of its own, with its own labels; the statistics tell them apart.
    folders = {record["uri"]: Path(record["outputs"][0]).parent for record in records}
    assert len(set(folders.values())) == len(folders)
    for uri, folder in folders.items():
        assert folder.parent == root and not folder.name.startswith(".") and folder.name.isprintable()
        assert folder.name.lower() not in {"stats", "runs", ".manifest", ".work", ".names"}
        with rasterio.open(folder / "labels.tif") as labels, rasterio.open(uri) as source:
            assert labels.transform == source.transform, f"{folder} holds the labels of another image"
    names_by_uri = dict(zip(rows["image_uri"].to_pylist(), rows["image"].to_pylist()))
    assert len(set(names_by_uri.values())) == len(names_by_uri) == len(folders)
    assert {folders[uri].name for uri in folders} == set(names_by_uri.values())
    a_names = sorted(folders[str(nasty / name)].name for name in ("a.tif", "a.TIFF"))
    assert a_names[0] == "a" and a_names[1].startswith("a-") and len(a_names[1]) == len("a-") + 8

    # Stable from night to night: segmented again with other settings, every image keeps its folder.
    again = run_night(str(nasty), "s2-cloud", str(root), RunOptions(run_id="night-4", overlap=0.5))
    assert len(again["done"]) == len(listed)
    renamed = {r["uri"]: Path(r["outputs"][0]).parent for r in manifest_records(root) if r["run_id"] == "night-4"}
    assert renamed == {uri: folders[uri] for uri in renamed}


# --- 2. numbers that are not numbers -------------------------------------------------------------

def float_scene(sentinel_scene: Path, path: Path, value_at: tuple[int, int, int, float] | None = None) -> Path:
    with rasterio.open(sentinel_scene) as src:
        profile, pixels = src.profile, src.read().astype(np.float32)
    if value_at:
        band, row, col, value = value_at
        pixels[band, row, col] = value
    profile.update(dtype="float32")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


def test_a_nan_in_one_band_of_one_pixel_is_nodata_for_that_pixel_only(ray_cluster, sentinel_scene, tmp_path):
    """The NaN's pixel is nodata (255, not counted); the model sees the band's mean there, so the
    labels equal those of the scene with the band's mean written in that pixel."""
    band, row, col = 2, 100, 150
    mean_raw = np.float32(S2_CARD.mean[band]) / np.float32(S2_CARD.scale)
    with_mean = float_scene(sentinel_scene, tmp_path / "with_mean.tif", (band, row, col, mean_raw))
    holed = float_scene(sentinel_scene, tmp_path / "holed.tif", (band, row, col, np.nan))
    out = tmp_path / "out"
    for scene in (with_mean, holed):
        assert main(["segment", str(scene), "--model", "s2-cloud", "--out", str(out)]) == 0
    with rasterio.open(out / "with_mean" / "labels.tif") as a, rasterio.open(out / "holed" / "labels.tif") as b:
        expected, labels = a.read(1), b.read(1)
    assert labels[row, col] == 255 and expected[row, col] != 255
    expected[row, col] = 255
    np.testing.assert_array_equal(labels, expected)
    rows = read_table(out / "stats", "image_class").to_pylist()
    counted = {row["image"]: 0 for row in rows}
    for stats_row in rows:
        counted[stats_row["image"]] += stats_row["pixel_count"]
    assert counted["holed"] == counted["with_mean"] - 1 == int((labels != 255).sum())


@pytest.mark.parametrize("field, value, words", [
    ("input.scale", float("nan"), ["input.scale", "finite"]),
    ("input.std", [0.3, 0.3, 0, 0.3, 0.2, 0.1], ["input.std[2]", "greater than 0"]),
    ("input.std", [0.3, 0.3, -1, 0.3, 0.2, 0.1], ["input.std[2]", "greater than 0"]),
    ("input.mean", [0.3, float("inf"), 0.3, 0.3, 0.2, 0.1], ["input.mean[1]", "finite"]),
    ("input.scale", 0, ["input.scale", "0"]),
    # Finite in float64, not in float32, where the worker normalises: 0 and infinity there.
    ("input.std", [0.3, 1e-300, 0.3, 0.3, 0.2, 0.1], ["input.std[1]", "float32"]),
    ("input.scale", 1e300, ["input.scale", "float32"]),
])
def test_invalid_normalisation_in_a_card_is_bad_input(field, value, words, sentinel_scene, tmp_path, capsys):
    card = s2_card_with(tmp_path, **{field: value})
    out = tmp_path / "out"
    assert main(["segment", str(sentinel_scene), "--model", str(card), "--out", str(out)]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"segpipe: error: {card}: model card field") and all(w in line for w in words), line
    assert not out.exists()


# --- 3. cards that cannot work ---------------------------------------------------------------------

@pytest.fixture
def rgb_scene_and_card(sentinel_scene, tmp_path) -> tuple[Path, Path]:
    """An 8-bit RGB crop of the real scene and the small conv net's card (3 bands -> 4 classes)."""
    from flows.synthetic import real_rgb_tile

    pixels, profile = real_rgb_tile()
    profile.update(count=3, dtype="uint8", nodata=0)
    scene = tmp_path / "rgb.tif"
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    return scene, write_small_net_card(tmp_path, tile=64)


def edited(card: Path, edit) -> Path:
    content = yaml.safe_load(card.read_text())
    edit(content)
    card.write_text(yaml.safe_dump(content))
    return card


CARD_PROBLEMS = {
    "tile 0": (lambda c: c["tile"].update(size=0), "tile.size"),
    "tile 100000": (lambda c: c["tile"].update(size=100000), "tile.size"),
    "negative halo": (lambda c: c["tile"].update(halo=-4), "tile.halo"),
    "overlap 0.999": (lambda c: c["tile"].update(overlap=0.999), "tile.overlap"),
    "256 classes": (lambda c: c.update(classes=[{"id": i, "name": f"c{i}"} for i in range(256)]), "classes"),
    "300 classes": (lambda c: c.update(classes=[{"id": i, "name": f"c{i}"} for i in range(300)]), "classes"),
    "duplicate class names": (lambda c: c["classes"][2].update(name="class0"), "classes[2].name"),
    "band index 0": (lambda c: c["input"].update(bands=[0, 1, 2]), "input.bands[0]"),
    "preview index out of range": (lambda c: c["input"].update(preview_bands=[0, 1, 3]), "input.preview_bands[2]"),
    "another number of classes": (lambda c: c["classes"].pop(), "classes"),
    "preview bands not a list": (lambda c: c["input"].update(preview_bands=5), "input.preview_bands"),
    "spatial dims not a whole number": (lambda c: c.update(spatial_dims=2.0), "spatial_dims"),
    "a misspelt key": (lambda c: c["input"].update(scael=0.5), "input.scael"),
    "a misspelt section": (lambda c: c.update(tiel=c["tile"]), "tiel"),
    "fixed size not true or false": (lambda c: c["tile"].update(fixed_size="no"), "tile.fixed_size"),
    "weights a folder": (lambda c: c.update(weights="."), None),
    "a model that needs a halo": (lambda c: c["tile"].update(size=64), None),
}


@pytest.mark.parametrize("problem", sorted(CARD_PROBLEMS))
def test_cards_are_checked_before_any_ingest(problem, prefect_server, rgb_scene_and_card, tmp_path, capsys):
    scene, card = rgb_scene_and_card
    edit, field = CARD_PROBLEMS[problem]
    if problem == "a model that needs a halo":  # valid convolutions: the output is smaller than the tile
        from test_stitching import conv_net, torchscript_card

        card = torchscript_card(tmp_path, conv_net(2, 3, 4, same=False), 2, 3, 4, tile=64)
    edited(card, edit)
    out = tmp_path / "out"
    for command in (["segment", str(scene)], ["run", str(scene.parent)]):
        assert main([*command, "--model", str(card), "--out", str(out)]) == 2, problem
        lines = error_lines(capsys)
        assert len(lines) == 1 and str(card) in lines[0], lines
        if field:
            assert f"'{field}'" in lines[0] or field in lines[0], lines[0]
    assert not out.exists(), "nothing is written for a card that cannot work"


def test_a_tile_size_given_on_the_command_line_is_tried_in_the_driver(prefect_server, rgb_scene_and_card, tmp_path,
                                                                      capsys):
    """A U-Net of depth 3 takes sides divisible by 8: --tile 60 fails in one line before any ingest."""
    from flows.synthetic import write_tiny_unet_card

    scene, _ = rgb_scene_and_card
    card = write_tiny_unet_card(tmp_path, tile=64)
    out = tmp_path / "out"
    for command in (["segment", str(scene)], ["run", str(scene.parent)]):
        assert main([*command, "--model", str(card), "--out", str(out), "--tile", "60"]) == 2
        [line] = error_lines(capsys)
        assert str(card) in line and "60-pixel tile" in line and "--tile" in line, line
    assert not out.exists()


class NotAWeight:
    """Anything a pickle could carry instead of tensors."""


WEIGHT_PROBLEMS = {
    "corrupt bytes": lambda folder: (folder / "tiny-unet.pt").write_bytes(os.urandom(4096)),
    "weights of another shape": lambda folder: torch.save(
        __import__("segworkers.models", fromlist=["create"]).create(
            "unet_padded", num_classes=4, in_channels=3, base_features=8, depth=3).state_dict(), folder / "tiny-unet.pt"),
    "a pickle": lambda folder: torch.save({"weights": NotAWeight()}, folder / "tiny-unet.pt"),
    "/dev/zero": "/dev/zero",
    "package path escape": "package://os/../../etc/passwd",
    "not a package": "package://os/etc/passwd",
}


@pytest.mark.parametrize("problem", sorted(WEIGHT_PROBLEMS))
def test_weights_that_cannot_load_stop_the_run_before_any_work(problem, prefect_server, rgb_scene_and_card, tmp_path,
                                                              capsys):
    from flows.synthetic import write_tiny_unet_card

    scene, _ = rgb_scene_and_card
    card = write_tiny_unet_card(tmp_path, tile=64)
    change = WEIGHT_PROBLEMS[problem]
    if isinstance(change, str):
        edited(card, lambda c: c.update(weights=change))
    else:
        change(tmp_path)
    out = tmp_path / "out"
    for command in (["segment", str(scene)], ["run", str(scene.parent)]):
        assert main([*command, "--model", str(card), "--out", str(out)]) == 2, problem
        lines = error_lines(capsys)
        assert len(lines) == 1, lines
        assert "Traceback" not in lines[0] and len(lines[0]) < 600
    assert not out.exists()


def test_an_smp_folder_that_asks_for_imagenet_weights_never_downloads(tmp_path, monkeypatch):
    """Its config is read with encoder_weights forced to None; with no network, a download
    attempt would fail (or hang) the load."""
    import segmentation_models_pytorch as smp

    from segworkers.tile_models import smp_pretrained_folder

    net = smp.Unet("resnet18", encoder_weights=None, in_channels=6, classes=3, encoder_depth=3,
                   decoder_channels=(32, 16, 8))
    net.save_pretrained(str(tmp_path / "smp"))
    config = json.loads((tmp_path / "smp" / "config.json").read_text())
    config["encoder_weights"] = "imagenet"
    (tmp_path / "smp" / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = smp_pretrained_folder(tmp_path / "smp")
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# --- 4. errors inside Ray workers ----------------------------------------------------------------

@pytest.fixture
def corrupt_zarr_source(sentinel_scene, tmp_path) -> Path:
    """The scene as a (band, y, x) Zarr source read in place, with one shard overwritten by garbage."""
    with rasterio.open(sentinel_scene) as src:
        pixels = src.read()
    store = tmp_path / "archive" / "scene.zarr"
    zarr.create_array(store=str(store), data=pixels, chunks=(6, 128, 128), shards=(6, 128, 128))
    shard = sorted(p for p in (store / "c").rglob("*") if p.is_file())[1]
    shard.write_bytes(b"not a shard" * 40)
    return store


def test_bad_input_found_inside_a_worker_is_one_line_and_never_retried(ray_cluster, prefect_server,
                                                                       corrupt_zarr_source, tmp_path, capsys):
    from flows.archive_flow import is_transient

    out = tmp_path / "out"
    # --workers: on Ray actors, not in this process (as small work would run)
    assert main(["segment", str(corrupt_zarr_source), "--model", "s2-cloud", "--out", str(out), "--workers", "1"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"segpipe: error: {corrupt_zarr_source}: cannot read pixels"), line
    assert "\x1b[" not in line and "RayTaskError" not in line

    report = run_night(str(corrupt_zarr_source.parent), "s2-cloud", str(tmp_path / "flow"))
    [(uri, message)] = report["failed"].items()
    assert message == line.removeprefix("segpipe: error: ")
    logs = capsys.readouterr()
    assert "Retry" not in logs.out + logs.err, "bad input must not be retried"
    from pipelines.errors import InputError

    assert not is_transient(InputError("x", "y"))


# --- 5. a disk that fills up mid-run ------------------------------------------------------------

@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_output_root_that_cannot_be_a_folder_is_one_line(where, prefect_server, sentinel_scene, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    out = tmp_path / "taken" / ("" if where == "a file" else "root")
    for command in (["segment", str(sentinel_scene)], ["run", str(sentinel_scene.parent)]):
        assert main([*command, "--model", "s2-cloud-l1c", "--out", str(out)]) == 2
        [line] = error_lines(capsys)
        assert line.startswith(f"segpipe: error: {out}: the output root cannot be made a folder"), line
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_a_disk_that_fills_up_mid_run_fails_in_one_line_without_retries(tmp_path):
    """The root is a tmpfs of its own (user + mount namespace), filled up once the first blocks
    are written: the next writes fail (a worker's shard or the driver's record), the image
    fails with the documented line and is not retried, the report's failure is named, and the
    summary is printed."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unprivileged user+mount namespaces (unshare -rm) are not available here")
    from flows.synthetic import write_tiled_scene

    archive = tmp_path / "archive"
    archive.mkdir()
    write_tiled_scene(archive / "big.tif", 1024)
    card = write_small_net_card(tmp_path, tile=64)
    root = tmp_path / "root"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(tmp_path / "prefect-home"))
    command = [sys.executable, "-m", "flows.cli", "run", str(archive), "--model", str(card), "--out", str(root),
               "--block", "64", "--workers", "1"]
    r = shlex.quote(str(root))
    script = (
        f"mount -t tmpfs -o size=64m tmpfs {r} || exit 90; "
        f"{shlex.join(command)} > {r}.log 2>&1 & run=$!; "
        f"for i in $(seq 900); do n=$(ls {r}/.work/*/blocks 2>/dev/null | wc -l); [ $n -ge 1 ] && break; sleep 0.1; done; "
        f"dd if=/dev/zero of={r}/filler bs=1M 2>/dev/null; wait $run; echo EXIT=$?; cat {r}.log; "
        f"echo '== manifest'; ls -1 {r}/.manifest 2>/dev/null; true"
    )
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0 and "EXIT=1" in output, output
    assert "0 done, 0 skipped (already done), 1 failed" in output
    assert "Traceback" not in output, "a full disk is a line, not a traceback"
    [failed] = [line for line in output.splitlines() if line.strip().startswith("failed ")]
    assert "no space left" in failed and "\x1b[" not in failed and "RayTaskError" not in failed, failed
    assert "report: not written (" in output and "no space left" in output.split("report: not written (")[1]
    assert "Retry" not in output, "a full disk is not retried"
    assert output.split("== manifest")[1].strip() == "", "nothing marked done"


# --- 6. credentials --------------------------------------------------------------------------

def test_no_credential_is_written_to_any_file(ray_cluster, prefect_server, s3_server, sentinel_scene, tmp_path,
                                              monkeypatch):
    import boto3
    import ray
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    secret = f"segpipe-test-secret-{secrets.token_hex(16)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    bucket = f"secret-{secrets.token_hex(6)}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(sentinel_scene), bucket, "archive/scene.tif")
    # On a Ray actor (workers=1): the credentials travel to it, and Ray writes session logs.
    report = run_night(f"s3://{bucket}/archive", "s2-cloud", f"s3://{bucket}/root",
                       RunOptions(run_id="secret", workers=1))
    assert report["done"] == ["scene"], report

    needle = secret.encode()
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    leaks = [str(p) for p in session.rglob("*") if p.is_file() and needle in p.read_bytes()]
    for entry in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        if needle in s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read():
            leaks.append(f"s3://{bucket}/{entry['Key']}")
    database = PREFECT_API_DATABASE_CONNECTION_URL.value()
    if database and database.startswith("sqlite"):
        path = Path(database.split("///", 1)[1])
        leaks += [str(p) for p in path.parent.glob(path.name + "*") if needle in p.read_bytes()]
    assert leaks == []


# --- 7. the SQL prompt ---------------------------------------------------------------------------

@pytest.mark.parametrize("query", [
    "COPY (SELECT * FROM image_class) TO '{tmp}/copied.csv'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "ATTACH '{tmp}/new.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CREATE TABLE kept AS SELECT 1",
    "SET enable_external_access = true",
    "SELECT 1; DROP VIEW image_class",
    "SELECT * FROM '{tmp}/*.parquet'",
])
def test_stats_sql_is_a_read_only_view_of_the_statistics(query, segmented_scene, tmp_path, capsys):
    assert main(["stats", str(segmented_scene), "--sql", query.format(tmp=tmp_path)]) == 2
    [line] = error_lines(capsys)
    assert line.startswith("segpipe: error: --sql: ")
    assert list(tmp_path.iterdir()) == []
    assert main(["stats", str(segmented_scene), "--sql", "SELECT COUNT(*) AS n FROM image_class", "--format",
                 "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 3}]


# --- 8. glob characters in a root ----------------------------------------------------------------

def test_a_root_and_an_archive_with_glob_characters_are_taken_as_they_are(ray_cluster, prefect_server,
                                                                         sentinel_scene, tmp_path, capsys):
    archive = tmp_path / "scenes[1]"
    write_crop(sentinel_scene, archive / "crop.tif")
    root = tmp_path / "root[1]"
    assert main(["run", str(archive), "--model", "s2-cloud", "--out", str(root)]) == 0
    assert not list(root.glob("stats/*/*/_pending/*/*.parquet")), "the statistics are compacted"
    assert not list(root.glob("stats/*/*/_pending")), "and no empty folders are left"
    assert len(list((root / "stats" / "image_class").rglob("*.parquet"))) == 1
    capsys.readouterr()
    assert main(["stats", str(root), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["class_name"] for row in rows] == ["clear", "cloud", "shadow"]
    assert sum(row["pixel_count"] for row in rows) > 0


def test_an_archive_with_images_only_in_subfolders_says_how_to_name_them(ray_cluster, prefect_server, sentinel_scene,
                                                                         tmp_path, capsys):
    """Discovery lists the folder itself, not its subfolders: a night over archive/ whose images
    are in archive/2026-12-01/ found nothing and said only '0 done, 0 skipped, 0 failed'. It now
    notes the subfolders and the pattern that names their images, which then finds them."""
    archive = tmp_path / "archive"
    write_crop(sentinel_scene, archive / "2026-12-01" / "crop.tif")
    (archive / "2026-12-02").mkdir()
    capsys.readouterr()
    assert main(["run", str(archive), "--model", "s2-cloud", "--out", str(tmp_path / "root")]) == 0
    printed = capsys.readouterr()
    assert "0 done, 0 skipped (already done), 0 failed" in printed.out
    assert (f"note: {archive} holds no image segpipe reads in the folder itself" in printed.err
            and "only 2 subfolder(s) (2026-12-01, 2026-12-02), which are not looked into" in printed.err
            and f"'{archive}/**/*.tif'" in printed.err)
    assert main(["run", str(archive / "*.png"), "--model", "s2-cloud", "--out", str(tmp_path / "root")]) == 0
    assert f"note: the pattern {archive / '*.png'} matches no file" in capsys.readouterr().err


# --- 9. leftovers ----------------------------------------------------------------------------------

RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def test_a_driver_killed_with_9_leaves_no_process_behind(sentinel_scene, tmp_path):
    """Prefect's temporary API server dies with the command (it used to stay, one per crash);
    Ray's raylet, GCS and workers too. Ray's two agents notice that their raylet is gone and
    exit on their own about a minute later, which is not waited for here."""
    import psutil

    from flows.synthetic import write_tiled_scene

    archive = tmp_path / "archive"
    archive.mkdir()
    write_tiled_scene(archive / "big.tif", 1024)
    card = write_small_net_card(tmp_path, tile=64)
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(tmp_path / "prefect-home"))
    command = [sys.executable, "-m", "flows.cli", "run", str(archive), "--model", str(card), "--out", str(root),
               "--block", "64", "--workers", "1"]
    driver = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(root.glob(".work/*/blocks/*.json"))) < 3:
        assert driver.poll() is None and time.monotonic() < deadline, "the run never got to its blocks"
        time.sleep(0.2)
    descendants = psutil.Process(driver.pid).children(recursive=True)
    assert any("prefect.server.api.server:create_app" in " ".join(p.cmdline()) for p in descendants), \
        "the run started its own temporary Prefect API"
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    def command_line(process: psutil.Process) -> str | None:
        """The process's command line, or None once it has exited (a zombie counts as exited:
        it can turn into one between any two questions asked of it)."""
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            return " ".join([process.name(), *process.cmdline()])
        except psutil.NoSuchProcess:  # ZombieProcess included
            return None

    def outliving() -> list[str]:
        alive = [line for line in map(command_line, descendants) if line is not None]
        return [line[:100] for line in alive if not any(agent in line for agent in RAY_AGENTS)]

    deadline = time.monotonic() + 15
    while outliving() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert outliving() == []


def test_the_next_run_removes_work_folders_left_by_finished_images(ray_cluster, prefect_server, sentinel_scene,
                                                                    tmp_path):
    archive = tmp_path / "archive"
    write_crop(sentinel_scene, archive / "crop.tif")
    root = tmp_path / "root"
    assert run_night(str(archive), "s2-cloud", str(root))["done"] == ["crop"]
    [record] = (root / ".manifest").glob("*.json")
    finished = root / ".work" / f"crop-{record.stem[:12]}"  # as a run killed while removing it leaves it
    (finished / "image.zarr").mkdir(parents=True)
    (finished / "state.json").write_text(json.dumps({"key": record.stem, "block": 2048, "tile": 256}))
    unfinished = root / ".work" / "other-0123456789ab"
    unfinished.mkdir()
    (unfinished / "state.json").write_text(json.dumps({"key": "0" * 64, "block": 2048, "tile": 256}))
    stateless = root / ".work" / "torn"
    stateless.mkdir()
    assert run_night(str(archive), "s2-cloud", str(root))["skipped"] == ["crop"]
    assert sorted(p.name for p in (root / ".work").iterdir()) == [unfinished.name], "an unfinished one can resume"


# --- 10. headers that lie ------------------------------------------------------------------------

def sparse_scene(path: Path, side: int) -> Path:
    """A GeoTIFF whose header says side x side pixels, of which one 300 x 300 window is stored:
    GDAL leaves every other block out of the file (SPARSE_OK)."""
    from rasterio.transform import from_origin

    from flows.synthetic import real_rgb_tile

    pixels, _ = real_rgb_tile()
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32632",
                   transform=from_origin(500000, 6000000, 10, 10), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", SPARSE_OK=True, BIGTIFF="YES")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels[:, :200, :300], window=((1000, 1200), (2000, 2300)))
    return path


def test_a_header_that_lies_is_refused_or_costs_nothing(ray_cluster, tmp_path, capsys):
    huge = sparse_scene(tmp_path / "huge.tif", 100_000)
    assert huge.stat().st_size < 1_000_000
    card = write_small_net_card(tmp_path, tile=64)
    assert main(["segment", str(huge), "--model", str(card), "--out", str(tmp_path / "refused"),
                 "--max-pixels", "1000000000"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"segpipe: error: {huge}: is 100000 x 100000") and "--max-pixels" in line
    assert not (tmp_path / "refused").exists()

    lying = sparse_scene(tmp_path / "lying.tif", 20_000)
    out = tmp_path / "out"
    assert main(["segment", str(lying), "--model", str(card), "--out", str(out)]) == 0
    with rasterio.open(out / "lying" / "labels.tif") as labels:
        window = labels.read(1, window=((1000, 1200), (2000, 2300)))
        assert (window != 255).all()
        assert (labels.read(1, window=((10000, 10512), (10000, 10512))) == 255).all()
    assert (out / "lying" / "labels.tif").stat().st_size < 2_000_000, "absent blocks stay absent"
    rows = read_table(out / "stats", "image_class").to_pylist()
    assert sum(row["pixel_count"] for row in rows) == 200 * 300, "only the stored pixels are counted"
