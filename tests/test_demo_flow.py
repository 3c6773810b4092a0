"""The Prefect flow over an archive, as `segpipe demo` runs it, on Prefect's test server."""

import shutil

import pyarrow.compute as pc

from flows.archive_flow import run_night
from flows.cli import main
from pipelines.stats import read_stats


def test_demo_runs_then_skips_the_finished_image(ray_cluster, prefect_server, capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    results = tmp_path / "results"
    assert f"segmented sentinel2_scene: {results / 'sentinel2_scene' / 'labels.tif'}" in " ".join(first.split())
    for name in ("clear", "cloud", "shadow"):
        assert name in first
    assert "km²" in first
    labels_before = (results / "sentinel2_scene" / "labels.tif").stat().st_mtime_ns

    assert main(["demo", "--out", str(tmp_path)]) == 0
    second = " ".join(capsys.readouterr().out.split())
    assert "skipped sentinel2_scene: already done for s2-cloud" in second
    assert (results / "sentinel2_scene" / "labels.tif").stat().st_mtime_ns == labels_before
    stats = read_stats(results / "stats")
    assert stats.num_rows == 3, "the skipped run added no rows"


def test_a_bad_image_fails_alone(ray_cluster, prefect_server, sentinel_scene, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(sentinel_scene, archive / "good.tif")
    data = sentinel_scene.read_bytes()
    (archive / "broken.tif").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"

    report = run_night(str(archive), "s2-cloud", str(out))
    assert report["done"] == ["good"]
    assert list(report["failed"]) == [str(archive / "broken.tif")]
    assert str(archive / "broken.tif") in report["failed"][str(archive / "broken.tif")]
    assert not (out / "broken").exists()
    stats = read_stats(out / "stats")
    assert set(pc.unique(stats["image"]).to_pylist()) == {"good"}
