"""The statistics dataset: per-class counts and areas in Parquet, one folder per table, one
hive partition per run date, one file per run.

    <out>/stats/image_class/run_date=YYYY-MM-DD/<run_id>.parquet     per image x class
    <out>/stats/block_class/run_date=YYYY-MM-DD/<run_id>.parquet     per output block x class
    <out>/stats/region_class/run_date=YYYY-MM-DD/<run_id>.parquet    per region x class (with --regions)
    <out>/stats/_pending/<table>/run_date=.../<run_id>/<image>.parquet   rows of images a run has finished
    <out>/stats/_runs/<run_id>.json                                   the run's date, fixed at its first start

An image's rows are written to `_pending/` when it finishes (one small file per image and
table, so a crashed run keeps what it finished); `compact` folds a run's pending files into its
one file per partition, replacing that run's earlier rows of the same images. A night never
rewrites another night's file, and re-running a run id replaces only its own rows (of the same
model card: another card's rows of the same images stay). segpipe's own
readers (`read_table`, the DuckDB views of `segpipe stats`) see compacted rows plus pending
ones, the pending rows of a (run, image) superseding compacted ones, so nothing is counted twice
at any moment. Pending rows live outside the table folders: a glob over a table (DuckDB's and
polars' `**/*.parquet`) or a hive dataset (pandas, pyarrow, Spark) sees the compacted rows only,
never a row twice.

`run_date` is the hive partition key only, never a column inside the files (schema version 3),
so pandas, pyarrow, polars, DuckDB and Spark all read the tables as one hive-partitioned dataset.
Every file carries its schema version in the Parquet key-value metadata. Schema changes are
additive only: a new version adds columns, older files read with nulls in them. `upgrade`
rewrites a dataset of version 2 (run_date inside the files, pending rows inside the partitions)
to this layout without losing a row; a run does it when it starts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import InputError
from pipelines.model_card import ClassInfo

SCHEMA_VERSION = 3
SCHEMA_VERSION_KEY = b"segpipe.stats.schema_version"
PARTITION_KEY = "run_date"
PENDING = "_pending"

_RUN_COLUMNS = [
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("model_digest", pa.string()),
    ("run_id", pa.string()),
    ("run_date", pa.date32()),
]
_IMAGE_COLUMNS = [("image", pa.string()), ("image_uri", pa.string()), ("image_key", pa.string())]
_CLASS_COLUMNS = [("class_id", pa.int16()), ("class_name", pa.string()), ("pixel_count", pa.int64())]
_AREA_COLUMNS = [("area", pa.float64()), ("area_unit", pa.string())]

IMAGE_CLASS_SCHEMA = pa.schema(
    _IMAGE_COLUMNS
    + _CLASS_COLUMNS
    + [("valid_pixels", pa.int64())]
    + _AREA_COLUMNS
    + _RUN_COLUMNS
    + [("tile", pa.int32()), ("overlap", pa.float64()), ("blending", pa.string()), ("tta", pa.bool_())]
)
BLOCK_CLASS_SCHEMA = pa.schema(
    _IMAGE_COLUMNS
    + [
        ("slice_start", pa.int64()), ("slice_stop", pa.int64()),
        ("row_start", pa.int64()), ("row_stop", pa.int64()),
        ("col_start", pa.int64()), ("col_stop", pa.int64()),
        ("min_x", pa.float64()), ("min_y", pa.float64()), ("max_x", pa.float64()), ("max_y", pa.float64()),
        ("crs", pa.string()),
    ]
    + _CLASS_COLUMNS
    + [("valid_pixels", pa.int64())]
    + _AREA_COLUMNS
    + _RUN_COLUMNS
)
REGION_CLASS_SCHEMA = pa.schema(
    _IMAGE_COLUMNS
    + [("region", pa.string()), ("regions_file", pa.string())]
    + _CLASS_COLUMNS
    + [("region_pixels", pa.int64())]
    + _AREA_COLUMNS
    + _RUN_COLUMNS
)
TABLES = {"image_class": IMAGE_CLASS_SCHEMA, "block_class": BLOCK_CLASS_SCHEMA, "region_class": REGION_CLASS_SCHEMA}
# Row order inside a run's file, so that the same rows always give the same bytes.
SORT_KEYS = {
    "image_class": ["image_uri", "class_id", "model"],
    "block_class": ["image_uri", "slice_start", "row_start", "col_start", "class_id", "model"],
    "region_class": ["image_uri", "regions_file", "region", "class_id", "model"],
}
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class RunInfo:
    """What every row of one image in one run shares."""

    run_id: str
    run_date: dt.date
    model: str
    model_version: str
    model_digest: str
    tile: int
    overlap: float
    blending: str
    tta: bool

    def run_columns(self) -> dict:
        return {"model": self.model, "model_version": self.model_version, "model_digest": self.model_digest,
                "run_id": self.run_id, "run_date": self.run_date}


@dataclass(frozen=True)
class ImageInfo:
    image: str
    image_uri: str
    image_key: str
    area_unit: str

    def columns(self) -> dict:
        return {"image": self.image, "image_uri": self.image_uri, "image_key": self.image_key}


@dataclass(frozen=True)
class BlockCounts:
    """One output block's class counts and areas, from the labels its worker wrote."""

    start: tuple[int, ...]
    stop: tuple[int, ...]
    class_counts: np.ndarray
    class_areas: np.ndarray


def image_class_table(image: ImageInfo, run: RunInfo, classes: Sequence[ClassInfo],
                      counts: np.ndarray, areas: np.ndarray) -> pa.Table:
    valid = int(counts.sum())
    rows = [
        {**image.columns(), "class_id": c.id, "class_name": c.name, "pixel_count": int(counts[c.id]),
         "valid_pixels": valid, "area": float(areas[c.id]), "area_unit": image.area_unit, **run.run_columns(),
         "tile": run.tile, "overlap": run.overlap, "blending": run.blending, "tta": run.tta}
        for c in classes
    ]
    return pa.Table.from_pylist(rows, schema=IMAGE_CLASS_SCHEMA)


def block_class_table(image: ImageInfo, run: RunInfo, classes: Sequence[ClassInfo], blocks: Sequence[BlockCounts],
                      transform: tuple[float, ...] | None = None, crs: str | None = None) -> pa.Table:
    """Rows per block x class. With a transform (2D scenes), the block's bounds in map coordinates."""
    rows = []
    for block in blocks:
        bounds = _block_columns(block, transform)
        valid = int(block.class_counts.sum())
        for c in classes:
            rows.append({
                **image.columns(), **bounds, "crs": crs if transform is not None else None,
                "class_id": c.id, "class_name": c.name, "pixel_count": int(block.class_counts[c.id]),
                "valid_pixels": valid, "area": float(block.class_areas[c.id]), "area_unit": image.area_unit,
                **run.run_columns(),
            })
    return pa.Table.from_pylist(rows, schema=BLOCK_CLASS_SCHEMA)


def _block_columns(block: BlockCounts, transform: tuple[float, ...] | None) -> dict:
    columns = dict.fromkeys(("slice_start", "slice_stop", "min_x", "min_y", "max_x", "max_y"))
    if len(block.start) == 3:
        columns["slice_start"], columns["slice_stop"] = block.start[0], block.stop[0]
    (row_start, col_start), (row_stop, col_stop) = block.start[-2:], block.stop[-2:]
    columns.update(row_start=row_start, row_stop=row_stop, col_start=col_start, col_stop=col_stop)
    if transform is not None:
        a, b, c, d, e, f = transform[:6]
        corners = [(col, row) for col in (col_start, col_stop) for row in (row_start, row_stop)]
        xs = [c + a * col + b * row for col, row in corners]
        ys = [f + d * col + e * row for col, row in corners]
        columns.update(min_x=min(xs), min_y=min(ys), max_x=max(xs), max_y=max(ys))
    return columns


def region_class_table(image: ImageInfo, run: RunInfo, classes: Sequence[ClassInfo], regions_file: str,
                       regions: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> pa.Table:
    """Rows per region x class from (region id, class counts, class areas)."""
    rows = [
        {**image.columns(), "region": region, "regions_file": regions_file, "class_id": c.id, "class_name": c.name,
         "pixel_count": int(counts[c.id]), "region_pixels": int(counts.sum()), "area": float(areas[c.id]),
         "area_unit": image.area_unit, **run.run_columns()}
        for region, counts, areas in regions
        for c in classes
    ]
    return pa.Table.from_pylist(rows, schema=REGION_CLASS_SCHEMA)


# --- writing ---------------------------------------------------------------------------------

def validate_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id):
        raise InputError(run_id, "a run id is 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return run_id


def begin_run(stats_root: str | Path, run_id: str, run_date: dt.date) -> dt.date:
    """Register a run and return its date: the date of its first start, so that re-running a
    run id on a later day replaces its rows in the same partition."""
    validate_run_id(run_id)
    record = f"{_root(stats_root)}/_runs/{run_id}.json"
    fs, path = storage.filesystem(record)
    if fs.exists(path):
        with fs.open(path, "r") as handle:
            return dt.date.fromisoformat(json.load(handle)["run_date"])
    storage.write_whole(record, json.dumps({"run_id": run_id, "run_date": run_date.isoformat()}).encode())
    return run_date


def image_file_id(image_uri: str, image: str, model: str | None = None) -> str:
    """A file name for an image's pending rows: its stem plus a hash of its URI (stems repeat
    across folders) and of the model card's name (two cards' rows of one image in one run are
    both kept)."""
    digest = hashlib.sha256((image_uri if model is None else f"{image_uri}\0{model}").encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', image)[:80]}-{digest}"


def _row_keys(table: pa.Table, columns: tuple[str, ...]) -> list[tuple]:
    """Each row's values of `columns`, as tuples."""
    return list(zip(*(table[column].to_pylist() for column in columns)))


def write_image_rows(stats_root: str | Path, run_id: str, run_date: dt.date, image_id: str,
                     tables: dict[str, pa.Table]) -> None:
    """Write one finished image's rows, a pending file per table; re-writing the same image in
    the same run replaces them."""
    for name, table in tables.items():
        path = f"{_pending_partition(stats_root, name, run_date)}/{run_id}/{image_id}.parquet"
        _write_parquet(path, table.cast(TABLES[name]), pending=True)


def compact(stats_root: str | Path) -> int:
    """Fold every pending file into its run's file; returns the number of pending files folded.

    Safe to interrupt anywhere: the run's file is replaced whole, pending files are deleted
    only after, and folding the same pending file twice gives the same rows."""
    folded = 0
    for name in TABLES:
        by_run: dict[tuple[str, str], list[str]] = {}
        for path in table_files(stats_root, name)[1]:
            run_dir, _ = path.rsplit("/", 1)
            partition_name, run_id = run_dir.rsplit("/", 2)[-2:]
            if partition_name == PENDING:  # version 2: <table>/run_date=.../_pending/<run_id>/
                partition_name = run_dir.rsplit("/", 3)[-3]
            by_run.setdefault((partition_name, run_id), []).append(path)
        for (partition_name, run_id), pending in sorted(by_run.items()):
            run_file = f"{_root(stats_root)}/{name}/{partition_name}/{run_id}.parquet"
            fresh = pa.concat_tables(_read_all(sorted(pending), TABLES[name]))
            if _exists(run_file):  # an image's rows of the same card in the same run are replaced
                earlier = _read_parquet(run_file, TABLES[name])
                again = set(_row_keys(fresh, ("image_uri", "model")))
                kept = pa.array([key not in again for key in _row_keys(earlier, ("image_uri", "model"))], pa.bool_())
                fresh = pa.concat_tables([earlier.filter(kept), fresh])
            _write_parquet(run_file, fresh.sort_by([(key, "ascending") for key in SORT_KEYS[name]]))
            storage.remove_files(pending)
            # No empty folders left behind for readers to wade through; each folder looked at
            # once, not once per file (on object storage that is two listings a file).
            for folder in sorted({path.rsplit("/", 1)[0] for path in pending}, reverse=True):
                _remove_empty_folders(folder, stop=_root(stats_root))
            folded += len(pending)
    return folded


def upgrade(stats_root: str | Path) -> int:
    """Bring a dataset of an older schema version to this one, in place and without losing a
    row: pending rows of version 2 are folded (into version-3 files), and every compacted file
    that still holds `run_date` as a column is rewritten without it. Returns the files rewritten."""
    rewritten = compact(stats_root)
    for name in TABLES:
        for path in table_files(stats_root, name)[0]:
            if PARTITION_KEY in _file_columns(path):
                _write_parquet(path, _read_parquet(path, TABLES[name]))
                rewritten += 1
    return rewritten


# --- reading ---------------------------------------------------------------------------------

def table_files(stats_root: str | Path, name: str) -> tuple[list[str], list[str]]:
    """(compacted run files, pending image files) of one table, as URIs or local paths: pending
    files where this version writes them and where version 2 did. Found by listing folders,
    never by globbing: a root may have glob characters in its name (root[1])."""
    root = _root(stats_root)
    compacted, pending = [], []
    for base, in_partition in ((f"{root}/{name}", True), (f"{root}/{PENDING}/{name}", False)):
        for partition in storage.list_names(base):
            if not partition.startswith(f"{PARTITION_KEY}="):
                continue
            folder = f"{base}/{partition}"
            if in_partition:
                compacted += _parquet_files(folder)
                folder = f"{folder}/{PENDING}"
            for run_id in storage.list_names(folder):
                pending += _parquet_files(f"{folder}/{run_id}")
    return sorted(compacted), sorted(pending)


def _parquet_files(folder: str) -> list[str]:
    """The Parquet files directly in a folder (not the hidden ones a writer has in progress)."""
    return [f"{folder}/{name}" for name in storage.list_names(folder)
            if name.endswith(".parquet") and not name.startswith(".")]


def read_table(stats_root: str | Path, name: str = "image_class") -> pa.Table:
    """Every row of a table, pending rows superseding compacted rows of the same run and image."""
    schema = TABLES[name]
    compacted, pending = table_files(stats_root, name)
    rows = _read_all(compacted, schema)
    fresh = pa.concat_tables(_read_all(pending, schema)) if pending else schema.empty_table()
    if fresh.num_rows:
        key = ("run_id", "image_uri", "model")
        superseded = set(_row_keys(fresh, key))
        rows = [t.filter(pa.array([k not in superseded for k in _row_keys(t, key)], pa.bool_())) for t in rows]
    return pa.concat_tables(rows + [fresh]) if rows else fresh


def read_stats(stats_root: str | Path) -> pa.Table:
    """The per image x class rows."""
    return read_table(stats_root, "image_class")


def schema_version(path: str) -> int | None:
    """The schema version a Parquet file of the dataset was written with."""
    fs, local = storage.filesystem(path)
    with fs.open(local, "rb") as handle, named_if_damaged(path):
        metadata = pq.read_schema(handle).metadata or {}
    value = metadata.get(SCHEMA_VERSION_KEY)
    return int(value) if value is not None else None


# --- storage ---------------------------------------------------------------------------------

def _root(stats_root: str | Path) -> str:
    return str(stats_root).rstrip("/")


def _pending_partition(stats_root: str | Path, name: str, run_date: dt.date) -> str:
    return f"{_root(stats_root)}/{PENDING}/{name}/{PARTITION_KEY}={run_date.isoformat()}"


def run_date_of(path: str) -> dt.date | None:
    """The run date a file's partition folder names."""
    for part in reversed(path.split("/")):
        if part.startswith(f"{PARTITION_KEY}="):
            return dt.date.fromisoformat(part.split("=", 1)[1])
    return None


def _remove_empty_folders(folder: str, stop: str) -> None:
    """Remove `folder` and then its parents while they are empty, up to (not including) `stop`."""
    while folder != stop and folder.startswith(stop) and not storage.list_names(folder):
        storage.remove_tree(folder)
        folder = folder.rsplit("/", 1)[0]


def _file_columns(path: str) -> list[str]:
    fs, local = storage.filesystem(path)
    with fs.open(local, "rb") as handle, named_if_damaged(path):
        return pq.read_schema(handle).names


def _exists(path: str) -> bool:
    fs, local = storage.filesystem(path)
    return fs.exists(local)


def _read_all(paths: list[str], schema: pa.Schema) -> list[pa.Table]:
    """The rows of the paths, in order, in the table's full schema (as _read_parquet gives them),
    as one table per run of consecutive files with the same columns and run date. A night
    leaves a small pending file per image and table (1,000 images: 2,000 files): they are read
    several at once (the decoding releases the GIL), and their columns are brought to the
    schema once per run of files, not once per file (that took longer than the reading)."""
    if len(paths) < 8:
        files = [_read_file(path) for path in paths]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=4) as pool:
            files = list(pool.map(_read_file, paths))
    tables, start = [], 0
    for end in range(1, len(paths) + 1):
        if (end == len(paths) or files[end].schema != files[start].schema
                or run_date_of(paths[end]) != run_date_of(paths[start])):
            tables.append(_conformed(pa.concat_tables(files[start:end]), paths[start], schema))
            start = end
    return tables


def _read_parquet(path: str, schema: pa.Schema) -> pa.Table:
    """A file's rows in the table's full schema (_conformed)."""
    return _conformed(_read_file(path), path, schema)


def _read_file(path: str) -> pa.Table:
    """A file's rows as the file holds them."""
    fs, local = storage.filesystem(path)
    with fs.open(local, "rb") as handle, named_if_damaged(path):
        # The file alone, not pq.read_table's dataset machinery: the same rows in half the time
        # for the small files a night leaves.
        return pq.ParquetFile(handle).read()


@contextlib.contextmanager
def named_if_damaged(path: str):
    """Arrow's errors for a file that is no Parquet (cut short, overwritten, a failed copy) as an
    InputError naming the file and what to do, instead of a traceback on every later run.
    Arrow reports a damaged page as a plain OSError; the storage layer's own errors (a network
    failure, a missing file, no permission) are of other types and pass through."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, OSError) and type(exc) is not OSError:
            raise
        raise InputError(path, f"is not a readable Parquet file ({exc}): a damaged statistics file; restore it "
                               "from a backup, or move it out of the stats folder (its rows are then left out), "
                               "and run again") from exc


def damaged_file(stats_root: str | Path) -> InputError | None:
    """The error naming the first file of the dataset that cannot be read, if one cannot: for
    readers (DuckDB) whose own error does not say which file or what to do."""
    for name in TABLES:
        compacted, pending = table_files(stats_root, name)
        for path in compacted + pending:
            try:
                _read_file(path)
            except InputError as exc:
                return exc
    return None


def _conformed(table: pa.Table, path: str, schema: pa.Schema) -> pa.Table:
    """Rows read from `path` (or from files of its folder and columns) in the table's full
    schema: run_date from the partition folder (files of version 2 also hold it as a column),
    the columns of newer versions as nulls."""
    if PARTITION_KEY not in table.column_names:
        table = table.append_column(PARTITION_KEY, pa.array([run_date_of(path)] * table.num_rows, pa.date32()))
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _write_parquet(path: str, table: pa.Table, pending: bool = False) -> None:
    """The rows without run_date, which only the partition folder holds. A pending file (a few
    rows of one image, read once by the fold) is written plain: no compression, dictionaries
    or column statistics, a third of the time to write and two thirds to read (24 columns:
    1.35 -> 0.47 ms, 1.3 -> 0.9 ms); the run's files keep them."""
    if PARTITION_KEY in table.column_names:
        table = table.drop_columns([PARTITION_KEY])
    table = table.replace_schema_metadata({SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})
    buffer = io.BytesIO()
    if pending:
        pq.write_table(table, buffer, compression="none", use_dictionary=False, write_statistics=False)
    else:
        pq.write_table(table, buffer, compression="zstd")
    storage.write_whole(path, buffer.getvalue())
