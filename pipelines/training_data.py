"""Training data: pairs of an image and its labels on the same grid, read through the same
sources and Zarr ingest as segmentation, and the tiles a training run samples from them.

Pairs: an image file and a label file, or folders (or globs) of both matched by name: a label
file belongs to the image whose stem it has, bare or followed by one of LABEL_SUFFIXES
(`T32.tif` and `T32_mask.tif`). Labels are a raster of class ids on the image's grid (255 =
not labelled), or for slides a QuPath GeoJSON of annotated polygons (classified by class name,
in level-0 pixels), rasterised at the resolution the card segments.

Sampling: each training tile is centred on a labelled pixel, half of them drawn with weights
1 / (pixels of its class), so that rare classes are seen often, the others uniformly; tiles are
flipped and turned by 90° at random (and their intensity jittered, as an option; each can be
left out: a CT's left and right sides differ). Validation is either whole images
(every k-th) or a held-out spatial part of every image (its last columns; slices for volumes),
cut into a fixed grid of tiles. Every draw comes from a generator seeded by (seed, epoch), so a
run resumed at an epoch draws what the uninterrupted run drew.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipelines import storage
from pipelines.errors import InputError
from pipelines.model_card import ClassInfo, ModelCard, default_colour, parse_color
from pipelines.sources import image_stem, list_archive, open_source, resolve_bands
from pipelines.tiling import Box, TileGrid, block_partition
from pipelines.zarr_stores import ingest_source, read_padded

# The share of training tiles centred on a pixel of a class drawn with equal odds for every class
# (the rest on any labelled pixel): rare classes are seen often, and the model still sees the
# classes in about their true proportions. nnU-Net forces a third of its patches onto foreground.
RARE_CLASS_SHARE = 0.5
LABEL_SUFFIXES = ("", "_mask", "_masks", "_labels", "_label", "-mask", "-labels", "_seg", "_gt")
NOT_LABELLED = 255


@dataclass(frozen=True)
class TrainingPair:
    image: str
    labels: str

    @property
    def name(self) -> str:
        return image_stem(self.image)


def find_pairs(images: str, labels: str) -> list[TrainingPair]:
    """One pair, or every image of a folder or glob with its label file from the labels folder."""
    if Path(images).is_file() or (storage.is_remote(images) and storage.exists(images)
                                  and not storage.list_names(images)):
        return [TrainingPair(images, labels)]
    image_uris = list_archive(images)
    if not image_uris:
        raise InputError(images, "holds no images")
    label_files = label_files_by_stem(labels)
    if storage.is_remote(images) == storage.is_remote(labels) and str(images).rstrip("/") == str(labels).rstrip("/"):
        # One folder of both: a label file is one named after an image with a suffix.
        stems = {image_stem(uri).lower() for uri in image_uris}
        label_files = {stem: uri for stem, uri in label_files.items()
                       if any(stem == base + suffix for base in stems for suffix in LABEL_SUFFIXES if suffix)}
        image_uris = [uri for uri in image_uris if uri not in set(label_files.values())]
    pairs = []
    for uri in image_uris:
        match = matching_label_file(image_stem(uri), label_files)
        if match is None:
            raise InputError(uri, f"has no label file in {labels} (a file named {image_stem(uri)}, or with one of "
                                  f"{', '.join(s for s in LABEL_SUFFIXES if s)} after it)")
        pairs.append(TrainingPair(uri, match))
    return pairs


def matching_label_file(name: str, label_files: dict[str, str]) -> str | None:
    """The label file of the image called `name` among label files by lower-case stem: the same
    stem, bare or followed by one of LABEL_SUFFIXES."""
    stem = name.lower()
    return next((label_files[stem + suffix] for suffix in LABEL_SUFFIXES if stem + suffix in label_files), None)


def label_files_by_stem(labels: str) -> dict[str, str]:
    files = {}
    for uri in list_label_files(labels):
        stem = image_stem(uri) if not uri.lower().endswith(".geojson") else Path(uri).name[: -len(".geojson")]
        files[stem.lower()] = uri
    return files


def list_label_files(labels: str) -> list[str]:
    if Path(labels).is_dir():
        return sorted(str(p) for p in Path(labels).iterdir() if p.is_file())
    return storage.list_images(labels, (".tif", ".tiff", ".png", ".nii", ".nii.gz", ".geojson", ".json"))


def parse_classes(spec: str) -> tuple[ClassInfo, ...]:
    """Classes from a file (YAML or JSON: a list of names, or of {name, color} mappings, ids in
    order) or from comma-separated names ("background,nucleus")."""
    import yaml

    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        try:
            listed = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(spec, f"cannot read the classes file: {exc}") from exc
    else:
        listed = [name.strip() for name in spec.split(",")]
    if isinstance(listed, dict):  # {id: name}
        listed = [listed[key] for key in sorted(listed)]
    if not isinstance(listed, list) or not listed:
        raise InputError(spec, "must list the classes: names, or mappings with 'name' (and 'color')")
    classes = []
    for class_id, entry in enumerate(listed):
        entry = entry if isinstance(entry, dict) else {"name": entry}
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(spec, f"class {class_id} has no name ({entry!r})")
        colour = parse_color(entry["color"], path) if "color" in entry else default_colour(class_id)
        classes.append(ClassInfo(class_id, name.strip(), colour))
    return tuple(classes)


def label_classes(pairs: list[TrainingPair]) -> tuple[ClassInfo, ...]:
    """The classes the label files themselves name: the category names (and colour table) of a
    label raster that has them (a labels.tif segpipe wrote, a GDAL thematic raster), the
    classification names (and colours) of QuPath annotations, else class0 ... classN up to the
    largest label value."""
    annotations = [pair.labels for pair in pairs if pair.labels.lower().endswith((".geojson", ".json"))]
    if annotations:
        found: dict[str, tuple[int, int, int] | None] = {}
        for path in annotations:
            for feature in annotation_features(path):
                classification = (feature.get("properties") or {}).get("classification") or {}
                if classification.get("name"):
                    found.setdefault(str(classification["name"]), qupath_colour(classification))
        return tuple(ClassInfo(i, name, colour or default_colour(i)) for i, (name, colour) in enumerate(found.items()))
    from pipelines.evaluation import category_names, open_labels

    for pair in pairs:
        names = category_names(pair.labels)
        if names:
            colours = raster_colours(pair.labels)
            return tuple(ClassInfo(i, name, colours.get(i) or default_colour(i)) for i, name in enumerate(names))
    largest = 0
    for pair in pairs:
        with open_labels(pair.labels) as labels:
            extents = LabelExtents(labels.shape)
            for strip, origin in labels.strips_with_origin():
                extents.add(strip, origin)
            refuse_instance_mask(pair.labels, extents)
            largest = max(largest, extents.largest())
    return tuple(ClassInfo(i, f"class{i}", default_colour(i)) for i in range(max(largest, 1) + 1))


# An unnamed label raster whose ids (besides 0) number at least INSTANCE_IDS, each in a small
# part of the image and apart from most others, is an instance mask: one id per object (StarDist's
# and Cellpose's masks), which a semantic network would learn as that many classes. Anatomy has
# many small classes too (TotalSegmentator's CT: 41 organs, a median box of 1.8 % of the volume),
# but organs lie around and inside each other: there a box meets 11 others on average, a
# nucleus's box one or two (StarDist's 2D and 3D example masks: 0.5 and 1.6).
INSTANCE_IDS = 16
INSTANCE_EXTENT = 0.02
"""The most that the median id's bounding box covers of the image's extent in an instance mask."""
INSTANCE_NEIGHBOURS = 3.0
"""The most other ids' boxes that an id's box meets on average in an instance mask."""


class LabelExtents:
    """The bounding box of every label value of a label raster, gathered strip by strip."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.low = np.full((NOT_LABELLED + 1, len(shape)), np.iinfo(np.int64).max, dtype=np.int64)
        self.high = np.full((NOT_LABELLED + 1, len(shape)), -1, dtype=np.int64)

    def add(self, class_ids: np.ndarray, origin: tuple[int, ...]) -> None:
        from scipy import ndimage

        # find_objects skips 0: shift every id by one so that class 0 has its box too.
        for index, box in enumerate(ndimage.find_objects(class_ids + 1)):
            if box is not None:
                start = [s.start + o for s, o in zip(box, origin)]
                stop = [s.stop + o for s, o in zip(box, origin)]
                self.low[index] = np.minimum(self.low[index], start)
                self.high[index] = np.maximum(self.high[index], stop)

    def present(self) -> np.ndarray:
        """The label values found, 255 (not labelled) left out."""
        return np.flatnonzero(self.high[:NOT_LABELLED, 0] >= 0)

    def largest(self) -> int:
        return int(self.present().max(initial=0))

    def extent_shares(self, values: np.ndarray) -> np.ndarray:
        """The share of the raster's extent that each value's bounding box covers."""
        sizes = (self.high[values] - self.low[values]).astype(np.float64)
        return sizes.prod(axis=1) / float(np.prod(self.shape))

    def mean_neighbours(self, values: np.ndarray) -> float:
        """How many other values' bounding boxes each value's box meets, on average."""
        low, high = self.low[values], self.high[values]
        meet = np.all((low[:, None] < high[None, :]) & (low[None, :] < high[:, None]), axis=2)
        return float(meet.sum(axis=1).mean()) - 1.0  # less each box meeting itself


def refuse_instance_mask(path: str, extents: LabelExtents) -> None:
    objects = extents.present()
    objects = objects[objects != 0]
    if (objects.size < INSTANCE_IDS or np.median(extents.extent_shares(objects)) >= INSTANCE_EXTENT
            or extents.mean_neighbours(objects) >= INSTANCE_NEIGHBOURS):
        return
    raise InputError(path, f"holds {objects.size} different ids besides 0 ({objects.min()}-{objects.max()}), each in "
                           "a small patch of its own, and no class names: it looks like an instance mask (one id per "
                           f"object, as StarDist and Cellpose write), which would be learnt as {objects.max() + 1} "
                           "classes. Turn it into class ids first (every object one class: 1 where the mask is above "
                           "0, e.g. gdal_calc.py -A MASK --calc='A>0' --type=Byte --outfile=OUT), or name the "
                           "classes with --classes if they are classes")


def annotation_features(path: str) -> list[dict]:
    try:
        document = json.loads(storage.read_bytes(path))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not readable GeoJSON ({exc})") from exc
    if isinstance(document, list):  # QuPath exports a bare list of features too
        return document
    if not isinstance(document, dict):
        raise InputError(path, "not GeoJSON: neither a feature collection nor a feature")
    return document.get("features", []) if document.get("type") == "FeatureCollection" else [document]


def qupath_colour(classification: dict) -> tuple[int, int, int] | None:
    """QuPath writes a class colour as [r, g, b] ("color") or, in older versions, one packed integer ("colorRGB")."""
    colour = classification.get("color")
    if isinstance(colour, list) and len(colour) == 3:
        return tuple(int(c) & 255 for c in colour)
    packed = classification.get("colorRGB")
    if isinstance(packed, int):
        return (packed >> 16) & 255, (packed >> 8) & 255, packed & 255
    return None


def raster_colours(path: str) -> dict[int, tuple[int, int, int]]:
    """The colour table of a label raster, where it has one."""
    import rasterio

    try:
        with storage.rasterio_env(path), rasterio.open(path) as dataset:
            return {i: tuple(rgba[:3]) for i, rgba in dataset.colormap(1).items()}
    except (ValueError, rasterio.errors.RasterioError):
        return {}


@dataclass(frozen=True)
class PreparedImage:
    name: str
    image_store: str
    label_store: str
    shape: tuple[int, ...]
    class_pixels: tuple[int, ...]
    """Labelled pixels of each class."""
    notes: tuple[str, ...] = ()
    """What was left out of its labels, for the user."""


def prepare_pair(pair: TrainingPair, card: ModelCard, folder: str) -> PreparedImage:
    """Ingest the image (the card's bands) and its labels into Zarr stores under `folder`."""
    from pipelines.evaluation import not_labelled

    source = open_source(pair.image, card)
    bands = resolve_bands(source, card)
    image_store = storage.join(folder, pair.name, "image.zarr")
    label_store = storage.join(folder, pair.name, "labels.zarr")
    tile = card.tile_size
    block = -(-(512 if card.spatial_dims == 2 else 64) // tile) * tile  # shards of whole chunks
    ingest_source(source, bands, image_store, tile, block)
    unlabelled = None
    notes: tuple[str, ...] = ()
    if pair.labels.lower().endswith((".geojson", ".json")):
        labels, notes = rasterise_annotations(pair.labels, source, card)
        zarr.create_array(store=label_store, data=labels[None], chunks=(1, *(min(tile, s) for s in labels.shape)),
                          fill_value=NOT_LABELLED, overwrite=True)
    else:
        label_card = dataclasses.replace(card, bands=(1,), band_names=("labels",), mean=(0.0,), std=(1.0,))
        label_source = open_source(pair.labels, label_card).as_stored()  # a palette PNG's indices: VOC's masks
        if label_source.count != 1:  # band 1 of a colour mask would pass for class ids
            raise InputError(pair.labels, f"has {label_source.count} bands: a labels raster is one band of class ids "
                                          "(a colour-coded mask must first be turned into class ids)")
        check_same_grid(pair, source, label_source)
        ingest_source(label_source, (1,), label_store, tile, block)
        unlabelled = label_source.nodata
    labels = zarr.open_array(label_store, mode="r+")
    counts = np.zeros(card.num_classes, dtype=np.int64)
    for box in block_partition(labels.shape[1:], (block,) * (labels.ndim - 1)):
        values = np.asarray(labels[(0, *box.slices())])
        # The labels file's own nodata (and NaN) is not labelled, as segpipe evaluate reads it.
        unlabelled_here = not_labelled(values, unlabelled)
        if unlabelled_here.any():
            values = np.where(unlabelled_here, NOT_LABELLED, values).astype(values.dtype)
            labels[(0, *box.slices())] = values
        bad = np.setdiff1d(np.unique(values), [*range(card.num_classes), NOT_LABELLED])
        if bad.size:
            many = (f" ({bad.size} of them here: an instance mask, one id per object, must first be turned into "
                    "class ids)") if bad.size >= INSTANCE_IDS else ""
            raise InputError(pair.labels, f"has label values {', '.join(map(str, bad[:10]))} that are not among the "
                                          f"{card.num_classes} classes (ids 0-{card.num_classes - 1}; 255 = not "
                                          f"labelled){many}")
        # Whole numbers by now, whatever the file's type (float labels included).
        ids = values[values != NOT_LABELLED].ravel().astype(np.int64)
        counts += np.bincount(ids, minlength=card.num_classes)[: card.num_classes]
    if counts.sum() == 0:
        raise InputError(pair.labels, "has no labelled pixel")
    return PreparedImage(pair.name, image_store, label_store, tuple(source.shape), tuple(int(c) for c in counts), notes)


def check_same_grid(pair: TrainingPair, image, labels) -> None:
    if tuple(image.shape) != tuple(labels.shape):
        raise InputError(pair.labels, f"is {' x '.join(map(str, labels.shape[::-1]))}, its image {pair.image} "
                                      f"{' x '.join(map(str, image.shape[::-1]))}: not the same grid")
    if image.crs_wkt and labels.crs_wkt:
        from rasterio.crs import CRS

        from pipelines.evaluation import same_grid

        if not same_grid((CRS.from_wkt(image.crs_wkt), tuple(image.transform)[:6]),
                         (CRS.from_wkt(labels.crs_wkt), tuple(labels.transform)[:6])):
            raise InputError(pair.labels, f"is not on the grid of its image {pair.image} (another CRS or transform)")


def rasterise_annotations(path: str, source, card: ModelCard) -> tuple[np.ndarray, tuple[str, ...]]:
    """QuPath's GeoJSON (level-0 pixel coordinates, `classification.name`) on the grid the card
    segments the slide at, pixels no annotation covers not labelled; and notes on what was left
    out (unclassified annotations, points and lines)."""
    import shapely
    from affine import Affine
    from rasterio.features import rasterize

    features = annotation_features(path)
    ids = {c.name.lower(): c.id for c in card.classes}
    shapes = []
    unclassified = no_area = 0
    for feature in features:
        classification = (feature.get("properties") or {}).get("classification") or {}
        if not classification.get("name"):  # QuPath's unclassified annotations (a region of interest)
            unclassified += 1
            continue
        name = str(classification["name"]).lower()
        if name not in ids:
            raise InputError(path, f"has an annotation of class {classification.get('name')!r}, not among the card's "
                                   f"classes ({', '.join(c.name for c in card.classes)})")
        try:
            geometry = shapely.geometry.shape(feature.get("geometry") or {"type": "GeometryCollection",
                                                                          "geometries": []})
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise InputError(path, f"has an annotation of class {classification['name']!r} whose geometry is not "
                                   f"GeoJSON ({exc})") from exc
        areas = [part for part in getattr(geometry, "geoms", [geometry]) if part.geom_type in ("Polygon", "MultiPolygon")]
        if not areas or all(part.is_empty for part in areas):  # points (QuPath's counting tool), lines, nothing
            no_area += 1
            continue
        shapes += [(part, ids[name]) for part in areas]
    if not shapes:
        raise InputError(path, "has no classified area annotation" + (f" ({unclassified} without a class, {no_area} "
                                                                       "points or lines)" if features else ""))
    notes = []
    if unclassified:
        notes.append(f"{path}: {unclassified} annotation(s) without a class left out (they label no pixel)")
    if no_area:
        notes.append(f"{path}: {no_area} point, line or empty annotation(s) left out (they cover no area)")
    factor = source.full_resolution_factor
    labels = rasterize(shapes, out_shape=source.shape, fill=NOT_LABELLED, dtype="uint8",
                       transform=Affine.scale(factor, factor))
    return labels, tuple(notes)


def split(images: list[PreparedImage], validation: str, fraction: float
          ) -> tuple[list[tuple[PreparedImage, Box]], list[tuple[PreparedImage, Box]]]:
    """(training, validation) parts: (image, box of it)."""
    whole = [(image, Box((0,) * len(image.shape), image.shape)) for image in images]
    if validation == "image":
        if len(images) < 2:
            raise InputError("--validation image", "needs at least two images (one is held out)")
        every = max(2, round(1 / fraction))
        held = [i for i in range(len(images)) if i % every == every - 1] or [len(images) - 1]
        return [w for i, w in enumerate(whole) if i not in held], [w for i, w in enumerate(whole) if i in held]
    training, held_out = [], []
    for image, box in whole:
        axis = len(image.shape) - 1 if len(image.shape) == 2 else 0  # columns; slices for volumes
        cut = box.stop[axis] - max(1, int(round(box.stop[axis] * fraction)))
        training.append((image, Box(box.start, tuple(cut if a == axis else s for a, s in enumerate(box.stop)))))
        held_out.append((image, Box(tuple(cut if a == axis else s for a, s in enumerate(box.start)), box.stop)))
    return training, held_out


class TileSampler:
    """Training tiles drawn toward labelled and rare-class pixels, and the validation grid."""

    def __init__(self, training: list[tuple[PreparedImage, Box]], validation: list[tuple[PreparedImage, Box]],
                 tile: int, halo: int, num_classes: int):
        self.training, self.validation = training, validation
        self.tile, self.halo, self.num_classes = tile, halo, num_classes
        self.labelled = [self.labelled_pixels(image, box) for image, box in training]
        totals = np.zeros(num_classes, dtype=np.float64)
        for per_class in self.labelled:
            for class_id, pixels in per_class.items():
                totals[class_id] += len(pixels)
        self.class_weight = np.where(totals > 0, 1.0 / np.maximum(totals, 1), 0.0)

    def labelled_pixels(self, image: PreparedImage, box: Box) -> dict[int, np.ndarray]:
        """Flat positions (in the box) of each class's labelled pixels, a subsample when many."""
        labels = np.asarray(zarr.open_array(image.label_store, mode="r")[(0, *box.slices())])
        found = {}
        for class_id in range(self.num_classes):
            positions = np.flatnonzero(labels == class_id)
            if positions.size > 200_000:  # a fixed subsample: enough to draw centres from
                positions = positions[:: positions.size // 200_000 + 1]
            if positions.size:
                found[class_id] = positions
        return found

    def training_tiles(self, count: int, seed: int, epoch: int) -> list[tuple[int, tuple[int, ...], int]]:
        """(training part index, tile origin, augmentation code) of the epoch's `count` tiles."""
        rng = np.random.default_rng([seed, epoch])
        choices = [(part, class_id) for part, per_class in enumerate(self.labelled) for class_id in per_class]
        pixels = np.array([len(self.labelled[p][c]) for p, c in choices], dtype=np.float64)
        # Each class as likely as any other; within a class, each part by its share of the pixels.
        balanced = pixels * np.array([self.class_weight[c] for _, c in choices])
        balanced /= balanced.sum()
        every_pixel = pixels / pixels.sum()  # each labelled pixel as likely as any other
        tiles = []
        for _ in range(count):
            weights = balanced if rng.random() < RARE_CLASS_SHARE else every_pixel
            part, class_id = choices[rng.choice(len(choices), p=weights)]
            image, box = self.training[part]
            flat = self.labelled[part][class_id][rng.integers(len(self.labelled[part][class_id]))]
            centre = np.unravel_index(flat, box.shape)
            origin = tuple(int(min(max(b0 + c - self.tile // 2, b0), max(b0, b1 - self.tile)))
                           for c, b0, b1 in zip(centre, box.start, box.stop))
            tiles.append((part, origin, int(rng.integers(1 << 16))))
        return tiles

    def validation_tiles(self) -> list[tuple[int, tuple[int, ...]]]:
        tiles = []
        for part, (image, box) in enumerate(self.validation):
            grid = TileGrid(box.shape, self.tile, 0.0)
            for origin in (tuple(b + o for b, o in zip(box.start, origin)) for origin in grid_origins(grid)):
                tiles.append((part, origin))
        return tiles

    def read(self, parts: list[tuple[PreparedImage, Box]], part: int, origin: tuple[int, ...]
             ) -> tuple[np.ndarray, np.ndarray]:
        """(band, *tile + 2 halo) pixels and (*tile) labels; outside the part's box: mirrored pixels,
        not labelled."""
        image, box = parts[part]
        tile = Box(origin, tuple(o + self.tile for o in origin))
        pixels = read_padded(zarr.open_array(image.image_store, mode="r"), tile.grown(self.halo))
        labels = np.full((self.tile,) * len(origin), NOT_LABELLED, dtype=np.uint8)
        inside = tile.intersection(box)
        if inside is not None:
            stored = zarr.open_array(image.label_store, mode="r")
            labels[inside.relative_to(origin)] = stored[(0, *inside.slices())]
        return pixels, labels


def grid_origins(grid: TileGrid):
    import itertools

    return itertools.product(*grid.origins)


AUGMENTATIONS = ("flip", "rot90", "jitter")


def augment(pixels: np.ndarray, labels: np.ndarray, code: int, kinds: tuple[str, ...]
            ) -> tuple[np.ndarray, np.ndarray]:
    """The augmentations named in `kinds` (AUGMENTATIONS), drawn by the tile's random `code`:
    flip: each spatial axis flipped or not; rot90: a turn by 0-3 quarters in the last two axes
    (when they are square); jitter: the intensities scaled and shifted by up to 10 %."""
    dims = labels.ndim
    if "flip" in kinds:
        for axis in range(dims):
            if code >> axis & 1:
                pixels, labels = np.flip(pixels, axis + 1), np.flip(labels, axis)
    turns = code >> dims & 3
    if "rot90" in kinds and turns and labels.shape[-1] == labels.shape[-2]:
        pixels, labels = np.rot90(pixels, turns, axes=(-2, -1)), np.rot90(labels, turns, axes=(-2, -1))
    if "jitter" in kinds:
        rng = np.random.default_rng(code)
        pixels = pixels * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1) * pixels.std()
    return np.ascontiguousarray(pixels), np.ascontiguousarray(labels)


def band_statistics(images: list[PreparedImage], scale: float, clip: tuple[float, float] | None = None,
                    samples: int = 1 << 20) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of each band (values x scale, clipped) over the training images."""
    totals, squares, count = None, None, 0
    for image in images:
        array = zarr.open_array(image.image_store, mode="r")
        step = max(1, int(math.ceil((math.prod(array.shape[1:]) / samples) ** (1 / (array.ndim - 1)))))
        values = np.asarray(array[(slice(None), *(slice(None, None, step),) * (array.ndim - 1))], dtype=np.float64)
        values = values.reshape(values.shape[0], -1) * scale
        values = values[:, np.all(np.isfinite(values), axis=0)]
        if clip:
            values = np.clip(values, *clip)
        totals = values.sum(axis=1) if totals is None else totals + values.sum(axis=1)
        squares = (values ** 2).sum(axis=1) if squares is None else squares + (values ** 2).sum(axis=1)
        count += values.shape[1]
    mean = totals / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0))
    return [float(m) for m in mean], [float(s) if s > 0 else 1.0 for s in std]
