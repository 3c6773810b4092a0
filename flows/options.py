"""The options of a run, as one typed object that the CLI, the Prefect flow, `segpipe deploy` and
the benchmarks all build the same way.

    options = RunOptions(tile=512, outputs=("labels", "preview", "probabilities"), workers=2)
    resolved = options.resolved(card)   # the card's defaults and the machine's filled in

The fields fall in three groups (`FIELD_GROUPS`):
- outputs: change what is written; they go into each image's manifest key, so that changing
  one segments the archive again;
- model: the card's runtime overrides (precision, channels_last, compile, cuda_graphs); they
  change the card, whose digest is in the manifest key too;
- execution: only change how the work is done (block, workers, concurrency, Ray address...):
  the labels are the same whatever they are.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines import storage
from pipelines.errors import InputError
from pipelines.model_card import MAX_OVERLAP, MAX_TILE, ModelCard, load_card
from pipelines.outputs import DEFAULT_OUTPUTS, check_output_names

DEFAULT_BATCH = 4
DEFAULT_MAX_PIXELS = 10_000_000_000
DEFAULT_BLOCK = 2048
DEFAULT_BLOCK_3D = 128
BLOCK_TILES_ON_GPU = 8


def _group(name: str) -> dict:
    return {"json_schema_extra": {"group": name}}


class RunOptions(BaseModel):
    """How to segment: every option of `segpipe segment`, `segpipe run` and the segment-archive
    flow besides the images, the model card and the output root. None means: the card's or the
    machine's default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str | None = Field(None, description="the run's name in the statistics (default: today's date); "
                                                 "re-running a run id replaces its own rows", **_group("run"))
    tile: int | None = Field(None, description="tile side in pixels (default: the card's)", **_group("outputs"))
    overlap: float | None = Field(None, description="tile overlap fraction, 0 to 0.9 (default: the card's)",
                                  **_group("outputs"))
    blending: Literal["gaussian", "constant"] = Field(
        "gaussian", description="weights of overlapping tiles (default gaussian, sigma = tile / 8)", **_group("outputs"))
    tta: bool = Field(False, description="test-time augmentation: average over all flips", **_group("outputs"))
    outputs: tuple[str, ...] = Field(
        DEFAULT_OUTPUTS, description="what to write per image (default labels,preview; also labels-tiff, "
                                     "probabilities, or an output by its name)", **_group("outputs"))
    nodata: float | None = Field(None, description="a pixel whose every band has this value is nodata (for files "
                                                   "that do not say; overrides the file and the card's input.nodata)",
                                 **_group("outputs"))
    vector_simplify: float = Field(0.0, description="simplify the class polygons (--vector) to this tolerance in "
                                                    "pixels; their areas stay those of the pixels (default 0: exact)",
                                   **_group("outputs"))
    regions: str | None = Field(None, description="a GeoPackage or GeoJSON of regions: also write per region x class "
                                                  "areas", **_group("outputs"))
    region_id: str | None = Field(None, description="the regions' id field (default: 'id' or 'name', else the "
                                                    "feature id)", **_group("outputs"))
    precision: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="torch models: compute in this precision (autocast); blending stays fp32 (default: the "
                          "card's, fp32)", **_group("model"))
    channels_last: bool | None = Field(None, description="torch models: channels-last inputs", **_group("model"))
    compile: bool | None = Field(None, description="torch models: torch.compile the network", **_group("model"))
    cuda_graphs: bool | None = Field(
        None, description="torch models on a GPU: replay the network as a CUDA graph (batches have one fixed shape)",
        **_group("model"))
    batch: int | None = Field(None, description=f"tiles per model call (default {DEFAULT_BATCH})",
                              **_group("execution"))
    block: int | None = Field(None, description="output block (= Zarr shard) side in pixels (default 2048; on a GPU "
                                                "8 tiles, at least 2048)", **_group("execution"))
    device: Literal["cpu", "cuda"] | None = Field(
        None, description="default: cuda when the model's runtime can use a GPU", **_group("execution"))
    workers: int | None = Field(None, description="number of Ray actors (default: one per GPU, or CPUs / 2)",
                                **_group("execution"))
    concurrency: int = Field(2, description="images in progress at once (segpipe run; default 2)",
                             **_group("execution"))
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, description="refuse an image of more pixels (voxels) than this: a file whose header "
                                        "claims more is more likely broken than real (default 10000000000, 10 Gpx)",
        **_group("execution"))
    ray_address: str | None = Field(
        None, description="join this Ray cluster (head host:port, 'auto', or ray://host:10001) instead of starting a "
                          "local one (default: $RAY_ADDRESS)", **_group("execution"))

    def resolved(self, card: ModelCard) -> RunOptions:
        """These options with the card's and the machine's defaults filled in, checked."""
        from segworkers.tile_models import best_device

        check_output_names(self.outputs)
        for name in ("tile", "batch", "block", "workers", "concurrency", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')}", f"must be at least 1, got {value}")
        tile = self.tile or card.tile_size
        if card.fixed_tile_size and tile != card.tile_size:
            raise InputError(card.source, f"model '{card.name}' takes only {card.tile_size}-pixel tiles, not {tile}")
        if tile > MAX_TILE[card.spatial_dims]:
            raise InputError("--tile", f"must be at most {MAX_TILE[card.spatial_dims]} for a {card.spatial_dims}D "
                                       f"model, got {tile}")
        overlap = card.overlap if self.overlap is None else self.overlap
        if not 0 <= overlap <= MAX_OVERLAP:
            raise InputError("--overlap", f"must be between 0 and {MAX_OVERLAP}, got {overlap}")
        device = self.device or best_device(card)
        block = self.block or default_block(card.spatial_dims, tile, device)
        block = -(-max(block, tile) // tile) * tile  # a whole number of tile-sized chunks per shard
        return self.model_copy(update={"tile": tile, "overlap": overlap, "batch": self.batch or DEFAULT_BATCH,
                                       "block": block, "device": device,
                                       "regions": str(self.regions) if self.regions else None})

    def output_settings(self) -> dict:
        """The resolved settings that change the outputs or statistics, for the manifest key.

        Runs with the default outputs keep the keys of earlier versions (a probabilities flag,
        no output list), so an upgrade does not segment a whole archive again."""
        settings = {"tile": self.tile, "overlap": self.overlap, "blending": self.blending, "tta": self.tta,
                    "probabilities": "probabilities" in self.outputs}
        others = sorted(set(self.outputs) - set(DEFAULT_OUTPUTS) - {"probabilities"})
        if others:
            settings["outputs"] = others
        if self.nodata is not None:
            settings["nodata"] = self.nodata
        if self.vector_simplify:
            settings["vector_simplify"] = self.vector_simplify
        if self.regions:  # the regions file's identity too: editing it changes the region statistics
            settings["regions"] = {"file": str(Path(self.regions).resolve()), "version": storage.stat(self.regions),
                                   "id": self.region_id}
        return settings

    def card_overrides(self) -> dict:
        return {name: getattr(self, name) for name in FIELD_GROUPS["model"]}


FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(name for name, field in RunOptions.model_fields.items() if field.json_schema_extra["group"] == group)
    for group in ("run", "outputs", "model", "execution")
}


def load_run_card(model: str, options: RunOptions) -> ModelCard:
    """The model card with the options' runtime overrides."""
    return load_card(model).with_runtime(**options.card_overrides())


def default_block(spatial_dims: int, tile: int, device: str) -> int:
    """The block side when none is given. A block also runs the tiles straddling its border
    (its neighbour runs them too): at tile 1024 and overlap 0.25, 2048-pixel blocks run each grid
    tile 1.78 times on average, 8192-pixel blocks 1.10 times. A GPU has the memory for big
    blocks (8 tiles a side: about 2 GB per block in flight at 6 classes); host memory per CPU
    actor stays bounded by the 2048 default."""
    if spatial_dims != 2:
        return DEFAULT_BLOCK_3D
    return max(DEFAULT_BLOCK, BLOCK_TILES_ON_GPU * tile) if device == "cuda" else DEFAULT_BLOCK


# --- the command line -------------------------------------------------------------------------

# Options only an archive run has.
ARCHIVE_ONLY = ("concurrency",)
# Shorthands for common outputs.
OUTPUT_FLAGS = {"tiff": ("labels-tiff", "slides and Zarr sources: also write labels.tif (a tiled TIFF in pixel "
                                        "coordinates)"),
                "probabilities": ("probabilities", "also write uint8-quantised class probabilities to "
                                                   "DIR/<image>/probabilities.zarr"),
                "vector": ("polygons", "also write every class's connected regions as polygons (GeoParquet in map "
                                       "coordinates; QuPath GeoJSON for sources without a CRS)"),
                "confidence": ("confidence", "also write confidence.tif: the highest class probability per pixel")}


def add_run_options(parser: argparse.ArgumentParser, archive: bool) -> None:
    """One command-line option per RunOptions field (its description as the help), plus the
    output shorthands --tiff and --probabilities."""
    add_field_options(parser, RunOptions, skip=() if archive else ARCHIVE_ONLY)
    for flag, (_, help_text) in OUTPUT_FLAGS.items():
        parser.add_argument(f"--{flag}", action="store_true", help=help_text)


def add_field_options(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One command-line option per field of a pydantic options model, its description as the
    help; a list field takes comma-separated values (NAME,...), given whole to the model."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = f"--{name.replace('_', '-')}"
        kind, choices = _value_type(field.annotation)
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=field.description)
        elif (typing.get_origin(kind) or kind) in (tuple, list):
            parser.add_argument(flag, help=field.description, metavar="NAME,...")
        elif (typing.get_origin(kind) or kind) is dict:
            parser.add_argument(flag, help=field.description, metavar="KEY=VALUE,...")
        else:
            parser.add_argument(flag, type=kind, choices=choices, help=field.description)


def options_from_args(args: argparse.Namespace) -> RunOptions:
    given = {name: getattr(args, name) for name in RunOptions.model_fields
             if getattr(args, name, None) is not None}
    outputs = [o.strip() for o in given.pop("outputs", ",".join(DEFAULT_OUTPUTS)).split(",") if o.strip()]
    outputs += [output for flag, (output, _) in OUTPUT_FLAGS.items() if getattr(args, flag, False)]
    return make_options(**given, outputs=tuple(dict.fromkeys(outputs)))


def make_options(**values) -> RunOptions:
    """RunOptions from plain values; a value of the wrong kind is bad input, in one line."""
    try:
        return RunOptions(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InputError(where, f"{error['msg']} (got {error.get('input')!r})") from None


def _value_type(annotation) -> tuple[type, list | None]:
    """The argparse type (and choices) of a field: the non-None member of an optional."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)] if isinstance(
        annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else [annotation]
    member = members[0]
    if typing.get_origin(member) is Literal:
        return str, list(typing.get_args(member))
    return member, None
