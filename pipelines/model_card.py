"""Model cards: the YAML file that tells a run everything it needs to know about a model.

A card names the model's format and weights, the classes it predicts (names and colours),
which source bands it reads and how to normalise them, and the tile geometry it wants.
Cards are plain data: parsing them needs neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from pipelines.errors import InputError

FORMATS = ("onnx", "torchscript", "smp", "torchvision", "registry")
PRECISIONS = ("fp32", "fp16", "bf16")
BUILTIN_CARDS = Path(__file__).with_name("cards")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a torch model is run: speed options that may change outputs slightly, never their meaning.

    precision: "fp32", or "fp16" / "bf16" autocast of the forward pass (softmax, blending and
    argmax stay fp32). channels_last: NHWC memory format for the model's input and weights.
    compile: torch.compile the model once per worker. cuda_graphs: capture the forward in CUDA
    graphs (batches are always padded to one fixed size, so shapes are static); CUDA only, ignored
    with a warning on the CPU. ONNX models run in onnxruntime: only fp32 without compile is
    accepted for them (a card or override asking more is an InputError); channels_last and
    cuda_graphs are ignored there. TorchScript models cannot be compiled (InputError).
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    format: str
    weights: Path
    classes: tuple[ClassInfo, ...]
    bands: tuple[int | str, ...]
    """Source bands in the order the model expects them: 1-based indexes, or band names (e.g. a
    GeoTIFF's band descriptions), resolved against each source by pipelines.sources."""
    band_names: tuple[str, ...]
    scale: float
    """Multiplier applied to raw pixel values before normalisation (e.g. 1e-4 for S2 DN)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tile_size: int
    overlap: float
    fixed_tile_size: bool
    """True when the model accepts only tile_size inputs (e.g. an ONNX graph with static shape)."""
    halo: int = 0
    """Context margin in pixels read around each tile (0: the model's own `halo`, if it declares one)."""
    spatial_dims: int = 2
    architecture: str | None = None
    architecture_options: dict = field(default_factory=dict)
    preview_bands: tuple[int, ...] = ()
    """Positions (0-based, into `bands`) of the red, green, blue inputs used for the preview."""
    mpp: float | None = None
    """Slides: the resolution the model was trained at, µm per pixel (input.mpp)."""
    postprocess: dict = field(default_factory=dict)
    """`{name: crf, halo: 32, intensity_scale: 1.0, <dense_crf parameters>}` or empty."""
    runtime: RuntimeOptions = RuntimeOptions()
    """Precision and speed options (card section `runtime`, overridden by the CLI: with_runtime)."""
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return len(self.bands)

    @property
    def block_margin(self) -> int:
        """Pixels around each block whose probabilities post-processing needs (the CRF's halo)."""
        return int(self.postprocess.get("halo", 32)) if self.postprocess else 0

    def with_runtime(
        self,
        precision: str | None = None,
        channels_last: bool | None = None,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
    ) -> ModelCard:
        """A copy of this card whose runtime options are overridden by the arguments that are not None."""
        given = {"precision": precision, "channels_last": channels_last, "compile": compile, "cuda_graphs": cuda_graphs}
        overrides = {key: value for key, value in given.items() if value is not None}
        runtime = replace(self.runtime, **overrides)
        check_runtime(runtime, self.format, self.source or self.name)
        return replace(self, runtime=runtime)

    def digest(self) -> str:
        """A hash of everything that changes the model's output: card fields and weights bytes."""
        h = hashlib.sha256()
        card_fields = asdict(self)
        card_fields.pop("source")
        card_fields["weights"] = self.weights.name
        h.update(json.dumps(card_fields, sort_keys=True, default=str).encode())
        weights_files = sorted(p for p in self.weights.rglob("*") if p.is_file()) if self.weights.is_dir() else [self.weights]
        for path in weights_files:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()


def builtin_card_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CARDS.glob("*.yaml"))


def load_card(name_or_path: str | Path) -> ModelCard:
    """Load a card from a YAML path or by the name of a built-in card (see builtin_card_names)."""
    path = Path(name_or_path)
    if not path.exists():
        builtin = BUILTIN_CARDS / f"{name_or_path}.yaml"
        if not builtin.exists():
            known = ", ".join(builtin_card_names())
            raise InputError(name_or_path, f"no such model card file, and not a built-in card ({known})")
        path = builtin
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot read model card: {exc}") from exc
    if not isinstance(raw, dict):
        raise InputError(path, "model card must be a YAML mapping")
    return parse_card(raw, path)


def parse_card(raw: dict, path: Path) -> ModelCard:
    def need(mapping: dict, key: str, where: str = ""):
        if key not in mapping:
            raise InputError(path, f"model card is missing '{where}{key}'")
        return mapping[key]

    fmt = need(raw, "format")
    if fmt not in FORMATS:
        raise InputError(path, f"unknown model format '{fmt}' (expected one of {', '.join(FORMATS)})")
    inputs = need(raw, "input")
    tile = need(raw, "tile")
    bands = tuple(b if isinstance(b, str) else int(b) for b in need(inputs, "bands", "input."))
    mean = tuple(float(m) for m in inputs.get("mean", [0.0] * len(bands)))
    std = tuple(float(s) for s in inputs.get("std", [1.0] * len(bands)))
    if not (len(mean) == len(std) == len(bands)):
        raise InputError(path, f"input.mean ({len(mean)}), input.std ({len(std)}) and input.bands ({len(bands)}) differ in length")
    classes = tuple(
        ClassInfo(int(c["id"]), str(c["name"]), parse_color(c.get("color", "#808080"), path))
        for c in need(raw, "classes")
    )
    if [c.id for c in classes] != list(range(len(classes))):
        raise InputError(path, "classes must be listed with ids 0, 1, 2, ... in order")
    card = ModelCard(
        name=str(need(raw, "name")),
        version=str(raw.get("version", "0")),
        format=fmt,
        weights=resolve_weights(str(need(raw, "weights")), path),
        classes=classes,
        bands=bands,
        band_names=tuple(str(b) for b in inputs.get("band_names", [f"band{b}" for b in bands])),
        scale=float(inputs.get("scale", 1.0)),
        mean=mean,
        std=std,
        tile_size=int(need(tile, "size", "tile.")),
        overlap=float(tile.get("overlap", 0.25)),
        fixed_tile_size=bool(tile.get("fixed_size", False)),
        halo=int(tile.get("halo", 0)),
        spatial_dims=int(raw.get("spatial_dims", 2)),
        architecture=raw.get("architecture"),
        architecture_options=dict(raw.get("architecture_options", {})),
        preview_bands=tuple(int(b) for b in inputs.get("preview_bands", range(min(3, len(bands))))),
        mpp=float(inputs["mpp"]) if inputs.get("mpp") is not None else None,
        postprocess=dict(raw.get("postprocess") or {}),
        runtime=parse_runtime(raw.get("runtime"), path),
        source=str(path),
    )
    if card.postprocess and card.postprocess.get("name") != "crf":
        raise InputError(path, f"unknown postprocess {card.postprocess.get('name')!r} (expected 'crf')")
    if card.format in ("registry", "torchvision") and not card.architecture:
        raise InputError(path, f"a '{card.format}' model card must name its 'architecture'")
    check_runtime(card.runtime, card.format, path)
    return card


def parse_runtime(section, path: Path) -> RuntimeOptions:
    """The card's optional `runtime: {precision, channels_last, compile, cuda_graphs}` section."""
    if section is None:
        return RuntimeOptions()
    if not isinstance(section, dict):
        raise InputError(path, f"model card 'runtime' must be a mapping, not {section!r}")
    known = [f.name for f in fields(RuntimeOptions)]
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise InputError(path, f"unknown key 'runtime.{unknown[0]}' in model card (expected {', '.join(known)})")
    return RuntimeOptions(**section)


def check_runtime(runtime: RuntimeOptions, fmt: str, where) -> None:
    """Reject bad runtime values, and options the model's format cannot honour (ONNX: fp32 and
    no compile; TorchScript: no compile)."""
    if runtime.precision not in PRECISIONS:
        raise InputError(where, f"model card 'runtime.precision' is {runtime.precision!r} (expected one of {', '.join(PRECISIONS)})")
    for key in ("channels_last", "compile", "cuda_graphs"):
        if not isinstance(getattr(runtime, key), bool):
            raise InputError(where, f"model card 'runtime.{key}' is {getattr(runtime, key)!r} (expected true or false)")
    if fmt == "onnx" and (runtime.precision != "fp32" or runtime.compile):
        raise InputError(where, "an ONNX model runs in onnxruntime: 'runtime.precision' must be fp32 and 'runtime.compile' false")
    if fmt == "torchscript" and runtime.compile:
        raise InputError(where, "torch.compile cannot compile a TorchScript model: 'runtime.compile' must be false")


def resolve_weights(spec: str, card_path: Path) -> Path:
    """Weights are a path relative to the card, or package://PACKAGE/FILE inside an installed package."""
    if spec.startswith("package://"):
        package, _, relative = spec.removeprefix("package://").partition("/")
        try:
            weights = Path(str(importlib.resources.files(package).joinpath(relative)))
        except ModuleNotFoundError as exc:
            raise InputError(card_path, f"weights package '{package}' is not installed") from exc
    else:
        weights = (card_path.parent / spec).resolve()
    if not weights.exists():
        raise InputError(weights, f"weights file named by model card {card_path} does not exist")
    return weights


def parse_color(value, path: Path) -> tuple[int, int, int]:
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(int(v) for v in value)
    raise InputError(path, f"class colour {value!r} is neither '#rrggbb' nor [r, g, b]")
