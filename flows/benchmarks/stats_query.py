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

import pyarrow as pa

from flows.synthetic import FIRST_NIGHT, generate_dataset
from pipelines import stats_query

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
