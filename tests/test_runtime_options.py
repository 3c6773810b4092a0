"""Runtime options (precision, channels_last, torch.compile, CUDA graphs) from the model card,
and the device-side block pipeline: raw pixels to the device once, blending and argmax there.

The CPU tests run everywhere; the CUDA tests skip without a GPU."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from flows.synthetic import real_rgb_tile, rgb_card, write_small_net_card
from pipelines.blending import gaussian_weights
from pipelines.errors import InputError
from pipelines.model_card import RuntimeOptions, load_card
from pipelines.tiling import TileGrid, block_partition
from pipelines.zarr_stores import (
    NODATA_LABEL,
    create_label_store,
    create_probability_store,
)
from segworkers.predictor import BlockJob, BlockPredictor
from segworkers.tile_models import TileModel

REPO = Path(__file__).resolve().parents[1]
TILE = 64
HOLE = (slice(120, 200), slice(0, 90))  # a corner without data in any band
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def rgb_image(tmp_path_factory):
    """The real Sentinel-2 scene as 8-bit RGB in a Zarr image store, with a nodata (0) corner."""
    pixels, _ = real_rgb_tile()
    pixels[(slice(None), *HOLE)] = 0
    store = tmp_path_factory.mktemp("rgb") / "image.zarr"
    zarr.create_array(store=str(store), data=pixels, chunks=(3, TILE, TILE), attributes={"nodata": 0})
    return store, pixels


def write_he_unet_card(folder):
    """The registry's unet_padded (base 16, depth 3) with He-initialised random weights, whose
    labels on the real scene are varied (a default-initialised one predicts one class)."""
    from segworkers import models

    torch.manual_seed(2)
    options = {"base_features": 16, "depth": 3}
    net = models.create("unet_padded", num_classes=4, in_channels=3, **options)
    for layer in net.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            torch.nn.init.zeros_(layer.bias)
    torch.save(net.state_dict(), folder / "he-unet.pt")
    card = rgb_card("he-unet", TILE, 0.25, 4, {
        "format": "registry", "architecture": "unet_padded", "architecture_options": options, "weights": "he-unet.pt"})
    (folder / "he-unet.yaml").write_text(yaml.safe_dump(card))
    return folder / "he-unet.yaml"


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards")
    return {"small-net": load_card(write_small_net_card(folder, tile=TILE)), "unet": load_card(write_he_unet_card(folder))}


def segment_image(predictor: BlockPredictor, image_store, folder, block: int = 128, tta: bool = False,
                  probabilities: bool = False, row_areas: np.ndarray | None = None, threads: int = 1):
    """Every block of the image through the predictor (no Ray), `threads` blocks at a time."""
    shape = zarr.open_array(str(image_store)).shape[1:]
    grid = TileGrid(shape, predictor.card.tile_size, predictor.card.overlap)
    label_store = folder / "labels.zarr"
    create_label_store(label_store, shape, chunk=TILE, block=block, attributes={})
    probability_store = folder / "probabilities.zarr" if probabilities else None
    if probabilities:
        create_probability_store(probability_store, predictor.card.num_classes, shape, TILE, block, {})
    jobs = [
        BlockJob(str(image_store), str(label_store), b, tuple(grid.tiles_touching(b)), grid.tile_size, tta=tta,
                 probability_store=str(probability_store) if probabilities else None,
                 row_areas=None if row_areas is None else row_areas[b.start[0] : b.stop[0]])
        for b in block_partition(shape, (block, block))
    ]
    results = [None] * len(jobs)

    def work(indexes):
        for i in indexes:
            results[i] = predictor.segment(jobs[i])

    workers = [threading.Thread(target=work, args=(range(k, len(jobs), threads),)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    labels = zarr.open_array(str(label_store))[:]
    return labels, results, (zarr.open_array(str(probability_store))[:] if probabilities else None)


def per_tile_reference(card, pixels: np.ndarray, batch: int = 4, tta: bool = False):
    """A plain loop over the whole image's tiles with the TorchScript module itself, numpy
    normalisation (nodata pixels as the bands' means), softmax and Gaussian blending:
    (labels with nodata, mean probabilities)."""
    module = torch.jit.load(str(card.weights)).eval()
    x = (pixels.astype(np.float32) * np.float32(card.scale) - np.float32(card.mean).reshape(-1, 1, 1)) / np.float32(card.std).reshape(-1, 1, 1)
    x[:, (pixels == 0).all(axis=0)] = 0  # the image's nodata (0 in every band) reaches the model as the mean
    grid = TileGrid(pixels.shape[1:], card.tile_size, card.overlap)
    weights = gaussian_weights((card.tile_size,) * 2)
    sums = np.zeros((card.num_classes, *pixels.shape[1:]), np.float32)
    total_weight = np.zeros(pixels.shape[1:], np.float32)
    flips = [(), (1,), (2,), (1, 2)] if tta else [()]
    for origin in itertools.product(*grid.origins):
        window = tuple(slice(o, o + card.tile_size) for o in origin)
        views = []
        for axes in flips:
            tile = np.ascontiguousarray(np.flip(x[(slice(None), *window)], axes))
            with torch.inference_mode():
                logits = module(torch.from_numpy(np.repeat(tile[None], batch, axis=0)))[0].numpy()
            exp = np.exp(logits - logits.max(axis=0))
            views.append(np.flip(exp / exp.sum(axis=0), axes))
        probabilities = np.mean(views, axis=0, dtype=np.float32)
        sums[(slice(None), *window)] += probabilities * weights
        total_weight[window] += weights
    labels = sums.argmax(axis=0).astype(np.uint8)
    labels[(pixels == 0).all(axis=0)] = NODATA_LABEL
    return labels, sums / total_weight


# --- the card ---------------------------------------------------------------------------------

def write_card(folder, cards, runtime) -> object:
    raw = yaml.safe_load(Path(cards["unet"].source).read_text())
    raw["runtime"] = runtime
    raw["weights"] = str(cards["unet"].weights)
    path = folder / "runtime.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_runtime_section_of_a_card_is_parsed(cards, tmp_path):
    card = load_card(write_card(tmp_path, cards, {"precision": "bf16", "channels_last": True, "compile": True}))
    assert card.runtime == RuntimeOptions(precision="bf16", channels_last=True, compile=True, cuda_graphs=False)
    assert cards["unet"].runtime == RuntimeOptions()  # no section: fp32, nothing else


@pytest.mark.parametrize("runtime,key", [
    ({"precision": "fp8"}, "runtime.precision"),
    ({"precision": "bf16", "channels_last": "yes"}, "runtime.channels_last"),
    ({"cuda_graphs": 1}, "runtime.cuda_graphs"),
    ({"amp": True}, "runtime.amp"),
    (["bf16"], "'runtime'"),
])
def test_bad_runtime_values_name_the_card_and_the_key(cards, tmp_path, runtime, key):
    path = write_card(tmp_path, cards, runtime)
    with pytest.raises(InputError) as error:
        load_card(path)
    assert str(path) in str(error.value) and key in str(error.value)


def test_with_runtime_overrides_only_the_options_given(cards):
    card = cards["unet"]
    fast = card.with_runtime(precision="bf16", channels_last=True)
    assert fast.runtime == RuntimeOptions(precision="bf16", channels_last=True)
    assert fast.with_runtime(compile=True, precision=None).runtime == RuntimeOptions("bf16", True, True, False)
    assert card.runtime == RuntimeOptions() and fast.digest() != card.digest()
    assert replace(fast, runtime=RuntimeOptions()).digest() == card.digest()
    with pytest.raises(InputError, match="runtime.precision"):
        card.with_runtime(precision="fp64")


def test_options_a_model_format_cannot_honour_are_refused(cards):
    onnx = load_card("s2-cloud")
    assert onnx.with_runtime(channels_last=True, cuda_graphs=True).runtime.channels_last  # accepted, no effect
    for options in ({"precision": "bf16"}, {"compile": True}):
        with pytest.raises(InputError, match="ONNX"):
            onnx.with_runtime(**options)
    with pytest.raises(InputError, match="TorchScript"):
        cards["small-net"].with_runtime(compile=True)


# --- the device path on the CPU ---------------------------------------------------------------

def test_device_path_equals_a_per_tile_reference_with_statistics(rgb_image, cards, tmp_path):
    """Blocks of 128 px through the predictor (TTA on, two blocks at a time) give the labels,
    probabilities, class counts and per-row areas of one loop over the whole image's tiles."""
    store, pixels = rgb_image
    card = cards["small-net"]
    row_areas = np.linspace(90.0, 110.0, pixels.shape[1])
    labels, results, probabilities = segment_image(
        BlockPredictor(card, batch_size=4), store, tmp_path, tta=True, probabilities=True, row_areas=row_areas, threads=2)
    expected_labels, expected_probabilities = per_tile_reference(card, pixels, tta=True)

    np.testing.assert_array_equal(labels, expected_labels)
    assert (labels[HOLE] == NODATA_LABEL).all() and len(np.unique(labels)) > 2
    valid = labels != NODATA_LABEL
    quantised = np.rint(np.clip(expected_probabilities, 0, 1) * 255).astype(np.uint8) * valid
    np.testing.assert_array_equal(probabilities, quantised)
    counts = np.sum([r.class_counts for r in results], axis=0)
    np.testing.assert_array_equal(counts, [np.sum(labels == k) for k in range(card.num_classes)])
    areas = np.sum([r.class_areas for r in results], axis=0)
    expected_areas = [((labels == k) * row_areas[:, None]).sum() for k in range(card.num_classes)]
    np.testing.assert_allclose(areas, expected_areas, rtol=1e-12)


def counting_calls_at_once(function):
    """`function` wrapped to count the calls running at once, and a list whose item 0 is the
    most seen so far."""
    lock, running, most = threading.Lock(), [0], [0]

    def counted(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return function(*args)
        finally:
            with lock:
                running[0] -= 1

    return counted, most


def test_two_cpu_lanes_give_the_bytes_of_one_with_two_batches_at_once(rgb_image, cards, tmp_path):
    """A CPU predictor of two threads runs its batches on two lanes of one torch thread each:
    the labels, probabilities and class counts of one batch after the other, with two forward
    passes running at once."""
    store, _ = rgb_image
    card = cards["unet"]
    one, one_results, one_probabilities = segment_image(BlockPredictor(card, batch_size=4, threads=1), store,
                                                        tmp_path / "one", block=256, probabilities=True)
    predictor = BlockPredictor(card, batch_size=4, threads=2)
    forward, most = counting_calls_at_once(predictor.model.forward)
    predictor.model = replace(predictor.model, forward=forward)
    two, two_results, two_probabilities = segment_image(predictor, store, tmp_path / "two", block=256,
                                                        probabilities=True)
    np.testing.assert_array_equal(two, one)
    np.testing.assert_array_equal(two_probabilities, one_probabilities)
    for mine, theirs in zip(two_results, one_results):
        np.testing.assert_array_equal(mine.class_counts, theirs.class_counts)
    assert len(np.unique(one[one != NODATA_LABEL])) > 1
    assert most[0] == 2, "the lanes ran two batches at once"
    predictor.close()


def jobs_of_blocks(store, card, label_store, block: int = 128) -> list[BlockJob]:
    """A job for every block of the image store, writing into a new label store."""
    shape = zarr.open_array(str(store)).shape[1:]
    grid = TileGrid(shape, card.tile_size, card.overlap)
    create_label_store(label_store, shape, chunk=TILE, block=block, attributes={})
    return [BlockJob(str(store), str(label_store), b, tuple(grid.tiles_touching(b)), grid.tile_size)
            for b in block_partition(shape, (block, block))]


def test_the_local_pool_runs_two_groups_at_once_and_reports_each_block_in_its_callers_thread(rgb_image, cards,
                                                                                              tmp_path):
    """LocalPool (the model in the driver) keeps two groups of blocks in flight, as an actor
    does: the labels and counts are those of one block after the other, and every finished
    block is handed to the caller in the caller's own thread, once."""
    from segworkers.local_pool import LocalPool

    store, _ = rgb_image
    card = cards["unet"]
    one, one_results, _ = segment_image(BlockPredictor(card, batch_size=4, threads=1), store, tmp_path / "one",
                                        block=128)
    label_store = tmp_path / "pool.zarr"
    jobs = jobs_of_blocks(store, card, label_store)
    threads_before = set(threading.enumerate())
    pool = LocalPool(card, batch_size=4, threads=2)
    pool.group_tiles = 1  # a group per block: several groups to keep in flight
    pool.predictor.segment_group, most = counting_calls_at_once(pool.predictor.segment_group)
    reported = []
    results = pool.run(jobs, lambda index, result: reported.append((index, threading.get_ident())))
    np.testing.assert_array_equal(zarr.open_array(str(label_store))[:], one)
    for mine, theirs in zip(results, one_results):
        assert mine.block == theirs.block
        np.testing.assert_array_equal(mine.class_counts, theirs.class_counts)
    assert sorted(index for index, _ in reported) == list(range(len(jobs))) and len(jobs) > 2
    assert {thread for _, thread in reported} == {threading.get_ident()}
    assert most[0] == 2, "two groups in flight"
    pool_threads = [t for t in set(threading.enumerate()) - threads_before
                    if t.name.startswith(("model-lane", "block-group"))]
    pool.close()
    assert len(pool_threads) == 4 and not any(t.is_alive() for t in pool_threads), "a closed pool ends its threads"


def test_a_stopped_local_pool_hands_back_the_groups_in_flight_and_starts_no_other(rgb_image, cards, tmp_path):
    """pool.stop() (Ctrl-C in a night): the call in progress hands back the groups already on
    the model, each to on_block_done as usual (so their records are written), then raises
    WorkStopped; no other group starts, and a later call on the pool raises at once."""
    from segworkers.local_pool import GROUPS_IN_FLIGHT, LocalPool, WorkStopped

    store, _ = rgb_image
    card = cards["unet"]
    jobs = jobs_of_blocks(store, card, tmp_path / "pool.zarr")
    pool = LocalPool(card, batch_size=4, threads=2)
    pool.group_tiles = 1  # a group per block
    groups_run = []
    segment_group = pool.predictor.segment_group
    pool.predictor.segment_group = lambda group: groups_run.append(group) or segment_group(group)
    reported = []

    def stop_after_the_first(index, result) -> None:
        reported.append(index)
        pool.stop()

    with pytest.raises(WorkStopped):
        pool.run(jobs, stop_after_the_first)
    # The groups' ends let the next ones start before their blocks are handed back (and stop()
    # called): both slots may finish before the pool's thread wakes and refill both.
    assert 1 <= len(reported) <= 2 * GROUPS_IN_FLIGHT < len(jobs), "the groups in flight, none after"
    assert len(groups_run) == len(reported), "every group started was handed back"
    with pytest.raises(WorkStopped):
        pool.run(jobs, lambda index, result: reported.append(index))
    assert len(groups_run) == len(reported), "a stopped pool runs nothing"
    pool.close()


def test_a_stopped_actor_pool_takes_back_the_groups_in_flight_and_sends_no_other(rgb_image, cards, tmp_path,
                                                                                  ray_cluster):
    """ActorPool.stop(), as LocalPool.stop(): the groups on the actors come back (their blocks
    handed to on_block_done), none is sent after, the call raises WorkStopped."""
    from segworkers.actors import ActorPool
    from segworkers.local_pool import WorkStopped

    store, _ = rgb_image
    jobs = jobs_of_blocks(store, cards["unet"], tmp_path / "pool.zarr")
    reported = []
    with ActorPool(cards["unet"], "cpu", 4, workers=1) as pool:
        pool.group_tiles = 1  # a group per block

        def stop_after_the_first(index, result) -> None:
            reported.append(index)
            pool.stop()

        with pytest.raises(WorkStopped):
            pool.run(jobs, stop_after_the_first)
    assert 1 <= len(reported) < len(jobs), "the groups in flight, none after"


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.005)


LANES_IN_A_FRESH_PROCESS = """
import os, time, torch
from segworkers.predictor import CpuLanes

def threads() -> int:  # the process's threads, OpenMP's included
    return len(os.listdir("/proc/self/task"))

convolution = torch.nn.Conv2d(8, 8, 3, padding=1).eval()
before = threads()
lanes = CpuLanes(2)
with torch.no_grad():
    assert len(list(lanes.map(convolution, [torch.randn(2, 8, 128, 128)] * 6))) == 6
print(threads() - before)
lanes.close()
deadline = time.monotonic() + 10  # a joined thread leaves /proc a moment after join() returns
while threads() > before and time.monotonic() < deadline:
    time.sleep(0.01)
print(threads() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2,
                    reason="counts a process's threads in /proc, on two cores or more")
def test_cpu_lanes_convolve_on_their_own_thread_and_end_when_closed():
    """A lane runs its convolutions on its one thread: left to OpenMP's default, oneDNN ran them
    on a team of two threads a lane, whose idle threads then slowed every torch call of the
    process (a training in the same process after a night: 2.5 times slower). close() ends the
    lanes. In a process of its own, where no other thread comes or goes."""
    counts = subprocess.run([sys.executable, "-c", LANES_IN_A_FRESH_PROCESS], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert counts.returncode == 0, counts.stderr
    assert counts.stdout.split() == ["2", "0"], "two lanes and no thread of theirs; none once closed"


def test_cpu_lanes_take_the_items_of_the_earlier_call_first():
    """Two calls of CpuLanes.map at once (two groups of blocks in flight): a lane that frees
    takes the earlier call's next item before the later call's, even when the later call's
    items were queued first, so the earlier group finishes first."""
    from segworkers.predictor import CpuLanes

    lanes = CpuLanes(2)
    gates = {name: threading.Event() for name in ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]}
    started: list[str] = []

    def run(name):
        started.append(name)
        assert gates[name].wait(30), f"{name} was never let through"
        return name

    outputs = {}
    callers = {key: threading.Thread(target=lambda key=key: outputs.__setitem__(
        key, list(lanes.map(run, [f"{key}{i}" for i in range(4 if key == "a" else 3)])))) for key in "ab"}
    try:
        callers["a"].start()  # a0 and a1 on the lanes, a2 queued
        wait_until(lambda: sorted(started) == ["a0", "a1"] and lanes.queue.qsize() == 1, "a0 and a1 on the lanes")
        callers["b"].start()  # b0, b1, b2 queued behind a2
        wait_until(lambda: lanes.queue.qsize() == 4, "b's items queued")
        gates["a0"].set()  # a2 takes the lane; a's caller takes a0's result and queues a3, after b's items
        wait_until(lambda: started[2:] == ["a2"] and lanes.queue.qsize() == 4, "a3 queued behind b's items")
        gates["a1"].set()
        wait_until(lambda: len(started) == 4, "the next item on the freed lane")
        assert started[2:] == ["a2", "a3"], "the earlier call's item went first"
    finally:
        for gate in gates.values():
            gate.set()
        for caller in callers.values():
            if caller.ident is not None:
                caller.join(30)
        lanes.close()
    assert outputs == {"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1", "b2"]}


def test_the_local_pool_starts_the_next_callers_blocks_before_the_last_group_of_the_first_ends(rgb_image, cards,
                                                                                             tmp_path):
    """Two callers of one LocalPool at once (two images in progress): the first submits every
    group before the second submits any, and the second's first group takes the slot the
    first's groups leave while its last group still runs, not once its whole call returned.
    Both get the labels and counts of one block after the other."""
    from segworkers.local_pool import LocalPool

    store, _ = rgb_image
    card = cards["unet"]
    one, one_results, _ = segment_image(BlockPredictor(card, batch_size=4, threads=1), store, tmp_path / "one",
                                        block=128)
    jobs = {caller: jobs_of_blocks(store, card, tmp_path / f"{caller}.zarr") for caller in "ab"}
    pool = LocalPool(card, batch_size=4, threads=2)
    pool.group_tiles = 1  # a group per block
    segment_group = pool.predictor.segment_group
    started: list[str] = []
    b_started = threading.Event()
    b_started_while_a_ran = []

    def watched(group):
        caller = "a" if group[0] in jobs["a"] else "b"
        started.append(caller)
        if caller == "b":
            b_started.set()
        elif group[-1] is jobs["a"][-1]:  # the first caller's last group waits for the second's first
            b_started_while_a_ran.append(b_started.wait(30))
        return segment_group(group)

    pool.predictor.segment_group = watched
    results = {}
    callers = {key: threading.Thread(target=lambda key=key: results.__setitem__(key, pool.run(jobs[key])))
               for key in "ab"}
    callers["a"].start()
    wait_until(lambda: started, "the first caller's first group")
    callers["b"].start()
    for caller in callers.values():
        caller.join(120)
    pool.close()
    assert b_started_while_a_ran == [True], "the second caller's first group ran beside the first's last"
    count = len(jobs["a"])
    assert started == ["a"] * count + ["b"] * count and count > 2
    for key in "ab":
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / f"{key}.zarr"))[:], one)
        for mine, theirs in zip(results[key], one_results):
            np.testing.assert_array_equal(mine.class_counts, theirs.class_counts)


def label_agreement(card, rgb_image, folder, **runtime) -> tuple[float, np.ndarray, np.ndarray]:
    store, _ = rgb_image
    reference, _, _ = segment_image(BlockPredictor(card, batch_size=4), store, folder / "fp32")
    labels, _, _ = segment_image(BlockPredictor(card.with_runtime(**runtime), batch_size=4), store, folder / "options")
    valid = reference != NODATA_LABEL
    assert (labels[~valid] == NODATA_LABEL).all() and len(np.unique(reference[valid])) > 1
    return float((labels[valid] == reference[valid]).mean()), labels, reference


def test_bf16_autocast_labels_agree_with_fp32(rgb_image, cards, tmp_path):
    agreement, _, _ = label_agreement(cards["unet"], rgb_image, tmp_path, precision="bf16")
    print(f"bf16 (CPU autocast) vs fp32, He-initialised U-Net on the real scene: {100 * agreement:.2f} % of pixels agree")
    assert agreement >= 0.99


def test_channels_last_fp32_labels_equal_fp32(rgb_image, cards, tmp_path):
    agreement, labels, reference = label_agreement(cards["unet"], rgb_image, tmp_path, channels_last=True)
    print(f"channels_last vs contiguous fp32: {100 * agreement:.4f} % of pixels agree")
    np.testing.assert_array_equal(labels, reference)


def test_compiled_model_equals_eager(rgb_image, cards, tmp_path):
    agreement, labels, reference = label_agreement(cards["unet"], rgb_image, tmp_path, compile=True)
    print(f"torch.compile (inductor, CPU) vs eager: {100 * agreement:.4f} % of pixels agree")
    np.testing.assert_array_equal(labels, reference)


def test_cuda_graphs_on_the_cpu_are_ignored_with_one_warning(cards, caplog):
    from segworkers.tile_models import warn_once

    card = cards["small-net"].with_runtime(cuda_graphs=True)
    warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="segworkers.tile_models"):
        graphs_asked, plain = BlockPredictor(card), BlockPredictor(cards["small-net"])
        BlockPredictor(card)
    assert [r.getMessage() for r in caplog.records] == ["CUDA graphs asked for on cpu: ignored (they need a GPU)"]
    batch = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, TILE, TILE), dtype=np.float32))
    np.testing.assert_array_equal(graphs_asked.model.forward(batch), plain.model.forward(batch))


def test_out_of_memory_in_two_blocks_at_once_halves_the_batch_once_per_failure(rgb_image, cards, tmp_path):
    """Two threads run into the (simulated) OOM with batch 8: the batch ends at 2, the largest
    that fits, not at 1, and the labels are those of a batch-2 run."""
    store, _ = rgb_image
    card = cards["small-net"]
    expected, _, _ = segment_image(BlockPredictor(card, batch_size=2), store, tmp_path / "batch2")
    predictor = BlockPredictor(card, batch_size=8)
    real_model = predictor.model

    def runs_out_above_two(batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_model.forward(batch)

    predictor.model = TileModel(runs_out_above_two, real_model.halo, real_model.device)
    labels, _, _ = segment_image(predictor, store, tmp_path / "oom", threads=2)
    assert predictor.batch_size == 2
    np.testing.assert_array_equal(labels, expected)


def test_the_threaded_actor_reports_its_node_and_matches_the_predictor(ray_cluster, rgb_image, cards, tmp_path):
    import ray

    from segworkers.actors import SegmentationActor

    store, _ = rgb_image
    card = cards["small-net"]
    expected, _, _ = segment_image(BlockPredictor(card), store, tmp_path / "direct")
    shape = expected.shape
    grid = TileGrid(shape, TILE, card.overlap)
    label_store = tmp_path / "actor.zarr"
    create_label_store(label_store, shape, chunk=TILE, block=128, attributes={})
    actor = SegmentationActor.remote(card, "cpu", 4, 1)
    jobs = [BlockJob(str(store), str(label_store), b, tuple(grid.tiles_touching(b)), TILE) for b in block_partition(shape, (128, 128))]
    # All submitted at once, one block or a group of them a call: two calls run at a time.
    calls = [[job] for job in jobs[:2]] + [jobs[2:]]
    results = [result for group in ray.get([actor.segment.remote(group) for group in calls]) for result in group]
    assert len(results) == len(jobs)
    ray.kill(actor)
    np.testing.assert_array_equal(zarr.open_array(str(label_store))[:], expected)
    assert {r.node for r in results} == {ray.get_runtime_context().get_node_id()}


# --- CUDA only ------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_labels_agree_with_cpu_fp32(rgb_image, cards, tmp_path, precision):
    """fp32 on the GPU differs too: cuDNN convolutions use TF32 by default."""
    store, _ = rgb_image
    card = cards["unet"]
    reference, _, _ = segment_image(BlockPredictor(card), store, tmp_path / "cpu")
    labels, _, _ = segment_image(BlockPredictor(card.with_runtime(precision=precision, channels_last=True), "cuda"),
                                 store, tmp_path / "cuda")
    valid = reference != NODATA_LABEL
    agreement = (labels[valid] == reference[valid]).mean()
    print(f"cuda {precision} channels_last vs cpu fp32: {100 * agreement:.3f} % of pixels agree")
    assert (labels[~valid] == NODATA_LABEL).all()
    assert agreement >= 0.99


@needs_cuda
def test_two_blocks_at_once_on_two_streams_equal_one_at_a_time(rgb_image, cards, tmp_path):
    store, _ = rgb_image
    predictor = BlockPredictor(cards["unet"].with_runtime(precision="bf16", channels_last=True), "cuda")
    one_at_a_time, _, _ = segment_image(predictor, store, tmp_path / "serial", block=64)
    two_at_once, _, _ = segment_image(predictor, store, tmp_path / "threads", block=64, threads=2)
    np.testing.assert_array_equal(two_at_once, one_at_a_time)


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_equal_eager_on_cuda(rgb_image, cards, tmp_path, compile):
    """Replayed graphs give the eager labels, also with two blocks at a time on two streams."""
    store, _ = rgb_image
    card = cards["unet"].with_runtime(precision="bf16", compile=compile)
    eager, _, _ = segment_image(BlockPredictor(card, "cuda"), store, tmp_path / "eager")
    graphed = BlockPredictor(card.with_runtime(cuda_graphs=True), "cuda")
    labels, _, _ = segment_image(graphed, store, tmp_path / "graphs", threads=2)
    assert len(graphed.model.forward.graphs) == 1  # one batch shape, captured once
    if compile:  # two compilations may autotune to different kernels
        assert (labels == eager).mean() >= 0.99
    else:
        np.testing.assert_array_equal(labels, eager)


@needs_cuda
def test_raw_pixels_go_to_the_gpu_through_pinned_memory(rgb_image, cards, tmp_path):
    store, pixels = rgb_image
    predictor = BlockPredictor(cards["small-net"], "cuda")
    before = torch.cuda.host_memory_stats()["active_bytes.allocated"]
    segment_image(predictor, store, tmp_path, block=256)
    assert torch.cuda.host_memory_stats()["active_bytes.allocated"] - before >= pixels.nbytes  # every block's context (it covers the image) was pinned
