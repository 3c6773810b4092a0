"""The run report as one self-contained HTML page, `<root>/runs/<run id>.html`: it opens offline
in any browser (styles inline, pictures as data URIs, charts as inline SVG, no script).

Per image: its preview, its class areas as a table and a bar chart, its outputs, the time of
each stage and the blocks taken over from an interrupted run; failed images with their whole
reason; skipped ones. Then the run's totals and, from the statistics, a chart of each class's
area over every night of the root (one line per class).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import os
import shutil
from pathlib import Path

from flows.report import format_area
from pipelines import storage

THUMBNAIL = 320
CHART_WIDTH, CHART_HEIGHT = 640, 240
STAGES = ("ingest", "segment", "finalize", "record")


def report_path(root: str, run_id: str) -> str:
    return storage.join(root, "runs", f"{run_id}.html")


def write_html_report(root: str, report: dict, path: str | None = None) -> str:
    """Write the page for `report` (a run report, runs/<id>.json) and return where; the
    thumbnails its images' finalize kept (keep_thumbnail) are dropped after."""
    path = path or report_path(root, report["run_id"])
    storage.write_whole(path, render(root, report).encode())
    forget_thumbnails(root, report)
    return path


def rebuild(root: str, run_id: str | None = None) -> str:
    """The page of a run (default: the latest report in <root>/runs) written again from its
    JSON report: `segpipe run`'s `<run id>.json`, or `segpipe segment`'s `<run id>-<image>.json`."""
    runs = sorted(n for n in storage.list_names(storage.join(root, "runs")) if n.endswith(".json"))
    if not runs:
        from pipelines.errors import InputError

        raise InputError(root, "has no run reports (runs/*.json): run segpipe run into it first")
    name = f"{run_id}.json" if run_id else max(runs, key=lambda n: storage.stat(storage.join(root, "runs", n))[1])
    if name not in runs:
        from pipelines.errors import InputError

        raise InputError(run_id, f"no run report of that id in {root} (there are: {', '.join(r[:-5] for r in runs)})")
    report = json.loads(storage.read_bytes(storage.join(root, "runs", name)))
    return write_html_report(root, report, storage.join(root, "runs", name[: -len(".json")] + ".html"))


def render(root: str, report: dict) -> str:
    colours = {c["name"]: tuple(c["color"]) for c in report.get("classes", [])}
    images = report.get("images", {})
    done = [name for name in report.get("done", []) if name in images]
    parts = [HEAD.format(title=html.escape(f"segpipe run {report['run_id']}")),
             f"<h1>segpipe run {html.escape(report['run_id'])}</h1>",
             "<p class='summary'>" + html.escape(
                 f"{report.get('run_date', '')} · model {report.get('model', '?')} {report.get('model_version', '')} · "
                 f"{len(report.get('done', []))} done, {len(report.get('skipped', []))} skipped, "
                 f"{len(report.get('failed', {}))} failed · {report.get('started', '')} – {report.get('finished', '')}"
                 + attempts_text(report.get("attempts", [])))
             + "</p>",
             f"<p>archive <code>{html.escape(str(report.get('archive', '')))}</code>, output root "
             f"<code>{html.escape(str(report.get('out', root)))}</code></p>"]
    parts += totals_section(images, done, colours)
    parts += history_section(root, colours, report.get("model"))
    if done:
        parts.append("<h2>Images</h2>")
    pictures = thumbnails([(preview_of(images[name]), kept_thumbnail(root, report["run_id"], name)) for name in done])
    for name, picture in zip(done, pictures):
        parts.append(image_section(root, name, images[name], report.get("blocks", {}).get(name, {}), colours, picture))
    if report.get("failed"):
        parts.append("<h2>Failed</h2><ul class='failed'>")
        parts += [f"<li data-uri='{html.escape(uri)}'><code>{html.escape(uri)}</code><pre>{html.escape(why)}</pre></li>"
                  for uri, why in report["failed"].items()]
        parts.append("</ul>")
    if report.get("skipped"):
        parts.append(f"<h2>Skipped (already done)</h2><p class='skipped'>{html.escape(', '.join(report['skipped']))}</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def attempts_text(attempts: list[dict]) -> str:
    """The attempts of a run resumed or run again, each with what it did."""
    if len(attempts) < 2:
        return ""
    each = "; ".join(f"{a.get('started', '?')}: {a.get('done', 0)} done, {a.get('failed', 0)} failed"
                     for a in attempts)
    return f" · {len(attempts)} attempts ({each})"


def totals_section(images: dict, done: list[str], colours: dict) -> list[str]:
    totals: dict[tuple[str, str], float] = {}
    for name in done:
        entry = images[name]
        for class_name, value in entry["classes"].items():
            totals[class_name, entry["area_unit"]] = totals.get((class_name, entry["area_unit"]), 0.0) + value["area"]
    if not totals:
        return []
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td class='number'>{format_area(a, u)}</td></tr>"
                   for (c, u), a in totals.items())
    bars = bar_chart({c: a for (c, _), a in totals.items()}, colours)
    return [f"<h2>Run totals</h2><div class='image'><table class='totals'><tr><th>class</th><th>area</th></tr>{rows}"
            f"</table>{bars}</div>"]


def history_section(root: str, colours: dict, model: str | None = None) -> list[str]:
    """Each class's area in every run of the root's statistics (all its images) by the report's
    model card (another card's rows in the same root are another series), the runs in the order
    of their dates."""
    from pipelines.stats import read_table

    try:
        rows = read_table(storage.join(root, "stats"), "image_class").to_pylist()
    except OSError:
        return []
    series: dict[tuple[str, str], dict[tuple[dt.date, str], float]] = {}
    for row in rows:
        if model is not None and row["model"] != model:
            continue
        per_run = series.setdefault((row["class_name"], row["area_unit"]), {})
        run = (row["run_date"], row["run_id"])
        per_run[run] = per_run.get(run, 0.0) + row["area"]
    if not series:
        return []
    parts = ["<h2>Class areas over the nights</h2>"]
    for unit in sorted({u for _, u in series}):
        lines = {c: points for (c, u), points in series.items() if u == unit}
        parts.append(line_chart(lines, colours, unit))
    return parts


def preview_of(entry: dict) -> str | None:
    return next((o for o in entry["outputs"] if o.endswith("preview.png")), None)


def image_section(root: str, name: str, entry: dict, blocks: dict, colours: dict, picture: str | None) -> str:
    """`picture`: the preview's thumbnail as a data URI (thumbnails), or None."""
    unit = entry["area_unit"]
    valid = entry.get("valid_pixels") or 1
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td class='number'>{v['pixels']:,}</td>"
        f"<td class='number'>{v['pixels'] / valid:.1%}</td><td class='number'>{format_area(v['area'], unit)}</td></tr>"
        for c, v in entry["classes"].items())
    stages = " · ".join(f"{stage} {entry['stages'][stage]:.2f} s" for stage in STAGES if stage in entry["stages"])
    outputs = "".join(f"<li><a href='{html.escape(relative(root, o))}'>{html.escape(Path(o).name)}</a></li>"
                      for o in entry["outputs"])
    preview = preview_of(entry)
    figure = (f"<a href='{html.escape(relative(root, preview))}'><img alt='preview of {html.escape(name)}' "
              f"src='{picture}'></a>") if picture else "<p>(no preview)</p>"
    resumed = (f"<p>resumed: {blocks['resumed']} of {blocks['total']} blocks were done by an interrupted run</p>"
               if blocks.get("resumed") else "")
    return (f"<section class='image' data-image='{html.escape(name)}'><h3>{html.escape(name)}</h3>"
            f"<div class='figure'>{figure}</div><div><p><code>{html.escape(entry['uri'])}</code> · {entry['kind']} "
            f"{' x '.join(map(str, reversed(entry['shape'])))} · {entry['seconds']:.2f} s ({stages}) · "
            f"{entry['tiles'] - entry['tiles_skipped']} tiles segmented, {entry['tiles_skipped']} skipped</p>{resumed}"
            f"<table><tr><th>class</th><th>pixels</th><th>share</th><th>area</th></tr>{rows}</table>"
            f"{bar_chart({c: v['pixels'] for c, v in entry['classes'].items()}, colours)}"
            f"<ul class='outputs'>{outputs}</ul></div></section>")


def relative(root: str, path: str) -> str:
    """A link from <root>/runs/ to an output, its characters URL-escaped: an image named
    `scene#1` or `what?` linked to a fragment or a query, `100%` to nothing."""
    from urllib.parse import quote

    if storage.is_remote(path):
        return path
    try:
        return "../" + quote(Path(path).resolve().relative_to(Path(root).resolve()).as_posix())
    except ValueError:
        return Path(path).resolve().as_uri()


def thumbnails(pictures: list[tuple[str | None, str | None]]) -> list[str | None]:
    """thumbnail() of each (preview, kept thumbnail) (no preview: None), several at once:
    decoding and encoding release the GIL, and a night's report has a picture per image."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda pair: thumbnail(*pair) if pair[0] else None, pictures))


def thumbnail(path: str, kept: str | None = None) -> str | None:
    """The picture at `path`, at most THUMBNAIL pixels a side, as a JPEG data URI (a tenth of a
    PNG's time and size: a night's report holds thousands). `kept`: where finalize may have
    left it made already (keep_thumbnail); taken only if written after the picture, so a
    thumbnail an earlier attempt left behind is never shown for a newer preview."""
    from PIL import Image

    try:
        if kept and is_newer(kept, path):
            return data_uri(Path(kept).read_bytes())
        with Image.open(io.BytesIO(storage.read_bytes(path))) as picture:
            return data_uri(thumbnail_jpeg(picture))
    except (OSError, ValueError):
        return None


def thumbnail_jpeg(picture) -> bytes:
    """A PIL image made a thumbnail (in place) and encoded as JPEG."""
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


THUMBNAILS = ".thumbnails"
"""runs/.thumbnails/<run id>/<image>.jpg: thumbnails kept for the run's report."""


def kept_thumbnails(root: str, run_id: str) -> Path | None:
    """The folder of a run's kept thumbnails (local roots), or None."""
    return None if storage.is_remote(root) else Path(root, "runs", THUMBNAILS, run_id)


def kept_thumbnail(root: str, run_id: str, name: str) -> str | None:
    """Where keep_thumbnail keeps an image's thumbnail (local roots), or None."""
    folder = kept_thumbnails(root, run_id)
    return None if folder is None else str(folder / f"{name}.jpg")


def keep_thumbnail(root: str, run_id: str, name: str, picture) -> None:
    """Make the report's thumbnail of an image's preview while the picture is still in memory
    (the finalize stage, beside the model's work) and keep it until the run's report is
    written: at the end of a night of 1,000 images of 512² the report then reads 1,000 small
    JPEGs instead of decoding 1,000 PNGs (12 ms each, about 10 s). The same bytes as from the
    file: PNG is lossless. Local roots only; on object storage the report decodes the previews."""
    path = kept_thumbnail(root, run_id, name)
    if path is None:
        return
    try:
        storage.write_whole(path, thumbnail_jpeg(picture.copy()))
    except OSError:  # only a shortcut: the report decodes the preview instead
        pass


def forget_thumbnails(root: str, report: dict) -> None:
    """Remove the thumbnails kept for the run of `report` (also those of images that failed
    after their finalize), and runs/.thumbnails once empty. Whatever removes them early, the
    report only decodes the previews again."""
    folder = kept_thumbnails(root, report["run_id"])
    if folder is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()
    except OSError:  # another run's thumbnails are there, or none ever were
        pass


def is_newer(kept: str, path: str) -> bool:
    """`kept` exists and was written no earlier than `path` (a missing `path`: False)."""
    try:
        return os.stat(kept).st_mtime_ns >= os.stat(path).st_mtime_ns
    except OSError:
        return False


def colour(colours: dict, name: str) -> str:
    r, g, b = colours.get(name, (128, 128, 128))
    return f"rgb({r},{g},{b})"


def bar_chart(values: dict[str, float], colours: dict) -> str:
    """Horizontal bars, one per class, lengths proportional to the values."""
    top = max(values.values(), default=0) or 1
    height = 22 * len(values) + 4
    bars = []
    for index, (name, value) in enumerate(values.items()):
        width = 220 * value / top
        y = 4 + 22 * index
        bars.append(f"<rect x='100' y='{y}' width='{width:.1f}' height='16' fill='{colour(colours, name)}' "
                    f"stroke='#444' stroke-width='0.5'><title>{html.escape(name)}: {value:,.6g}</title></rect>"
                    f"<text x='96' y='{y + 12}' text-anchor='end'>{html.escape(name)}</text>")
    return (f"<svg class='bars' role='img' width='340' height='{height}' viewBox='0 0 340 {height}' "
            f"xmlns='http://www.w3.org/2000/svg'>{''.join(bars)}</svg>")


def line_chart(lines: dict[str, dict[tuple[dt.date, str], float]], colours: dict, unit: str) -> str:
    dates = sorted({d for points in lines.values() for d in points})
    top = max((v for points in lines.values() for v in points.values()), default=0) or 1
    left, bottom = 60, CHART_HEIGHT - 30

    def x(day: dt.date) -> float:
        if len(dates) == 1:
            return (left + CHART_WIDTH - 20) / 2
        return left + (CHART_WIDTH - left - 20) * dates.index(day) / (len(dates) - 1)

    def y(value: float) -> float:
        return bottom - (bottom - 10) * value / top

    shapes = [f"<line x1='{left}' y1='{bottom}' x2='{CHART_WIDTH - 10}' y2='{bottom}' stroke='#444'/>",
              f"<line x1='{left}' y1='10' x2='{left}' y2='{bottom}' stroke='#444'/>",
              f"<text x='4' y='16'>{html.escape(format_area(top, unit))}</text>",
              f"<text x='{left - 4}' y='{bottom + 4}' text-anchor='end'>0</text>",
              *(f"<text x='{x(run):.1f}' y='{CHART_HEIGHT - 8}' text-anchor='{anchor}'>{html.escape(run_label(run))}"
                f"</text>" for run, anchor in axis_runs(dates))]
    for index, (name, points) in enumerate(sorted(lines.items())):
        coordinates = " ".join(f"{x(d):.1f},{y(v):.1f}" for d, v in sorted(points.items()))
        # A dark edge under each line and dot: a class coloured near white (cloud) stays visible.
        shapes.append(f"<polyline points='{coordinates}' fill='none' stroke='#444' stroke-width='4'/>"
                      f"<polyline class='series' data-class='{html.escape(name)}' points='{coordinates}' fill='none' "
                      f"stroke='{colour(colours, name)}' stroke-width='2'><title>{html.escape(name)}</title></polyline>")
        shapes += [f"<circle cx='{x(d):.1f}' cy='{y(v):.1f}' r='3' fill='{colour(colours, name)}' stroke='#444' "
                   f"stroke-width='0.75'/>" for d, v in sorted(points.items())]
        shapes.append(f"<rect x='{CHART_WIDTH - 22}' y='{14 + 16 * index}' width='10' height='10' "
                      f"fill='{colour(colours, name)}' stroke='#444' stroke-width='0.5'/>"
                      f"<text x='{CHART_WIDTH - 28}' y='{23 + 16 * index}' text-anchor='end'>{html.escape(name)}</text>")
    return (f"<svg class='history' role='img' width='{CHART_WIDTH}' height='{CHART_HEIGHT}' "
            f"viewBox='0 0 {CHART_WIDTH} {CHART_HEIGHT}' xmlns='http://www.w3.org/2000/svg'>{''.join(shapes)}</svg>")


def run_label(run: tuple[dt.date, str]) -> str:
    """A run on the time axis: its date, and its id where that is not the date."""
    day, run_id = run
    return str(day) if run_id == str(day) else f"{day} {run_id}"


def axis_runs(runs: list) -> list[tuple]:
    """The runs labelled under the time axis, with their text anchors: the first and the last."""
    if len(runs) == 1:
        return [(runs[0], "middle")]
    return [(runs[0], "start"), (runs[-1], "end")]


HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }}
td.number {{ text-align: right; font-variant-numeric: tabular-nums; }}
section.image, div.image {{ display: flex; gap: 1.5em; margin: 1em 0; padding-bottom: 1em; border-bottom: 1px solid #eee; }}
svg text {{ font-size: 12px; fill: #222; }}
pre {{ white-space: pre-wrap; background: #fbeeee; padding: 0.5em; }}
</style></head><body>"""
