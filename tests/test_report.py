"""A run you can see: the HTML report checked in headless Chromium, the Prefect flow run's state,
artifacts and task names, and a quiet terminal (--version, -q, --json)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from flows.archive_flow import segment_archive
from flows.cli import main
from flows.options import RunOptions
from test_hardening import write_crop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def night(ray_cluster, prefect_server, sentinel_scene, tmp_path_factory):
    """A night of two good crops and a broken file, run as the flow; returns (root, final state)."""
    folder = tmp_path_factory.mktemp("night")
    archive = folder / "archive"
    write_crop(sentinel_scene, archive / "north.tif", size=96)
    write_crop(sentinel_scene, archive / "south.tif", size=96, offset=80)
    (archive / "broken.tif").write_bytes(sentinel_scene.read_bytes()[:3000])
    root = folder / "root"
    state = segment_archive(str(archive), "s2-cloud-l1c", str(root), RunOptions(run_id="night"), return_state=True)
    return root, state


def test_a_night_with_a_failed_image_ends_failed_with_its_report(night):
    root, state = night
    assert state.is_failed() and "1 image(s) failed, 2 done" in state.message
    report = state.result(raise_on_failure=False)
    assert sorted(report["done"]) == ["north", "south"] and list(report["failed"]) == [str(Path(report["archive"]) / "broken.tif")]
    assert json.loads((root / "runs" / "night.json").read_text())["failed"] == report["failed"]


def test_prefect_shows_areas_outputs_and_stages_named_by_image(night):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId)

    _, state = night
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        # This flow run's artifacts: other tests' runs in the shared Prefect server may use the id "night" too.
        def artifact(key):
            [found] = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return found
        table, summary = artifact("images-night"), artifact("summary-night")
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    rows = {row["image"]: row for row in json.loads(table.data)}
    assert rows["north"]["outcome"] == "done" and "clear" in rows["north"]["areas"] and "ha" in rows["north"]["areas"]
    assert rows["north"]["outputs"].endswith("preview.png") and rows["north"]["seconds"] > 0
    assert rows["north"]["resumed blocks"] == "0 of 1"
    broken = next(row for image, row in rows.items() if image.endswith("broken.tif"))
    assert broken["outcome"].startswith("failed: ") and "not a readable raster" in broken["outcome"]
    assert "night.html" in summary.data and "| clear |" in summary.data
    names = {run.name for run in task_runs}
    # Small images go through the stages in batches: each stage's task names its images.
    for stage in ("ingest", "segment", "finalize", "record"):
        for image in ("north", "south"):
            assert any(name.startswith(f"{stage} ") and image in name.split(" ", 1)[1].split(", ") for name in names), names


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_the_html_report_loads_in_headless_chromium_with_every_image_and_number(night, tmp_path):
    root, state = night
    report = state.result(raise_on_failure=False)
    page = root / "runs" / "night.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    for name in ("north", "south"):
        section = re.search(rf"<section class=\"image\" data-image=\"{name}\">(.*?)</section>", dom.stdout, re.S)
        assert section, f"no section for {name}"
        assert re.search(r'<img alt="preview of ' + name + r'" src="data:image/jpeg;base64,', section.group(1))
        for class_name, value in report["images"][name]["classes"].items():
            assert f"{value['pixels']:,}" in section.group(1), (name, class_name)
    assert "not a readable raster" in dom.stdout
    assert dom.stdout.count('class="series"') == 3, "one line per class over the nights"

    screenshot = tmp_path / "report.png"
    shot = subprocess.run([CHROMIUM, *flags, f"--screenshot={screenshot}", "--window-size=1200,1800", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    with Image.open(screenshot) as picture:
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "the page is not blank"


def test_segpipe_report_rebuilds_the_same_page(night, capsys):
    root, _ = night
    page = root / "runs" / "night.html"
    before = page.read_bytes()
    page.unlink()
    assert main(["report", str(root), "--run-id", "night"]) == 0
    assert capsys.readouterr().out.strip() == str(page) and page.read_bytes() == before


def test_a_night_run_again_keeps_its_earlier_images_in_its_report(night, tmp_path):
    """A night resumed after a crash, or run again by its schedule with the same run id, wrote a
    report of '0 done, 2 skipped' over the page of the images it had done: they now stay done in
    the run's report, with each attempt's counts. Another run id skips them as done."""
    root, _ = night
    again = tmp_path / "root"
    shutil.copytree(root, again)
    archive = root.parent / "archive"
    state = segment_archive(str(archive), "s2-cloud-l1c", str(again), RunOptions(run_id="night"), return_state=True)
    attempt = state.result(raise_on_failure=False)
    assert attempt["done"] == [] and sorted(attempt["skipped"]) == ["north", "south"]  # what this attempt did
    whole = json.loads((again / "runs" / "night.json").read_text())
    assert sorted(whole["done"]) == ["north", "south"] and whole["skipped"] == []
    assert list(whole["failed"]) == [str(archive / "broken.tif")]  # retried, and failed again
    assert [(a["done"], a["skipped"], a["failed"]) for a in whole["attempts"]] == [(2, 0, 1), (0, 2, 1)]
    earlier = json.loads((root / "runs" / "night.json").read_text())
    assert whole["images"] == earlier["images"] and whole["started"] == earlier["started"]
    page = (again / "runs" / "night.html").read_text()
    assert "data-image='north'" in page and "data-image='south'" in page and "2 attempts" in page

    other = segment_archive(str(archive), "s2-cloud-l1c", str(again), RunOptions(run_id="other"), return_state=True)
    assert sorted(other.result(raise_on_failure=False)["skipped"]) == ["north", "south"]
    assert sorted(json.loads((again / "runs" / "other.json").read_text())["skipped"]) == ["north", "south"]


def test_the_reports_links_reach_outputs_of_any_name(ray_cluster, prefect_server, sentinel_scene, tmp_path):
    """Image names are file names: `scene#1`, `what?` and `100%` gave links to a fragment, a
    query and nothing."""
    from urllib.parse import unquote, urljoin, urlsplit

    archive = tmp_path / "archive"
    for name in ("scene#1", "what?", "100%"):
        write_crop(sentinel_scene, archive / f"{name}.tif", size=64)
    root = tmp_path / "root"
    segment_archive(str(archive), "s2-cloud-l1c", str(root), RunOptions(run_id="names"), return_state=True)
    page = root / "runs" / "names.html"
    links = re.findall(r"href='([^']*)'", page.read_text())
    assert len(links) == 3 * 3
    for link in links:
        target = Path(unquote(urlsplit(urljoin(page.as_uri(), link)).path))
        assert target.is_file() and target.parent.name in ("scene#1", "what?", "100%"), link


def test_version_quiet_and_json(ray_cluster, sentinel_scene, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and re.fullmatch(r"segpipe \S+\n", capsys.readouterr().out)

    assert main(["-q", "segment", str(sentinel_scene), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "q"),
                 "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["image"] == "sentinel2_scene" and sum(v["pixels"] for v in summary["classes"].values()) == 60000
    assert Path(summary["report"]).is_file() and summary["report"].endswith("-sentinel2_scene.html")
    assert captured.err.strip() == "", "quiet: nothing but results and errors"

    # -q and -v also work after the command, as users type them.
    assert main(["segment", str(sentinel_scene), "--model", "s2-cloud-l1c", "--out", str(tmp_path / "q2"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "" and "sentinel2_scene" in captured.out
    with pytest.raises(SystemExit) as done:
        main(["stats", str(tmp_path / "q2"), "-q", "-v"])
    assert done.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
