"""The per-class area table printed at the end of a run."""

from __future__ import annotations

import pyarrow as pa
from rich.console import Console
from rich.table import Table


def area_table(stats: pa.Table, title: str) -> Table:
    rows = stats.to_pylist()
    table = Table(title=title)
    for column, justify in (("image", "left"), ("class", "left"), ("pixels", "right"), ("share", "right"), ("area", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        share = row["pixel_count"] / row["valid_pixels"] if row["valid_pixels"] else 0.0
        table.add_row(row["image"], row["class_name"], f"{row['pixel_count']:,}", f"{share:.1%}", format_area(row["area"], row["area_unit"]))
    return table


def format_area(area: float, unit: str) -> str:
    if unit == "m2":
        return f"{area / 1e6:,.4f} km²"
    return f"{area:,.0f} {unit}"


def print_area_table(stats: pa.Table, title: str = "Per-class areas") -> None:
    Console().print(area_table(stats, title))
