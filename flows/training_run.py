"""`segpipe train`: from labelled images to a model card that `segment` and `run` use unchanged.

    options = TrainingOptions(architecture="unet_padded", epochs=20)
    trained = train("images/", "masks/", "models/nuclei", options)   # models/nuclei/card.yaml

The pairs are read through the same sources and Zarr ingest as segmentation (with the card's
bands, tile and resolution), sampled into tiles and trained on Ray Train (TorchTrainer, DDP:
one worker per GPU, or CPU workers). Every epoch leaves a checkpoint in OUT/checkpoints; a run
killed at any point continues from its last one with `--resume`, computing what the
uninterrupted run would have (on the CPU, bit for bit).

What OUT holds at the end:
- card.yaml: the card (architecture, bands, normalisation, classes, tile), plus a `training`
  section: the data, the options and the validation scores of the last epoch;
- weights.safetensors: the state dict of the last epoch;
- metrics.json (every epoch), metrics.parquet (one row per epoch x class), metrics.png (loss,
  IoU and Dice per class over the epochs);
- training.json: the resolved options, what `--resume` continues with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows import segpipe_version
from flows.progress import console, note, stage_progress, verbosity
from pipelines import storage
from pipelines.errors import InputError
from pipelines.model_card import MAX_TILE, ClassInfo, ModelCard, card_document, load_card
from pipelines.training_data import (
    TrainingPair, band_statistics, find_pairs, label_classes, parse_classes, prepare_pair, split,
)

CARD_FILE = "card.yaml"
WEIGHTS_FILE = "weights.safetensors"
OPTIONS_FILE = "training.json"
RUN_NAME = "training"
DEFAULT_TILE = {2: 256, 3: 64}


class TrainingOptions(BaseModel):
    """Every option of `segpipe train` besides the images, the labels and the output folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str | None = Field(None, description="the network: a segworkers.models name (unet_padded, "
                                                        "deeplab_v3plus, nnunet3d, ...), a torchvision model "
                                                        "(deeplabv3_resnet50, ...) or an smp architecture (Unet, FPN, "
                                                        "...) with --encoder (default: --fine-tune's)")
    encoder: str | None = Field(None, description="segmentation_models_pytorch: the encoder (resnet34, "
                                                  "efficientnet-b0, ...), built without pretrained weights")
    architecture_options: dict = Field(default_factory=dict, description="options of the architecture, "
                                                                         "key=value,... (base_features=16,depth=3)")
    fine_tune: str | None = Field(None, description="start from this card's weights, bands, normalisation and tile "
                                                    "(its classifier starts afresh when the classes differ)")
    classes: str | None = Field(None, description="class names: name,name,... or a YAML/JSON file of names or "
                                                  "{name, color} (default: the label raster's categories or the "
                                                  "annotations' classes, else class0..classN)")
    bands: tuple[str, ...] | None = Field(None, description="the image bands the model reads, 1-based or by name "
                                                            "(default: all of the first image's)")
    scale: float | None = Field(None, description="multiply pixel values by this before normalising (default 1)")
    clip: tuple[float, float] | None = Field(None, description="LOW,HIGH: clamp the scaled values to this range "
                                                               "before normalising (CT: a Hounsfield window, -200,300)")
    tile: int | None = Field(None, description="tile side in pixels (default 256; 64 for volumes)")
    halo: int | None = Field(None, description="context in pixels read around each tile (default: the network's own)")
    overlap: float = Field(0.25, description="the card's tile overlap for segmenting (default 0.25)")
    mpp: float | None = Field(None, description="slides: train (and later segment) at this many µm per pixel "
                                                "(default: level 0)")
    epochs: int = Field(10, description="epochs (default 10)")
    steps_per_epoch: int = Field(50, description="optimiser steps per epoch (default 50)")
    batch: int = Field(4, description="tiles per step on each worker (default 4)")
    learning_rate: float = Field(1e-3, description="AdamW's initial learning rate, falling to 0 as nnU-Net's poly "
                                                   "schedule (default 0.001)")
    validation: Literal["spatial", "image"] = Field(
        "spatial", description="hold out the last part of every image (spatial: its last columns, a volume's last "
                               "slices) or every k-th image (image) (default spatial)")
    validation_fraction: float = Field(0.2, description="share held out for validation (default 0.2)")
    validation_tiles: int = Field(64, description="validation tiles scored each epoch, spread evenly (default 64)")
    augment: tuple[Literal["flip", "rot90", "jitter"], ...] = Field(
        ("flip", "rot90"), description="augmentations of the training tiles: flip (every axis), rot90 (in the plane), "
                                       "jitter (intensities ±10 %%); 'none' for none (default flip,rot90)")
    seed: int = Field(0, description="seed of every random draw (default 0)")
    workers: int = Field(1, description="Ray Train workers: one per GPU with --device cuda (default 1)")
    device: Literal["cpu", "cuda"] | None = Field(None, description="default: cuda when there is a GPU")
    threads: int | None = Field(None, description="torch threads per CPU worker (default: the machine's CPUs / "
                                                  "workers); fixed, so that a run resumes exactly")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting a local one "
                                                      "(default: $RAY_ADDRESS)")
    name: str | None = Field(None, description="the card's name (default: the output folder's name)")

    def resolved(self, out: str) -> TrainingOptions:
        """Defaults filled in and checked: what training.json keeps."""
        import torch

        for field in ("epochs", "steps_per_epoch", "batch", "validation_tiles", "workers", "threads", "tile"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise InputError(f"--{field.replace('_', '-')}", f"must be at least 1, got {value}")
        if not 0 < self.validation_fraction < 1:
            raise InputError("--validation-fraction", f"must be between 0 and 1, got {self.validation_fraction}")
        if not self.learning_rate > 0:
            raise InputError("--learning-rate", f"must be greater than 0, got {self.learning_rate}")
        if not (self.architecture or self.fine_tune):
            raise InputError("--architecture", "name the network to train (or a card to --fine-tune)")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda", "no CUDA GPU here")
        threads = self.threads or (1 if device == "cuda" else max(1, (os.cpu_count() or 1) // self.workers))
        name = self.name or Path(str(out).rstrip("/")).name or "trained"
        return self.model_copy(update={"device": device, "threads": threads, "name": name})


def options_from_values(**values) -> TrainingOptions:
    try:
        return TrainingOptions(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise InputError(".".join(str(p) for p in error["loc"]), f"{error['msg']} (got {error.get('input')!r})") from None


def parse_option_values(text: str) -> dict:
    """key=value,key=value, each value read as YAML (16 -> int, true -> bool, [32, 16] -> list)."""
    import yaml

    parts, depth, current = [], 0, ""
    for character in text:  # commas inside [...] or {...} belong to the value
        depth += character in "[{"
        depth -= character in "]}"
        if character == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += character
    parts.append(current)
    values = {}
    for part in (p for p in parts if p.strip()):
        key, equals, value = part.partition("=")
        if not equals or not key.strip():
            raise InputError("--architecture-options", f"expected key=value,..., got {part!r}")
        try:
            values[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise InputError("--architecture-options", f"{part!r}: {str(exc).splitlines()[0]}") from None
    return values


@dataclasses.dataclass(frozen=True)
class Trained:
    card_path: str
    card: ModelCard
    history: list[dict]
    seconds: float


def train(images: str, labels: str, out: str | Path, options: TrainingOptions, resume: bool = False) -> Trained:
    """Train a network on the pairs of `images` and `labels` into `out`."""
    import ray
    import ray.train
    from ray.util.queue import Queue

    from segworkers.cluster import STORAGE_ENVIRONMENT, ensure_ray
    from segworkers.training import run_training

    started = time.perf_counter()
    out = str(out).rstrip("/")
    if not storage.is_remote(out):  # Ray's workers run in folders of their own
        out = str(Path(out).resolve())
    images, labels = training_data(out, images, labels, resume)
    options = continued_options(out, options) if resume else fresh_options(out, options, images, labels)
    pairs, plan = prepare_training(images, labels, out, options)
    ensure_ray(options.ray_address)
    storage_path, filesystem = checkpoint_storage(out)
    environment = {k: os.environ[k] for k in STORAGE_ENVIRONMENT if k in os.environ}
    progress = Queue(actor_options={"num_cpus": 0})
    try:
        with training_progress(progress, options):
            result = run_training(plan, storage_path, options.workers, name=RUN_NAME,
                                  storage_filesystem=filesystem, progress=progress, environment=environment)
    except ray.train.TrainingFailedError as exc:
        raise training_error(exc) from exc
    finally:
        ray.kill(progress.actor)
    with result.checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / "state.json").read_text())
        storage.put_file(Path(folder) / WEIGHTS_FILE, storage.join(out, WEIGHTS_FILE))
    history = state["history"]
    card_path = write_outputs(out, plan.card, pairs, options, history)
    storage.remove_tree(storage.join(out, PREPARED))
    return Trained(card_path, plan.card, history, time.perf_counter() - started)


PREPARED = ".prepared"


def prepare_training(images: str, labels: str, out: str, options: TrainingOptions):
    """(pairs, plan): the pairs found and ingested into OUT/.prepared, the card being trained
    (its normalisation from the training images unless fine-tuned), and the TrainingPlan the
    workers run. `options` are resolved (TrainingOptions.resolved)."""
    from segworkers.training import TrainingPlan

    pairs = find_pairs(images, labels)
    card = training_card(pairs, options, out)
    with stage_progress(f"prepare {len(pairs)} training image(s)", len(pairs)) as advance:
        prepared = []
        for pair in pairs:
            prepared.append(prepare_pair(pair, card, storage.join(out, PREPARED)))
            for text in prepared[-1].notes:
                note(text)
            advance()
    if not options.fine_tune:
        mean, std = band_statistics(prepared, card.scale, card.clip)
        card = dataclasses.replace(card, mean=tuple(mean), std=tuple(std))
    training, validation = split(prepared, options.validation, options.validation_fraction)
    return pairs, TrainingPlan(
        card=card, training=tuple(training), validation=tuple(validation), epochs=options.epochs,
        steps_per_epoch=options.steps_per_epoch, batch_size=options.batch, learning_rate=options.learning_rate,
        seed=options.seed, augment=options.augment, device=options.device, threads=options.threads,
        initial_weights=str(load_card(options.fine_tune).weights) if options.fine_tune else None,
        validation_tiles=options.validation_tiles,
    )


DATA_FILE = "training-data.json"
"""--images and --labels of the run in OUT (absolute), for `--out DIR --resume` alone."""


def training_data(out: str, images: str | None, labels: str | None, resume: bool) -> tuple[str, str]:
    """The run's images and labels: as given (fresh_options keeps them in OUT for a resume), or,
    resuming, as kept; given again when resuming, they must be the same."""
    path = storage.join(out, DATA_FILE)
    given = {"images": images and storage.absolute(images), "labels": labels and storage.absolute(labels)}
    if not resume:
        missing = [f"--{name}" for name, value in given.items() if not value]
        if missing:
            raise InputError(" and ".join(missing), "required to start a training run (only --resume takes them "
                                                    "from the run in --out)")
        return images, labels
    if not storage.exists(path):
        if images and labels:  # a run started before the data were kept
            return images, labels
        raise InputError(out, f"does not say which images it was trained on (no {DATA_FILE}): give --images and "
                              "--labels as when it started")
    kept = json.loads(storage.read_bytes(path))
    for name, value in given.items():
        if value and value != kept[name]:
            raise InputError(f"--{name}", f"differs from the run being resumed in {out} ({kept[name]!r}); leave it out")
    return kept["images"], kept["labels"]


def fresh_options(out: str, options: TrainingOptions, images: str, labels: str) -> TrainingOptions:
    """The options of a new run, kept in OUT with its images and labels (absolute)."""
    if storage.exists(storage.join(out, "checkpoints", RUN_NAME)):
        raise InputError(out, "holds a training run already: --resume continues it, or choose another --out")
    resolved = options.resolved(out)
    storage.write_whole(storage.join(out, OPTIONS_FILE), resolved.model_dump_json(indent=1).encode())
    data = {"images": storage.absolute(images), "labels": storage.absolute(labels)}
    storage.write_whole(storage.join(out, DATA_FILE), json.dumps(data, indent=1).encode())
    return resolved


def continued_options(out: str, options: TrainingOptions) -> TrainingOptions:
    """The options the run was started with; an option given again must not differ."""
    path = storage.join(out, OPTIONS_FILE)
    if not storage.exists(path):
        raise InputError(out, "holds no training run to resume (no training.json)")
    saved = TrainingOptions.model_validate_json(storage.read_bytes(path))
    given = options.model_dump(exclude_unset=True)
    changed = [name for name, value in given.items()
               if name != "ray_address" and value != getattr(saved, name) and not (name == "bands" and value is None)]
    if changed:
        raise InputError(f"--{changed[0].replace('_', '-')}", f"differs from the run being resumed in {out} "
                                                             f"({getattr(saved, changed[0])!r}); leave it out")
    return saved.model_copy(update={"ray_address": options.ray_address})


def training_card(pairs: list[TrainingPair], options: TrainingOptions, out: str) -> ModelCard:
    """The card being trained: from --fine-tune, or built from the options and the first image."""
    from pipelines.sources import choose_kind
    from segworkers.tile_models import (architecture_format, architecture_spatial_dims, build_architecture,
                                        check_network, load_state_dict_file, non_finite_tensors)

    classes = parse_classes(options.classes) if options.classes else label_classes(pairs)
    if options.fine_tune:
        base = load_card(options.fine_tune)
        if base.format not in ("registry", "smp", "torchvision") or (base.format == "smp" and base.weights.is_dir()):
            raise InputError(options.fine_tune, f"a {base.format} card cannot be fine-tuned here: its network must "
                                                "be a registry, torchvision or smp architecture with a state dict")
        bad = non_finite_tensors(load_state_dict_file(base.weights))
        if bad:  # every step would be NaN from the first: the run would read as diverged
            raise InputError(base.weights, f"holds NaN or infinity in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                                           f"{', ...' if len(bad) > 3 else ''}): there is nothing to fine-tune from")
        given = {"tile_size": options.tile, "halo": options.halo}
        card = dataclasses.replace(base, classes=classes, name=options.name, version="1", overlap=options.overlap,
                                   **{key: value for key, value in given.items() if value is not None})
    else:
        architecture_options = dict(options.architecture_options)
        if options.encoder:
            architecture_options["encoder_name"] = options.encoder
        probe = probe_card(classes)
        # A 3D network reads its images as volumes (a TIFF stack too, whose axes tifffile may not
        # name Z); a 2D one is not given a volume to learn slice by slice.
        image_dims = 3 if choose_kind(pairs[0].image, probe).name == "volume" else 2
        try:
            spatial_dims = architecture_spatial_dims(options.architecture, architecture_options)
        except TypeError as exc:  # an option the network does not take
            raise InputError("--architecture-options", f"{options.architecture}: {exc}") from exc
        if image_dims == 3 and spatial_dims == 2:
            raise InputError(pairs[0].image, f"is a volume, and {options.architecture} is a 2D network: train a 3D "
                                             "one (--architecture nnunet3d)")
        first = open_image(pairs[0].image, dataclasses.replace(probe, spatial_dims=spatial_dims, mpp=options.mpp))
        bands = tuple(int(b) if str(b).isdigit() else b for b in options.bands) if options.bands else \
            tuple(range(1, first.count + 1))
        tile = options.tile or DEFAULT_TILE[spatial_dims]
        if tile > MAX_TILE[spatial_dims]:
            raise InputError("--tile", f"must be at most {MAX_TILE[spatial_dims]} for {spatial_dims}D images, got {tile}")
        card = ModelCard(
            name=options.name, version="1", format=architecture_format(options.architecture, options.encoder),
            weights=Path(WEIGHTS_FILE), classes=classes, bands=bands,
            band_names=tuple(band_name(first, b) for b in bands), scale=options.scale or 1.0,
            mean=(0.0,) * len(bands), std=(1.0,) * len(bands), tile_size=tile, overlap=options.overlap,
            fixed_tile_size=False, halo=options.halo or 0, spatial_dims=spatial_dims,
            architecture=options.architecture, architecture_options=architecture_options,
            preview_bands=tuple(range(min(3, len(bands)))), mpp=options.mpp, clip=options.clip,
        )
    card = dataclasses.replace(card, source=f"the card being trained in {out}")
    network = build_architecture(card)
    check_network(card, network)
    return card


def probe_card(classes: tuple[ClassInfo, ...]) -> ModelCard:
    """A one-band card, only to open an image and see what it holds."""
    return ModelCard(name="probe", version="0", format="registry", weights=Path(WEIGHTS_FILE), classes=classes,
                     bands=(1,), band_names=("band1",), scale=1.0, mean=(0.0,), std=(1.0,), tile_size=256,
                     overlap=0.0, fixed_tile_size=False)


def open_image(uri: str, card: ModelCard):
    from pipelines.sources import open_source

    return open_source(uri, card)


def band_name(source, band) -> str:
    if isinstance(band, str):
        return band
    names = source.band_names
    return (names[band - 1] if band - 1 < len(names) else None) or f"band{band}"


def checkpoint_storage(out: str):
    """Ray Train's storage path (and filesystem, for object storage) of OUT/checkpoints."""
    target = storage.join(out, "checkpoints")
    if not storage.is_remote(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        return str(Path(target).resolve()), None
    import pyarrow.fs

    bucket_path = target.split("://", 1)[1]
    filesystem = pyarrow.fs.S3FileSystem(endpoint_override=storage.s3_endpoint_url(), region=storage.s3_region() or
                                         "us-east-1")
    return bucket_path, filesystem


def training_error(error: BaseException) -> BaseException:
    """Bad input a worker found (a store gone, a label out of range) as its own one line; any
    other failure as Ray Train reported it."""
    failures = list(getattr(error, "worker_failures", {}).values()) or [error]
    for failure in failures:
        seen = failure
        while seen is not None:
            if isinstance(seen, InputError):
                return seen
            seen = getattr(seen, "cause", None) or seen.__cause__
    return error


@contextlib.contextmanager
def training_progress(queue, options: TrainingOptions) -> Iterator[None]:
    """A progress bar in optimiser steps across every epoch, and a line per finished epoch, fed
    by rank 0's messages on the queue (segworkers.training.run_training)."""
    from ray.util.queue import Empty

    finished = threading.Event()
    steps = options.steps_per_epoch
    with stage_progress(f"train {options.name}", options.epochs * steps) as advance:
        def follow() -> None:
            completed = 0
            while not finished.is_set():
                try:
                    kind, epoch, step, detail = queue.get(timeout=0.5)
                except Empty:
                    continue
                except Exception:  # noqa: BLE001 - the queue's actor is gone: training ended
                    return
                if epoch * steps + step > completed:  # a resumed run starts past its first epochs
                    advance(epoch * steps + step - completed)
                    completed = epoch * steps + step
                if kind == "epoch" and verbosity() != "quiet":
                    console.print(epoch_line(detail, options.epochs), highlight=False, soft_wrap=True)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            yield
        finally:
            finished.set()
            thread.join(timeout=5)


def epoch_line(metrics: dict, epochs: int) -> str:
    scores = ", ".join(f"{key[4:]} {value:.3f}" for key, value in metrics.items()
                       if key.startswith("iou/") and value is not None)
    validation = f"validation loss {metrics['validation_loss']:.4f}, " if metrics.get("validation_loss") is not None else ""
    mean_iou = f"mean IoU {metrics['mean_iou']:.3f}" if metrics.get("mean_iou") is not None else "no validation pixels"
    return (f"epoch {metrics['epoch']}/{epochs}: loss {metrics['loss']:.4f}, {validation}{mean_iou} ({scores}); "
            f"{metrics['tiles_per_second']:.1f} tiles/s")


def write_outputs(out: str, card: ModelCard, pairs: list[TrainingPair], options: TrainingOptions,
                  history: list[dict]) -> str:
    """card.yaml (with its training record), metrics.json, metrics.parquet and metrics.png."""
    import yaml

    last = history[-1]
    record = {
        "segpipe_version": segpipe_version(),
        "data": [{"image": storage.absolute(pair.image), "labels": storage.absolute(pair.labels)} for pair in pairs],
        "options": options.model_dump(exclude={"ray_address"}, mode="json"),
        "epochs": len(history),
        "validation": {key: value for key, value in last.items() if key not in ("confusion", "tiles_per_second")},
    }
    document = card_document(card, WEIGHTS_FILE, {"training": record})
    card_path = storage.join(out, CARD_FILE)
    storage.write_whole(card_path, ("# Trained by segpipe train; segment with: segpipe segment IMAGE --model "
                                    f"{card_path} --out DIR\n" + yaml.safe_dump(document, sort_keys=False)).encode())
    storage.write_whole(storage.join(out, "metrics.json"), json.dumps(history, indent=1).encode())
    write_metrics_table(storage.join(out, "metrics.parquet"), history, card)
    storage.write_whole(storage.join(out, "metrics.png"), metrics_chart(history, card))
    return card_path


def metrics_rows(history: list[dict], card: ModelCard) -> list[dict]:
    return [{"epoch": metrics["epoch"], "loss": metrics["loss"], "validation_loss": metrics.get("validation_loss"),
             "tiles_per_second": metrics["tiles_per_second"], "class_id": c.id, "class_name": c.name,
             "iou": metrics.get(f"iou/{c.name}"), "dice": metrics.get(f"dice/{c.name}")}
            for metrics in history for c in card.classes]


def write_metrics_table(path: str, history: list[dict], card: ModelCard) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("epoch", pa.int32()), ("loss", pa.float64()), ("validation_loss", pa.float64()),
                        ("tiles_per_second", pa.float64()), ("class_id", pa.int16()), ("class_name", pa.string()),
                        ("iou", pa.float64()), ("dice", pa.float64())])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(metrics_rows(history, card), schema=schema), buffer)
    storage.write_whole(path, buffer.getvalue())


LEGEND_ROWS = 20
"""Classes in one column of the training chart's legend."""


def metrics_chart(history: list[dict], card: ModelCard) -> bytes:
    """A PNG: the training and validation loss, and each class's validation IoU (solid) and
    Dice (dashed), over the epochs. The classes are named once each in a legend beside the
    scores, in columns of up to LEGEND_ROWS, so that many classes do not cover the curves."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    epochs = [m["epoch"] for m in history]
    columns = -(-len(card.classes) // LEGEND_ROWS)
    figure = Figure(figsize=(10 + 1.6 * columns, 4 + 0.1 * min(len(card.classes), LEGEND_ROWS)), dpi=100,
                    layout="constrained")
    loss, scores = figure.subplots(1, 2)
    loss.plot(epochs, [m["loss"] for m in history], marker="o", label="training")
    loss.plot(epochs, [m.get("validation_loss") for m in history], marker="o", label="validation")
    loss.set(title="loss (cross-entropy + Dice)", xlabel="epoch")
    loss.legend()
    handles = [Line2D([], [], color="#444", marker="o", label="IoU"), Line2D([], [], color="#444", linestyle="--",
                                                                            label="Dice")]
    for c in card.classes:
        colour = tuple(v / 255 for v in c.color)
        scores.plot(epochs, [m.get(f"iou/{c.name}") for m in history], marker="o", color=colour, markeredgecolor="#444")
        scores.plot(epochs, [m.get(f"dice/{c.name}") for m in history], linestyle="--", color=colour)
        handles.append(Line2D([], [], color=colour, linewidth=6, label=c.name))
    scores.set(title="validation scores", xlabel="epoch", ylim=(0, 1))
    scores.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0,
                  ncols=columns)
    for axes in (loss, scores):
        if len(epochs) <= 12:  # a tick at each epoch, none between (one epoch gave ticks at 0.96 ... 1.04)
            axes.set_xticks(epochs)
        else:
            axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
