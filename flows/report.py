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


# Base unit -> (threshold in base units, factor, unit shown), the first that fits is used: areas
# of scenes in km² or ha, of slides in mm² or µm², volumes in mL or mm³.
HUMAN_UNITS = {
    "m2": [(1e6, 1e6, "km²"), (1e2, 1e4, "ha"), (0, 1, "m²")],
    "um2": [(1e4, 1e6, "mm²"), (0, 1, "µm²")],
    "mm2": [(1e2, 1, "mm²"), (0, 1, "mm²")],
    "mm3": [(1e2, 1e3, "mL"), (0, 1, "mm³")],
}


def format_area(area: float, unit: str) -> str:
    """An area (volume) in the unit a person reads it in; the statistics keep base units."""
    for threshold, factor, shown in HUMAN_UNITS.get(unit, []):
        if abs(area) >= threshold:
            value = area / factor
            # Four significant digits (5.939 km², 6.07 ha); whole numbers from 1000 on.
            return f"{value:.4g} {shown}" if abs(value) < 1000 else f"{value:,.0f} {shown}"
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
    # Areas are shown with their (human) unit: the base-unit column is left to CSV and JSON.
    shown = [f for f in result.schema
             if not (f.name == "area_unit" and any(name in AREA_COLUMNS for name in result.column_names))]
    for field in shown:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        table.add_column(field.name, justify="right" if numeric else "left")
    for row in result.to_pylist():
        unit = row.get("area_unit")
        table.add_row(*(format_area(row[f.name], unit) if unit and f.name in AREA_COLUMNS and row[f.name] is not None
                        else format_cell(f.name, row[f.name]) for f in shown))
    Console(width=max(120, Console().width)).print(table)
    if result.num_rows == 0:
        Console().print("no rows")


AREA_COLUMNS = ("area", "area_before", "area_after", "change")


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


def print_evaluation(agreements: list, output_format: str, out: str | None = None) -> None:
    """`segpipe evaluate`'s answer: per image and class IoU, Dice, precision and recall (and,
    with several images, all of them together), the confusion matrices; optionally as Parquet."""
    import json
    import sys

    from pipelines import storage
    from pipelines.evaluation import agreement_table, confusion_table, overall

    groups = agreements + ([overall(agreements)] if len(agreements) > 1 else [])
    rows = agreement_table(groups)
    if out:
        import io

        import pyarrow.parquet as pq

        for name, table in (("evaluation.parquet", rows), ("confusion.parquet", confusion_table(agreements))):
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            storage.write_whole(storage.join(out, name), buffer.getvalue())
    if output_format == "json":
        document = [{"image": a.image, "classes": [r for r in a.rows()], "confusion": a.confusion.tolist()}
                    for a in groups]
        sys.stdout.write(json.dumps(document, indent=1) + "\n")
        return
    if output_format == "csv":
        print_query_result(rows, "csv")
        return
    table = Table(title="agreement with the reference (pixels labelled in both)")
    for column in ("image", "class", "reference px", "predicted px", "IoU", "Dice", "precision", "recall"):
        table.add_column(column, justify="left" if column in ("image", "class") else "right")

    def score(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for row in rows.to_pylist():
        table.add_row(row["image"], row["class_name"], f"{row['reference_pixels']:,}", f"{row['predicted_pixels']:,}",
                      score(row["iou"]), score(row["dice"]), score(row["precision"]), score(row["recall"]))
    console = Console(width=max(120, Console().width))
    console.print(table)
    for a in groups:
        if len(a.class_names) > 12:
            continue
        console.print(f"{a.image}: confusion (rows: reference, columns: predicted)", highlight=False)
        matrix = Table()
        matrix.add_column("")
        for name in a.class_names:
            matrix.add_column(name, justify="right")
        for i, name in enumerate(a.class_names):
            matrix.add_row(name, *(f"{int(v):,}" for v in a.confusion[i]))
        console.print(matrix)
