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
from pipelines.stats import PARTITION_KEY, TABLES, table_files

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
    """An in-memory DuckDB with the dataset's tables as views, locked down once they exist: no
    file or network access of its own (the views read through pyarrow), no extension installed
    or loaded, and a configuration that cannot be changed back."""
    if not storage.exists(stats_root):
        raise InputError(stats_root, "no statistics here (expected the stats/ folder of a segpipe output root)")
    fs, _ = storage.filesystem(stats_root)
    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    for name, schema in TABLES.items():
        compacted, pending = table_files(stats_root, name)
        for part, files in (("compacted", compacted), ("pending", pending)):
            con.register(f"_{name}_{part}", hive_dataset(files, schema, arrow_fs))
        con.execute(f"""
            CREATE VIEW {name} AS
            SELECT * FROM _{name}_compacted AS c
            WHERE NOT EXISTS (SELECT 1 FROM _{name}_pending AS p WHERE p.run_id = c.run_id AND p.image_uri = c.image_uri
                              AND p.model = c.model)
            UNION ALL BY NAME
            SELECT * FROM _{name}_pending""")
    con.execute("SET enable_external_access = false")
    con.execute("SET allow_community_extensions = false")
    con.execute("SET lock_configuration = true")
    return con


def hive_dataset(files: list[str], schema: pa.Schema, arrow_fs):
    """The files as one dataset with the full schema: run_date from each file's partition
    folder (run_date=YYYY-MM-DD, typed date), older files' missing columns as nulls."""
    by_base: dict[str, list[str]] = {}
    for file in files:
        path = storage.filesystem(file)[1]
        by_base.setdefault(path.split(f"/{PARTITION_KEY}=", 1)[0], []).append(path)
    partitioning = ds.partitioning(pa.schema([schema.field(PARTITION_KEY)]), flavor="hive")
    datasets = [ds.dataset(paths, schema=schema, format="parquet", filesystem=arrow_fs, partitioning=partitioning,
                           partition_base_dir=base) for base, paths in sorted(by_base.items())]
    if not datasets:
        return schema.empty_table()
    return datasets[0] if len(datasets) == 1 else ds.dataset(datasets)


QUERY_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def sql(con: duckdb.DuckDBPyConnection, query: str) -> pa.Table:
    """A user's query over the views: queries only (SELECT, WITH, EXPLAIN), read-only."""
    try:
        statements = con.extract_statements(query)
        refused = [s.type.name for s in statements if s.type not in QUERY_STATEMENTS]
        if refused:
            raise InputError("--sql", f"only queries (SELECT, WITH, EXPLAIN) are run, not {', '.join(refused)}")
        relation = con.sql(query)
        # A statement that returns no rows (CREATE, SET ...) gives no relation.
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as exc:
        raise InputError("--sql", str(exc).splitlines()[0]) from exc


def check_filters(con: duckdb.DuckDBPyConnection, filters: Filters, change: tuple[dt.date, dt.date] | None = None,
                  by: list[str] | tuple[str, ...] = ()) -> None:
    """A class, image or run date that the statistics do not have is a mistake to name, not an
    empty answer: one line listing what there is. So are regions in statistics that have none."""
    if "region" in by and not con.sql("SELECT 1 FROM region_class LIMIT 1").fetchall():
        raise InputError("--by region", "the statistics have no region rows: segment with --regions FILE to get them")
    checks = [("--class", "class_name", filters.classes), ("--image", "image", filters.images),
              ("--model", "model", (filters.model,) if filters.model else ()),
              ("--run-id", "run_id", (filters.run_id,) if filters.run_id else ()),
              ("--change", "run_date", change or ())]
    for option, column, wanted in checks:
        if not wanted:
            continue
        known = [row[0] for row in con.sql(f"SELECT DISTINCT {column} FROM image_class ORDER BY 1").fetchall()]
        missing = [value for value in wanted if value not in known]
        if missing:
            what = {"run_date": "run on", "class_name": "class", "image": "image", "model": "model",
                    "run_id": "run"}[column]
            listed = ", ".join(str(value) for value in known[:50]) + (", ..." if len(known) > 50 else "")
            raise InputError(option, f"no {what} {', '.join(map(str, missing))} in the statistics "
                                     f"(there are: {listed or 'none'})")


def group_columns(by: list[str]) -> list[str]:
    unknown = [b for b in by if b not in GROUPINGS]
    if unknown:
        raise InputError("--by", f"unknown grouping {', '.join(unknown)}; choose from {', '.join(GROUPINGS)}")
    return [column for b in by for column in GROUPINGS[b]]


def one_run_per_date(table: str, filters: Filters, by_run: bool) -> tuple[str, list]:
    """The rows the filters keep, as a SQL subquery, and its parameters. An image run more than
    once on one date (a re-run under another run id) counts once for that date, by the greatest
    run id of the date, unless the question is asked per run."""
    where, parameters = filters.where()
    latest = "" if by_run else \
        "QUALIFY run_id = MAX(run_id) OVER (PARTITION BY image_uri, model, run_date)"
    return f"(SELECT * FROM {table} WHERE {where} {latest})", parameters


def areas_by(con: duckdb.DuckDBPyConnection, by: list[str], filters: Filters = Filters()) -> pa.Table:
    """Pixels, share of the valid pixels and area per group; areas of different units are never added."""
    table = "region_class" if "region" in by else "image_class"
    valid = "region_pixels" if table == "region_class" else "valid_pixels"
    keys = group_columns(by) + ["area_unit"]
    # Each (image, run, region) row set carries its valid pixels once per class: take it once.
    unit = ["image_uri", "run_id", "model"] + (["regions_file", "region"] if table == "region_class" else [])
    inner = list(dict.fromkeys(keys + unit))
    keys_sql, inner_sql = ", ".join(keys), ", ".join(inner)
    rows, parameters = one_run_per_date(table, filters, "run_id" in by)
    query = f"""
        WITH per_unit AS (
            SELECT {inner_sql}, SUM(pixel_count)::BIGINT AS pixel_count, ANY_VALUE({valid}) AS valid_pixels, SUM(area) AS area
            FROM {rows} GROUP BY {inner_sql})
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
    rows, parameters = one_run_per_date(table, filters, "run_id" in by)
    joined = " AND ".join(f"a.{k} IS NOT DISTINCT FROM b.{k}" for k in keys)
    query = f"""
        WITH per_date AS (
            SELECT run_date, {keys_sql}, SUM(pixel_count)::BIGINT AS pixel_count, SUM(area) AS area
            FROM {rows} WHERE run_date IN (?, ?) GROUP BY run_date, {keys_sql}),
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
