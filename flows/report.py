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


def print_query_result(result: pa.Table, output_format: str, title: str = "") -> None:
    """A `segpipe stats` answer as a table on the terminal, CSV or JSON (records) on stdout."""
    import json
    import sys

    import pyarrow.csv as pacsv

    if output_format == "csv":
        buffer = pa.BufferOutputStream()
        pacsv.write_csv(result, buffer)
        sys.stdout.write(buffer.getvalue().to_pybytes().decode())
        return
    if output_format == "json":
        sys.stdout.write(json.dumps(result.to_pylist(), default=json_value, indent=1) + "\n")
        return
    table = Table(title=title)
    for field in result.schema:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        table.add_column(field.name, justify="right" if numeric else "left")
    for row in result.to_pylist():
        table.add_row(*(format_cell(name, value) for name, value in row.items()))
    Console(width=max(120, Console().width)).print(table)
    if result.num_rows == 0:
        Console().print("no rows")


def json_value(value):
    """Values json cannot write: DuckDB's exact sums (Decimal) as numbers, dates as ISO text."""
    from decimal import Decimal

    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)


def format_cell(column: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if column in ("share", "relative_change"):
            return f"{value:.2%}"
        return f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
