"""The statistics dataset (per image x class, per block x class) and `segpipe stats`, over real
segmentations of the Sentinel-2 scene and over generated nights."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pyproj
import pytest
import rasterio

from flows.benchmarks.stats_query import run_queries
from flows.synthetic import FIRST_NIGHT, PIXEL_AREA, generate_dataset
from flows.cli import main
from pipelines.stats import (
    SCHEMA_VERSION, TABLES, begin_run, compact, read_table, schema_version, table_files, write_image_rows,
)

# Every released schema version, frozen: the dataset may only ever add columns.
RELEASED_SCHEMAS = {
    1: {
        "image_class": {"image": "string", "image_uri": "string", "class_id": "int16", "class_name": "string",
                        "pixel_count": "int64", "valid_pixels": "int64", "area": "double", "area_unit": "string",
                        "model": "string", "model_version": "string", "run_date": "date32[day]"},
    },
    2: {
        "image_class": {"image": "string", "image_uri": "string", "image_key": "string", "class_id": "int16", "class_name": "string", "pixel_count": "int64", "valid_pixels": "int64", "area": "double", "area_unit": "string", "model": "string", "model_version": "string", "model_digest": "string", "run_id": "string", "run_date": "date32[day]", "tile": "int32", "overlap": "double", "blending": "string", "tta": "bool"},  # noqa: E501
        "block_class": {"image": "string", "image_uri": "string", "image_key": "string", "slice_start": "int64", "slice_stop": "int64", "row_start": "int64", "row_stop": "int64", "col_start": "int64", "col_stop": "int64", "min_x": "double", "min_y": "double", "max_x": "double", "max_y": "double", "crs": "string", "class_id": "int16", "class_name": "string", "pixel_count": "int64", "valid_pixels": "int64", "area": "double", "area_unit": "string", "model": "string", "model_version": "string", "model_digest": "string", "run_id": "string", "run_date": "date32[day]"},  # noqa: E501
        "region_class": {"image": "string", "image_uri": "string", "image_key": "string", "region": "string", "regions_file": "string", "class_id": "int16", "class_name": "string", "pixel_count": "int64", "region_pixels": "int64", "area": "double", "area_unit": "string", "model": "string", "model_version": "string", "model_digest": "string", "run_id": "string", "run_date": "date32[day]"},  # noqa: E501
    },
}
# Version 3 has the columns of version 2; run_date moved out of the files into the partition folders.
RELEASED_SCHEMAS[3] = RELEASED_SCHEMAS[2]
V2_DATASET = Path(__file__).parent / "data" / "stats-v2"  # written by segpipe's version-2 code


def segment(scene: Path, out: Path, *options: str) -> None:
    assert main(["segment", str(scene), "--model", "s2-cloud", "--out", str(out), *options]) == 0


def stats_cli(capsys, *arguments: str) -> str:
    capsys.readouterr()  # drop what came before
    assert main(["stats", *arguments]) == 0
    return capsys.readouterr().out


def key_rows(table: pa.Table, *columns: str) -> list[tuple]:
    return sorted(zip(*(table[c].to_pylist() for c in columns)))


def test_released_schemas_only_ever_gain_columns():
    assert max(RELEASED_SCHEMAS) == SCHEMA_VERSION
    for version, tables in RELEASED_SCHEMAS.items():
        for name, columns in tables.items():
            current = {f.name: str(f.type) for f in TABLES[name]}
            for column, type_name in columns.items():
                assert current.get(column) == type_name, f"v{version} {name}.{column} was removed or changed type"


def test_block_and_image_rows_equal_a_recount_of_the_written_labels(ray_cluster, sentinel_scene, tmp_path):
    out = tmp_path / "out"
    segment(sentinel_scene, out, "--block", "256", "--run-id", "recount")
    with rasterio.open(out / "sentinel2_scene" / "labels.tif") as dataset:
        labels, transform, crs = dataset.read(1), dataset.transform, dataset.crs
    valid = labels != 255
    recount = np.bincount(labels[valid], minlength=3)

    images = read_table(out / "stats", "image_class").sort_by("class_id")
    assert images["pixel_count"].to_pylist() == recount.tolist()
    assert set(images["valid_pixels"].to_pylist()) == {int(valid.sum())}
    assert np.allclose(images["area"].to_numpy(), recount * abs(transform.a * transform.e))
    assert images["run_id"].to_pylist() == ["recount"] * 3
    assert set(images["tile"].to_pylist()) == {256} and set(images["blending"].to_pylist()) == {"gaussian"}
    assert len(set(images["image_key"].to_pylist())) == 1

    blocks = read_table(out / "stats", "block_class")
    spans = sorted({(r["row_start"], r["row_stop"], r["col_start"], r["col_stop"]) for r in blocks.to_pylist()})
    assert spans == [(0, 200, 0, 256), (0, 200, 256, 300)], "one block per 256-px shard, clipped to the image"
    for row in blocks.to_pylist():
        window = labels[row["row_start"] : row["row_stop"], row["col_start"] : row["col_stop"]]
        assert row["pixel_count"] == int((window == row["class_id"]).sum())
        assert row["valid_pixels"] == int((window != 255).sum())
        assert row["crs"] == f"EPSG:{crs.to_epsg()}"
        left, top = transform @ (row["col_start"], row["row_start"])
        right, bottom = transform @ (row["col_stop"], row["row_stop"])
        assert (row["min_x"], row["max_x"], row["min_y"], row["max_y"]) == pytest.approx((left, right, bottom, top))
    per_class = blocks.group_by("class_id").aggregate([("pixel_count", "sum"), ("area", "sum")]).sort_by("class_id")
    assert per_class["pixel_count_sum"].to_pylist() == recount.tolist()
    assert np.allclose(per_class["area_sum"].to_numpy(), images["area"].to_numpy())

    compacted, pending = table_files(out / "stats", "image_class")
    assert [Path(p).name for p in compacted] == ["recount.parquet"] and pending == []
    assert schema_version(compacted[0]) == SCHEMA_VERSION


def test_two_nights_appended_and_a_rerun_give_exactly_the_expected_rows(ray_cluster, sentinel_scene, tmp_path):
    out = tmp_path / "out"
    stats_root = out / "stats"
    scenes = []
    for name in ("field-a", "field-b"):
        scenes.append(tmp_path / f"{name}.tif")
        shutil.copy(sentinel_scene, scenes[-1])
    # The runs' dates are fixed at their first start: register two past nights.
    begin_run(stats_root, "night-1", dt.date(2026, 11, 1))
    begin_run(stats_root, "night-2", dt.date(2026, 11, 2))

    for scene in scenes:
        segment(scene, out, "--run-id", "night-1")
    night_1 = stats_root / "image_class" / "run_date=2026-11-01" / "night-1.parquet"
    night_1_bytes = night_1.read_bytes()
    for scene in scenes:
        segment(scene, out, "--run-id", "night-2")
    night_2 = stats_root / "image_class" / "run_date=2026-11-02" / "night-2.parquet"
    assert night_1.read_bytes() == night_1_bytes, "appending a night rewrote an earlier one"
    night_2_bytes = night_2.read_bytes()

    segment(scenes[0], out, "--run-id", "night-1")  # re-run one image of the first night
    assert night_2.read_bytes() == night_2_bytes, "re-running night-1 touched night-2"
    assert night_1.read_bytes() == night_1_bytes, "the re-run replaced its rows with identical ones"

    for name in ("image_class", "block_class"):
        table = read_table(stats_root, name)
        keys = key_rows(table, "run_id", "image", "class_id")
        assert len(keys) == len(set(keys)) == 2 * 2 * 3, name
        assert {(r, str(d)) for r, d in key_rows(table, "run_id", "run_date")} == {
            ("night-1", "2026-11-01"), ("night-2", "2026-11-02")}


def test_two_cards_in_one_run_keep_each_others_rows(ray_cluster, sentinel_scene, tmp_path, capsys):
    """Two cards over the same images on the same day (the default run id is the date): the
    second replaced the first's rows, so its areas were lost from the root. A re-run of a card
    replaces its own rows only, compacted or pending, in Python and in DuckDB's views."""
    from pipelines.stats import image_file_id, write_image_rows

    out = tmp_path / "out"
    stats_root = out / "stats"
    for card in ("s2-cloud-l1c", "s2-cloud", "s2-cloud-l1c"):
        assert main(["segment", str(sentinel_scene), "--model", card, "--out", str(out), "--run-id", "day"]) == 0
    table = read_table(stats_root)
    assert sorted(set(table["model"].to_pylist())) == ["s2-cloud", "s2-cloud-l1c"]
    keys = key_rows(table, "model", "class_id")
    assert len(keys) == len(set(keys)) == 2 * 3
    # A pending re-run of one card (a night in progress) supersedes that card's rows only.
    l1c = table.filter(pc.equal(table["model"], "s2-cloud-l1c"))
    uri = l1c["image_uri"][0].as_py()
    rerun = l1c.set_column(l1c.schema.get_field_index("pixel_count"), "pixel_count",
                           pa.array([7] * l1c.num_rows, pa.int64()))
    write_image_rows(stats_root, "day", l1c["run_date"][0].as_py(), image_file_id(uri, "scene", "s2-cloud-l1c"),
                     {"image_class": rerun})
    table = read_table(stats_root)
    by_model = {m: sorted(table.filter(pc.equal(table["model"], m))["pixel_count"].to_pylist())
                for m in ("s2-cloud", "s2-cloud-l1c")}
    assert by_model["s2-cloud-l1c"] == [7, 7, 7] and sum(by_model["s2-cloud"]) == l1c["valid_pixels"][0].as_py()
    capsys.readouterr()
    assert main(["stats", str(out), "--by", "model", "--format", "json"]) == 0
    rows = {row["model"]: row["pixel_count"] for row in json.loads(capsys.readouterr().out)}
    assert rows == {"s2-cloud-l1c": 21, "s2-cloud": sum(by_model["s2-cloud"])}


def test_an_interrupted_compaction_never_counts_an_image_twice(tmp_path):
    stats_root = tmp_path / "stats"
    generate_dataset(stats_root, images=6, classes=4, nights=1)
    run_file = next((stats_root / "image_class").rglob("*.parquet"))
    before = run_file.read_bytes()
    rows = read_table(stats_root)

    # As if a compaction had replaced the run file and died before deleting the pending file.
    some = rows.filter(pc.is_in(rows["image"], pa.array(["scene00001", "scene00004"])))
    write_image_rows(stats_root, rows["run_id"][0].as_py(), FIRST_NIGHT, "generated", {"image_class": some})
    assert table_files(stats_root, "image_class")[1], "a pending file is there"
    assert key_rows(read_table(stats_root), "image", "class_id") == key_rows(rows, "image", "class_id")
    assert compact(stats_root) == 1
    assert run_file.read_bytes() == before


def test_many_pending_files_fold_into_the_bytes_of_one_pending_file(s3_server, tmp_path, monkeypatch):
    """A night's pending files (one per image) are read several at once and removed in bulk: the
    rows, their order and the run's file are those of the same rows folded from one file, or
    read one at a time, on a local root and on S3, and nothing pending is left."""
    import fsspec

    from pipelines import stats

    whole = tmp_path / "whole"
    generate_dataset(whole, images=24, classes=4, nights=1)
    [run_file] = (whole / "image_class").rglob("*.parquet")
    rows = read_table(whole)
    run_id = rows["run_id"][0].as_py()
    bucket = f"segpipe-{uuid.uuid4().hex[:12]}"
    s3 = fsspec.filesystem("s3", endpoint_url=s3_server, skip_instance_cache=True)
    s3.mkdir(bucket)
    folded = {}
    for how in ("on S3", "several at once", "one at a time"):
        root = f"s3://{bucket}/stats" if how == "on S3" else tmp_path / how.replace(" ", "-")
        begin_run(root, run_id, FIRST_NIGHT)
        for image in reversed(rows["image"].unique().to_pylist()):
            write_image_rows(root, run_id, FIRST_NIGHT, image,
                             {"image_class": rows.filter(pc.equal(rows["image"], image))})
        if how == "one at a time":
            monkeypatch.setattr(stats, "_read_all", lambda paths, schema: [stats._read_parquet(p, schema) for p in paths])
        assert len(table_files(root, "image_class")[1]) == 24
        if how == "several at once":  # pending files plain (quick to write and read), the run's file zstd
            pending_file = pq.ParquetFile(table_files(root, "image_class")[1][0]).metadata.row_group(0)
            assert {pending_file.column(i).compression for i in range(pending_file.num_columns)} == {"UNCOMPRESSED"}
        assert key_rows(read_table(root), "image", "class_id", "pixel_count") == key_rows(rows, "image", "class_id", "pixel_count")
        assert compact(root) == 24
        assert table_files(root, "image_class")[1] == []
        [compacted], _ = table_files(root, "image_class")
        folded[how] = s3.cat_file(compacted) if how == "on S3" else Path(compacted).read_bytes()
    assert folded["several at once"] == folded["one at a time"] == folded["on S3"] == run_file.read_bytes()
    run_group = pq.ParquetFile(run_file).metadata.row_group(0)
    assert {run_group.column(i).compression for i in range(run_group.num_columns)} == {"ZSTD"}
    assert s3.find(f"{bucket}/stats/_pending") == [], "no pending object left on S3"
    assert not (tmp_path / "several-at-once" / "_pending").exists(), "no empty folder left"


def test_files_of_an_older_schema_read_with_nulls_in_the_new_columns(tmp_path):
    stats_root = tmp_path / "stats"
    generate_dataset(stats_root, images=3, classes=2, nights=1)
    current = read_table(stats_root)
    older = current.select(list(RELEASED_SCHEMAS[1]["image_class"]))
    older = older.set_column(older.schema.get_field_index("image"), "image", pa.array(["old"] * older.num_rows))
    partition = stats_root / "image_class" / "run_date=2026-09-30"
    partition.mkdir()
    pq.write_table(older, partition / "version-1.parquet")

    rows = read_table(stats_root)
    old = rows.filter(pc.equal(rows["image"], "old"))
    assert old.num_rows == current.num_rows and old["run_id"].null_count == old.num_rows
    assert pc.sum(old["pixel_count"]).as_py() == pc.sum(current["pixel_count"]).as_py()


def test_files_of_several_schemas_and_dates_read_together_give_the_rows_of_each_read_alone(tmp_path):
    """Files read together have their columns brought to the schema once per run of files with
    the same columns and date: files of version 1 (fewer columns), of version 2 (run_date also
    a column) and of this version, in two date folders, interleaved, give the rows each gives
    read alone, in the same order."""
    from pipelines import stats

    source = tmp_path / "source"
    generate_dataset(source, images=4, classes=2, nights=1)
    current = read_table(source)
    kinds = {
        "current": current.drop_columns(["run_date"]),
        "version-1": current.select(list(RELEASED_SCHEMAS[1]["image_class"])),
        "version-2": current,
    }
    paths = []
    for number, (kind, date) in enumerate([("current", "2026-10-01"), ("current", "2026-10-01"), ("version-1", "2026-10-01"),
                                           ("version-1", "2026-10-01"), ("current", "2026-10-02"), ("version-2", "2026-10-02"),
                                           ("current", "2026-10-02"), ("current", "2026-10-01")] * 2):
        folder = tmp_path / "stats" / "image_class" / f"run_date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = kinds[kind].slice(number % 3, 2)
        rows = rows.set_column(rows.schema.get_field_index("image"), "image", pa.array([f"{kind}-{number}"] * 2))
        pq.write_table(rows, folder / f"{number:02d}.parquet")
        paths.append(str(folder / f"{number:02d}.parquet"))
    schema = TABLES["image_class"]
    together = stats._read_all(paths, schema)
    alone = [stats._read_parquet(path, schema) for path in paths]
    assert len(together) == 11, "a table per run of files alike, not one per file"
    assert all(table.schema == schema for table in together)
    assert pa.concat_tables(together).equals(pa.concat_tables(alone))
    assert sorted(set(pa.concat_tables(together)["run_date"].to_pylist())) == [dt.date(2026, 10, 1), dt.date(2026, 10, 2)]


@pytest.fixture(scope="module")
def generated_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generated")
    generate_dataset(root / "stats", images=30, classes=5, nights=3)
    return root


def test_stats_by_class_image_and_date_sum_the_rows(generated_root, capsys):
    rows = read_table(generated_root / "stats").to_pandas()
    assert len(rows) == 30 * 5 * 3

    by_class = json.loads(stats_cli(capsys, str(generated_root), "--format", "json"))
    expected = rows.groupby("class_name")["pixel_count"].sum()
    assert {r["class_name"]: r["pixel_count"] for r in by_class} == expected.to_dict()
    valid_total = rows.drop_duplicates(["image_uri", "run_id"])["valid_pixels"].sum()
    for row in by_class:
        assert row["valid_pixels"] == valid_total
        assert row["share"] == pytest.approx(row["pixel_count"] / valid_total)
        assert row["area"] == pytest.approx(row["pixel_count"] * PIXEL_AREA)

    csv = pacsv.read_csv(io.BytesIO(stats_cli(capsys, str(generated_root), "--by", "image", "--class", "class02",
                                              "--format", "csv").encode()))
    wanted = rows[rows.class_name == "class02"].groupby("image")["pixel_count"].sum()
    assert dict(zip(csv["image"].to_pylist(), csv["pixel_count"].to_pylist())) == wanted.to_dict()

    by_date = json.loads(stats_cli(capsys, str(generated_root / "stats"), "--by", "run_date", "--format", "json"))
    assert [r["run_date"] for r in by_date] == [str(FIRST_NIGHT + dt.timedelta(days=n)) for n in range(3)]
    assert all(r["images"] == 30 and r["share"] == pytest.approx(1.0) for r in by_date)

    table = stats_cli(capsys, str(generated_root), "--by", "run_date,class", "--since", str(FIRST_NIGHT + dt.timedelta(days=2)))
    assert "class04" in table and str(FIRST_NIGHT) not in table


def test_stats_change_top_and_sql_agree_with_the_rows(generated_root, capsys):
    rows = read_table(generated_root / "stats").to_pandas()
    first, last = FIRST_NIGHT, FIRST_NIGHT + dt.timedelta(days=2)
    change = json.loads(stats_cli(capsys, str(generated_root), "--change", str(first), str(last), "--format", "json"))
    area = rows.groupby(["run_date", "class_name"])["area"].sum()
    for row in change:
        before, after = area[(first, row["class_name"])], area[(last, row["class_name"])]
        assert (row["area_before"], row["area_after"]) == pytest.approx((before, after))
        assert row["change"] == pytest.approx(after - before)
        assert row["relative_change"] == pytest.approx((after - before) / before)

    top = json.loads(stats_cli(capsys, str(generated_root), "--top", "4", "--class", "class03", "--format", "json"))
    latest = rows[(rows.class_name == "class03") & (rows.run_date == last)]
    shares = (latest.pixel_count / latest.valid_pixels).to_numpy()
    assert [r["image"] for r in top] == latest.image.to_numpy()[np.argsort(-shares, kind="stable")][:4].tolist()
    assert all(r["run_date"] == str(last) for r in top)

    answer = json.loads(stats_cli(capsys, str(generated_root), "--sql",
                                  "SELECT COUNT(*) AS n, SUM(pixel_count) AS p FROM image_class", "--format", "json"))
    assert answer == [{"n": len(rows), "p": int(rows.pixel_count.sum())}]

    timed = run_queries(str(generated_root / "stats"), nights=3)  # the benchmark's questions answer the same
    by_class = timed["areas by class"]
    assert by_class["pixel_count"].to_pylist() == rows.groupby("class_name")["pixel_count"].sum().tolist()


def test_an_image_run_twice_on_one_date_counts_once_for_that_date(tmp_path, capsys):
    """The version-2 dataset has the image in runs night-1 and night-2, both on 2026-11-28, and
    in night-3 on 2026-11-30, with the same areas each time: no change, one image per date."""
    shutil.copytree(V2_DATASET, tmp_path / "stats")
    rows = read_table(tmp_path / "stats").to_pandas()
    night_1 = rows[rows.run_id == "night-1"].set_index("class_name")
    assert set(rows[rows.run_date == dt.date(2026, 11, 28)].run_id) == {"night-1", "night-2"}

    change = json.loads(stats_cli(capsys, str(tmp_path), "--change", "2026-11-28", "2026-11-30", "--format", "json"))
    for row in change:
        assert row["area_before"] == row["area_after"] == pytest.approx(night_1.area[row["class_name"]])
        assert row["change"] == 0
    by_date = json.loads(stats_cli(capsys, str(tmp_path), "--by", "run_date,class", "--format", "json"))
    assert len(by_date) == 2 * len(night_1)
    for row in by_date:
        assert row["pixel_count"] == night_1.pixel_count[row["class_name"]] and row["images"] == 1
    by_run = json.loads(stats_cli(capsys, str(tmp_path), "--by", "run_id,class", "--format", "json"))
    assert sorted({row["run_id"] for row in by_run}) == ["night-1", "night-2", "night-3"], "per run, every run"


@pytest.mark.parametrize("arguments, message", [
    (["--by", "colour"], "unknown grouping colour"),
    (["--top", "3"], "exactly one --class"),
    (["--sql", "SELECT nothing FROM nowhere"], "nowhere"),
])
def test_stats_bad_questions_name_the_problem(generated_root, capsys, arguments, message):
    assert main(["stats", str(generated_root), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_stats_on_a_folder_without_statistics_is_bad_input(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nothing")]) == 2
    assert "no statistics here" in capsys.readouterr().err


def test_stats_on_an_s3_root_answers_as_on_a_local_one(s3_server, generated_root, capsys):
    import fsspec

    bucket = f"segpipe-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", endpoint_url=s3_server, skip_instance_cache=True)
    fs.mkdir(bucket)
    root = f"s3://{bucket}/nightly"
    generate_dataset(f"{root}/stats", images=30, classes=5, nights=3)  # the same seed: the same rows
    assert fs.glob(f"{bucket}/nightly/stats/image_class/run_date=*/*.parquet"), "written as run files on S3"

    for arguments in (["--by", "class"], ["--by", "run_date,class"], ["--top", "5", "--class", "class01"]):
        remote = stats_cli(capsys, root, *arguments, "--format", "json")
        local = stats_cli(capsys, str(generated_root), *arguments, "--format", "json")
        assert json.loads(remote) == json.loads(local)


def test_region_rows_count_the_labels_inside_each_region(ray_cluster, sentinel_scene, tmp_path, capsys):
    with rasterio.open(sentinel_scene) as dataset:
        transform, crs = dataset.transform, dataset.crs
    # Two fields drawn along pixel edges in the scene's CRS: the whole scene and its left 120 columns.
    def field(columns: int) -> dict:
        corners = [transform @ (c, r) for c, r in ((0, 0), (columns, 0), (columns, 200), (0, 200), (0, 0))]
        return {"type": "Polygon", "coordinates": [[list(p) for p in corners]]}
    regions = tmp_path / "fields.geojson"
    regions.write_text(json.dumps({
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{crs.to_epsg()}"}},
        "features": [{"type": "Feature", "properties": {"field": name}, "geometry": field(columns)}
                     for name, columns in (("whole", 300), ("west", 120))],
    }))
    out = tmp_path / "out"
    segment(sentinel_scene, out, "--regions", str(regions), "--region-id", "field")
    with rasterio.open(out / "sentinel2_scene" / "labels.tif") as dataset:
        labels = dataset.read(1)

    rows = read_table(out / "stats", "region_class")
    for name, window in (("whole", labels), ("west", labels[:, :120])):
        mine = rows.filter(pc.equal(rows["region"], name)).sort_by("class_id")
        expected = np.bincount(window[window != 255], minlength=3)
        assert mine["pixel_count"].to_pylist() == expected.tolist(), name
        assert np.allclose(mine["area"].to_numpy(), expected * 100.0)
        assert set(mine["region_pixels"].to_pylist()) == {int((window != 255).sum())}
    image = read_table(out / "stats", "image_class").sort_by("class_id")
    whole = rows.filter(pc.equal(rows["region"], "whole")).sort_by("class_id")
    assert whole["pixel_count"].to_pylist() == image["pixel_count"].to_pylist()

    by_region = json.loads(stats_cli(capsys, str(out), "--by", "region", "--format", "json"))
    assert {r["region"]: r["pixel_count"] for r in by_region} == {
        "whole": int((labels != 255).sum()), "west": int((labels[:, :120] != 255).sum())}


def test_regions_that_miss_the_image_are_counted_as_zero_with_a_note(ray_cluster, sentinel_scene, tmp_path, capsys):
    """Fields in lon/lat with longitude and latitude swapped (a common slip) lie far from the
    scene: their rows count 0 pixels, as the file says, and `segment` says in a note (also in
    --json's notes) that no region overlaps the image, with both extents."""
    with rasterio.open(sentinel_scene) as dataset:
        to_lon_lat = pyproj.Transformer.from_crs(dataset.crs, "EPSG:4326", always_xy=True)
        corners = [to_lon_lat.transform(*(dataset.transform @ corner))
                   for corner in ((0, 0), (300, 0), (300, 200), (0, 200), (0, 0))]
    swapped = {"type": "Polygon", "coordinates": [[[lat, lon] for lon, lat in corners]]}
    regions = tmp_path / "fields.geojson"
    regions.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"field": "swapped"}, "geometry": swapped}]}))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud", "--out", str(out), "--regions", str(regions),
                 "--json"]) == 0
    printed = capsys.readouterr()
    assert f"no region of {regions} overlaps the image" in printed.err
    assert any("overlaps the image" in text for text in json.loads(printed.out)["notes"])
    rows = read_table(out / "stats", "region_class")
    assert rows.num_rows == 3 and set(rows["pixel_count"].to_pylist()) == {0}

    capsys.readouterr()
    corners_in_order = {"type": "Polygon", "coordinates": [[list(corner) for corner in corners]]}
    regions.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"field": "scene"}, "geometry": corners_in_order}]}))
    segment(sentinel_scene, tmp_path / "out-right", "--regions", str(regions))
    assert "overlaps the image" not in capsys.readouterr().err


def test_a_bad_regions_file_stops_before_any_work(sentinel_scene, tmp_path, capsys):
    regions = tmp_path / "fields.geojson"
    regions.write_text("not json at all")
    out = tmp_path / "out"
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud", "--out", str(out), "--regions", str(regions)]) == 2
    assert str(regions) in capsys.readouterr().err
    assert not out.exists()


# --- every library reads the same rows ---------------------------------------------------------

def sorted_rows(table: pa.Table, columns: list[str]) -> list[tuple]:
    return sorted(zip(*(table[c].cast(pa.string()).to_pylist() for c in columns)))


@pytest.fixture(scope="module")
def nights_root(ray_cluster, sentinel_scene, tmp_path_factory) -> Path:
    """Two real nights into one root, then a third night interrupted: its rows are pending."""
    root = tmp_path_factory.mktemp("nights") / "out"
    for run_id in ("night-1", "night-2"):
        assert main(["segment", str(sentinel_scene), "--model", "s2-cloud", "--out", str(root), "--run-id", run_id,
                     "--block", "128"]) == 0
    return root


def test_pandas_pyarrow_polars_and_duckdb_read_the_same_rows_as_segpipe(nights_root):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    for name in ("image_class", "block_class"):
        folder = nights_root / "stats" / name
        expected = read_table(nights_root / "stats", name)
        columns = ["image_uri", "class_id", "pixel_count", "area", "run_id", "run_date"]
        want = sorted_rows(expected, columns)
        for file in folder.rglob("*.parquet"):
            assert "run_date" not in pq.read_schema(file).names, "the partition key only in the folder names"
        readers = {
            "pandas": lambda: pa.Table.from_pandas(pd.read_parquet(folder)),
            "pyarrow read_table": lambda: pq.read_table(folder),
            "pyarrow dataset": lambda: ds.dataset(folder, format="parquet", partitioning="hive").to_table(),
            "polars": lambda: pl.read_parquet(f"{folder}/**/*.parquet", hive_partitioning=True).to_arrow(),
            "duckdb": lambda: duckdb.sql(f"SELECT * FROM read_parquet('{folder}/**/*.parquet', "
                                         "hive_partitioning=true)").to_arrow_table(),
        }
        for reader, read in readers.items():
            assert sorted_rows(read(), columns) == want, f"{reader} reads other rows of {name}"


def test_pending_rows_are_seen_by_segpipe_and_never_twice_by_a_glob(nights_root, tmp_path):
    import duckdb

    stats_root = tmp_path / "stats"
    shutil.copytree(nights_root / "stats", stats_root)
    compacted = read_table(stats_root)
    night_2 = compacted.filter(pc.equal(compacted["run_id"], "night-2"))
    rerun = night_2.set_column(night_2.schema.get_field_index("pixel_count"), "pixel_count",
                               pc.add(night_2["pixel_count"], 1))
    write_image_rows(stats_root, "night-2", night_2["run_date"][0].as_py(), "rerun", {"image_class": rerun})
    glob = duckdb.sql(f"SELECT COUNT(*) FROM read_parquet('{stats_root}/image_class/**/*.parquet', "
                      "hive_partitioning=true)").fetchall()[0][0]
    assert glob == compacted.num_rows, "a glob over the table sees each row once"
    seen = read_table(stats_root)
    assert seen.num_rows == compacted.num_rows
    assert pc.sum(seen["pixel_count"]).as_py() == pc.sum(compacted["pixel_count"]).as_py() + rerun.num_rows


def test_a_version_2_dataset_is_upgraded_in_place_without_losing_a_row(ray_cluster, sentinel_scene, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(V2_DATASET, root / "stats")
    assert {schema_version(str(p)) for p in (root / "stats").rglob("*.parquet")} == {2}
    before = {name: read_table(root / "stats", name) for name in TABLES}
    assert before["image_class"].num_rows == 9, "two nights and an interrupted third, pending"
    segment(sentinel_scene, root, "--run-id", "night-4")  # a run upgrades the dataset when it starts
    for name, rows in before.items():
        after = read_table(root / "stats", name)
        columns = [f.name for f in TABLES[name]]
        old = after.filter(pc.invert(pc.equal(after["run_id"], "night-4")))
        assert sorted_rows(old, columns) == sorted_rows(rows, columns), f"{name} lost or changed rows"
    files = list((root / "stats").rglob("*.parquet"))
    assert {schema_version(str(p)) for p in files} == {SCHEMA_VERSION}
    assert all("run_date" not in pq.read_schema(p).names for p in files)
    assert not [p for p in files if "_pending" in p.parts], "the interrupted night's rows were folded"


@pytest.mark.parametrize("arguments, words", [
    (["--class", "clodu"], ["--class", "no class clodu", "class00"]),
    (["--image", "nosuch"], ["--image", "no image nosuch", "scene00000"]),
    (["--change", "2026-09-01", "2026-10-02"], ["--change", "no run on 2026-09-01", "2026-10-01"]),
    (["--by", "region,class"], ["--by region", "no region rows", "--regions"]),
])
def test_stats_questions_about_what_is_not_there_name_what_is(generated_root, capsys, arguments, words):
    assert main(["stats", str(generated_root), *arguments]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(word in err[0] for word in words), err


@pytest.mark.parametrize("damage", ["cut short", "overwritten inside"])
def test_a_damaged_statistics_file_is_named_by_stats_report_and_the_next_run(generated_root, tmp_path, capsys, damage):
    """A run file cut short (a failed copy or sync) or with bytes overwritten inside: every reader
    says which file and what to do, in one line, instead of a traceback on every later run."""
    from pipelines.errors import InputError
    from pipelines.stats import upgrade

    root = tmp_path / "root"
    shutil.copytree(generated_root, root)
    damaged = table_files(root / "stats", "image_class")[0][1]
    data = Path(damaged).read_bytes()
    if damage == "cut short":
        Path(damaged).write_bytes(data[:100])
    else:  # the footer intact, the column chunks not
        Path(damaged).write_bytes(data[:4] + bytes(len(data) // 2) + data[4 + len(data) // 2:])
    expected = f"{damaged}: is not a readable Parquet file ("
    advice = ("): a damaged statistics file; restore it from a backup, or move it out of the stats folder (its rows "
              "are then left out), and run again")

    for arguments in ([], ["--by", "image"], ["--sql", "SELECT sum(pixel_count) FROM image_class"]):
        capsys.readouterr()
        assert main(["stats", str(root), *arguments]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"segpipe: error: {expected}") and line.endswith(advice), line
    assert main(["stats", str(root), "--sql", "SELECT nonsense FROM image_class"]) == 2  # a wrong query is the query's
    assert capsys.readouterr().err.strip().startswith("segpipe: error: --sql: Binder Error")

    # The report reads every row; a run's start reads each file's columns (a footer cut off).
    readers = [lambda: read_table(root / "stats")] + ([lambda: upgrade(root / "stats")] if damage == "cut short" else [])
    for read in readers:
        with pytest.raises(InputError) as refused:
            read()
        assert str(refused.value).startswith(expected) and str(refused.value).endswith(advice)
    assert Path(damaged).stat().st_size == (100 if damage == "cut short" else len(data))  # left as it was
