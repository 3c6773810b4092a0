"""Model cards: the YAML file that tells a run everything it needs to know about a model.

A card names the model's format and weights, the classes it predicts (names and colours),
which source bands it reads and how to normalise them, and the tile geometry it wants.
Cards are plain data: parsing them needs neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import yaml

from pipelines.errors import InputError

FORMATS = ("onnx", "export", "torchscript", "smp", "torchvision", "registry")
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
    """Positions (0-based, into `bands`) of the inputs the preview shows: red, green, blue; one
    band in grey; two in false colour (red = first, green = second, blue = their mean)."""
    mpp: float | None = None
    """Slides: the resolution the model was trained at, µm per pixel (input.mpp)."""
    postprocess: dict = field(default_factory=dict)
    """`{name: crf, halo: 32, intensity_scale: 1.0, <dense_crf parameters>}` or empty."""
    runtime: RuntimeOptions = RuntimeOptions()
    """Precision and speed options (card section `runtime`, overridden by the CLI: with_runtime)."""
    processing_level: str | None = None
    """The product level the model expects (Sentinel-2 "L1C", "L2A", ...; input.processing_level):
    a source tagged with another level gets a warning."""
    nodata: float | None = None
    """A nodata value sources do not declare themselves (input.nodata)."""
    clip: tuple[float, float] | None = None
    """input.clip [low, high]: values (after `scale`) are clamped to this range before the mean
    and std are applied, as CT models take a window of Hounsfield units."""
    source: str = ""
    weights_uri: str | None = None
    """A card loaded from object storage: where its weights are there (`weights` is the local
    copy; a Ray worker on another machine makes its own: ensure_local_weights)."""

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
        """A hash of everything that changes the model's output: card fields and weights bytes.
        Remembered per process while the weights files keep their size and modification time."""
        card_fields = asdict(self)
        for name in DIGEST_LEAVES_OUT:
            card_fields.pop(name)
        for name in DIGEST_ONLY_WHEN_SET:  # fields newer than the first cards: their digests stay
            if card_fields[name] is None:
                card_fields.pop(name)
        card_fields["weights"] = self.weights.name
        text = json.dumps(card_fields, sort_keys=True, default=str)
        weights_files = sorted(p for p in self.weights.rglob("*") if p.is_file()) if self.weights.is_dir() else [self.weights]
        identity = (text, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in weights_files))
        if identity not in _DIGESTS:
            h = hashlib.sha256(text.encode())
            for path in weights_files:
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
            _DIGESTS[identity] = h.hexdigest()
        return _DIGESTS[identity]


_DIGESTS: dict[tuple, str] = {}
# Fields that do not change what the model outputs.
DIGEST_LEAVES_OUT = ("source", "processing_level", "weights_uri")
DIGEST_ONLY_WHEN_SET = ("nodata", "clip")


def processing_level(text) -> str | None:
    """A product level in one spelling: "Level-1C", "LEVEL1C", "l1c" -> "L1C"."""
    if text is None:
        return None
    compact = re.sub(r"[\s_\-]", "", str(text)).upper().removeprefix("LEVEL")
    return compact if compact.startswith("L") else f"L{compact}"


def builtin_card_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CARDS.glob("*.yaml"))


def load_card(name_or_path: str | Path) -> ModelCard:
    """Load a card from a YAML path or by the name of a built-in card (see builtin_card_names)."""
    from pipelines import storage

    if storage.is_remote(str(name_or_path)):
        uri = str(name_or_path).rstrip("/")
        if not uri.lower().endswith((".yaml", ".yml", ".json")) and storage.exists(storage.join(uri, "card.yaml")):
            uri = storage.join(uri, "card.yaml")  # the prefix `segpipe train --out s3://...` wrote
        return load_remote_card(uri)
    path = Path(name_or_path)
    if path.is_dir():  # the folder `segpipe train --out` wrote
        if not (path / "card.yaml").is_file():
            raise InputError(path, "is a folder without card.yaml: give the model card's YAML file")
        path = path / "card.yaml"
    if not path.exists():
        builtin = BUILTIN_CARDS / f"{name_or_path}.yaml"
        if not builtin.exists():
            known = ", ".join(builtin_card_names())
            raise InputError(name_or_path, f"no such model card file, and not a built-in card ({known}); a card is "
                                           "a YAML file naming the network and its weights (segpipe train writes "
                                           "one)")
        path = builtin
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError as exc:  # a weights file (.pt, .onnx, .safetensors) given as the card
        raise InputError(path, "is not a model card (YAML text) but a binary file: give the card that names it "
                               "under 'weights' (segpipe train writes card.yaml beside its weights)") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot read model card: {exc}") from exc
    if not isinstance(raw, dict):
        raise InputError(path, "model card must be a YAML mapping")
    return parse_card(raw, path)


def load_remote_card(uri: str) -> ModelCard:
    """A card on object storage (s3://.../card.yaml, as `segpipe train --out s3://...` writes):
    the card and its weights file (named relative to it) are copied into a local cache keyed by
    their URIs and versions, and the card is read from there."""
    from pipelines import storage

    try:
        raw = yaml.safe_load(storage.read_bytes(uri))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(uri, f"cannot read model card: {exc}") from exc
    if not isinstance(raw, dict):
        raise InputError(uri, "model card must be a YAML mapping")
    spec = raw.get("weights")
    weights_uri = None
    if isinstance(spec, str) and spec.strip() and not spec.startswith("package://"):
        if Path(spec).is_absolute() or ".." in Path(spec).parts:
            raise InputError(uri, f"model card field 'weights' {spec!r} must name a file beside the card on object storage")
        weights_uri = storage.join(uri.rsplit("/", 1)[0], spec)
    folder = cache_folder(uri, weights_uri)
    card_path = folder / "card.yaml"
    card_path.write_text(yaml.safe_dump(raw))
    if weights_uri is not None:
        fetch_weights(weights_uri, folder / spec)
    return replace(parse_card(raw, card_path), source=uri, weights_uri=weights_uri)


def cache_folder(card_uri: str, weights_uri: str | None) -> Path:
    import tempfile

    from pipelines import storage

    versions = [card_uri, *storage.stat(card_uri)]
    if weights_uri is not None and storage.exists(weights_uri):
        versions += [weights_uri, *storage.stat(weights_uri)]
    key = hashlib.sha256("|".join(map(str, versions)).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "segpipe-cache" / "cards" / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fetch_weights(weights_uri: str, target: Path) -> None:
    """Copy the weights object once (to a partial name, renamed when whole)."""
    from pipelines import storage

    if target.exists():
        return
    if not storage.exists(weights_uri):
        raise InputError(weights_uri, "weights file named by the model card does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    storage.get_file(weights_uri, partial)
    partial.replace(target)


def ensure_local_weights(card: ModelCard) -> None:
    """On a machine that has not got the weights of a card from object storage: fetch them to
    the path the card names."""
    if card.weights_uri is not None and not card.weights.exists():
        fetch_weights(card.weights_uri, card.weights)


# Labels are uint8 and 255 is nodata: at most 255 classes, ids 0..254.
MAX_CLASSES = 255
# The largest tile side a card (or --tile) may ask for: a batch of 8 such 2D tiles of 16 classes
# is 8 GiB of fp32 probabilities; 3D tiles are cubes.
MAX_TILE = {2: 8192, 3: 512}
# Tiles must advance by at least a tenth of their side: beyond, each pixel is computed > 100 times.
MAX_OVERLAP = 0.9
FLOAT32 = np.finfo(np.float32)
CARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")
# The keys of each section of a card (`training` is what `segpipe train` records; `description`
# is for people).
CARD_KEYS = ("name", "version", "format", "weights", "spatial_dims", "architecture", "architecture_options", "tile",
             "input", "classes", "runtime", "postprocess", "training", "description")
TILE_KEYS = ("size", "overlap", "halo", "fixed_size")
INPUT_KEYS = ("bands", "band_names", "scale", "mean", "std", "preview_bands", "mpp", "processing_level", "nodata", "clip")
CLASS_KEYS = ("id", "name", "color")
# The dense CRF's parameters (segworkers.crf.dense_crf), and what each must be.
CRF_PARAMETERS = {"iterations": "count", "w_appearance": "weight", "theta_alpha": "positive", "theta_beta": "positive",
                  "w_smoothness": "weight", "theta_gamma": "positive"}
POSTPROCESS_KEYS = ("name", "halo", "intensity_scale", *CRF_PARAMETERS)


class CardFields:
    """Typed access to a card's YAML mapping; every problem is an InputError naming the card
    and the field, as `input.std[2]` or `tile.size`."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, problem: str):
        raise InputError(self.path, f"model card field '{field}' {problem}")

    def need(self, mapping: dict, key: str, where: str = ""):
        if not isinstance(mapping, dict):
            self.fail(where.rstrip(".") or key, f"must be a mapping, not {mapping!r}")
        if key not in mapping:
            raise InputError(self.path, f"model card is missing '{where}{key}'")
        return mapping[key]

    def integer(self, value, field: str, low: int | None = None, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"must be a whole number, not {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(field, f"must be {_bounds(low, high)}, not {value}")
        return value

    def number(self, value, field: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(field, f"must be a finite number, not {value!r}")
        if positive and value <= 0:
            self.fail(field, f"must be greater than 0, not {value!r}")
        return float(value)

    def sequence(self, value, field: str) -> list:
        if not isinstance(value, (list, tuple)) or not value:
            self.fail(field, f"must be a non-empty list, not {value!r}")
        return list(value)

    def boolean(self, value, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, not {value!r}")
        return value

    def float32(self, value: float, field: str) -> float:
        """A number the worker can use: it normalises in float32, where 1e300 is infinite and
        1e-300 is 0."""
        if abs(value) > float(FLOAT32.max) or (value != 0 and abs(value) < float(FLOAT32.tiny)):
            self.fail(field, f"is {value!r}, out of float32's range (the worker normalises in float32)")
        return value

    def known_keys(self, mapping: dict, section: str, known: tuple[str, ...]) -> None:
        """A key the card format does not have is a typo to name (`input.scael`), not something to ignore."""
        if not isinstance(mapping, dict):
            self.fail(section.rstrip(".") or "card", f"must be a mapping, not {mapping!r}")
        unknown = [key for key in mapping if key not in known]
        if unknown:
            raise InputError(self.path, f"unknown key '{section}{unknown[0]}' in model card (expected one of "
                                        f"{', '.join(known)})")


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def parse_card(raw: dict, path: Path) -> ModelCard:
    fields_ = CardFields(path)
    need = fields_.need
    fields_.known_keys(raw, "", CARD_KEYS)
    name = need(raw, "name")
    if not isinstance(name, str) or not CARD_NAME.match(name):
        fields_.fail("name", f"must be 1-100 letters, digits, spaces, '.', '_' or '-', starting with a letter or "
                             f"digit, not {name!r}")
    fmt = need(raw, "format")
    if fmt not in FORMATS:
        raise InputError(path, f"unknown model format '{fmt}' (expected one of {', '.join(FORMATS)})")
    spatial_dims = raw.get("spatial_dims", 2)
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in (2, 3):
        fields_.fail("spatial_dims", f"must be 2 or 3, not {spatial_dims!r}")
    inputs = need(raw, "input")
    fields_.known_keys(inputs, "input.", INPUT_KEYS)
    tile = need(raw, "tile")
    fields_.known_keys(tile, "tile.", TILE_KEYS)
    bands = tuple(
        b if isinstance(b, str) and b.strip() else fields_.integer(b, f"input.bands[{i}]", low=1)
        for i, b in enumerate(fields_.sequence(need(inputs, "bands", "input."), "input.bands"))
    )
    mean = tuple(fields_.float32(fields_.number(m, f"input.mean[{i}]"), f"input.mean[{i}]")
                 for i, m in enumerate(fields_.sequence(inputs.get("mean", [0.0] * len(bands)), "input.mean")))
    std = tuple(fields_.float32(fields_.number(v, f"input.std[{i}]", positive=True), f"input.std[{i}]")
                for i, v in enumerate(fields_.sequence(inputs.get("std", [1.0] * len(bands)), "input.std")))
    if not (len(mean) == len(std) == len(bands)):
        raise InputError(path, f"input.mean ({len(mean)}), input.std ({len(std)}) and input.bands ({len(bands)}) differ in length")
    scale = fields_.float32(fields_.number(inputs.get("scale", 1.0), "input.scale"), "input.scale")
    if scale == 0:
        fields_.fail("input.scale", "must not be 0 (every pixel would be the same)")
    listed = fields_.sequence(need(raw, "classes"), "classes")
    if len(listed) > MAX_CLASSES:
        fields_.fail("classes", f"lists {len(listed)} classes; at most {MAX_CLASSES} (label 255 means nodata)")
    classes = []
    for i, c in enumerate(listed):
        fields_.known_keys(c, f"classes[{i}].", CLASS_KEYS)
        class_id = fields_.integer(need(c, "id", f"classes[{i}]."), f"classes[{i}].id")
        class_name = need(c, "name", f"classes[{i}].")
        if not isinstance(class_name, str) or not class_name.strip():
            fields_.fail(f"classes[{i}].name", f"must be a non-empty text, not {class_name!r}")
        colour = parse_color(c["color"], path) if "color" in c else default_colour(class_id)
        classes.append(ClassInfo(class_id, class_name, colour))
    if [c.id for c in classes] != list(range(len(classes))):
        raise InputError(path, "classes must be listed with ids 0, 1, 2, ... in order")
    seen: dict[str, int] = {}
    for c in classes:
        if c.name.lower() in seen:
            fields_.fail(f"classes[{c.id}].name", f"repeats the name of classes[{seen[c.name.lower()]}] ({c.name!r})")
        seen[c.name.lower()] = c.id
    tile_size = fields_.integer(need(tile, "size", "tile."), "tile.size", low=1, high=MAX_TILE[spatial_dims])
    overlap = fields_.number(tile.get("overlap", 0.25), "tile.overlap")
    if not 0 <= overlap <= MAX_OVERLAP:
        fields_.fail("tile.overlap", f"must be between 0 and {MAX_OVERLAP}, not {overlap}")
    halo = fields_.integer(tile.get("halo", 0), "tile.halo", low=0, high=tile_size)
    listed_preview = inputs.get("preview_bands", list(range(min(3, len(bands)))))
    preview_bands = tuple(fields_.integer(b, f"input.preview_bands[{i}]", low=0, high=len(bands) - 1)
                          for i, b in enumerate(fields_.sequence(listed_preview, "input.preview_bands")))
    if len(preview_bands) not in (1, 2, 3):
        fields_.fail("input.preview_bands", f"must list 1 (grey), 2 (false colour) or 3 (red, green, blue) "
                                            f"positions in input.bands, not {len(preview_bands)}")
    mpp = inputs.get("mpp")
    band_names = inputs.get("band_names", [f"band{b}" for b in bands])
    if len(fields_.sequence(band_names, "input.band_names")) != len(bands):
        fields_.fail("input.band_names", f"names {len(band_names)} bands, input.bands has {len(bands)}")
    postprocess = raw.get("postprocess") or {}
    if not isinstance(postprocess, dict):
        fields_.fail("postprocess", f"must be a mapping, not {postprocess!r}")
    if postprocess:
        fields_.known_keys(postprocess, "postprocess.", POSTPROCESS_KEYS)
        fields_.integer(postprocess.get("halo", 32), "postprocess.halo", low=0, high=tile_size)
        fields_.number(postprocess.get("intensity_scale", 1.0), "postprocess.intensity_scale", positive=True)
        for key, kind in CRF_PARAMETERS.items():
            if key in postprocess:
                if kind == "count":
                    fields_.integer(postprocess[key], f"postprocess.{key}", low=1, high=1000)
                else:
                    value = fields_.number(postprocess[key], f"postprocess.{key}", positive=kind == "positive")
                    if value < 0:
                        fields_.fail(f"postprocess.{key}", f"must not be negative, not {value!r}")
    options = raw.get("architecture_options", {})
    if not isinstance(options, dict):
        fields_.fail("architecture_options", f"must be a mapping, not {options!r}")
    card = ModelCard(
        name=name,
        version=str(raw.get("version", "0")),
        format=fmt,
        weights=resolve_weights(need(raw, "weights"), path, folder_weights=fmt == "smp"),
        classes=tuple(classes),
        bands=bands,
        band_names=tuple(str(b) for b in band_names),
        scale=scale,
        mean=mean,
        std=std,
        tile_size=tile_size,
        overlap=overlap,
        fixed_tile_size=fields_.boolean(tile.get("fixed_size", False), "tile.fixed_size"),
        halo=halo,
        spatial_dims=spatial_dims,
        architecture=raw.get("architecture"),
        architecture_options=dict(options),
        preview_bands=preview_bands,
        mpp=fields_.number(mpp, "input.mpp", positive=True) if mpp is not None else None,
        processing_level=processing_level(inputs.get("processing_level")),
        nodata=fields_.number(inputs["nodata"], "input.nodata") if inputs.get("nodata") is not None else None,
        clip=parse_clip(inputs.get("clip"), fields_),
        postprocess=dict(postprocess),
        runtime=parse_runtime(raw.get("runtime"), path),
        source=str(path),
    )
    if card.postprocess and card.postprocess.get("name") != "crf":
        raise InputError(path, f"unknown postprocess {card.postprocess.get('name')!r} (expected 'crf')")
    if card.format in ("registry", "torchvision") and not card.architecture:
        raise InputError(path, f"a '{card.format}' model card must name its 'architecture'")
    check_runtime(card.runtime, card.format, path)
    return card


def parse_clip(value, fields_: CardFields) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        fields_.fail("input.clip", f"must be [low, high], not {value!r}")
    low, high = (fields_.number(v, f"input.clip[{i}]") for i, v in enumerate(value))
    if not low < high:
        fields_.fail("input.clip", f"must have low < high, not {list(value)!r}")
    return low, high


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


def resolve_weights(spec, card_path: Path, folder_weights: bool = False) -> Path:
    """Weights are a path relative to the card, or package://PACKAGE/FILE inside an installed
    package; a regular file (or, with `folder_weights` (smp), a save_pretrained folder)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(card_path, f"model card field 'weights' must be a file name, not {spec!r}")
    if spec.startswith("package://"):
        package, _, relative = spec.removeprefix("package://").partition("/")
        if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise InputError(card_path, f"model card field 'weights' {spec!r} must name a file inside the package "
                                        "(package://PACKAGE/FILE, no '..')")
        try:
            root = Path(str(importlib.resources.files(package)))
        except ModuleNotFoundError as exc:
            raise InputError(card_path, f"weights package '{package}' is not installed") from exc
        except (TypeError, ValueError) as exc:
            raise InputError(card_path, f"model card field 'weights' {spec!r}: '{package}' is not a package") from exc
        weights = root / relative
    else:
        weights = (card_path.parent / spec).resolve()
    if not weights.exists():
        raise InputError(weights, f"weights file named by model card {card_path} does not exist")
    if not (weights.is_file() or (weights.is_dir() and folder_weights)):
        raise InputError(weights, f"weights named by model card {card_path} are not a regular file")
    if weights.is_dir() and not (weights / "config.json").is_file():  # checked before its files are hashed
        raise InputError(weights, f"weights folder named by model card {card_path} has no config.json: not a "
                                  "segmentation_models_pytorch save_pretrained folder")
    return weights


# Colours for classes nobody gave one (a card without colours, a trained card's classes from
# label values): distinct on a map and on H&E, the first two telling background from foreground.
DEFAULT_COLOURS = ((128, 128, 128), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def default_colour(class_id: int) -> tuple[int, int, int]:
    if class_id < len(DEFAULT_COLOURS):
        return DEFAULT_COLOURS[class_id]
    # Beyond the list: spread over the hues by the golden angle.
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618034) % 1.0, 0.75, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def card_document(card: ModelCard, weights: str, extra: dict | None = None) -> dict:
    """The YAML mapping of a card (what parse_card reads back as the same card), its weights
    named `weights` relative to the card file; `extra` adds sections parse_card leaves alone
    (a trained card's `training`)."""
    inputs = {"bands": list(card.bands), "band_names": list(card.band_names), "scale": card.scale,
              "mean": list(card.mean), "std": list(card.std), "preview_bands": list(card.preview_bands)}
    for key, value in (("mpp", card.mpp), ("processing_level", card.processing_level), ("nodata", card.nodata),
                       ("clip", list(card.clip) if card.clip else None)):
        if value is not None:
            inputs[key] = value
    document = {
        "name": card.name, "version": card.version, "format": card.format, "weights": weights,
        "spatial_dims": card.spatial_dims,
        **({"architecture": card.architecture} if card.architecture else {}),
        **({"architecture_options": dict(card.architecture_options)} if card.architecture_options else {}),
        "tile": {"size": card.tile_size, "overlap": card.overlap, "halo": card.halo,
                 **({"fixed_size": True} if card.fixed_tile_size else {})},
        "input": inputs,
        "classes": [{"id": c.id, "name": c.name, "color": "#%02x%02x%02x" % c.color} for c in card.classes],
    }
    if card.runtime != RuntimeOptions():
        document["runtime"] = asdict(card.runtime)
    if card.postprocess:
        document["postprocess"] = dict(card.postprocess)
    return {**document, **(extra or {})}


def parse_color(value, path: Path) -> tuple[int, int, int]:
    if isinstance(value, str) and re.fullmatch(r"#[0-9A-Fa-f]{6}", value):
        return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
        return tuple(value)
    raise InputError(path, f"class colour {value!r} is neither '#rrggbb' nor [r, g, b] with values 0-255")
