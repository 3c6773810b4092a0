"""How fast `segpipe stats` answers over a big statistics dataset.

    python -m flows.benchmarks.stats_query [--images 1000] [--classes 20] [--nights 30] [--root DIR]

Generates per image x class rows for every night (random class shares over a fixed archive of
images, 10 m pixels), writes each night through the dataset writer (pending rows, then
compaction into the night's run file, as a nightly run does), then times the common questions
on a fresh DuckDB connection each: areas by class, by image, by run date, the change between
the first and the last night, the top 10 images by one class's share, and a --sql query.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines import stats_query
from pipelines.model_card import ClassInfo
from pipelines.stats import ImageInfo, RunInfo, begin_run, compact, image_class_table, write_image_rows

FIRST_NIGHT = dt.date(2026, 10, 1)
PIXEL_AREA = 100.0  # m², a 10 m pixel


def generate_dataset(stats_root: Path, images: int, classes: int, nights: int, seed: int = 0,
                     side: int = 1000) -> list[ClassInfo]:
    """One run per night over the same `images` (side x side pixels, some nodata), random
    class counts that sum to each image's valid pixels."""
    rng = np.random.default_rng(seed)
    class_infos = [ClassInfo(k, f"class{k:02d}", (k * 11 % 256, k * 53 % 256, k * 97 % 256)) for k in range(classes)]
    for night in range(nights):
        run_date = FIRST_NIGHT + dt.timedelta(days=night)
        run_id = f"night-{run_date.isoformat()}"
        begin_run(stats_root, run_id, run_date)
        info = RunInfo(run_id, run_date, "generated", "1", "0" * 64, 512, 0.25, "gaussian", False)
        tables = []
        for index in range(images):
            valid = int(side * side - rng.integers(0, side * side // 10))
            counts = rng.multinomial(valid, rng.dirichlet(np.full(classes, 0.5)))
            image = ImageInfo(f"scene{index:05d}", f"s3://archive/scene{index:05d}.tif", f"{index:064x}", "m2")
            tables.append(image_class_table(image, info, class_infos, counts, counts * PIXEL_AREA))
        write_image_rows(stats_root, run_id, run_date, "generated", {"image_class": pa.concat_tables(tables)})
        compact(stats_root)
    return class_infos


def timed(label: str, question) -> pa.Table:
    started = time.perf_counter()
    result = question()
    print(f"{label:<48} {time.perf_counter() - started:7.3f} s  ({result.num_rows} rows)", flush=True)
    return result


def run_queries(stats_root: str, nights: int) -> dict[str, pa.Table]:
    last = FIRST_NIGHT + dt.timedelta(days=nights - 1)
    questions = {
        "areas by class": lambda con: stats_query.areas_by(con, ["class"]),
        "areas by image": lambda con: stats_query.areas_by(con, ["image"]),
        "areas by run date and class": lambda con: stats_query.areas_by(con, ["run_date", "class"]),
        f"change by class {FIRST_NIGHT} -> {last}": lambda con: stats_query.changes(con, FIRST_NIGHT, last, ["class"]),
        "top 10 images by class00 share": lambda con: stats_query.top_images(con, "class00", 10),
        "--sql: nights with most class01 area": lambda con: stats_query.sql(
            con, "SELECT run_date, SUM(area) AS area FROM image_class WHERE class_name = 'class01' "
                 "GROUP BY run_date ORDER BY area DESC LIMIT 5"),
    }
    answers = {}
    for label, question in questions.items():
        # A fresh connection per question: the time includes finding the files and opening the views.
        answers[label] = timed(label, lambda: question(stats_query.connect(stats_root)))
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--root", type=Path, help="where the dataset goes (default: a temporary folder, removed after)")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="segpipe-stats-"))
    stats_root = root / "stats"
    try:
        started = time.perf_counter()
        generate_dataset(stats_root, args.images, args.classes, args.nights)
        rows = args.images * args.classes * args.nights
        files = sum(1 for _ in stats_root.rglob("*.parquet"))
        print(f"generated {rows:,} rows ({args.images} images x {args.classes} classes x {args.nights} nights) "
              f"in {files} files, {time.perf_counter() - started:.1f} s", flush=True)
        run_queries(str(stats_root), args.nights)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
