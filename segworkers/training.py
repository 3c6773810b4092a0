"""The training loop each Ray Train worker runs (TorchTrainer, DDP), and what it saves.

Every worker builds the card's network from the same seed, DDP keeps the copies equal, and
each draws its share of the epoch's tiles (pipelines.training_data.TileSampler, seeded by
(seed, epoch)). Loss: cross-entropy plus soft Dice over the labelled pixels (255 ignored),
on the centre of the network's output that the tile covers. The learning rate falls from
`learning_rate` to 0 as (1 - step / steps) ** 0.9 (nnU-Net's "poly" schedule).

After each epoch every worker scores its share of the validation tiles; the confusion
matrices are summed over workers, and rank 0 saves a checkpoint (weights, optimiser, the
metrics so far) that Ray Train copies to the run's storage. A run started again with the
same storage resumes from the last checkpoint Ray registered; since every random draw of an
epoch is seeded by the epoch and not carried over from the one before, on the CPU the resumed
run computes exactly what the uninterrupted one did.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import InputError
from pipelines.model_card import ModelCard
from pipelines.training_data import NOT_LABELLED, PreparedImage, TileSampler, augment
from pipelines.tiling import Box

WEIGHTS_FILE = "weights.safetensors"
OPTIMISER_FILE = "optimiser.pt"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class TrainingPlan:
    """Everything a worker needs: picklable, sent once to every worker."""

    card: ModelCard
    """The card being trained: architecture, bands, normalisation, classes, tile and halo."""
    training: tuple[tuple[PreparedImage, Box], ...]
    validation: tuple[tuple[PreparedImage, Box], ...]
    epochs: int
    steps_per_epoch: int
    batch_size: int
    """Tiles per step on each worker."""
    learning_rate: float
    seed: int
    augment: tuple[str, ...] = ("flip", "rot90")
    """pipelines.training_data.AUGMENTATIONS applied to the training tiles."""
    device: str = "cpu"
    threads: int = 1
    """torch threads per CPU worker: fixed, so a run computes the same sums in the same order."""
    initial_weights: str | None = None
    """Fine-tuning: a state-dict file the network starts from."""
    validation_tiles: int = 64


def network(plan: TrainingPlan):
    """The card's untrained network, initialised from the seed (or from the fine-tuned weights)."""
    import torch

    from segworkers.tile_models import build_architecture, load_state_dict_file

    torch.manual_seed(plan.seed)
    module = build_architecture(plan.card)
    if plan.initial_weights:
        state = load_state_dict_file(Path(plan.initial_weights))
        own = module.state_dict()
        # A fine-tuned card may predict other classes: its classifier layers start afresh.
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        module.load_state_dict(fitting, strict=False)
    return module


def halo_of(plan: TrainingPlan, module) -> int:
    return plan.card.halo or int(getattr(module, "halo", 0))


class Batches:
    """Normalised input batches and label batches read from the prepared Zarr stores."""

    def __init__(self, plan: TrainingPlan, halo: int):
        self.plan, self.halo = plan, halo
        card = plan.card
        self.sampler = TileSampler(list(plan.training), list(plan.validation), card.tile_size, halo, card.num_classes)
        shape = (-1,) + (1,) * card.spatial_dims
        self.mean = np.asarray(card.mean, dtype=np.float32).reshape(shape)
        self.std = np.asarray(card.std, dtype=np.float32).reshape(shape)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        card = self.plan.card
        values = pixels.astype(np.float32) * np.float32(card.scale)
        if card.clip:
            values = np.clip(values, *card.clip)  # as the predictor does
        values = (values - self.mean) / self.std
        # As the predictor does: a missing value is the mean, not a NaN spreading through the tile.
        return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)

    def training(self, epoch: int, rank: int, world: int):
        """This worker's batches of the epoch: (inputs, labels) numpy arrays."""
        plan = self.plan
        per_step = plan.batch_size * world
        tiles = self.sampler.training_tiles(plan.steps_per_epoch * per_step, plan.seed, epoch)
        for step in range(plan.steps_per_epoch):
            mine = tiles[step * per_step + rank * plan.batch_size: step * per_step + (rank + 1) * plan.batch_size]
            inputs, labels = [], []
            for part, origin, code in mine:
                pixels, tile_labels = self.sampler.read(self.sampler.training, part, origin)
                pixels, tile_labels = augment(self.normalise(pixels), tile_labels, code, plan.augment)
                inputs.append(pixels)
                labels.append(tile_labels)
            yield np.stack(inputs), np.stack(labels)

    def validation(self, rank: int, world: int):
        tiles = self.sampler.validation_tiles()
        if len(tiles) > self.plan.validation_tiles:  # evenly spread over every validation part
            keep = np.linspace(0, len(tiles) - 1, self.plan.validation_tiles).round().astype(int)
            tiles = [tiles[i] for i in sorted(set(keep))]
        for part, origin in tiles[rank::world]:
            pixels, labels = self.sampler.read(self.sampler.validation, part, origin)
            yield self.normalise(pixels)[None], labels[None]


def fit_output(logits, labels, tile: int):
    """Logits and labels cut to what both cover: the tile's centre of a larger output, or the
    centre of the labels that a smaller (valid-convolution) output covers."""
    spatial = logits.shape[2:]
    if min(spatial) >= tile:
        cut = tuple(slice((s - tile) // 2, (s - tile) // 2 + tile) for s in spatial)
        return logits[(slice(None), slice(None), *cut)], labels
    cut = tuple(slice((tile - s) // 2, (tile - s) // 2 + s) for s in spatial)
    return logits, labels[(slice(None), *cut)]


def output_heads(output) -> list:
    """A network's output as a list of logits, the full-resolution head first: torchvision's
    {"out", "aux"}, deep supervision's list (UNet++, No New-Net in training), or one tensor."""
    if isinstance(output, dict):
        return [output[key] for key in ("out", "aux") if key in output]
    return list(output) if isinstance(output, (list, tuple)) else [output]


def training_loss(output, labels, card: ModelCard):
    """loss_of the full-resolution head, plus (deep supervision) each further head's against the
    labels resampled to its size, weighted 1, 1/2, 1/4, ... and normalised, as nnU-Net does.
    Returns (loss, the full-resolution logits and the labels they cover)."""
    import torch.nn.functional as F

    heads = output_heads(output)
    logits, covered = fit_output(heads[0].float(), labels, card.tile_size)
    weights = [0.5 ** i for i in range(len(heads))]
    loss = weights[0] * loss_of(logits, covered, card.num_classes)
    for weight, head in zip(weights[1:], heads[1:]):
        head = head.float()
        if head.shape[2:] == logits.shape[2:]:
            resampled = covered
        else:
            resampled = F.interpolate(covered[:, None].float(), size=head.shape[2:], mode="nearest")[:, 0].to(covered.dtype)
        loss = loss + weight * loss_of(head, resampled, card.num_classes)
    return loss / sum(weights), logits, covered


def loss_of(logits, labels, num_classes: int):
    """Cross-entropy plus soft Dice over the labelled pixels."""
    import torch
    import torch.nn.functional as F

    labels = labels.long()
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=NOT_LABELLED)
    labelled = (labels != NOT_LABELLED).unsqueeze(1)
    if not bool(labelled.any()):
        # Nothing to learn here (a coarse head that misses a tile's few labelled pixels, a
        # validation tile of sparse annotations): cross-entropy over no pixel is NaN, which
        # would read as a diverged run. Zero, with zero gradients, unless the logits are not
        # finite themselves.
        return (logits.float().sum() * 0.0).abs()  # abs: 0, not -0, in the metrics
    probabilities = torch.softmax(logits.float(), dim=1) * labelled
    target = F.one_hot(labels.clamp(max=num_classes - 1), num_classes).movedim(-1, 1) * labelled
    axes = (0, *range(2, logits.dim()))
    overlap = (probabilities * target).sum(axes)
    dice = (2 * overlap + 1.0) / (probabilities.sum(axes) + target.sum(axes) + 1.0)
    return cross_entropy + (1 - dice.mean())


def confusion_of(logits, labels, num_classes: int):
    import torch

    predicted = logits.argmax(1).flatten()
    truth = labels.long().flatten()
    keep = truth != NOT_LABELLED
    keys = truth[keep] * num_classes + predicted[keep]
    return torch.bincount(keys, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(confusion: np.ndarray, class_names: list[str]) -> dict:
    """Per-class IoU and Dice from a confusion matrix (rows: reference)."""
    result = {}
    for index, name in enumerate(class_names):
        true_positive = float(confusion[index, index])
        reference, predicted = float(confusion[index].sum()), float(confusion[:, index].sum())
        union = reference + predicted - true_positive
        result[f"iou/{name}"] = true_positive / union if union else None
        result[f"dice/{name}"] = 2 * true_positive / (reference + predicted) if reference + predicted else None
    defined = [v for k, v in result.items() if k.startswith("iou/") and v is not None]
    result["mean_iou"] = float(np.mean(defined)) if defined else None
    defined = [v for k, v in result.items() if k.startswith("dice/") and v is not None]
    result["mean_dice"] = float(np.mean(defined)) if defined else None
    return result


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    plan: TrainingPlan = config["plan"]
    os.environ.update(config.get("environment") or {})  # object-storage settings, never a runtime_env
    progress = config.get("progress")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cuda = plan.device == "cuda"
    configure_torch(plan)
    module = network(plan)
    halo = halo_of(plan, module)
    model = prepare_model(module)
    device = next(model.parameters()).device
    optimiser = torch.optim.AdamW(model.parameters(), lr=plan.learning_rate, weight_decay=1e-4)
    history, first_epoch = [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            from safetensors.torch import load_file

            unwrap(model).load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(device)))
            optimiser.load_state_dict(torch.load(folder / OPTIMISER_FILE, map_location=device, weights_only=True))
            state = json.loads((folder / STATE_FILE).read_text())
        history, first_epoch = state["history"], state["epoch"] + 1
    batches = Batches(plan, halo)
    total_steps = plan.epochs * plan.steps_per_epoch
    names = [c.name for c in plan.card.classes]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    for epoch in range(first_epoch, plan.epochs):
        started = time.perf_counter()
        torch.manual_seed(plan.seed * 1_000_003 + epoch * 1009 + rank)  # dropout and the like, per epoch
        model.train()
        loss_sum, tiles_seen = 0.0, 0
        for step, (inputs, labels) in enumerate(batches.training(epoch, rank, world)):
            for group in optimiser.param_groups:
                group["lr"] = plan.learning_rate * (1 - (epoch * plan.steps_per_epoch + step) / total_steps) ** 0.9
            inputs = torch.from_numpy(inputs).to(device)
            labels = torch.from_numpy(labels).to(device)
            with autocast:
                logits = model(inputs)
            loss, _, _ = training_loss(logits, labels, plan.card)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step_loss = float(loss.detach())
            if not math.isfinite(step_loss):
                raise diverged(step_loss, epoch, step, optimiser.param_groups[0]["lr"])
            loss_sum += step_loss * len(inputs)
            tiles_seen += len(inputs)
            if progress is not None and rank == 0:
                progress.put(("step", epoch, step + 1, loss_sum / tiles_seen))
        training_seconds = time.perf_counter() - started
        model.eval()
        confusion = torch.zeros((plan.card.num_classes,) * 2, dtype=torch.int64, device=device)
        validation_loss, validation_tiles = 0.0, 0
        with torch.no_grad():
            for inputs, labels in batches.validation(rank, world):
                with autocast:
                    logits = model(torch.from_numpy(inputs).to(device))
                loss, logits, labels_t = training_loss(logits, torch.from_numpy(labels).to(device), plan.card)
                validation_loss += float(loss)
                validation_tiles += 1
                confusion += confusion_of(logits, labels_t, plan.card.num_classes)
        totals = torch.tensor([loss_sum, tiles_seen, validation_loss, validation_tiles, training_seconds],
                              dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(confusion)
            dist.all_reduce(totals)
        loss_sum, tiles_seen, validation_loss, validation_tiles, seconds = totals.tolist()
        metrics = {"epoch": epoch + 1, "loss": loss_sum / max(tiles_seen, 1),
                   "validation_loss": validation_loss / validation_tiles if validation_tiles else None,
                   "tiles": int(tiles_seen), "tiles_per_second": tiles_seen / max(seconds / world, 1e-9),
                   **scores(confusion.cpu().numpy(), names),
                   "confusion": confusion.cpu().tolist()}
        history.append(metrics)
        if progress is not None and rank == 0:
            progress.put(("epoch", epoch, plan.steps_per_epoch, metrics))
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                save_checkpoint(Path(folder), unwrap(model), optimiser, epoch, history)
                saved = Checkpoint.from_directory(folder)
            ray.train.report({k: v for k, v in metrics.items() if k != "confusion"}, checkpoint=saved,
                             checkpoint_dir_name=f"epoch-{epoch + 1:04d}")


def diverged(loss: float, epoch: int, step: int, learning_rate: float) -> InputError:
    """A step whose loss is NaN or infinite has already written NaN into every weight (the
    optimiser stepped on its gradients), and each later step and the card would carry it: the
    run stops here, before the epoch's checkpoint, instead of writing a card that labels
    everything as the first class."""
    return InputError("--learning-rate", f"the training loss became {loss} at epoch {epoch + 1}, step {step + 1} "
                                         f"(learning rate {learning_rate:.3g} there): the weights diverged and no "
                                         f"card is written; a lower --learning-rate usually helps (start again in "
                                         f"another --out)")


def configure_torch(plan: TrainingPlan) -> None:
    """On the CPU: a fixed number of threads and deterministic kernels, so that a run computes
    the same sums in the same order every time (and a resumed run what the uninterrupted one did)."""
    import torch

    if plan.device != "cuda":
        torch.set_num_threads(plan.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_checkpoint(folder: Path, module, optimiser, epoch: int, history: list[dict]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(folder / WEIGHTS_FILE))
    torch.save(optimiser.state_dict(), folder / OPTIMISER_FILE)
    # Written last: a folder with state.json holds a whole checkpoint.
    (folder / STATE_FILE).write_text(json.dumps({"epoch": epoch, "history": history}))


def run_training(plan: TrainingPlan, storage_path: str, workers: int, name: str = "training",
                 storage_filesystem=None, keep: int | None = None, progress=None,
                 environment: dict[str, str] | None = None):
    """Train with Ray Train; the result's checkpoint is the last epoch's (Ray Train resumes
    from the checkpoints already in `storage_path`/`name`). `progress`: a ray.util.queue.Queue
    that rank 0 puts ("step", epoch, step, mean loss) and ("epoch", epoch, steps, metrics) on."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"GPU": 1} if plan.device == "cuda" else {"CPU": plan.threads}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"plan": plan, "progress": progress, "environment": environment},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=plan.device == "cuda",
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=keep)),
    )
    return trainer.fit()


def plain_loop_throughput(plan: TrainingPlan, steps: int) -> float:
    """Tiles per second of the same steps in a plain PyTorch loop in this process (the
    benchmark's baseline): same network, tiles, loss and optimiser, no Ray, no DDP."""
    import torch

    configure_torch(plan)
    module = network(plan).to(plan.device)
    halo = halo_of(plan, module)
    optimiser = torch.optim.AdamW(module.parameters(), lr=plan.learning_rate, weight_decay=1e-4)
    batches = Batches(plan, halo)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if plan.device == "cuda" else torch.autocast("cpu", enabled=False)
    module.train()
    seen = 0
    started = time.perf_counter()
    for step, (inputs, labels) in enumerate(batches.training(0, 0, 1)):
        if step == steps:
            break
        inputs, labels = torch.from_numpy(inputs).to(plan.device), torch.from_numpy(labels).to(plan.device)
        with autocast:
            logits = module(inputs)
        loss, _, _ = training_loss(logits, labels, plan.card)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        seen += len(inputs)
    if plan.device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)
