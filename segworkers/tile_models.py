"""Load the model a card describes as a function from a batch of tiles to logits.

    model = load_tile_model(card, device="cuda", threads=2)
    logits = model.forward(batch)  # fp32 tensor (N, C, *input) on model.device -> fp32 logits (N, K, *output)
    logits = model(array)          # the same from and to numpy arrays (references, benchmarks)
    model.halo                     # context (pixels) to read around each tile

The card's runtime options shape the forward pass of torch models: autocast to fp16/bf16
(logits come back fp32), channels_last inputs and weights, torch.compile, CUDA graphs.

One adapter per card format (LOADERS; the torch ones build an nn.Module: MODULE_BUILDERS);
weights only ever come from files:
- onnx: an .onnx graph run by onnxruntime (CUDA provider on a GPU)
- export: a torch.export program (torch.export.save, .pt2), exported at the card's tile size
  with a dynamic batch dimension
- torchscript: a torch.jit.save file (deprecated by torch 2.14; still read)
- smp: segmentation_models_pytorch, either a save_pretrained directory or an architecture and
  encoder by name (`architecture: Unet`, `architecture_options: {encoder_name: resnet34}`) with
  a state-dict file; encoder_weights is always None, so nothing is downloaded
- torchvision: fcn_resnet50/101, deeplabv3_resnet50/101/mobilenet_v3_large,
  lraspp_mobilenet_v3_large with a state-dict file
- registry: a segworkers.models architecture with a state-dict file
State dicts are read from .safetensors, or with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.errors import InputError
from pipelines.model_card import ModelCard, RuntimeOptions, ensure_local_weights
from segworkers.c_heap import keep_freed_memory

logger = logging.getLogger(__name__)

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
    forward: Callable[[Any], Any]
    """fp32 tensor (N, C, *input) on `device` -> fp32 logits tensor (N, K, *output) on the same device."""
    halo: int = 0
    device: str = "cpu"
    memory_format: Any = None
    """The torch memory format the forward pass wants its input in (None: contiguous)."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self.forward(torch.from_numpy(batch).to(self.device)).cpu().numpy()


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
    ensure_local_weights(card)
    keep_freed_memory()  # before the first batch: see segworkers.c_heap
    return LOADERS[card.format](card, device, threads)


def load_onnx_model(card: ModelCard, device: str, threads: int) -> TileModel:
    return TileModel(load_onnx(card, device, threads), card.halo, device)


def load_torch_model(card: ModelCard, device: str, threads: int) -> TileModel:
    """A torch module built by the card format's MODULE_BUILDERS entry, run as the card's runtime
    options say."""
    try:
        module = MODULE_BUILDERS[card.format](card)
    except InputError:
        raise
    except Exception as exc:  # a weights file the runtime rejects is bad input, not a bug
        if damaged := damaged_weights_file(Path(card.weights)):
            raise InputError(card.weights, f"cannot load {card.format} model of card {card.source}: {damaged}") from exc
        raise InputError(card.weights, f"cannot load {card.format} model of card {card.source}: {one_line(exc)}") from exc
    memory_format = channels_last_format(card.spatial_dims) if card.runtime.channels_last else None
    forward = torch_forward(module, device, threads, card.runtime, memory_format)
    return TileModel(forward, card.halo or getattr(module, "halo", 0), device, memory_format)


def load_onnx(card: ModelCard, device: str, threads: int) -> Callable:
    """onnxruntime behind the tensor forward interface (numpy in and out on the host)."""
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
        raise InputError(card.weights, f"cannot load onnx model of card {card.source}: {one_line(exc)}") from exc
    input_name = session.get_inputs()[0].name

    def forward(batch):
        import torch

        inputs = np.ascontiguousarray(batch.cpu().numpy())
        logits = session.run(None, {input_name: inputs})[0].astype(np.float32, copy=False)
        return torch.from_numpy(logits).to(batch.device)

    return forward


def channels_last_format(spatial_dims: int):
    import torch

    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def torch_forward(module, device: str, threads: int, runtime: RuntimeOptions, memory_format=None) -> Callable:
    """The module's forward pass on `device` as the runtime options ask, fp32 logits out.

    Autocast (fp16/bf16) covers the model only: callers take softmax, blend and argmax in fp32.
    torch.compile runs once, on the first batch of each shape (batches have one fixed shape).
    CUDA graphs are captured here (CudaGraphForward) rather than by inductor's "reduce-overhead"
    mode, whose graph trees are per thread: an actor runs its blocks on several threads.
    """
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    module = module.to(device).eval()
    if memory_format is not None:
        module = module.to(memory_format=memory_format)
    device_type = torch.device(device).type
    on_cuda = device_type == "cuda"
    if runtime.cuda_graphs and not on_cuda:
        warn_once(f"CUDA graphs asked for on {device}: ignored (they need a GPU)")
    if runtime.compile:
        module = torch.compile(module, mode="max-autotune-no-cudagraphs" if on_cuda else None, dynamic=False)
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(runtime.precision)

    def run(batch):
        # No autocast cache: it would keep cast weights alive across CUDA graph capture.
        autocast = torch.autocast(device_type, autocast_dtype, cache_enabled=False) if autocast_dtype else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            logits = module(batch.contiguous(memory_format=memory_format or torch.contiguous_format))
        if isinstance(logits, dict):  # torchvision segmentation models
            logits = logits["out"]
        return logits.float()

    if runtime.cuda_graphs and on_cuda:
        return CudaGraphForward(run)
    if runtime.compile:  # compiling (on the first call of each shape) is not thread-safe
        return serialised(run)
    return run


def serialised(function: Callable) -> Callable:
    lock = threading.Lock()

    def call(*args):
        with lock:
            return function(*args)

    return call


class CudaGraphForward:
    """A forward pass captured into one CUDA graph per input shape, then replayed.

    Replays share the graph's static input and output buffers, so calls from several threads
    (each on its own CUDA stream) take turns: one lock on the host, and on the GPU each call's
    stream waits for the previous call's copy of the output before overwriting the input.
    """

    def __init__(self, run: Callable):
        self.run = run
        self.graphs: dict = {}
        self.lock = threading.Lock()
        self.previous_call_done = None

    def __call__(self, batch):
        import torch

        with self.lock:
            stream = torch.cuda.current_stream()
            if self.previous_call_done is not None:
                stream.wait_event(self.previous_call_done)
            key = (tuple(batch.shape), batch.dtype, batch.stride(), batch.device)
            if key not in self.graphs:
                self.graphs[key] = self.capture(batch)
            graph, static_input, static_output = self.graphs[key]
            static_input.copy_(batch)
            graph.replay()
            logits = static_output.clone()
            self.previous_call_done = torch.cuda.Event()
            self.previous_call_done.record(stream)
            return logits

    def capture(self, example):
        import torch

        static_input = example.clone()  # keeps the example's memory format
        # Warm-up off the capture: compilation, autotuning, cuDNN and cuBLAS workspaces.
        warm_up = torch.cuda.Stream(example.device)
        warm_up.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm_up):
            for _ in range(3):
                self.run(static_input)
        torch.cuda.current_stream().wait_stream(warm_up)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the other threads' blocks may synchronise their own streams meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_output = self.run(static_input)
        return graph, static_input, static_output


@functools.cache
def warn_once(message: str) -> None:
    logger.warning(message)


def torchscript_module(card: ModelCard):
    import warnings

    import torch

    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript: the user's card still loads
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(card.weights), map_location="cpu")


def exported_module(card: ModelCard):
    """A torch.export program (torch.export.save, .pt2), its tensors read without unpickling
    anything else: a payload that is not plain tensors is refused, as for state dicts."""
    import types

    import torch

    with _forced_weights_only_loads():
        program = torch.export.load(str(card.weights))
    module = program.module()
    # The graph runs in the mode it was exported in (eval, for inference): eval() has nothing to
    # switch, and an exported module raises NotImplementedError for it.
    module.eval = types.MethodType(lambda self, mode=True: self, module)
    return module


_weights_only_lock = threading.Lock()


@contextlib.contextmanager
def _forced_weights_only_loads():
    """Within: every torch.load (torch.export.load unpickles parts of a .pt2 with it) reads
    tensors only, whatever its caller asks for."""
    import os

    with _weights_only_lock:
        saved = {name: os.environ.pop(name, None)
                 for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None)
                if value is not None:
                    os.environ[name] = value


def smp_module(card: ModelCard):
    """A save_pretrained directory, or an architecture and encoder by name with a state dict."""
    if card.weights.is_dir():
        return smp_pretrained_folder(card.weights)
    return architecture_with_weights(card)


def smp_pretrained_folder(folder: Path):
    """A segmentation_models_pytorch save_pretrained folder (config.json and model.safetensors),
    rebuilt here rather than by smp.from_pretrained: whatever its config says of encoder_weights
    (imagenet, say), nothing is downloaded, and a folder without config.json is an error, not a
    model hub name."""
    import json

    import segmentation_models_pytorch as smp

    config_file = folder / "config.json"
    weights = [folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()]
    if not config_file.is_file() or not weights:
        raise InputError(folder, "not a segmentation_models_pytorch save_pretrained folder (config.json and "
                                 "model.safetensors)")
    config = json.loads(config_file.read_text())
    architecture = config.pop("_model_class", None)
    if not isinstance(architecture, str) or not hasattr(smp, architecture):
        raise InputError(config_file, f"names no segmentation_models_pytorch architecture ({architecture!r})")
    options = {key: value for key, value in config.items() if not key.startswith("_")}
    module = getattr(smp, architecture)(**{**options, "encoder_weights": None})
    module.load_state_dict(load_state_dict_file(weights[0]))
    return module


def architecture_with_weights(card: ModelCard):
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


def architecture_spatial_dims(name: str, options: dict) -> int:
    """3 for a registry network of 3D convolutions (nnunet3d), else 2 (smp and torchvision
    networks are 2D); built on the meta device, so nothing is allocated."""
    import torch
    from torch import nn

    from segworkers import models

    if name not in models.names():
        return 2
    with torch.device("meta"):
        network = models.create(name, num_classes=2, in_channels=1, **options)
    return 3 if any(isinstance(layer, nn.Conv3d) for layer in network.modules()) else 2


def architecture_format(name: str, encoder: str | None = None) -> str:
    """The card format that builds an architecture by its name: a segworkers.models name
    (registry), a torchvision segmentation model, or a segmentation_models_pytorch architecture
    (any case; always smp when an encoder is named)."""
    from segworkers import models

    if encoder is None and name in models.names():
        return "registry"
    if encoder is None and name in TORCHVISION_SEGMENTATION:
        return "torchvision"
    from segmentation_models_pytorch import MODEL_ARCHITECTURES_MAPPING

    if name.lower() in MODEL_ARCHITECTURES_MAPPING:
        return "smp"
    raise InputError("--architecture", f"unknown architecture {name!r}: a segworkers.models name "
                                       f"({', '.join(models.names())}), a torchvision model "
                                       f"({', '.join(TORCHVISION_SEGMENTATION)}) or a segmentation_models_pytorch "
                                       f"architecture ({', '.join(MODEL_ARCHITECTURES_MAPPING)}) with --encoder")


def check_model(card: ModelCard, digest: str | None = None, tile_size: int | None = None) -> None:
    """Load the card's model on the CPU and run one tile through it, in the driver, before any
    work: weights that cannot be read (corrupt, a pickle, another network's), a network that
    fails on the run's tile (the card's, or `tile_size` given by --tile), or one that answers
    with another number of classes than the card lists fail here in one line, instead of in
    every worker after ingest. With the card's `digest`, a card and tile that passed are not
    checked again in this process."""
    import dataclasses

    tile_size = tile_size or card.tile_size
    if digest is not None and (digest, tile_size) in _CHECKED:
        return

    probe = card.with_runtime(precision="fp32", channels_last=False, compile=False, cuda_graphs=False)
    model = load_tile_model(probe, "cpu", threads=1)
    tile_field = "tile.size" if tile_size == card.tile_size else "--tile"
    check_answer(dataclasses.replace(card, tile_size=tile_size), model, tile_field)
    if digest is not None:
        _CHECKED.add((digest, tile_size))


def check_network(card: ModelCard, module) -> None:
    """check_model for a network that has no weights file yet (one about to be trained)."""
    forward = torch_forward(module, "cpu", 1, RuntimeOptions())
    check_answer(card, TileModel(forward, card.halo or getattr(module, "halo", 0)))
    module.train()


def check_answer(card: ModelCard, model: TileModel, tile_field: str = "tile.size") -> None:
    """One zero tile of the card's size (plus the model's halo) through the model: it must run
    and answer (1, classes, *tile) or larger, in finite numbers (a NaN among the weights reaches
    every output). `tile_field` names where the tile size came from."""
    import torch

    side = card.tile_size + 2 * model.halo
    shape = (1, card.in_channels) + (side,) * card.spatial_dims
    try:
        logits = model.forward(torch.zeros(shape))
    except Exception as exc:  # noqa: BLE001 - any failure of the network on this input
        raise InputError(card.source, f"the model does not run on a {side}-pixel tile of {card.in_channels} "
                                      f"band(s) ({tile_field}, tile.halo, input.bands): {one_line(exc)}") from exc
    expected = 2 + card.spatial_dims
    if not isinstance(logits, torch.Tensor) or logits.dim() != expected:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(card.source, f"the model answers a {shape} batch with {got}, not (N, classes, "
                                      f"{', '.join('HW' if card.spatial_dims == 2 else 'DHW')})")
    if logits.shape[1] != card.num_classes:
        raise InputError(card.source, f"the model returns {logits.shape[1]} classes, the card lists "
                                      f"{card.num_classes} under 'classes'")
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise InputError(card.source, f"the model answers a tile of zeros with NaN or infinity ({bad:,} of "
                                      f"{logits.numel():,} values): its weights are damaged or diverged")
    smallest = min(logits.shape[2:])
    if smallest < card.tile_size:
        needed = model.halo + -(-(card.tile_size - smallest) // 2)
        raise InputError(card.source, f"the model returns {tuple(logits.shape[2:])} for {side}-pixel inputs, "
                                      f"smaller than the {card.tile_size}-pixel tile: tile.halo must be at least {needed}")


_CHECKED: set[tuple[str, int]] = set()


CUT_SHORT = "the file is cut short or damaged ({}); copy it again"


def damaged_weights_file(path: Path) -> str | None:
    """What is wrong with a weights file its loader rejected, when it is a copy cut short or
    damaged: a zip archive (torch.save's format, and TorchScript's and torch.export's) without a
    readable central directory, or a safetensors file shorter than its header says. torch says
    "OSError: [Errno 22] Invalid argument" or a miniz error, safetensors "incomplete metadata".
    None when the file looks whole (the loader's own reason stands)."""
    import json
    import zipfile

    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            start = file.read(8)
            if path.suffix == ".safetensors":
                if len(start) < 8:
                    return CUT_SHORT.format(f"{size} bytes, less than a safetensors header")
                header_size = int.from_bytes(start, "little")
                if 8 + header_size > size:
                    return CUT_SHORT.format(f"{size} bytes, its header alone says {8 + header_size}")
                try:
                    header = json.loads(file.read(header_size))
                    data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                                   default=0)
                except (ValueError, TypeError, KeyError, IndexError):
                    return None
                expected = 8 + header_size + data_end
                return CUT_SHORT.format(f"{size} bytes of the {expected} its header names") if size < expected else None
            if not start.startswith(b"PK\x03\x04"):
                return None
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except zipfile.BadZipFile:
        return CUT_SHORT.format("a zip archive, as torch saves, without its end")
    except OSError:
        return None
    return f"the file is damaged (the archive member {broken} does not match its checksum); copy it again" if broken else None


def one_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:500]


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinity."""
    import torch

    return [name for name, tensor in state.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def load_state_dict_file(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if damaged := damaged_weights_file(path):
            raise InputError(path, damaged) from exc
        raise


# Card format -> nn.Module from the card's weights (torch formats).
MODULE_BUILDERS: dict[str, Callable[[ModelCard], Any]] = {
    "export": exported_module,
    "torchscript": torchscript_module,
    "smp": smp_module,
    "torchvision": architecture_with_weights,
    "registry": architecture_with_weights,
}
# Card format -> TileModel; every name in pipelines.model_card.FORMATS has one.
LOADERS: dict[str, Callable[[ModelCard, str, int], TileModel]] = {
    "onnx": load_onnx_model,
    **{name: load_torch_model for name in MODULE_BUILDERS},
}
