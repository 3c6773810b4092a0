"""How close the worker plane comes to the bare model: one model, tile, overlap and image.

    python -m flows.benchmarks.worker_plane [--model unet-resnet34|tiny-unet|CARD] [--side N] [--tile N]
        [--overlap F] [--batch N] [--block N] [--device cpu|cuda] [--precision fp32|fp16|bf16]
        [--channels-last] [--compile] [--cuda-graphs] [--parts model,segment,end-to-end,monai]
        [--actors 1,2,4,8] [--json]

Each part runs in its own process, sampled for the peak RSS of its whole process tree (Ray's
raylet and actors included) and, on a GPU machine, for GPU memory and utilisation (NVML, or
nvidia-smi, every 0.1 s: Ray actors allocate from processes torch.cuda cannot see into):
  model       full batches of tiles through the model alone, on the device, with the card's
              runtime options (uint8-range input, normalised; warm-up excluded; on the CPU a
              batch on each of the predictor's lanes of one torch thread at once); tile pixels
  segment     segpipe's segment stage on the image already in Zarr (ingest done first), on
              warm actors (started, and on a GPU run once on a small image, before timing)
  end-to-end  GeoTIFF -> Zarr -> labels -> COG + preview + statistics (plan, ingest, segment,
              finalize, statistics, manifest), on warm actors as in a nightly run
  monai       MONAI sliding_window_inference with the same model, tile, overlap, Gaussian
              weights (sigma_scale 0.125), batch and precision: stitched on the GPU, and
              stitched on the CPU with the model on the GPU; on a CPU machine, on the CPU
  actors N    (--actors) the segment stage with N CPU actors of one thread each, fp32 (a GPU
              run gives them CPU-sized work: tile 256, batch 4, at most a 2048² image)
Ideal = model / (tile / stride)^2: each pixel is computed (tile / stride)^2 times.

The image is the real Sentinel-2 demo scene (8-bit RGB) tiled out to --side; the default model
is segmentation_models_pytorch's Unet with a ResNet-34 encoder (random weights, 3 bands, 6
classes); `--model tiny-unet` is a small registry U-Net for quick CPU runs. On a GPU the default
is bf16 autocast and channels_last, as in the issue's anchors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from flows.benchmarks.measure import GpuMonitor, Measured, python_module, run_sampled

PARTS = ("model", "segment", "end-to-end", "monai")
GENERATED_MODELS = ("unet-resnet34", "tiny-unet")


@dataclass(frozen=True)
class Bench:
    """Everything a part's process needs, resolved once by the driver (written as JSON)."""
    workdir: str
    card: str
    model: str
    scene: str
    side: int
    tile: int
    overlap: float
    batch: int
    block: int | None
    device: str
    runtime: dict
    """Model card runtime options: precision, channels_last, compile, cuda_graphs."""
    seconds: float
    """How long the model-alone part runs its batches."""
    actors_scene: str
    actors_side: int
    actors_tile: int
    actors_batch: int
    actors_block: int
    """Block side for the CPU actors' scaling: at least two blocks per actor at the largest count."""

    @property
    def stride(self) -> int:
        """As pipelines.tiling spaces the tiles."""
        return max(1, round(self.tile * (1.0 - self.overlap)))

    def options(self, device: str | None = None, workers: int | None = None):
        """The run options of a part; with `workers`, the CPU actors' scaling: CPU-sized work,
        fp32, uncompiled, whatever the GPU parts use."""
        from flows.options import RunOptions

        if workers:
            return RunOptions(tile=self.actors_tile, overlap=self.overlap, batch=self.actors_batch,
                              block=self.actors_block, device="cpu", workers=workers, precision="fp32",
                              channels_last=False, compile=False, cuda_graphs=False)
        return RunOptions(tile=self.tile, overlap=self.overlap, batch=self.batch, block=self.block,
                          device=device or self.device, **self.runtime)

    def load_card(self):
        """The card with this run's runtime options."""
        from flows.options import load_run_card

        return load_run_card(self.card, self.options())

    def prepare(self, out: Path, device: str | None = None, workers: int | None = None):
        """A run of the card into `out`, as `segpipe segment` and `segpipe run` prepare one."""
        from flows.run import prepare_run

        return prepare_run(self.card, out, self.options(device, workers))


# ---------------------------------------------------------------- the parts, one per process

def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synchronise(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def normalised(card, pixels, device: str):
    """uint8 (…, C, H, W) pixels as the card's normalised float32 input, on the device."""
    import torch

    shape = (-1, 1, 1)
    mean = torch.tensor(card.mean, dtype=torch.float32, device=device).reshape(shape)
    std = torch.tensor(card.std, dtype=torch.float32, device=device).reshape(shape)
    return (torch.as_tensor(pixels).to(device).float() * card.scale - mean) / std


def model_part(bench: Bench) -> dict:
    import torch

    from segworkers.predictor import CpuLanes
    from segworkers.tile_models import load_tile_model

    card = bench.load_card()
    on_cpu = bench.device == "cpu"
    model = load_tile_model(card, bench.device, 1 if on_cpu else available_cores())
    side = bench.tile + 2 * model.halo
    pixels = np.random.default_rng(0).integers(0, 256, (bench.batch, card.in_channels, side, side), dtype=np.uint8)
    inputs = normalised(card, pixels, bench.device).contiguous(memory_format=model.memory_format or torch.contiguous_format)
    forward = model.forward
    if on_cpu:  # as segpipe's predictor runs it: a batch on each lane of one torch thread, the lanes at once
        lanes, one = CpuLanes(available_cores()), model.forward

        def forward(inputs):
            for _ in lanes.map(one, [inputs] * lanes.lanes):
                pass
        bench_batch = bench.batch * lanes.lanes
    else:
        bench_batch = bench.batch
    for _ in range(3 if bench.device == "cuda" else 1):  # warm-up: cuDNN plans, compilation, graph capture
        forward(inputs)
    synchronise(bench.device)
    window_start, started, batches = time.time(), time.perf_counter(), 0
    while batches < 3 or time.perf_counter() - started < bench.seconds:
        forward(inputs)
        batches += 1
        if batches % 8 == 0:  # stop after about `seconds` of work done, not of work launched
            synchronise(bench.device)
    synchronise(bench.device)
    seconds = time.perf_counter() - started
    if on_cpu:
        lanes.close()
    return {"mpx_per_s": batches * bench_batch * bench.tile**2 / 1e6 / seconds, "seconds": seconds,
            "window": [window_start, time.time()], "torch": torch.__version__}


class WarmPool:
    """Ray (local, or `num_cpus` of it) and an actor pool whose actors have loaded the model;
    on a GPU they have also run a small image once (cuDNN plans, compilation, CUDA graphs)."""

    def __init__(self, bench: Bench, run, num_cpus: int | None = None, threads: int = 2):
        import ray

        from segworkers.actors import ActorPool
        from segworkers.cluster import ensure_ray

        started = time.perf_counter()
        if num_cpus:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
        else:
            ensure_ray()
        options = run.options
        self.pool = ActorPool(run.card, options.device, options.batch, workers=options.workers, threads=threads)
        ray.get([actor.__ray_ready__.remote() for actor in self.pool.actors])
        if options.device == "cuda":
            self.warm_up(bench, run)
        self.seconds = time.perf_counter() - started

    def warm_up(self, bench: Bench, run) -> None:
        """Every actor segments at least one one-tile block of a small image."""
        from flows.run import plan_image
        from flows.stages import ingest, segment
        from flows.synthetic import write_tiled_scene

        side = min(bench.side, run.options.tile * max(2, math.ceil(math.sqrt(len(self.pool.actors)))))
        scene = write_tiled_scene(Path(bench.workdir) / "warm-up.tif", side)
        one_tile_blocks = replace(run, options=run.options.model_copy(update={"block": run.options.tile}),
                                  out_root=str(Path(bench.workdir) / "warm-up-out"))
        image = plan_image(one_tile_blocks, scene)
        ingest(image)
        segment(image, self.pool)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.pool.close()


def tiles_run_per_grid_tile(shape: tuple[int, ...], options, card) -> float:
    """Tiles the blocks run (a tile straddling a block border runs in each block it touches)
    per tile of the grid."""
    from pipelines.tiling import TileGrid, block_partition

    grid = TileGrid(shape, options.tile, options.overlap)
    blocks = block_partition(shape, (options.block,) * len(shape))
    return sum(len(grid.tiles_touching(b.grown(card.block_margin))) for b in blocks) / len(grid)


def segment_part(bench: Bench, device: str | None = None, workers: int | None = None) -> dict:
    """The segment stage alone; with `workers`, that many CPU actors of one thread each."""
    from flows.run import plan_image
    from flows.stages import ingest, segment

    run = bench.prepare(Path(bench.workdir) / f"segment-out-{workers or device or bench.device}", device, workers)
    scene = bench.actors_scene if workers else bench.scene
    with WarmPool(bench, run, num_cpus=workers, threads=1 if workers else 2) as warm:
        image = plan_image(run, scene)
        ingest(image)
        window_start, started = time.time(), time.perf_counter()
        summary = segment(image, warm.pool)
        seconds = time.perf_counter() - started
    pixels = math.prod(image.source.shape)
    return {"mpx_per_s": pixels / 1e6 / seconds, "seconds": seconds, "window": [window_start, time.time()],
            "actors": len(warm.pool.actors), "startup_seconds": warm.seconds, "tiles": summary.tiles,
            "tiles_run_per_grid_tile": tiles_run_per_grid_tile(image.source.shape, run.options, run.card),
            "block": run.options.block}


# The end-to-end stages as the report names them.
STAGE_NAMES = {"ingest": "ingest", "segment": "segment", "finalize": "finalize", "record": "statistics"}


def end_to_end_part(bench: Bench) -> dict:
    """The stages of one image as `segpipe segment` and a nightly run do them (flows.stages),
    inside a started run (the output root locked, statistics compacted at the end)."""
    from flows.run import claim_folder, plan_image, started
    from flows.stages import run_image

    out = Path(bench.workdir) / "end-to-end-out"
    run = bench.prepare(out)
    stages = {}

    def timed(stage, work):
        lap = time.perf_counter()
        work()
        stages[STAGE_NAMES[stage.__name__]] = time.perf_counter() - lap

    with WarmPool(bench, run) as warm:
        window_start, begun = time.time(), time.perf_counter()
        with started(run) as run:
            image = claim_folder(plan_image(run, bench.scene))
            run_image(image, warm.pool, run_stage=timed)
        seconds = time.perf_counter() - begun
    if not (out / image.name / "labels.tif").exists():
        raise RuntimeError(f"end-to-end run left no {out / image.name / 'labels.tif'}")
    return {"mpx_per_s": math.prod(image.source.shape) / 1e6 / seconds, "seconds": seconds,
            "window": [window_start, time.time()], "stages": stages}


def monai_part(bench: Bench, stitch_device: str) -> dict:
    """sliding_window_inference over the whole image: the model runs on the bench's device,
    the probabilities are summed on `stitch_device`; labels come back to the host as uint8."""
    import rasterio
    import torch
    from pipelines.sources import open_source, resolve_bands
    from segworkers.tile_models import load_tile_model

    try:
        from monai.data.utils import dense_patch_slices
        from monai.inferers import sliding_window_inference
    except ModuleNotFoundError as exc:
        raise SystemExit("the monai part needs MONAI: pip install 'segpipe[bench]', or leave it out "
                         "(--parts model,segment,end-to-end)") from exc

    card = bench.load_card()
    forward = load_tile_model(card, bench.device, available_cores()).forward
    bands = resolve_bands(open_source(bench.scene, card), card)
    with rasterio.open(bench.scene) as src:
        pixels = torch.from_numpy(src.read(list(bands)))[None]
    # Warm-up on both batch shapes MONAI will send (full ones, then the rest): a new shape
    # costs a compilation or a graph capture, which the pipeline never pays twice either.
    interval = max(1, int(bench.tile * (1 - bench.overlap)))  # MONAI's scan interval
    windows = len(dense_patch_slices(pixels.shape[2:], (bench.tile,) * 2, (interval,) * 2))
    crop = normalised(card, pixels[0, :, : bench.tile, : bench.tile], bench.device)
    for size in {min(bench.batch, windows), windows % bench.batch} - {0}:
        forward(crop.expand(size, *crop.shape).contiguous())
    synchronise(bench.device)
    window_start, started = time.time(), time.perf_counter()
    with torch.inference_mode():
        image = normalised(card, pixels, stitch_device)
        logits = sliding_window_inference(
            image, roi_size=(bench.tile, bench.tile), sw_batch_size=bench.batch, predictor=forward,
            overlap=bench.overlap, mode="gaussian", sigma_scale=0.125, sw_device=bench.device, device=stitch_device,
        )
        labels = logits.argmax(1).to(torch.uint8).cpu()
    seconds = time.perf_counter() - started
    return {"mpx_per_s": labels.numel() / 1e6 / seconds, "seconds": seconds, "window": [window_start, time.time()]}


def run_part(name: str, bench: Bench) -> dict:
    part, _, detail = name.partition("@")
    if part == "model":
        return model_part(bench)
    if part == "segment":
        return segment_part(bench)
    if part == "end-to-end":
        return end_to_end_part(bench)
    if part == "monai":
        return monai_part(bench, detail)
    if part == "actors":
        return segment_part(bench, device="cpu", workers=int(detail))
    raise ValueError(f"unknown part {name!r}")


# ---------------------------------------------------------------- the driver

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="unet-resnet34",
                        help="a model card (YAML path or built-in name), or a generated random-weights model: "
                             "unet-resnet34 (smp Unet, ResNet-34 encoder, 6 classes; default) or tiny-unet "
                             "(registry unet_padded, base 16, depth 3, 4 classes; quick on a CPU). The image "
                             "is 8-bit RGB: the card must read 3 bands")
    parser.add_argument("--side", type=int, help="image side in pixels (default 16384 on cuda, 1024 on cpu)")
    parser.add_argument("--tile", type=int, help="tile side (default: 1024 on cuda, 256 on cpu; a given card's own)")
    parser.add_argument("--overlap", type=float, help="tile overlap fraction (default 0.25; a given card's own)")
    parser.add_argument("--batch", type=int, help="tiles per model call (default 8 on cuda, 4 on cpu)")
    parser.add_argument("--block", type=int, help="output block (Zarr shard) side (default: segpipe's, 2048 on cpu, 8 tiles on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is a GPU")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                        help="autocast precision (default: the card's; generated models: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        help="NHWC memory format (default: the card's; generated models: on with cuda)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, help="run the model in CUDA graphs")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}, or none (default: all)")
    parser.add_argument("--actors", help="also the segment stage with N CPU actors of one thread each, for each N "
                                         "of a comma-separated list (e.g. 1,2,4,8; counts above the cores are skipped)")
    parser.add_argument("--actors-side", type=int, help="image side for --actors (default: --side on cpu; on cuda "
                                                        "at most 2048, with tile 256 and batch 4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the model-alone part runs (default 10)")
    parser.add_argument("--workdir", type=Path, help="where the image, cards and outputs go (default: a temporary "
                                                     "folder, removed at the end)")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON object (last line)")


def main(argv: list[str] | None = None, prog: str = "python -m flows.benchmarks.worker_plane") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:  # one part, in a process of its own started by the driver below
        bench = Bench(**json.loads(args.config.read_text()))
        print(json.dumps(run_part(args.part, bench)), flush=True)
        return 0
    return run(args)


def parse_parts(text: str) -> list[str]:
    parts = [] if text.strip() == "none" else [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)} or none")
    return [p for p in PARTS if p in parts]


def parse_actor_counts(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        counts = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        raise SystemExit(f"--actors takes a comma-separated list of counts, not {text!r}") from None
    if any(n < 1 for n in counts):
        raise SystemExit("--actors counts must be at least 1")
    return counts


def resolve_bench(args: argparse.Namespace, workdir: Path, actor_counts: list[int]) -> Bench:
    import torch

    from flows.synthetic import write_smp_unet_card, write_tiny_unet_card
    from pipelines.model_card import load_card

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")
    gpu = device == "cuda"
    overlap = 0.25 if args.overlap is None else args.overlap
    generated = args.model in GENERATED_MODELS
    if generated:
        writer = write_smp_unet_card if args.model == "unet-resnet34" else write_tiny_unet_card
        card_path = writer(workdir, tile=args.tile or (1024 if gpu else 256), overlap=overlap)
    else:
        card_path = Path(load_card(args.model).source)
    card = load_card(card_path)
    runtime = asdict(card.runtime)
    if generated and gpu:  # the issue's anchors: bf16 autocast, channels_last
        runtime.update(precision="bf16", channels_last=True)
    chosen = {"precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
              "cuda_graphs": args.cuda_graphs}
    runtime.update({key: value for key, value in chosen.items() if value is not None})
    card.with_runtime(**runtime)  # an option the card's format cannot honour fails here, before any part
    side = args.side or (16384 if gpu else 1024)
    tile = args.tile or card.tile_size
    batch = args.batch or (8 if gpu else 4)
    # A GPU run's CPU actors take CPU-sized work (tile 256, batch 4, a 2048² image at most),
    # or the one-thread actor alone would take many minutes.
    actors_side = args.actors_side or (min(side, 2048) if gpu else side)
    actors_tile = min(tile, 256) if gpu and not card.fixed_tile_size else tile
    blocks_per_axis = math.ceil(math.sqrt(2 * max(actor_counts, default=1)))
    scene = workdir / "scene.tif"
    return Bench(
        workdir=str(workdir), card=str(card_path), model=args.model, scene=str(scene), side=side, tile=tile,
        overlap=overlap if generated or args.overlap is not None else card.overlap, batch=batch, block=args.block,
        device=device, runtime=runtime, seconds=args.seconds,
        actors_scene=str(scene if actors_side == side else workdir / "actors-scene.tif"), actors_side=actors_side,
        actors_tile=actors_tile, actors_batch=4 if gpu else batch,
        actors_block=max(actors_tile, actors_side // blocks_per_axis // actors_tile * actors_tile),
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str) -> dict:
    import torch

    described = {"cpu": f"{cpu_name()}, {available_cores()} cores", "torch": torch.__version__, "gpu": None}
    if device == "cuda":  # only now: a CUDA context in the driver would have sat in every part's GPU memory
        described["gpu"] = torch.cuda.get_device_name(0)
    return described


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe; prints the table (and with --json, one JSON object)."""
    from flows.synthetic import write_tiled_scene

    parts = parse_parts(args.parts)
    actor_counts = parse_actor_counts(args.actors)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segpipe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        bench = resolve_bench(args, workdir, actor_counts)
        card = bench.load_card()
        options = bench.options().resolved(card)
        started = time.perf_counter()
        write_tiled_scene(Path(bench.scene), bench.side)
        scene_seconds = time.perf_counter() - started
        if actor_counts and bench.actors_scene != bench.scene:
            write_tiled_scene(Path(bench.actors_scene), bench.actors_side)
        config = workdir / "bench.json"
        config.write_text(json.dumps(asdict(bench)))
        print(f"{bench.side}² scene written in {scene_seconds:.1f} s; running "
              f"{', '.join(parts + [f'{n} CPU actors' for n in actor_counts]) or 'nothing'}", flush=True)

        names = [p for part in parts for p in
                 ([f"monai@{bench.device}", "monai@cpu"] if part == "monai" and bench.device == "cuda"
                  else ["monai@cpu"] if part == "monai" else [part])]
        cores = available_cores()
        fitting = [n for n in actor_counts if n <= cores]
        measured = {}
        for name in names + [f"actors@{n}" for n in fitting]:
            measured[name] = measure_part(name, config, workdir)
            print(f"  {name:12s} {measured[name].result['mpx_per_s']:10.4g} Mpx/s "
                  f"(process: {measured[name].seconds:.1f} s)", flush=True)
        report = build_report(bench, options, card, measured, describe_machine(bench.device), scene_seconds,
                              skipped_actors=[n for n in actor_counts if n > cores], cores=cores)
        print_report(report)
        if args.json:
            print(json.dumps(report))
        return 0
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def measure_part(name: str, config: Path, workdir: Path) -> Measured:
    log = workdir / f"{name.replace('@', '-')}.log"
    with open(log, "w") as stderr:
        try:
            return run_sampled(python_module("flows.benchmarks.worker_plane", "--part", name, "--config", str(config)),
                               gpu=GpuMonitor(), stderr=stderr)
        except RuntimeError:
            tail = log.read_text()[-4000:]
            sys.stderr.write(f"part {name} failed; the end of its log:\n{tail}\n")
            raise


def part_figures(measured: Measured) -> dict:
    result = measured.result
    utilisation = measured.gpu_utilisation(*result["window"])
    peak_gpu = measured.peak_gpu_memory
    return {
        "mpx_per_s": result["mpx_per_s"],
        "seconds": result["seconds"],
        "peak_rss_gib": measured.peak_rss / 2**30,
        "peak_gpu_memory_gib": None if peak_gpu is None else peak_gpu / 2**30,
        "gpu_utilisation_mean": None if utilisation is None else utilisation[0],
        "gpu_utilisation_p10": None if utilisation is None else utilisation[1],
    }


def build_report(bench: Bench, options, card, measured: dict[str, Measured], machine: dict, scene_seconds: float,
                 skipped_actors: list[int], cores: int) -> dict:
    labels = {"model": "model", "segment": "segment", "end-to-end": "end_to_end", "monai@cuda": "monai_gpu_stitched",
              "monai@cpu": "monai_cpu_stitched" if bench.device == "cuda" else "monai"}
    figures = {labels[name]: part_figures(m) for name, m in measured.items() if not name.startswith("actors@")}
    recompute = (bench.tile / bench.stride) ** 2
    ratios = {}
    if "model" in figures:
        ideal = figures["model"]["mpx_per_s"] / recompute
        ratios.update({f"{key}/ideal": figures[key]["mpx_per_s"] / ideal
                       for key in ("segment", "end_to_end") if key in figures})
    else:
        ideal = None
    if "segment" in figures:
        ratios.update({f"segment/{key}": figures["segment"]["mpx_per_s"] / figures[key]["mpx_per_s"]
                       for key in ("monai", "monai_gpu_stitched", "monai_cpu_stitched") if key in figures})
    actors = [{"actors": int(name.split("@")[1]), "mpx_per_s": m.result["mpx_per_s"], "seconds": m.result["seconds"],
               "peak_rss_gib": m.peak_rss / 2**30} for name, m in measured.items() if name.startswith("actors@")]
    for row in actors:
        row["speed_up"] = row["mpx_per_s"] / actors[0]["mpx_per_s"]
    details = {name: {k: v for k, v in m.result.items() if k not in ("mpx_per_s", "seconds", "window")}
               for name, m in measured.items()}
    return {
        "machine": machine,
        "model": {"name": bench.model, "card": card.name, "format": card.format, "architecture": card.architecture,
                  "architecture_options": card.architecture_options, "bands": card.in_channels,
                  "classes": card.num_classes},
        "settings": {"side": bench.side, "tile": bench.tile, "overlap": bench.overlap, "stride": bench.stride,
                     "batch": bench.batch, "block": options.block, "device": bench.device, **bench.runtime,
                     "blending": "gaussian", "actors_side": bench.actors_side, "actors_tile": bench.actors_tile,
                     "actors_batch": bench.actors_batch, "actors_block": bench.actors_block, "cores": cores},
        "scene_seconds": scene_seconds,
        "figures": figures,
        "recompute": recompute,
        "ideal_mpx_per_s": ideal,
        "ratios": ratios,
        "actors": actors,
        "actors_skipped": skipped_actors,
        "details": details,
    }


PART_TITLES = {
    "model": "model alone (tile px)",
    "segment": "segment stage",
    "end_to_end": "end-to-end",
    "monai": "MONAI sliding window",
    "monai_gpu_stitched": "MONAI, stitched on GPU",
    "monai_cpu_stitched": "MONAI, stitched on CPU",
}


def number(value: float | None, unit: str = "", digits: str = ".4g") -> str:
    return "n/a" if value is None else f"{value:{digits}}{unit}"


def print_report(report: dict) -> None:
    machine, model, s = report["machine"], report["model"], report["settings"]
    gpu = f"{machine['gpu']} (cuda)" if machine["gpu"] else "none"
    print(f"\nsegpipe worker-plane benchmark\n"
          f"device:   {s['device']}; GPU: {gpu}; CPU: {machine['cpu']}; torch {machine['torch']}\n"
          f"model:    {model['name']} ({model['format']} {model['architecture']} {model['architecture_options']}, "
          f"{model['bands']} bands, {model['classes']} classes)\n"
          f"settings: {s['side']}² RGB, tile {s['tile']}, overlap {s['overlap']} (stride {s['stride']}), batch "
          f"{s['batch']}, block {s['block']}, gaussian, precision {s['precision']}, channels_last "
          f"{'on' if s['channels_last'] else 'off'}, compile {'on' if s['compile'] else 'off'}, cuda_graphs "
          f"{'on' if s['cuda_graphs'] else 'off'}\n")
    print(f"{'part':26s} {'Mpx/s':>10s} {'seconds':>9s} {'peak RSS':>10s} {'peak GPU mem':>13s} "
          f"{'GPU util mean':>14s} {'GPU util p10':>13s}")
    for key, f in report["figures"].items():
        print(f"{PART_TITLES[key]:26s} {number(f['mpx_per_s']):>10s} {f['seconds']:9.2f} "
              f"{number(f['peak_rss_gib'], ' GiB', '.2f'):>10s} {number(f['peak_gpu_memory_gib'], ' GiB', '.2f'):>13s} "
              f"{number(f['gpu_utilisation_mean'], ' %', '.0f'):>14s} {number(f['gpu_utilisation_p10'], ' %', '.0f'):>13s}")
    if report["ideal_mpx_per_s"] is not None:
        print(f"\nideal = model / (tile / stride)^2 = model / {report['recompute']:.4f} = "
              f"{number(report['ideal_mpx_per_s'])} Mpx/s")
    for name, value in report["ratios"].items():
        print(f"{name:30s} {value:.4g}")
    details = report["details"]
    if "segment" in details:
        d = details["segment"]
        warmed = " and warmed up on a small image" if s["device"] == "cuda" else ""
        print(f"segment: {d['actors']} actor(s), started{warmed} in {d['startup_seconds']:.1f} s before timing; "
              f"{d['tiles']} grid tiles, {d['tiles_run_per_grid_tile']:.2f} tiles run per grid tile "
              f"(block {d['block']})")
        if report["ideal_mpx_per_s"] is not None:
            # (tile / stride)^2 holds for an unbounded image; on a small one the last tiles sit
            # flush with the border and overlap their neighbours more or less than a stride.
            grid_recompute = d["tiles"] * s["tile"] ** 2 / s["side"] ** 2
            grid_ideal = report["figures"]["model"]["mpx_per_s"] / grid_recompute
            print(f"this image's grid computes each pixel {grid_recompute:.4f} times: ideal for it "
                  f"{number(grid_ideal)} Mpx/s, segment / that {report['figures']['segment']['mpx_per_s'] / grid_ideal:.4g}")
    if "end-to-end" in details:
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in details["end-to-end"]["stages"].items())
        print(f"end-to-end stages: {stages}")
    if report["actors"] or report["actors_skipped"]:
        tiles_run = [d["tiles_run_per_grid_tile"] for name, d in details.items() if name.startswith("actors@")]
        run_per_tile = f" ({tiles_run[0]:.2f} tiles run per grid tile)" if tiles_run else ""
        print(f"\nCPU actors, one thread each, fp32, segment stage on a {s['actors_side']}² image, tile "
              f"{s['actors_tile']}, batch {s['actors_batch']}, block {s['actors_block']}{run_per_tile}:")
        baseline = report["actors"][0]["actors"] if report["actors"] else 1
        print(f"{'actors':>6s} {'Mpx/s':>10s} {'seconds':>9s} {'peak RSS':>10s} {f'speed-up vs {baseline}':>16s}")
        for row in report["actors"]:
            print(f"{row['actors']:6d} {number(row['mpx_per_s']):>10s} {row['seconds']:9.2f} "
                  f"{row['peak_rss_gib']:6.2f} GiB {row['speed_up']:16.4g}")
        if report["actors_skipped"]:
            print(f"skipped: {', '.join(map(str, report['actors_skipped']))} actors "
                  f"(more than the machine's {s['cores']} cores)")


if __name__ == "__main__":
    sys.exit(main())
