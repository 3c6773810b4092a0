"""Questions over the statistics dataset, answered by DuckDB in-process.

`connect(stats_root)` opens an in-memory DuckDB with one view per table (`image_class`,
`block_class`, `region_class`) over the dataset's files, local or on object storage: the files
are read through pyarrow datasets (s3fs for s3://), so DuckDB needs no extension and nothing is
downloaded. Each view already folds in rows of images a run has finished but not yet compacted.

The helpers below answer the common questions without SQL; each returns a pyarrow table.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipelines import storage
from pipelines.errors import InputError
from pipelines.stats import TABLES, table_files

GROUPINGS = {"class": ["class_id", "class_name"], "image": ["image", "image_uri"], "region": ["regions_file", "region"],
             "run_date": ["run_date"], "run_id": ["run_id"], "model": ["model"]}


@dataclass(frozen=True)
class Filters:
    classes: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    model: str | None = None
    run_id: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None

    def where(self) -> tuple[str, list]:
        """A SQL condition and its parameters."""
        conditions, parameters = ["TRUE"], []
        if self.classes:
            conditions.append(f"class_name IN ({', '.join('?' for _ in self.classes)})")
            parameters += list(self.classes)
        if self.images:
            conditions.append(f"image IN ({', '.join('?' for _ in self.images)})")
            parameters += list(self.images)
        for column, value in (("model", self.model), ("run_id", self.run_id)):
            if value is not None:
                conditions.append(f"{column} = ?")
                parameters.append(value)
        if self.since:
            conditions.append("run_date >= ?")
            parameters.append(self.since)
        if self.until:
            conditions.append("run_date <= ?")
            parameters.append(self.until)
        return " AND ".join(conditions), parameters


def connect(stats_root: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the dataset's tables as views."""
    if not storage.exists(stats_root):
        raise InputError(stats_root, "no statistics here (expected the stats/ folder of a segpipe output root)")
    fs, _ = storage.filesystem(stats_root)
    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    con = duckdb.connect()
    for name, schema in TABLES.items():
        compacted, pending = table_files(stats_root, name)
        for part, files in (("compacted", compacted), ("pending", pending)):
            paths = [storage.filesystem(f)[1] for f in files]
            # An explicit file list with the full schema: older files read with nulls in newer columns.
            con.register(f"_{name}_{part}", ds.dataset(paths, schema=schema, format="parquet", filesystem=arrow_fs)
                         if paths else schema.empty_table())
        con.execute(f"""
            CREATE VIEW {name} AS
            SELECT * FROM _{name}_compacted AS c
            WHERE NOT EXISTS (SELECT 1 FROM _{name}_pending AS p WHERE p.run_id = c.run_id AND p.image_uri = c.image_uri)
            UNION ALL BY NAME
            SELECT * FROM _{name}_pending""")
    return con


def sql(con: duckdb.DuckDBPyConnection, query: str) -> pa.Table:
    try:
        relation = con.sql(query)
        # A statement that returns no rows (CREATE, SET ...) gives no relation.
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as exc:
        raise InputError("--sql", str(exc).splitlines()[0]) from exc


def group_columns(by: list[str]) -> list[str]:
    unknown = [b for b in by if b not in GROUPINGS]
    if unknown:
        raise InputError("--by", f"unknown grouping {', '.join(unknown)}; choose from {', '.join(GROUPINGS)}")
    return [column for b in by for column in GROUPINGS[b]]


def areas_by(con: duckdb.DuckDBPyConnection, by: list[str], filters: Filters = Filters()) -> pa.Table:
    """Pixels, share of the valid pixels and area per group; areas of different units are never added."""
    table = "region_class" if "region" in by else "image_class"
    valid = "region_pixels" if table == "region_class" else "valid_pixels"
    keys = group_columns(by) + ["area_unit"]
    # Each (image, run, region) row set carries its valid pixels once per class: take it once.
    unit = ["image_uri", "run_id", "model"] + (["regions_file", "region"] if table == "region_class" else [])
    inner = list(dict.fromkeys(keys + unit))
    keys_sql, inner_sql = ", ".join(keys), ", ".join(inner)
    where, parameters = filters.where()
    query = f"""
        WITH per_unit AS (
            SELECT {inner_sql}, SUM(pixel_count)::BIGINT AS pixel_count, ANY_VALUE({valid}) AS valid_pixels, SUM(area) AS area
            FROM {table} WHERE {where} GROUP BY {inner_sql})
        SELECT {keys_sql}, SUM(pixel_count)::BIGINT AS pixel_count, SUM(valid_pixels)::BIGINT AS valid_pixels,
               SUM(pixel_count) / NULLIF(SUM(valid_pixels), 0) AS share, SUM(area) AS area,
               COUNT(DISTINCT image_uri) AS images
        FROM per_unit GROUP BY {keys_sql} ORDER BY {keys_sql}"""
    return con.sql(query, params=parameters).to_arrow_table()


def changes(con: duckdb.DuckDBPyConnection, before: dt.date, after: dt.date, by: list[str],
            filters: Filters = Filters()) -> pa.Table:
    """Area per group on two run dates side by side, with the change and the relative change."""
    table = "region_class" if "region" in by else "image_class"
    keys = group_columns(by) + ["area_unit"]
    keys_sql = ", ".join(keys)
    where, parameters = filters.where()
    joined = " AND ".join(f"a.{k} IS NOT DISTINCT FROM b.{k}" for k in keys)
    query = f"""
        WITH per_date AS (
            SELECT run_date, {keys_sql}, SUM(pixel_count)::BIGINT AS pixel_count, SUM(area) AS area
            FROM {table} WHERE {where} AND run_date IN (?, ?) GROUP BY run_date, {keys_sql}),
        a AS (SELECT * FROM per_date WHERE run_date = ?),
        b AS (SELECT * FROM per_date WHERE run_date = ?)
        SELECT {', '.join(f'COALESCE(a.{k}, b.{k}) AS {k}' for k in keys)},
               COALESCE(a.area, 0) AS area_before, COALESCE(b.area, 0) AS area_after,
               COALESCE(b.area, 0) - COALESCE(a.area, 0) AS change,
               (COALESCE(b.area, 0) - COALESCE(a.area, 0)) / NULLIF(a.area, 0) AS relative_change
        FROM a FULL OUTER JOIN b ON {joined}
        ORDER BY {', '.join(f'COALESCE(a.{k}, b.{k})' for k in keys)}"""
    return con.sql(query, params=parameters + [before, after, before, after]).to_arrow_table()


def top_images(con: duckdb.DuckDBPyConnection, class_name: str, count: int, filters: Filters = Filters()) -> pa.Table:
    """The images where `class_name` covers the largest share of the valid pixels, each image
    by its latest run (within the filters)."""
    where, parameters = dataclasses.replace(filters, classes=(class_name,)).where()
    query = f"""
        SELECT image, image_uri, run_date, run_id, model, class_name, pixel_count, valid_pixels,
               pixel_count / NULLIF(valid_pixels, 0) AS share, area, area_unit
        FROM image_class WHERE {where}
        QUALIFY ROW_NUMBER() OVER (PARTITION BY image_uri, model ORDER BY run_date DESC, run_id DESC) = 1
        ORDER BY share DESC NULLS LAST, image_uri LIMIT ?"""
    return con.sql(query, params=parameters + [count]).to_arrow_table()
