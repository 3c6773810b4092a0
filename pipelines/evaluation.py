"""How well labels agree with a reference: per image and class IoU, Dice, precision, recall, and
the confusion matrix, for a labels raster against a reference raster of the same grid.

Pixels that are not labelled in either raster are left out: 255, the raster's own nodata value
and NaN. Every other value must be a class id (a whole number 0-254) and a raster one band (a
volume 3D): a colour-coded mask, a probability map or a one-hot volume is refused, naming the
file and the first pixel, not counted as classes it does not hold. Both rasters are read in
strips of rows (volumes: slices), so memory does not depend on the image size. Rasters are
whatever GDAL reads (labels.tif, masks) or NIfTI volumes.
"""

from __future__ import annotations

import contextlib
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.errors import InputError

NODATA = 255
STRIP_PIXELS = 1 << 24
NIFTI = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Agreement:
    image: str
    confusion: np.ndarray
    """confusion[reference class, predicted class], pixels counted where neither is nodata."""
    class_names: tuple[str, ...]

    def rows(self) -> list[dict]:
        """One row per class: pixels, IoU, Dice, precision, recall (None where undefined)."""
        rows = []
        for index, name in enumerate(self.class_names):
            true_positive = int(self.confusion[index, index])
            reference = int(self.confusion[index].sum())
            predicted = int(self.confusion[:, index].sum())
            union = reference + predicted - true_positive
            rows.append({
                "image": self.image, "class_id": index, "class_name": name, "reference_pixels": reference,
                "predicted_pixels": predicted, "true_positives": true_positive,
                "iou": true_positive / union if union else None,
                "dice": 2 * true_positive / (reference + predicted) if reference + predicted else None,
                "precision": true_positive / predicted if predicted else None,
                "recall": true_positive / reference if reference else None,
            })
        return rows


SCHEMA = pa.schema([("image", pa.string()), ("class_id", pa.int16()), ("class_name", pa.string()),
                    ("reference_pixels", pa.int64()), ("predicted_pixels", pa.int64()),
                    ("true_positives", pa.int64()), ("iou", pa.float64()), ("dice", pa.float64()),
                    ("precision", pa.float64()), ("recall", pa.float64())])


def agreement_table(agreements: list[Agreement]) -> pa.Table:
    return pa.Table.from_pylist([row for a in agreements for row in a.rows()], schema=SCHEMA)


def confusion_table(agreements: list[Agreement]) -> pa.Table:
    """The confusion matrices in long form: one row per image x reference class x predicted class."""
    rows = [{"image": a.image, "reference_class_id": i, "reference_class": a.class_names[i], "predicted_class_id": j,
             "predicted_class": a.class_names[j], "pixels": int(a.confusion[i, j])}
            for a in agreements for i in range(len(a.class_names)) for j in range(len(a.class_names))]
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("image", pa.string()), ("reference_class_id", pa.int16()), ("reference_class", pa.string()),
        ("predicted_class_id", pa.int16()), ("predicted_class", pa.string()), ("pixels", pa.int64())]))


def overall(agreements: list[Agreement], name: str = "all images") -> Agreement:
    """The agreement of every image together (their confusion matrices summed)."""
    size = max(len(a.class_names) for a in agreements)
    total = np.zeros((size, size), dtype=np.int64)
    for a in agreements:
        total[: len(a.class_names), : len(a.class_names)] += a.confusion
    names = max((a.class_names for a in agreements), key=len)
    return Agreement(name, total, names)


# What an image's folder in an output root holds its labels in, by preference.
LABEL_FILES = ("labels.tif", "labels.nii.gz", "labels.ome.zarr", "image.ome.zarr")
"""What an image folder's labels are in: GeoTIFF, NIfTI, OME-Zarr labels (Zarr sources) or the
OME-Zarr image with its labels (slides)."""


def pairs_to_evaluate(prediction: str, reference: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(image, prediction file, reference file) to compare, and notes on what was left out.

    A labels file against a reference file; or an output root (a folder of image folders, each
    with labels.tif or labels.nii.gz) against a folder of references matched by image name (the
    same name, bare or with a suffix such as _mask; see pipelines.training_data)."""
    from pipelines.training_data import label_files_by_stem, matching_label_file

    def labels_file(uri: str) -> bool:  # a file, or a Zarr store (a folder read as one array)
        return uri.rstrip("/").lower().endswith(".zarr") or not storage.is_folder(uri)

    if storage.exists(prediction) and labels_file(prediction):
        if not labels_file(reference):
            raise InputError(reference, f"is a folder; a labels file ({prediction}) is compared with one reference file")
        path = PurePosixPath(prediction.split("://", 1)[-1])
        name = path.parent.name if path.name.lower() in LABEL_FILES else path.name.split(".")[0]
        return [(name, prediction, reference)], []
    if not storage.is_folder(prediction):
        raise InputError(prediction, "no such labels file or output root")
    if labels_file(reference):
        raise InputError(reference, f"must be a folder of references to compare with the output root {prediction}")
    references = label_files_by_stem(reference)
    pairs, notes = [], []
    for folder in storage.list_names(prediction):
        if folder.startswith((".", "_")):
            continue
        candidates = (storage.join(prediction, folder, name) for name in LABEL_FILES)
        labels = next((uri for uri in candidates if storage.exists(uri)), None)
        if labels is None:  # not an image folder (stats/, runs/) or one without labels
            continue
        match = matching_label_file(folder, references)
        if match is None:
            notes.append(f"{folder}: no reference in {reference}, left out")
            continue
        pairs.append((folder, labels, match))
    if not pairs:
        raise InputError(prediction, f"has no image folder (with {' or '.join(LABEL_FILES)}) whose name matches a "
                                     f"reference in {reference}")
    return pairs, notes


def evaluate(prediction: str | Path, reference: str | Path, image: str | None = None,
             class_names: tuple[str, ...] | None = None) -> Agreement:
    prediction, reference = str(prediction), str(reference)
    with open_labels(prediction) as predicted, open_labels(reference) as truth:
        if hasattr(predicted, "nifti") != hasattr(truth, "nifti") and len(predicted.shape) == 3:
            # A NIfTI's i, j, k are the x, y, z of a Zarr array or TIFF stack (z, y, x), as segpipe
            # reads and writes volumes (and SimpleITK's GetArrayFromImage gives them).
            next(labels for labels in (predicted, truth) if hasattr(labels, "nifti")).read_as_zyx()
        if predicted.shape != truth.shape:
            raise InputError(prediction, f"is {predicted.shape[::-1]} pixels, the reference {reference} "
                                         f"{truth.shape[::-1]}: not the same grid")
        if predicted.grid is not None and truth.grid is not None and not same_grid(predicted.grid, truth.grid):
            raise InputError(prediction, f"is not on the grid of the reference {reference} (another CRS or transform)")
        confusion = np.zeros((NODATA, NODATA), dtype=np.int64)
        seen = 0
        for a, b in zip(truth.strips(), predicted.strips()):
            keep = (a != NODATA) & (b != NODATA)
            keys = a[keep].astype(np.int64) * NODATA + b[keep]
            confusion += np.bincount(keys, minlength=NODATA * NODATA).reshape(NODATA, NODATA)
            seen = max(seen, int(a[keep].max(initial=0)) + 1, int(b[keep].max(initial=0)) + 1)
    names = class_names or predicted.class_names or truth.class_names or ()
    count = max(seen, len(names))
    names = tuple(names) + tuple(f"class{i}" for i in range(len(names), count))
    return Agreement(image or Path(prediction).parent.name, confusion[:count, :count], names)


class open_labels:
    """A label raster read in strips: GDAL for rasters, nibabel for NIfTI."""

    def __init__(self, path: str):
        self.path = path
        if not storage.exists(path):
            raise InputError(path, "no such file")
        self.resources = contextlib.ExitStack()

    def __enter__(self):
        try:
            return self.open()
        except BaseException:
            self.resources.close()
            raise

    def open(self):
        if self.path.rstrip("/").lower().endswith(".zarr"):
            return self.open_zarr()
        if self.path.lower().endswith(NIFTI):
            import nibabel as nib

            local = self.path
            if storage.is_remote(self.path):  # nibabel reads files: a copy for as long as this is open
                copy = self.resources.enter_context(tempfile.TemporaryDirectory(prefix="segpipe-labels-"))
                local = str(Path(copy) / self.path.rsplit("/", 1)[-1])
                Path(local).write_bytes(storage.read_bytes(self.path))
            try:
                self.nifti = nib.load(local)
            except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds
                raise InputError(self.path, f"not a readable NIfTI file ({exc})") from exc
            shape = tuple(int(n) for n in self.nifti.shape)
            if len(shape) < 3 or any(n != 1 for n in shape[3:]):
                raise InputError(self.path, f"is a {len(shape)}D volume {shape}: a labels volume is 3D, one class id "
                                            "per voxel (a one-hot or 4D volume must first be turned into class ids)")
            self.shape = shape[:3]
            self.nodata = None
            self.grid = tuple(np.round(self.nifti.affine, 6).ravel())
            from pipelines.outputs.nifti_labels import SLICER_TABLE

            self.class_names = slicer_table_names(beside(self.path, SLICER_TABLE))
            return self
        stack = tiff_stack(self.path)
        if stack is not None:  # GDAL would read its first page only
            self.array, self.shape, self.nodata, self.grid, self.class_names = stack, stack.shape, None, None, ()
            return self
        import rasterio
        from rasterio.errors import RasterioError

        self.resources.enter_context(storage.rasterio_env(self.path))
        try:
            self.dataset = self.resources.enter_context(rasterio.open(self.path))
        except RasterioError as exc:
            raise InputError(self.path, f"not a readable raster ({exc})") from exc
        if self.dataset.count != 1:
            bands = self.dataset.count
            raise InputError(self.path, f"has {bands} bands: a labels raster is one band of class ids (a "
                                        "colour-coded mask must first be turned into class ids; `gdal_translate -b N` "
                                        "takes one band)")
        self.shape = (self.dataset.height, self.dataset.width)
        self.nodata = self.dataset.nodata
        self.grid = (self.dataset.crs, tuple(self.dataset.transform)[:6]) if self.dataset.crs else None
        self.class_names = category_names(self.path)
        return self

    def open_zarr(self):
        """An OME-Zarr image's first label image (`labels.ome.zarr` and `image.ome.zarr` as segpipe
        writes them, or any OME-Zarr 0.4/0.5 image with labels), a label multiscale itself, or a
        plain Zarr array of class ids: level 0, class names from image-label's properties."""
        import zarr

        try:
            node = zarr.open(self.path.rstrip("/"), mode="r")
        except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for what is not a store
            raise InputError(self.path, f"not a readable Zarr store ({exc})") from exc
        self.class_names = ()
        if isinstance(node, zarr.Group):
            def ome(group) -> dict:
                attrs = group.attrs.asdict()
                return attrs.get("ome", attrs)

            if "labels" in node and ome(node["labels"]).get("labels"):
                node = node["labels"][ome(node["labels"])["labels"][0]]
            metadata = ome(node)
            if not metadata.get("multiscales"):
                raise InputError(self.path, "is a Zarr group without OME-Zarr labels or multiscales: name the "
                                            "labels array itself")
            properties = metadata.get("image-label", {}).get("properties", [])
            named = {p.get("label-value"): p.get("class") for p in properties if isinstance(p, dict)}
            names = [named.get(i) for i in range(NODATA)]
            count = next((i for i, name in enumerate(names) if name is None), NODATA)
            self.class_names = tuple(str(name) for name in names[:count])
            node = node[metadata["multiscales"][0]["datasets"][0]["path"]]
        if node.ndim not in (2, 3):
            raise InputError(self.path, f"is a Zarr array of shape {node.shape}: labels are 2D or 3D, one class id "
                                        "per pixel")
        self.array = node
        self.shape = tuple(int(n) for n in node.shape)
        self.nodata = None
        self.grid = None
        return self

    def __exit__(self, *exc_info) -> None:
        self.resources.close()

    zyx = False
    """A NIfTI read as z, y, x (k, j, i), as Zarr arrays and TIFF stacks are."""

    def read_as_zyx(self) -> None:
        self.zyx, self.shape = True, self.shape[::-1]

    def strips(self):
        """Class ids (int64; NODATA where not labelled), a strip at a time."""
        for strip, _ in self.strips_with_origin():
            yield strip

    def strips_with_origin(self):
        """(class ids, the index of the strip's first pixel), a strip at a time."""
        if hasattr(self, "array"):  # Zarr: rows (slices of a volume), in C order like the others
            step = max(1, STRIP_PIXELS // int(np.prod(self.shape[1:])))
            for start in range(0, self.shape[0], step):
                origin = (start,) + (0,) * (len(self.shape) - 1)
                yield self.class_ids(np.asarray(self.array[start : start + step]), origin), origin
            return
        if hasattr(self, "nifti"):
            i, j, depth = self.shape[::-1] if self.zyx else self.shape
            step = max(1, STRIP_PIXELS // (i * j))
            for k in range(0, depth, step):
                voxels = np.asarray(self.nifti.dataobj[:, :, k : k + step]).reshape(i, j, -1)
                if self.zyx:
                    yield self.class_ids(voxels, (0, 0, k)).transpose(2, 1, 0), (k, 0, 0)
                else:
                    yield self.class_ids(voxels, (0, 0, k)), (0, 0, k)
            return
        rows = max(1, STRIP_PIXELS // self.shape[1])
        for row in range(0, self.shape[0], rows):
            window = ((row, min(row + rows, self.shape[0])), (0, self.shape[1]))
            yield self.class_ids(self.dataset.read(1, window=window), (row, 0)), (row, 0)

    def class_ids(self, values: np.ndarray, origin: tuple[int, ...]) -> np.ndarray:
        """`values` as class ids: the file's nodata and NaN become NODATA; anything else that is
        no class id is refused (casting would make a colour, a probability or -1 a class)."""
        if values.dtype == np.uint8 and self.nodata in (None, NODATA):
            return values.astype(np.int64)
        labelled = ~not_labelled(values, self.nodata)
        if np.issubdtype(values.dtype, np.floating):
            self.refuse(labelled & (values != np.floor(values)), values, origin,
                        "not a whole number: class ids are integers")
        self.refuse(labelled & ((values < 0) | (values > NODATA)), values, origin,
                    f"not a class id (0-{NODATA - 1}; {NODATA} = not labelled)")
        return np.where(labelled, values, NODATA).astype(np.int64)

    def refuse(self, wrong: np.ndarray, values: np.ndarray, origin: tuple[int, ...], why: str) -> None:
        if not wrong.any():
            return
        first = tuple(int(i) for i in np.argwhere(wrong)[0])
        where = tuple(i + o for i, o in zip(first, origin))
        at = f"voxel {where}" if len(where) == 3 else f"row {where[0]}, column {where[1]}"
        others = int(wrong.sum()) - 1  # in this strip: later strips are not read
        more = f" (and at least {others:,} more)" if others else ""
        raise InputError(self.path, f"holds the value {values[first].item()!r} at {at}{more}: {why}")


class TiffStackPlanes:
    """A local multi-page TIFF stack of one channel (pages = slices), read a few planes at a time
    like a Zarr array's first axis."""

    def __init__(self, path: str, shape: tuple[int, int, int]):
        self.path, self.shape, self.ndim = path, shape, 3

    def __getitem__(self, planes: slice) -> np.ndarray:
        from pipelines.sources.volume import read_volume_box
        from pipelines.tiling import Box

        start, stop, _ = planes.indices(self.shape[0])
        return read_volume_box(self.path, Box((start, 0, 0), (stop, *self.shape[1:])))[0]


def tiff_stack(path: str) -> TiffStackPlanes | None:
    """A local TIFF of more than one page of one channel in its first series (an ImageJ, OME or
    tifffile stack), as planes; None for anything else (GDAL reads it)."""
    if storage.is_remote(path) or not path.lower().endswith((".tif", ".tiff")):
        return None
    from pipelines.sources.volume import inspect_volume

    try:
        info = inspect_volume(path)
    except InputError:
        return None  # GDAL says what is wrong with it
    if info.shape[0] < 2:
        return None
    if info.channels != 1:
        raise InputError(path, f"is a stack of {info.channels}-channel planes: a labels volume is one class id per voxel")
    return TiffStackPlanes(path, info.shape)


def same_grid(first: tuple, second: tuple) -> bool:
    """Two rasters' (CRS, transform) or two NIfTI affines (flat tuples) describe one grid: the
    same CRS however its WKT is written (an ESRI .prj's against an EPSG code), pixel sizes within
    a millionth and origins within a hundredth of a pixel (the rounding of another writer)."""
    if len(first) != 2 or len(second) != 2:  # NIfTI affines, rounded when read
        return first == second
    (crs_a, (a, b, c, d, e, f)), (crs_b, (a2, b2, c2, d2, e2, f2)) = first, second
    if crs_a != crs_b:
        return False
    pixel = max(abs(a), abs(b), abs(d), abs(e))
    return (np.allclose((a, b, d, e), (a2, b2, d2, e2), rtol=1e-6, atol=1e-6 * pixel)
            and abs(c - c2) <= 0.01 * pixel and abs(f - f2) <= 0.01 * pixel)


def not_labelled(values: np.ndarray, nodata: float | None) -> np.ndarray:
    """Where a labels file says it has no label: NaN, and its own nodata value (255 means that
    already). Infinity is a value, and no class id."""
    unlabelled = np.isnan(values) if np.issubdtype(values.dtype, np.floating) else np.zeros(values.shape, dtype=bool)
    if nodata is not None and not np.isnan(nodata) and nodata != NODATA:
        unlabelled |= values == nodata
    return unlabelled


def beside(path: str, name: str) -> str:
    """The file `name` in the folder of `path` (a local path or an s3:// URI)."""
    return f"{path.rsplit('/', 1)[0]}/{name}" if "/" in path else name


def text_if_there(path: str) -> str | None:
    return storage.read_bytes(path).decode() if storage.exists(path) else None


def slicer_table_names(table: str | Path) -> tuple[str, ...]:
    """Class names from the 3D Slicer colour table segpipe writes beside labels.nii.gz
    (lines "index name r g b a"), where it is there."""
    text = text_if_there(str(table))
    if text is None:
        return ()
    names = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith("#") and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return tuple(names.get(i, f"class{i}") for i in range(max(names) + 1)) if names else ()


def category_names(path: str) -> tuple[str, ...]:
    """The class names of a labels.tif, from its GDAL sidecar (category names), if any."""
    text = text_if_there(f"{path}.aux.xml")
    if text is None:
        return ()
    band = ElementTree.fromstring(text).find("PAMRasterBand")
    categories = band.find("CategoryNames") if band is not None else None
    return tuple(c.text or "" for c in categories) if categories is not None else ()
