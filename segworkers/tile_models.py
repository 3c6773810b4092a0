"""Load the model a card describes as a function from a batch of tiles to logits.

    model = load_tile_model(card, device="cpu", threads=2)
    logits = model(batch)        # float32 (N, C, *input) -> float32 (N, K, *output)
    model.halo                   # context (pixels) to read around each tile

One adapter per card format; weights only ever come from files:
- onnx: an .onnx graph run by onnxruntime (CUDA provider on a GPU)
- torchscript: a torch.jit.save file
- smp: segmentation_models_pytorch, either a save_pretrained directory or an architecture and
  encoder by name (`architecture: Unet`, `architecture_options: {encoder_name: resnet34}`) with
  a state-dict file; encoder_weights is always None, so nothing is downloaded
- torchvision: fcn_resnet50/101, deeplabv3_resnet50/101/mobilenet_v3_large,
  lraspp_mobilenet_v3_large with a state-dict file
- registry: a segworkers.models architecture with a state-dict file
State dicts are read from .safetensors, or with torch.load(weights_only=True).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines.errors import InputError
from pipelines.model_card import ModelCard

TORCHVISION_SEGMENTATION = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)


@dataclass(frozen=True)
class TileModel:
    run: Callable[[np.ndarray], np.ndarray]
    halo: int = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)


def best_device(card: ModelCard) -> str:
    """cuda when there is a GPU that this card's runtime can use, else cpu."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if card.format == "onnx":
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return "cuda"


def load_tile_model(card: ModelCard, device: str, threads: int) -> TileModel:
    if card.format == "onnx":
        return TileModel(load_onnx(card, device, threads), card.halo)
    try:
        module = build_torch_module(card)
    except InputError:
        raise
    except Exception as exc:  # a weights file the runtime rejects is bad input, not a bug
        raise InputError(card.weights, f"cannot load {card.format} model of card {card.source}: {exc}") from exc
    return TileModel(wrap_torch_module(module, device, threads), card.halo or getattr(module, "halo", 0))


def load_onnx(card: ModelCard, device: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu or use --device cpu")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(card.weights), sess_options=options, providers=providers)
    except Exception as exc:
        raise InputError(card.weights, f"cannot load onnx model of card {card.source}: {exc}") from exc
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: batch})[0].astype(np.float32, copy=False)

    return run


def wrap_torch_module(module, device: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    module = module.to(device).eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = module(torch.from_numpy(batch).to(device))
        if isinstance(logits, dict):  # torchvision segmentation models
            logits = logits["out"]
        return logits.float().cpu().numpy()

    return run


def build_torch_module(card: ModelCard):
    import torch

    if card.format == "torchscript":
        return torch.jit.load(str(card.weights), map_location="cpu")
    if card.format == "smp" and card.weights.is_dir():
        import segmentation_models_pytorch as smp

        return smp.from_pretrained(str(card.weights))
    module = build_architecture(card)
    module.load_state_dict(load_state_dict_file(card.weights))
    return module


def build_architecture(card: ModelCard, device: str | None = None):
    """The untrained network a card names (smp, torchvision or registry), ready for its weights."""
    import torch

    if not card.architecture:
        raise InputError(card.source, f"a '{card.format}' model card with a weights file must name its 'architecture'")
    with torch.device(device or "cpu"):
        if card.format == "smp":
            import segmentation_models_pytorch as smp

            options = {**card.architecture_options, "encoder_weights": None}
            return smp.create_model(card.architecture, in_channels=card.in_channels, classes=card.num_classes, **options)
        if card.format == "torchvision":
            import torchvision.models.segmentation as tvseg

            if card.architecture not in TORCHVISION_SEGMENTATION:
                raise InputError(card.source, f"unknown torchvision model '{card.architecture}' ({', '.join(TORCHVISION_SEGMENTATION)})")
            if card.in_channels != 3:
                raise InputError(card.source, f"torchvision segmentation models take 3 bands, the card gives {card.in_channels}")
            options = {"aux_loss": False, **card.architecture_options, "weights": None, "weights_backbone": None}
            return getattr(tvseg, card.architecture)(num_classes=card.num_classes, **options)
        from segworkers import models

        try:
            return models.create(card.architecture, num_classes=card.num_classes, in_channels=card.in_channels, **card.architecture_options)
        except KeyError as exc:
            raise InputError(card.source, str(exc.args[0])) from exc


def load_state_dict_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
