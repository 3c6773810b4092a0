"""Per-class areas: class pixel counts turned into physical areas, appended to a Parquet dataset.

The dataset under <out>/stats/ is hive-partitioned by run_date. Each image of a run writes its
own file, named by the image key, so re-running the same image on the same date replaces its
rows instead of duplicating them, and other nights are never rewritten.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from pipelines.model_card import ClassInfo

STATS_SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("image_uri", pa.string()),
        ("class_id", pa.int16()),
        ("class_name", pa.string()),
        ("pixel_count", pa.int64()),
        ("valid_pixels", pa.int64()),
        ("area", pa.float64()),
        ("area_unit", pa.string()),
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("run_date", pa.date32()),
    ]
)
PARTITIONING = ds.partitioning(pa.schema([("run_date", pa.date32())]), flavor="hive")


def class_area_table(
    image: str,
    image_uri: str,
    counts: np.ndarray,
    classes: tuple[ClassInfo, ...],
    class_areas: np.ndarray,
    area_unit: str,
    model: str,
    model_version: str,
    run_date: dt.date,
) -> pa.Table:
    valid = int(counts.sum())
    rows = [
        {
            "image": image,
            "image_uri": image_uri,
            "class_id": c.id,
            "class_name": c.name,
            "pixel_count": int(counts[c.id]),
            "valid_pixels": valid,
            "area": float(class_areas[c.id]),
            "area_unit": area_unit,
            "model": model,
            "model_version": model_version,
            "run_date": run_date,
        }
        for c in classes
    ]
    return pa.Table.from_pylist(rows, schema=STATS_SCHEMA)


def write_stats(table: pa.Table, root: Path, basename: str) -> None:
    ds.write_dataset(
        table,
        root,
        format="parquet",
        partitioning=PARTITIONING,
        basename_template=f"{basename}-{{i}}.parquet",
        existing_data_behavior="overwrite_or_ignore",
    )


def read_stats(root: Path) -> pa.Table:
    return ds.dataset(root, format="parquet", partitioning=PARTITIONING, schema=STATS_SCHEMA).to_table()
