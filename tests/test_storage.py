"""pipelines.storage against the real thing: local folders, and s3:// on a moto S3 server that
listens on 127.0.0.1 (tests/s3_server.py), reached over HTTP by boto3, s3fs and GDAL alike."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from botocore.config import Config

from pipelines import storage
from pipelines.errors import InputError

# Every request here goes to loopback; a hung one fails the test instead of the session.
pytestmark = pytest.mark.timeout(60)
BOTO_CONFIG = Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2})
IMAGE_SUFFIXES = (".tif", ".tiff")


@pytest.fixture
def s3(s3_server):
    return boto3.client("s3", config=BOTO_CONFIG)


@pytest.fixture
def bucket(s3) -> str:
    name = f"segpipe-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def archived_scene(s3, bucket, sentinel_scene: Path) -> str:
    """The Sentinel-2 scene in s3://BUCKET/archive/, next to a non-image and a nested image."""
    s3.upload_file(str(sentinel_scene), bucket, "archive/sentinel2_scene.tif")
    s3.put_object(Bucket=bucket, Key="archive/notes.txt", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="archive/older/scene.tif", Body=b"one level down")
    return f"s3://{bucket}/archive/sentinel2_scene.tif"


def output_folder(root: Path) -> tuple[Path, np.ndarray]:
    """A finished output folder as finalize leaves it: a Zarr store, a GeoTIFF, a PNG, JSON."""
    labels = np.random.default_rng(7).integers(0, 5, size=(200, 300), dtype=np.uint8)
    out = root / "sentinel2_scene"
    array = zarr.create_array(out / "labels.zarr", shape=labels.shape, chunks=(64, 64), dtype="uint8")
    array[:] = labels
    array.attrs["classes"] = ["clear", "cloud", "shadow", "snow", "water"]
    profile = {
        "driver": "GTiff", "width": 300, "height": 200, "count": 1, "dtype": "uint8",
        "crs": "EPSG:32719", "transform": Affine(10, 0, 300000, 0, -10, 9000000),
    }
    with rasterio.open(out / "labels.tif", "w", **profile) as dst:
        dst.write(labels, 1)
    (out / "preview.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (out / "report" / "summary.json").parent.mkdir()
    (out / "report" / "summary.json").write_text(json.dumps({"pixels": int(labels.size)}))
    return out, labels


def test_is_remote_tells_uris_from_local_paths():
    assert storage.is_remote("s3://bucket/key.tif")
    assert storage.is_remote("gs://bucket/key.tif")
    assert not storage.is_remote("/data/scene.tif")
    assert not storage.is_remote("relative/scene.tif")
    assert not storage.is_remote("file:///data/scene.tif")
    assert not storage.is_remote(Path("/data/scene.tif"))


def test_local_folder_listing_stat_and_upload(tmp_path, sentinel_scene):
    archive = tmp_path / "archive"
    (archive / "older").mkdir(parents=True)
    (archive / "B.TIFF").write_bytes(sentinel_scene.read_bytes())
    (archive / "a.tif").write_bytes(b"x")
    (archive / "notes.txt").write_text("no")
    (archive / "older" / "c.tif").write_bytes(b"y")

    assert storage.list_images(archive, IMAGE_SUFFIXES) == [str(archive / "B.TIFF"), str(archive / "a.tif")]
    size, tag = storage.stat(archive / "B.TIFF")
    assert size == sentinel_scene.stat().st_size
    assert tag == str((archive / "B.TIFF").stat().st_mtime_ns)

    out, _ = output_folder(tmp_path / "work")
    written = storage.put_tree(out, tmp_path / "published")
    local_files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [f"{tmp_path / 'published'}/{name}" for name in local_files]
    for name in local_files:
        assert (tmp_path / "published" / name).read_bytes() == (out / name).read_bytes()
    storage.put_file(out / "preview.png", tmp_path / "previews" / "2026" / "scene.png")
    assert (tmp_path / "previews" / "2026" / "scene.png").read_bytes() == (out / "preview.png").read_bytes()

    with pytest.raises(InputError, match="no such file"):
        storage.stat(archive / "missing.tif")
    with pytest.raises(InputError, match="no such folder"):
        storage.list_images(tmp_path / "nowhere", IMAGE_SUFFIXES)


def test_list_images_and_stat_on_s3(s3, bucket, archived_scene, sentinel_scene):
    scene_bytes = sentinel_scene.read_bytes()

    # Non-recursive, filtered by suffix; the prefix works with or without its trailing slash.
    for prefix in (f"s3://{bucket}/archive", f"s3://{bucket}/archive/"):
        assert storage.list_images(prefix, IMAGE_SUFFIXES) == [archived_scene]

    size, etag = storage.stat(archived_scene)
    assert size == len(scene_bytes)
    # A single-part upload's ETag is the MD5 of its content (S3 API, "Common response headers").
    assert etag == hashlib.md5(scene_bytes).hexdigest()
    assert etag == s3.head_object(Bucket=bucket, Key="archive/sentinel2_scene.tif")["ETag"].strip('"')

    s3.put_object(Bucket=bucket, Key="archive/sentinel2_scene.tif", Body=scene_bytes[:-1])
    assert storage.stat(archived_scene) == (len(scene_bytes) - 1, hashlib.md5(scene_bytes[:-1]).hexdigest())

    assert storage.exists(archived_scene)
    assert not storage.exists(f"s3://{bucket}/archive/absent.tif")


def test_hidden_files_are_not_images_of_an_archive(s3, bucket, archived_scene, tmp_path):
    """A folder copied from a Mac holds an AppleDouble `._name.tif` beside every image (not a
    TIFF), and a copy in progress rsync's `.name.tif.Xy12`: each failed the night as an image."""
    hidden = ("._sentinel2_scene.tif", ".sentinel2_scene.tif.Xy12.tif")
    local = tmp_path / "archive"
    local.mkdir()
    for name in ("sentinel2_scene.tif", *hidden):
        (local / name).write_bytes(b"\0\5\26\7" + b"Mac OS X")
        s3.put_object(Bucket=bucket, Key=f"archive/{name}", Body=b"\0\5\26\7")
    assert storage.list_images(local, IMAGE_SUFFIXES) == [str(local / "sentinel2_scene.tif")]
    assert storage.list_images(str(local / "*.tif"), IMAGE_SUFFIXES) == [str(local / "sentinel2_scene.tif")]
    assert storage.list_images(f"s3://{bucket}/archive", IMAGE_SUFFIXES) == [archived_scene]
    assert storage.list_images(f"s3://{bucket}/archive/*.tif", IMAGE_SUFFIXES) == [archived_scene]
    from pipelines.sources import left_out_note

    for archive in (str(local), f"s3://{bucket}/archive"):  # what a night says it left out
        assert left_out_note(archive).startswith(f"{archive}: left out 2 hidden file(s) (")


def test_rasterio_reads_the_s3_object_as_the_local_file(archived_scene, sentinel_scene):
    with rasterio.open(sentinel_scene) as local:
        expected = local.read()
        crs, transform, descriptions = local.crs, local.transform, local.descriptions
    assert expected.any()

    with storage.rasterio_env(archived_scene):
        for path in (archived_scene, storage.gdal_path(archived_scene)):
            with rasterio.open(path) as remote:
                assert remote.crs == crs
                assert remote.transform == transform
                assert remote.descriptions == descriptions
                np.testing.assert_array_equal(remote.read(), expected)
                window = rasterio.windows.Window(col_off=40, row_off=30, width=64, height=50)
                np.testing.assert_array_equal(remote.read(window=window), expected[:, 30:80, 40:104])


def test_put_tree_uploads_an_output_folder_that_reads_back(s3_server, bucket, tmp_path):
    import fsspec

    out, labels = output_folder(tmp_path)
    target = f"s3://{bucket}/runs/2026-11-24/sentinel2_scene"
    local_files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "labels.zarr/zarr.json" in local_files

    written = storage.put_tree(out, target)
    # Once more onto the now existing prefix: same layout, no nested copy of the folder.
    assert storage.put_tree(out, target + "/") == written
    assert written == [f"{target}/{name}" for name in local_files]

    fs = fsspec.filesystem("s3", endpoint_url=s3_server, skip_instance_cache=True)
    remote_files = sorted(name.removeprefix(f"{bucket}/runs/2026-11-24/sentinel2_scene/")
                          for name in fs.find(f"{bucket}/runs"))
    assert remote_files == local_files
    for name in local_files:
        assert fs.cat_file(f"{target}/{name}") == (out / name).read_bytes()

    array = zarr.open_array(f"{target}/labels.zarr", mode="r", storage_options={"endpoint_url": s3_server})
    assert array.shape == labels.shape and array.chunks == (64, 64)
    assert array.attrs["classes"] == ["clear", "cloud", "shadow", "snow", "water"]
    np.testing.assert_array_equal(array[:], labels)

    storage.put_file(out / "preview.png", f"s3://{bucket}/previews/scene.png")
    assert fs.cat_file(f"s3://{bucket}/previews/scene.png") == (out / "preview.png").read_bytes()


def test_missing_objects_and_buckets_are_input_errors(s3_server, bucket, tmp_path):
    missing_key = f"s3://{bucket}/archive/absent.tif"
    with pytest.raises(InputError) as raised:
        storage.stat(missing_key)
    assert raised.value.path == missing_key
    assert str(raised.value).startswith(f"{missing_key}: no such object")

    missing_bucket = f"s3://segpipe-absent-{uuid.uuid4().hex[:8]}/archive"
    with pytest.raises(InputError, match="bucket does not exist") as raised:
        storage.list_images(missing_bucket, IMAGE_SUFFIXES)
    assert raised.value.path == missing_bucket

    source = tmp_path / "labels.tif"
    source.write_bytes(b"labels")
    with pytest.raises(InputError) as raised:
        storage.put_file(source, f"{missing_bucket}/labels.tif")
    assert raised.value.path == f"{missing_bucket}/labels.tif"


@pytest.mark.parametrize("uri", ["gs://bucket/scene.tif", "az://container/scene.tif", "foo://host/scene.tif"])
def test_a_storage_segpipe_does_not_read_is_one_line_not_a_traceback(capsys, tmp_path, uri):
    """gs:// ended in fsspec's ImportError ('Please install gcsfs'), 200 lines down."""
    from flows.cli import main

    scheme = uri.split("://")[0]
    for argv in (["segment", uri, "--model", "s2-cloud", "--out", str(tmp_path / "out")],
                 ["stats", uri.rsplit("/", 1)[0]]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{scheme}:// is not a storage segpipe reads (local paths, s3:// and https:// are)" in err
        assert len(err.strip().splitlines()) == 1, err


def test_segment_and_archive_flow_read_scenes_from_s3(ray_cluster, prefect_server, archived_scene, bucket, segmented_scene, tmp_path):
    """`segpipe segment s3://...` reads the scene through GDAL's /vsis3/ and gives the same labels
    as the local file; the Prefect flow discovers images under an s3:// prefix and skips them on
    a second run (keyed by ETag)."""
    from flows.archive_flow import run_night
    from flows.cli import main

    assert main(["segment", archived_scene, "--model", "s2-cloud", "--out", str(tmp_path / "one")]) == 0
    with rasterio.open(tmp_path / "one" / "sentinel2_scene" / "labels.tif") as remote, \
            rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif") as local:
        np.testing.assert_array_equal(remote.read(1), local.read(1))
        assert remote.crs == local.crs and remote.transform == local.transform

    first = run_night(f"s3://{bucket}/archive", "s2-cloud", str(tmp_path / "flow"))
    second = run_night(f"s3://{bucket}/archive/", "s2-cloud", str(tmp_path / "flow"))
    assert first["done"] == ["sentinel2_scene"] and not first["failed"]
    assert second["skipped"] == ["sentinel2_scene"] and not second["done"]


def test_a_volume_on_s3_is_segmented_from_a_cached_copy(ray_cluster, s3, bucket, tmp_path):
    """nibabel needs a seekable file: the object is fetched once into a cache keyed by its ETag;
    the labels carry the affine and the key the object's identity."""
    import nibabel as nib

    from flows.cli import main
    from test_stitching import conv_net, torchscript_card
    from training import CT_VOLUME, shared_data

    ct = shared_data(CT_VOLUME)
    s3.upload_file(str(ct), bucket, "volumes/ct.nii.gz")
    card = torchscript_card(tmp_path, conv_net(3, 1, 3), 3, 1, 3, tile=16, overlap=0.5)
    uri = f"s3://{bucket}/volumes/ct.nii.gz"
    assert main(["segment", uri, "--model", str(card), "--out", str(tmp_path / "out"), "--block", "32"]) == 0
    written = nib.load(tmp_path / "out" / "ct" / "labels.nii.gz")
    np.testing.assert_array_equal(written.affine, nib.load(ct).affine)
    assert written.shape == nib.load(ct).shape


def test_a_zarr_array_on_s3_is_segmented_in_place(ray_cluster, bucket, sentinel_scene, segmented_scene, tmp_path):
    from flows.cli import main

    with rasterio.open(sentinel_scene) as src:
        pixels = src.read()
    uri = f"s3://{bucket}/arrays/scene.zarr"
    zarr.create_array(uri, data=pixels, chunks=(6, 64, 64), storage_options=storage.storage_options(uri))
    assert main(["segment", uri, "--model", "s2-cloud", "--out", str(tmp_path / "out")]) == 0
    labels = zarr.open_array(str(tmp_path / "out" / "scene" / "labels.ome.zarr" / "labels" / "s2-cloud" / "0"))[:]
    with rasterio.open(segmented_scene / "sentinel2_scene" / "labels.tif") as reference:
        np.testing.assert_array_equal(labels, reference.read(1))


def test_remove_files_takes_a_thousand_objects_a_request_and_leaves_the_others(s3, bucket, tmp_path):
    keys = [f"stats/_pending/run/{index:05d}.parquet" for index in range(1003)]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"rows")
    s3.put_object(Bucket=bucket, Key="stats/_pending/run/kept.parquet", Body=b"rows")
    storage.remove_files([f"s3://{bucket}/{key}" for key in keys] + [f"s3://{bucket}/stats/not-there.parquet"])
    left = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix="stats/")["Contents"]]
    assert left == ["stats/_pending/run/kept.parquet"], "more than one request's worth, the rest untouched"

    # Names with glob characters are names, not patterns: "a[1]" does not remove "a1".
    for key in ("root[1]/a.parquet", "root1/a.parquet"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"rows")
    storage.remove_files([f"s3://{bucket}/root[1]/a.parquet"])
    assert [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix="root")["Contents"]] == ["root1/a.parquet"]
    # Mixed with plain names: each kind removed, and still nothing matched as a pattern.
    for key in ("root[1]/a.parquet", "root2/b.parquet"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"rows")
    storage.remove_files([f"s3://{bucket}/root[1]/a.parquet", f"s3://{bucket}/root2/b.parquet"])
    assert [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix="root")["Contents"]] == ["root1/a.parquet"]

    local = [tmp_path / "a[1].parquet", tmp_path / "b.parquet"]
    for path in local:
        path.write_bytes(b"rows")
    (tmp_path / "a1.parquet").write_bytes(b"rows")
    storage.remove_files([str(path) for path in local] + [str(tmp_path / "gone.parquet")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a1.parquet"]
