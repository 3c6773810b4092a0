"""Many small images at model speed without changing a byte: a night's images go through the
stages in batches whose blocks share the model's batches, and small work runs in the driver
without Ray; each image's outputs and statistics are those it gets segmented alone on a Ray
actor, block by block."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import rasterio
import torch

from flows import html_report, stages
from flows.archive_flow import image_batches, run_night
from flows.cli import main
from flows.options import RunOptions
from flows.run import ImageRun, claim_folder, plan_image, prepare_run, started
from flows.synthetic import write_small_net_card, write_tiled_scene
from pipelines.model_card import load_card
from pipelines.sources import scene
from pipelines.stats import read_table
from pipelines.tiling import Box
from segworkers.predictor import BlockJob, BlockPredictor, BlockWork

# Sizes that give images of one block and of several, edge tiles flush with odd borders, and
# an image smaller than a tile (mirrored out to it).
SIDES = (40, 64, 150, 200, 97)
RUN_ID = "night"
COMPARED = ("image", "class_id", "pixel_count", "valid_pixels", "area", "area_unit", "model_digest")


def write_archive(folder: Path) -> list[Path]:
    big = write_tiled_scene(folder.parent / "tiled.tif", 512)
    folder.mkdir()
    paths = []
    with rasterio.open(big) as src:
        for index, side in enumerate(SIDES):
            window = ((index * 37, index * 37 + side), (index * 53, index * 53 + side))
            profile = {**src.profile, "width": side, "height": side, "transform": src.window_transform(window)}
            profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
            path = folder / f"chip-{index}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(window=window))
            paths.append(path)
    return paths


def rows_of(root: Path, image: str) -> list[tuple]:
    table = read_table(root / "stats", "image_class")
    table = table.filter(pc.equal(table["image"], image)).sort_by("class_id")
    return list(zip(*(table[column].to_pylist() for column in COMPARED)))


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of module.name: the list gains a 1 per call."""
    calls, function = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_night_of_small_images_gives_the_bytes_each_gives_alone_on_an_actor(ray_cluster, prefect_server, tmp_path,
                                                                               monkeypatch):
    images = write_archive(tmp_path / "archive")
    card = write_small_net_card(tmp_path, tile=64)
    options = ["--block", "128", "--run-id", RUN_ID]

    night = tmp_path / "night"
    thumbnails_made = count_calls(monkeypatch, html_report, "thumbnail_jpeg")
    report = run_night(str(tmp_path / "archive"), str(card), str(night), RunOptions(block=128, run_id=RUN_ID))
    assert sorted(report["done"]) == sorted(path.stem for path in images)
    # The report's thumbnails were made in finalize, from the pictures in memory (one each, none
    # decoded again for the report), are the bytes decoding the previews gives, and are not left behind.
    assert thumbnails_made == [1] * len(images)
    page = (night / "runs" / f"{RUN_ID}.html").read_bytes()
    assert not (night / "runs" / html_report.THUMBNAILS).exists()
    assert main(["report", str(night), "--run-id", RUN_ID]) == 0
    assert thumbnails_made == [1] * len(images) * 2, "the rebuilt page decoded each preview"
    assert (night / "runs" / f"{RUN_ID}.html").read_bytes() == page

    alone, local = tmp_path / "alone", tmp_path / "local"
    for path in images:  # each on a Ray actor of its own, its blocks one group
        assert main(["segment", str(path), "--model", str(card), "--out", str(alone), "--workers", "1", *options]) == 0
        assert main(["segment", str(path), "--model", str(card), "--out", str(local), *options]) == 0  # in the driver

    for path, side in zip(images, SIDES):
        name = path.stem
        reference = (night / name / "labels.tif").read_bytes()
        for root in (alone, local):
            assert (root / name / "labels.tif").read_bytes() == reference, f"{name}: labels differ in {root.name}"
            assert (root / name / "preview.png").read_bytes() == (night / name / "preview.png").read_bytes()
            assert rows_of(root, name) == rows_of(night, name), f"{name}: statistics differ in {root.name}"
        with rasterio.open(night / name / "labels.tif") as labels:
            assert labels.shape == (side, side)
            assert np.isin(labels.read(1), [0, 1, 2, 3]).all(), "every pixel labelled (no nodata in these chips)"


def test_images_go_through_the_stages_in_batches_bounded_in_pixels_and_images(tmp_path):
    class Image:
        def __init__(self, side):
            self.source = type("Source", (), {"shape": (side, side)})()

    sides = [512] * 40 + [4096, 100, 5000, 100]
    batches = image_batches([Image(side) for side in sides])
    assert [len(batch) for batch in batches] == [32, 8, 1, 1, 1, 1]
    assert sum(len(batch) for batch in batches) == len(sides)


def segment_with_stages(card: Path, path: Path, out: Path, after_ingest, **options) -> None:
    """`path` through the stages in this process; `after_ingest(image)` is called between ingest
    and segment."""
    run = prepare_run(str(card), str(out), RunOptions(run_id=RUN_ID, **options))
    with started(run) as run:
        image = claim_folder(plan_image(run, str(path)))

        def run_stage(stage, work) -> None:
            work()
            if stage is stages.ingest:
                after_ingest(image)

        stages.run_image(image, run_stage=run_stage)


@pytest.mark.parametrize("several_blocks", [False, True], ids=["one-block", "tiled-several-blocks"])
def test_a_local_geotiff_is_read_in_place_with_the_bytes_of_a_copy(tmp_path, monkeypatch, several_blocks):
    """A GeoTIFF on a local disk of one block, or tiled and of several, is not copied into Zarr:
    the model and the preview read the file itself. The work of a one-block image stays in
    memory (the labels come back from the model without a Zarr store); an image of several
    blocks keeps its work folder and label store (a crash loses no finished block). The labels,
    preview and statistics (per class, per block, per region) are byte for byte those of the
    Zarr copy and work folder. The same image in strips as wide as the image is copied."""
    import geopandas as gpd
    from shapely.geometry import box

    chip = write_archive(tmp_path / "archive")[2]  # 150 x 150, one block
    block = 64 if several_blocks else 2048
    with rasterio.open(chip) as src:  # a corner without data, so the masks are compared too
        profile, pixels = {**src.profile, "nodata": 0}, src.read()
        left, bottom, right, top = src.bounds
    pixels[:, :30, :45] = 0
    if several_blocks:  # 3 x 3 blocks of 64, the file in tiles of 32
        profile.update(tiled=True, blockxsize=32, blockysize=32)
    with rasterio.open(chip, "w", **profile) as dst:
        dst.write(pixels)
    if several_blocks:
        striped = chip.with_name("striped.tif")
        with rasterio.open(striped, "w", **{**profile, "tiled": False, "blockysize": 8}) as dst:
            dst.write(pixels)
        run = prepare_run(str(write_small_net_card(tmp_path, tile=64)), str(tmp_path / "probe"),
                          RunOptions(run_id=RUN_ID, block=block))
        assert plan_image(run, str(chip)).reads_in_place and not plan_image(run, str(striped)).reads_in_place
    # A cluster named: its actors may be on machines that do not see this disk.
    on_cluster = prepare_run(str(write_small_net_card(tmp_path, tile=64)), str(tmp_path / "probe-cluster"),
                             RunOptions(run_id=RUN_ID, block=block, ray_address="head.example:6379"))
    assert not plan_image(on_cluster, str(chip)).reads_in_place
    card = write_small_net_card(tmp_path, tile=64)
    regions = tmp_path / "regions.gpkg"
    middle = box(left + (right - left) / 4, bottom + (top - bottom) / 3, right - (right - left) / 5, top - 1)
    gpd.GeoDataFrame({"name": ["middle", "whole"]}, geometry=[middle, box(left, bottom, right, top)],
                     crs=profile["crs"]).to_file(regions)

    def read_in_place(image) -> None:
        assert image.reads_in_place and image.works_in_memory != several_blocks
        if several_blocks:
            assert image.work.has_background_mask(), "a work folder: the mask (then the label store, the blocks' records)"
            assert not Path(image.work.image_store).exists(), "no Zarr copy"
        else:
            assert not Path(image.work_path).exists(), "no work folder: no Zarr copy, no mask file, no label store"

    segment_with_stages(card, chip, tmp_path / "in-place", read_in_place, regions=str(regions), block=block)
    assert not any((tmp_path / "in-place" / ".work").iterdir()), "nothing staged is left behind"
    monkeypatch.setattr(ImageRun, "reads_in_place", property(lambda image: False))

    def copied(image) -> None:
        assert not image.works_in_memory and Path(image.work.image_store, "zarr.json").exists()

    segment_with_stages(card, chip, tmp_path / "copy", copied, regions=str(regions), block=block)
    for name in ("labels.tif", "labels.tif.aux.xml", "preview.png"):
        assert (tmp_path / "in-place" / chip.stem / name).read_bytes() == (tmp_path / "copy" / chip.stem / name).read_bytes()
    in_place = rows_of(tmp_path / "in-place", chip.stem)
    assert in_place == rows_of(tmp_path / "copy", chip.stem)
    assert sum(row[COMPARED.index("pixel_count")] for row in in_place) == 150 * 150 - 30 * 45, "the corner is nodata"
    for kind in ("block_class", "region_class"):
        rows = [read_table(root / "stats", kind).drop_columns(["run_id", "run_date"]).sort_by(
            [(name, "ascending") for name in ("class_id", *(["region"] if kind == "region_class" else []))])
            for root in (tmp_path / "in-place", tmp_path / "copy")]
        assert rows[0].num_rows > 0 and rows[0].equals(rows[1]), kind
    whole = read_table(tmp_path / "in-place" / "stats", "region_class").filter(pc.equal(read_table(
        tmp_path / "in-place" / "stats", "region_class")["region"], "whole"))
    assert sum(whole["pixel_count"].to_pylist()) == 150 * 150 - 30 * 45, "the regions counted the labels"


def test_a_small_scene_read_in_place_is_decoded_once_and_again_when_replaced(tmp_path, monkeypatch):
    """Ingest (the mask), the model and the preview each read a small scene whole: it is decoded
    from the file once, with the bytes of three decodings; a file replaced meanwhile is decoded anew."""
    chip = write_archive(tmp_path / "archive")[2]  # 150 x 150, one block
    with rasterio.open(chip) as src:  # nodata in a corner: the mask comes from the same read
        profile, pixels = {**src.profile, "nodata": 0}, src.read()
    pixels[:, :30, :45] = 0
    with rasterio.open(chip, "w", **profile) as dst:
        dst.write(pixels)
    card = write_small_net_card(tmp_path, tile=64)
    decoded: list[str] = []
    decode = scene.decode_window

    def counted(info, bands, box):
        decoded.append(Path(info.uri).name)
        return decode(info, bands, box)

    monkeypatch.setattr(scene, "decode_window", counted)
    monkeypatch.setattr(scene, "WHOLE_READS", scene.RecentReads(128 << 20))
    segment_with_stages(card, chip, tmp_path / "kept", lambda image: None)
    assert decoded == [chip.name]

    monkeypatch.setattr(scene, "WHOLE_READS", scene.RecentReads(0))  # nothing kept
    segment_with_stages(card, chip, tmp_path / "decoded", lambda image: None)
    assert decoded == [chip.name] * 4, "ingest, the model and the preview decode it once each"
    for name in ("labels.tif", "preview.png"):
        assert (tmp_path / "kept" / chip.stem / name).read_bytes() == (tmp_path / "decoded" / chip.stem / name).read_bytes()
    assert rows_of(tmp_path / "kept", chip.stem) == rows_of(tmp_path / "decoded", chip.stem)

    monkeypatch.setattr(scene, "WHOLE_READS", scene.RecentReads(128 << 20))
    source = scene.SceneSource(scene.inspect_raster(chip))
    whole = Box((0, 0), source.shape)
    first = source.read((1, 2, 3), whole)
    first[:] = 7  # a caller's copy: what is kept stays as read
    assert np.array_equal(source.read((1, 2, 3), whole), pixels)
    with rasterio.open(chip, "r+") as dst:
        dst.write(pixels[:, ::-1])
    os.utime(chip, ns=(chip.stat().st_atime_ns, chip.stat().st_mtime_ns + 10**9))
    assert np.array_equal(source.read((1, 2, 3), whole), pixels[:, ::-1]), "the replaced file's pixels"
    assert decoded == [chip.name] * 6


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16"])
@pytest.mark.parametrize("nodata", [None, 0.0, float("nan"), 0.5])
@pytest.mark.parametrize("clip", [None, (0.1, 0.6)])
def test_integer_pixels_skip_the_search_for_nan_and_get_the_same_inputs(sentinel_scene, tmp_path, dtype, nodata, clip):
    """Integer pixels cannot be NaN or infinite: normalising them skips that search (a third of
    the step on the CPU), and on the CPU looks each band's value up in a table of its every
    value; both give the bytes the floating-point path gives the same values (a nodata value
    no pixel of the dtype can hold, 0.5, marks none)."""
    card = dataclasses.replace(load_card(write_small_net_card(tmp_path)), clip=clip)
    with rasterio.open(sentinel_scene) as dataset:
        pixels = (dataset.read([3, 2, 1]) // 8).astype(dtype)
    pixels[:, :20, :30] = 0  # a corner with the nodata value in every band
    shape = pixels.shape[1:]
    whole = Box((0, 0), shape)
    job = BlockJob("", "", whole, (), card.tile_size)

    def normalised(predictor: BlockPredictor, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        block = BlockWork(job, whole, whole, values, nodata)
        predictor.normalise(block)
        return block.valid, block.inputs

    predictor = BlockPredictor(card)
    assert predictor.stays_finite(torch.from_numpy(pixels).dtype)
    valid, inputs = normalised(predictor, pixels)
    assert list(predictor.input_tables) == [np.dtype(dtype)], "looked up in a table"
    valid_as_float, inputs_as_float = normalised(predictor, pixels.astype(np.float32))
    assert torch.equal(valid, valid_as_float) and torch.equal(inputs, inputs_as_float)
    if clip:
        assert inputs.unique().numel() > 2 and (inputs == inputs.max()).any()
    assert bool(valid[:20, :30].any()) == (nodata != 0.0)

    # A std so small that integers overflow float32: the search stays, and no infinity reaches the model.
    tiny = BlockPredictor(dataclasses.replace(card, std=(1e-37,) * 3))
    assert not tiny.stays_finite(torch.from_numpy(pixels).dtype)
    assert torch.isfinite(normalised(tiny, pixels)[1]).all()


def test_the_report_takes_a_kept_thumbnail_only_when_written_after_its_preview(tmp_path):
    from PIL import Image

    with rasterio.open(write_tiled_scene(tmp_path / "tiled.tif", 512)) as src:
        stretched = src.read(window=((0, 500), (0, 400))).transpose(1, 2, 0)
    root, preview = tmp_path / "root", tmp_path / "root" / "north" / "preview.png"
    preview.parent.mkdir(parents=True)
    picture = Image.fromarray(stretched)
    picture.save(preview, compress_level=1)
    html_report.keep_thumbnail(str(root), RUN_ID, "north", picture)
    kept = html_report.kept_thumbnail(str(root), RUN_ID, "north")
    assert picture.size == (400, 500), "the picture kept is not changed"
    decoded = html_report.thumbnail(str(preview))
    assert html_report.thumbnail(str(preview), kept) == decoded, "the same bytes as decoding the preview"

    # What is kept is what the report takes, without decoding the preview ...
    other = Image.fromarray(255 - stretched)
    Path(kept).write_bytes(html_report.thumbnail_jpeg(other))
    assert html_report.thumbnail(str(preview), kept) == html_report.data_uri(Path(kept).read_bytes()) != decoded
    # ... unless the preview was written after it (a thumbnail an earlier attempt left behind).
    later = os.stat(kept).st_mtime_ns + 1_000_000_000
    os.utime(preview, ns=(later, later))
    assert html_report.thumbnail(str(preview), kept) == decoded

    html_report.forget_thumbnails(str(root), {"run_id": RUN_ID, "done": ["north"]})
    assert not (root / "runs" / html_report.THUMBNAILS).exists()
    assert html_report.kept_thumbnail("s3://bucket/root", RUN_ID, "north") is None, "local roots only"


@pytest.mark.parametrize("collecting", [True, False])
def test_a_night_loads_without_garbage_collection_and_leaves_it_as_it_was(prefect_server, tmp_path, monkeypatch,
                                                                        collecting):
    """A night's start-up (imports, the card's check) runs with the cyclic collector off; the
    command then leaves it as it found it, also when bad input stops it there (a resident
    server runs many commands in one process)."""
    import gc

    import flows.run

    seen = []

    def checked_with_the_collector(*args, **kwargs):
        seen.append(gc.isenabled())
        return prepare_run(*args, **kwargs)

    monkeypatch.setattr(flows.run, "prepare_run", checked_with_the_collector)
    archive = tmp_path / "archive"
    archive.mkdir()
    (gc.enable if collecting else gc.disable)()
    try:
        code = main(["run", str(archive), "--model", str(tmp_path / "no-card.yaml"), "--out", str(tmp_path / "out")])
        assert (code, seen, gc.isenabled()) == (2, [False], collecting)
    finally:
        gc.enable()


def command_environment(tmp_path: Path) -> dict[str, str]:
    """A command's environment as a user's shell gives it: no Prefect API or Ray cluster named
    (the command starts its own), a Prefect home of its own, no telemetry."""
    environment = {name: value for name, value in os.environ.items() if name not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    environment.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                       RAY_USAGE_STATS_ENABLED="0")
    return environment


def test_segpipe_run_starts_prefects_server_before_loading_the_night_and_the_night_takes_it(tmp_path):
    """The command's entry point (flows.command) starts Prefect's temporary server before
    anything heavy is imported; prefect_api() then uses that server, once."""
    import subprocess
    import sys

    from flows.command import runs_a_flow

    assert runs_a_flow(["-q", "run", "archive", "--model", "card"]) and runs_a_flow(["demo", "--out", "x"])
    assert not any(runs_a_flow(argv) for argv in (["segment", "a.tif"], ["run", "--help"], ["--version"], ["-q"], []))
    script = (
        "import sys\n"
        "from flows import prefect_api\n"
        "prefect_api.start_server_early()\n"
        "early = prefect_api._early_server\n"
        "print(early is not None, 'prefect' in sys.modules or 'torch' in sys.modules)\n"
        "with prefect_api.prefect_api() as ready:\n"
        "    ready()\n"
        "    from prefect.settings import PREFECT_API_URL\n"
        "    print(PREFECT_API_URL.value() == early.api_url, prefect_api.take_early_server())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=command_environment(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.stdout.split() == ["True", "False", "True", "None"], done.stdout + done.stderr


@pytest.mark.parametrize("after", [0.8, 2.5, 5.0])
def test_ctrl_c_while_a_night_starts_is_one_line_and_leaves_no_server(tmp_path, after):
    """Ctrl-C reaches the terminal's whole process group: while `segpipe run` loads its modules
    and Prefect's temporary server starts, the command says it was interrupted, in one line, and
    the server (out of that group, stopped by the command) neither prints nor stays."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    archive = tmp_path / "archive"
    archive.mkdir()
    write_tiled_scene(archive / "chip.tif", 256)
    card = write_small_net_card(tmp_path)
    command = subprocess.Popen([sys.executable, "-m", "flows", "run", str(archive), "--model", str(card), "--out",
                                str(tmp_path / "out"), "--device", "cpu"], env=command_environment(tmp_path),
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    children = psutil.Process(command.pid).children(recursive=True)
    assert command.poll() is None and any("create_app" in " ".join(c.cmdline()) for c in children), "the server starts"
    os.killpg(command.pid, signal.SIGINT)  # the terminal's Ctrl-C: the command's process group
    stdout, stderr = command.communicate(timeout=120)
    # (a machine quick enough to be in the night's batches by then says it stops them first)
    said = [line for line in stderr.splitlines() if line.strip() and not line.startswith("note: stopping after")]
    assert (command.returncode, said) == (130, ["segpipe: interrupted"]), stdout + stderr
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"left running: {[p.cmdline() for p in alive]}"


def run_module(tmp_path: Path, source: str):
    """`python -m` of `source` written as a module, with SIGINT at its default (as a terminal gives
    it; a shell's background job would ignore it, and the exit by SIGINT with it)."""
    import signal
    import subprocess
    import sys

    (tmp_path / "as_a_command.py").write_text(source)
    environment = {**command_environment(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "as_a_command"], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=60, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_a_ctrl_c_caught_after_it_passed_through_an_exec_still_exits_130(tmp_path):
    """A Ctrl-C that lands while a dataclass is defined (an import) passes out of the exec() that
    makes its methods. CPython then marked the process to kill itself by SIGINT at exit, though
    the command caught the interrupt and said so: status -2 instead of 130."""
    done = run_module(tmp_path, (
        "import sys\n"
        "from flows.resident import interrupted\n"
        "try:\n"
        "    exec('raise KeyboardInterrupt', {})\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(interrupted())\n"))
    assert (done.returncode, done.stderr.strip()) == (130, "segpipe: interrupted")


def test_ctrl_c_while_loading_ends_at_once_even_with_a_thread_still_importing(tmp_path):
    """While a command loads (ends_at_once_when_interrupted), Ctrl-C ends the process at once: a
    KeyboardInterrupt raised inside an import could leave a module lock held, and the thread that
    imports the flow's modules beside Ray's start then waited on it and the process never exited."""
    import signal

    from flows.resident import ends_at_once_when_interrupted

    done = run_module(tmp_path, (
        "import os, signal, threading\n"
        "from flows.resident import ends_at_once_when_interrupted\n"
        "never = threading.Event()\n"
        "threading.Thread(target=never.wait).start()  # waits as on a module lock left held\n"
        "with ends_at_once_when_interrupted():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    never.wait()\n"
        "print('went on')\n"))
    assert (done.returncode, done.stderr.strip(), done.stdout) == (130, "segpipe: interrupted", "")
    with ends_at_once_when_interrupted():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C raises KeyboardInterrupt again after"


def test_an_image_stopped_by_ctrl_c_keeps_its_finished_blocks_and_resumes_to_the_bytes_of_an_uninterrupted_one(
        tmp_path):
    """Ctrl-C in a night stops the pool (flows.archive_flow.wait_for_batch): the image in
    progress ends after the blocks on the model, not after the whole image. Those blocks keep
    their records, the image is neither finished nor marked done, and the next run takes the
    blocks over and writes the bytes of a run never stopped."""
    from flows.manifest import is_done
    from segworkers.local_pool import GROUPS_IN_FLIGHT, LocalPool, WorkStopped

    scene_path = write_tiled_scene(tmp_path / "tiled.tif", 640)
    card = write_small_net_card(tmp_path, tile=64)

    class StoppedAtTheFirstBlock(LocalPool):
        def run(self, jobs, on_block_done=lambda index, result: None):
            def then_stop(index, result) -> None:
                on_block_done(index, result)
                self.stop()

            return super().run(jobs, then_stop)

    stopped_root = tmp_path / "stopped"
    run = prepare_run(str(card), str(stopped_root), RunOptions(run_id=RUN_ID, block=128))
    with started(run) as run:
        image = claim_folder(plan_image(run, str(scene_path)))
        with StoppedAtTheFirstBlock(run.card, batch_size=4, threads=2) as pool:
            pool.group_tiles = 1  # a group per block (else about seven of these small blocks share one)
            [outcome] = stages.run_images([image], pool)
    assert isinstance(outcome, WorkStopped)
    kept = len(image.work.block_records())
    # At most the groups that had finished when the pool's thread woke (GROUPS_IN_FLIGHT) and
    # those it started in their slots before handing the first one back (GROUPS_IN_FLIGHT):
    # with a group per block, 4 of 25 when both slots happened to finish together.
    assert 1 <= kept <= 2 * GROUPS_IN_FLIGHT, "the blocks on the model when it stopped (25 in all)"
    assert not is_done(str(stopped_root), image.key) and not (stopped_root / image.name).exists()

    resumed = {}

    def resume(image) -> None:
        resumed["blocks"] = len(image.work.block_records())

    segment_with_stages(card, scene_path, stopped_root, resume, block=128)
    segment_with_stages(card, scene_path, tmp_path / "whole", lambda image: None, block=128)
    assert resumed["blocks"] == kept, "the next run found the blocks kept"
    for name in ("labels.tif", "preview.png"):
        assert (stopped_root / image.name / name).read_bytes() == (tmp_path / "whole" / image.name / name).read_bytes()
    assert rows_of(stopped_root, image.name) == rows_of(tmp_path / "whole", image.name)


def test_an_ingest_stopped_by_ctrl_c_keeps_the_blocks_copied_and_resumes_to_the_bytes_of_an_uninterrupted_run(
        tmp_path, monkeypatch):
    """A source copied into Zarr (not read in place) stops after the blocks being copied when the
    night is stopped: they keep their records, and the next run takes them over and writes the
    bytes of a run never stopped."""
    from segworkers.local_pool import WorkStopped

    monkeypatch.setattr(ImageRun, "reads_in_place", property(lambda image: False))
    scene_path = write_tiled_scene(tmp_path / "tiled.tif", 640)
    card = write_small_net_card(tmp_path, tile=64)
    stopped_root = tmp_path / "stopped"
    run = prepare_run(str(card), str(stopped_root), RunOptions(run_id=RUN_ID, block=128))
    with started(run) as run:
        image = claim_folder(plan_image(run, str(scene_path)))
        with pytest.raises(WorkStopped):
            stages.ingest(image, stopped=lambda: True)
    copied = len(image.work.ingested_blocks())
    assert 1 <= copied <= 8, "the blocks being copied (four threads), of 25"

    segment_with_stages(card, scene_path, stopped_root, lambda image: None, block=128)
    segment_with_stages(card, scene_path, tmp_path / "whole", lambda image: None, block=128)
    for name in ("labels.tif", "preview.png"):
        assert (stopped_root / image.name / name).read_bytes() == (tmp_path / "whole" / image.name / name).read_bytes()
    assert rows_of(stopped_root, image.name) == rows_of(tmp_path / "whole", image.name)


def test_sigterm_stops_a_night_after_the_blocks_in_progress_and_keeps_them(tmp_path):
    """A scheduler's SIGTERM (or `kill`) in the middle of a night: the images in progress stop
    after their blocks on the model, as on Ctrl-C (Prefect raises its TerminationSignal in the
    flow), keeping their records for the next run (taken over as the tests of a stopped image
    show), and the command says so and exits with 143. Before, the night finished the images in
    progress first and died by the signal, silent."""
    import signal
    import subprocess
    import sys
    import time

    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("first", "second"):
        write_tiled_scene(archive / f"{name}.tif", 768)
    card = write_small_net_card(tmp_path, tile=64)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "flows", "run", str(archive), "--model", str(card), "--out", str(out),
               "--device", "cpu", "--block", "128", "--run-id", RUN_ID]
    night = subprocess.Popen(command, env=command_environment(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(out.glob(".work/*/blocks/*.json")) and night.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    night.send_signal(signal.SIGTERM)
    stdout, stderr = night.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert night.returncode == 143, stdout + stderr
    assert lines[0].startswith("note: stopping after the blocks in progress") and lines[-1] == "segpipe: terminated"
    kept = len(list(out.glob(".work/*/blocks/*.json")))
    assert 1 <= kept < 2 * 36, "some of the 2 x 36 blocks, not all"

    assert not any((out / name / "labels.tif").exists() for name in ("first", "second")), "stopped mid-image"


def test_a_night_of_small_images_killed_mid_run_resumes_to_the_bytes_of_an_uninterrupted_one(prefect_server, tmp_path):
    """Small images work in memory (no work folder): kill -9 of the driver mid-run loses the
    images in progress, not the finished ones; the next run skips those, redoes the others whole,
    and every output and statistics file is byte for byte that of a night never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    import prefect.settings

    big = write_tiled_scene(tmp_path / "tiled.tif", 640)
    archive = tmp_path / "archive"
    archive.mkdir()
    with rasterio.open(big) as src:
        for index in range(100):  # 64², one tile each: three batches of up to 32 images, one at a time
            window = ((index // 10 * 64, index // 10 * 64 + 64), (index % 10 * 64, index % 10 * 64 + 64))
            profile = {**src.profile, "width": 64, "height": 64, "transform": src.window_transform(window)}
            with rasterio.open(archive / f"chip-{index:03d}.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
    card = write_small_net_card(tmp_path, tile=64)
    options = RunOptions(block=128, run_id=RUN_ID, concurrency=1)
    whole = tmp_path / "whole"
    assert len(run_night(str(archive), str(card), str(whole), options)["done"]) == 100

    killed = tmp_path / "killed"
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment["PREFECT_API_URL"] = prefect.settings.PREFECT_API_URL.value()
    driver = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(archive), "--model", str(card), "--out", str(killed),
         "--block", "128", "--run-id", RUN_ID, "--concurrency", "1"],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list((killed / ".manifest").glob("*.json")):
            assert time.monotonic() < deadline and driver.poll() is None, "no image was done"
            time.sleep(0.02)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    done_before = {path.name for path in (killed / ".manifest").glob("*.json")}
    assert 1 <= len(done_before) < 100, "killed mid-run"

    report = run_night(str(archive), str(card), str(killed), options)
    assert len(report["skipped"]) == len(done_before) and len(report["done"]) == 100 - len(done_before)
    assert report["failed"] == {}
    for index in range(100):
        name = f"chip-{index:03d}"
        for output in ("labels.tif", "preview.png"):
            assert (killed / name / output).read_bytes() == (whole / name / output).read_bytes(), f"{name}/{output}"
    for kind in ("image_class", "block_class"):
        tables = [read_table(root / "stats", kind).sort_by([("image", "ascending"), ("class_id", "ascending")])
                  for root in (killed, whole)]
        assert tables[0].num_rows > 0 and tables[0].equals(tables[1]), kind
    assert not any((killed / ".work").iterdir()), "nothing left in the work folders"
