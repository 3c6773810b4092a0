"""Load the model a card describes as a function from a batch of tiles to logits.

    model = load_tile_model(card, device="cpu", threads=2)
    logits = model(batch)        # float32 (N, C, *tile) -> float32 (N, K, *tile_out)

One adapter per format: onnx (onnxruntime), torchscript, smp (a save_pretrained directory),
registry (segworkers.models architecture + state-dict file). Weights only ever come from files.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipelines.errors import InputError
from pipelines.model_card import ModelCard

TileModel = Callable[[np.ndarray], np.ndarray]


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
    loaders = {"onnx": load_onnx, "torchscript": load_torchscript, "smp": load_smp, "registry": load_registry}
    try:
        return loaders[card.format](card, device, threads)
    except InputError:
        raise
    except Exception as exc:  # a weights file the runtime rejects is bad input, not a bug
        raise InputError(card.weights, f"cannot load {card.format} model of card {card.source}: {exc}") from exc


def load_onnx(card: ModelCard, device: str, threads: int) -> TileModel:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu or use --device cpu")
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(card.weights), sess_options=options, providers=providers)
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: batch})[0].astype(np.float32, copy=False)

    return run


def wrap_torch_module(module, device: str, threads: int) -> TileModel:
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    module = module.to(device).eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = module(torch.from_numpy(batch).to(device))
        return logits.float().cpu().numpy()

    return run


def load_torchscript(card: ModelCard, device: str, threads: int) -> TileModel:
    import torch

    return wrap_torch_module(torch.jit.load(str(card.weights), map_location=device), device, threads)


def load_smp(card: ModelCard, device: str, threads: int) -> TileModel:
    import segmentation_models_pytorch as smp

    if not card.weights.is_dir():
        raise InputError(card.weights, "an 'smp' model card needs a save_pretrained directory as weights")
    return wrap_torch_module(smp.from_pretrained(str(card.weights)), device, threads)


def load_registry(card: ModelCard, device: str, threads: int) -> TileModel:
    import torch

    from segworkers import models

    module = models.create(card.architecture, num_classes=card.num_classes, in_channels=card.in_channels, **card.architecture_options)
    module.load_state_dict(torch.load(card.weights, map_location="cpu", weights_only=True))
    return wrap_torch_module(module, device, threads)
