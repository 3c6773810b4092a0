"""OME-Zarr (NGFF 0.5) label export, read back with ome-zarr-py's Reader and with plain zarr.

Real labels: the stardist nuclei mask (2D, classes background / nucleus) and the TotalSegmentator
organ labels of the CT volume in ../shared/data (3D, 42 label values).
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Labels, Multiscales, Reader
from ome_zarr.writer import write_image

from pipelines import ome_zarr
from pipelines.errors import InputError
from pipelines.ome_zarr import write_ome_zarr_labels
from training import CT_LABELS, nuclei_halves, shared_data

NUCLEI_CLASSES = [(0, "background", (0, 0, 0)), (1, "nucleus", (255, 0, 255))]


@pytest.fixture(scope="module")
def nuclei():
    """(image float32, labels uint8), both (512, 256): the left half of the stardist sample."""
    x, y, _, _ = nuclei_halves()
    return x[0, 0].numpy(), y.numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def ct_labels() -> np.ndarray:
    """The organ labels as (z, y, x) uint8: NIfTI stores (i, j, k) = (x, y, z)."""
    import nibabel as nib

    volume = nib.load(shared_data(CT_LABELS))
    return np.ascontiguousarray(np.asarray(volume.dataobj, dtype=np.uint8).T)


def nodes_by_kind(root) -> dict[str, list]:
    nodes = list(Reader(parse_url(root))())
    return {
        "images": [n for n in nodes if n.load(Multiscales) and not n.load(Label)],
        "labels groups": [n for n in nodes if n.load(Labels)],
        "label images": [n for n in nodes if n.load(Label)],
    }


def assert_is_mode_of(coarse: np.ndarray, fine: np.ndarray) -> None:
    """Each coarse pixel holds a class of its 2x2(x2) block of `fine` that no other class outnumbers."""
    padded = np.pad(fine, [(0, 2 * c - f) for c, f in zip(coarse.shape, fine.shape)], constant_values=255)
    ndim = fine.ndim
    samples = (
        padded.reshape([v for c in coarse.shape for v in (c, 2)])
        .transpose([*range(0, 2 * ndim, 2), *range(1, 2 * ndim, 2)])
        .reshape(*coarse.shape, -1)
    )
    valid = samples != 255
    chosen = ((samples == coarse[..., None]) & valid).sum(-1)
    counts = [((samples == samples[..., j : j + 1]) & valid).sum(-1) for j in range(samples.shape[-1])]
    best = np.max(counts, axis=0)
    assert (chosen >= 1).all()
    np.testing.assert_array_equal(chosen, best)


def test_nuclei_labels_stand_alone(tmp_path, nuclei):
    _, labels = nuclei
    root = tmp_path / "nuclei.zarr"
    write_ome_zarr_labels(labels, root, "nuclei", NUCLEI_CLASSES, ((0.5, "µm"), (0.5, "µm")), levels=4)

    found = nodes_by_kind(root / "labels")
    assert len(found["label images"]) == 1
    node = found["label images"][0]
    pyramid = [np.asarray(level) for level in node.data]
    assert [p.shape for p in pyramid] == [(512, 256), (256, 128), (128, 64), (64, 32)]
    np.testing.assert_array_equal(pyramid[0], labels)
    for fine, coarse in zip(pyramid, pyramid[1:]):
        assert set(np.unique(coarse)) <= {0, 1}
        assert_is_mode_of(coarse, fine)
    # Nuclei survive down the pyramid in about their share of the area.
    assert abs(pyramid[3].mean() - labels.mean()) < 0.05

    assert node.metadata["axes"] == [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]
    assert node.metadata["color"] == {0: [0, 0, 0, 1], 1: [1, 0, 1, 1], 255: [0, 0, 0, 0]}
    assert node.metadata["properties"] == {
        0: {"class": "background"}, 1: {"class": "nucleus"}, 255: {"class": "nodata"}
    }

    attrs = zarr.open_group(str(root / "labels"), mode="r").attrs["ome"]
    assert attrs == {"version": "0.5", "labels": ["nuclei"]}
    # Opening the image-less root finds nothing: the labels are opened at root/labels.
    assert nodes_by_kind(root) == {"images": [], "labels groups": [], "label images": []}


def test_automatic_levels_and_a_second_label_image(tmp_path, nuclei):
    _, labels = nuclei
    root = tmp_path / "nuclei.zarr"
    write_ome_zarr_labels(labels, root, "nuclei", NUCLEI_CLASSES, None)
    write_ome_zarr_labels(1 - labels, root, "background", NUCLEI_CLASSES, None)
    write_ome_zarr_labels(labels, root, "nuclei", NUCLEI_CLASSES, None)

    group = zarr.open_group(str(root / "labels"), mode="r")
    assert group.attrs["ome"]["labels"] == ["background", "nuclei"]
    # 512 px halves once to reach SMALLEST_LEVEL (256).
    assert sorted(group["nuclei"].array_keys()) == ["0", "1"]
    multiscale = group["nuclei"].attrs["ome"]["multiscales"][0]
    assert multiscale["axes"] == [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]]
    assert scales == [[1.0, 1.0], [2.0, 2.0]]
    np.testing.assert_array_equal(group["background"]["0"][:], 1 - labels)


def test_ct_organ_labels_3d_blockwise(tmp_path, ct_labels, monkeypatch):
    spacing = ((3.0, "mm"),) * 3
    classes = [(int(v), f"organ {v}", (int(v), 255 - int(v), 128)) for v in np.unique(ct_labels)]
    write_ome_zarr_labels(ct_labels, tmp_path / "whole.zarr", "organs", classes, spacing, levels=3)
    # Shards far smaller than the volume: every level is built from many blocks of the one before.
    monkeypatch.setattr(ome_zarr, "CHUNK", {2: 8, 3: 4})
    monkeypatch.setattr(ome_zarr, "SHARD", {2: 16, 3: 8})
    source = zarr.create_array(
        store=str(tmp_path / "source.zarr"), shape=ct_labels.shape, dtype="uint8", chunks=(8, 16, 16)
    )
    source[:] = ct_labels
    write_ome_zarr_labels(source, tmp_path / "blocks.zarr", "organs", classes, spacing, levels=3)

    whole = nodes_by_kind(tmp_path / "whole.zarr" / "labels")["label images"][0]
    blocks = nodes_by_kind(tmp_path / "blocks.zarr" / "labels")["label images"][0]
    level_1 = zarr.open_array(str(tmp_path / "blocks.zarr" / "labels" / "organs" / "1"), mode="r")
    assert level_1.shards == (8, 8, 8)
    assert [d.shape for d in whole.data] == [(30, 101, 122), (15, 51, 61), (8, 26, 31)]
    np.testing.assert_array_equal(np.asarray(whole.data[0]), ct_labels)
    for a, b in zip(whole.data, blocks.data):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pyramid = [np.asarray(d) for d in whole.data]
    for fine, coarse in zip(pyramid, pyramid[1:]):
        assert set(np.unique(coarse)) <= set(np.unique(ct_labels))
        assert_is_mode_of(coarse, fine)

    assert [a["name"] for a in whole.metadata["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in whole.metadata["axes"]} == {"millimeter"}
    transforms = whole.metadata["coordinateTransformations"]
    assert [t[0]["scale"] for t in transforms] == [[3.0] * 3, [6.0] * 3, [12.0] * 3]
    assert [t[1]["translation"] for t in transforms] == [[0.0] * 3, [1.5] * 3, [4.5] * 3]
    assert len(whole.metadata["color"]) == 43  # 42 label values and nodata
    assert whole.metadata["properties"][117] == {"class": "organ 117"}


def test_labels_join_an_existing_image(tmp_path, nuclei):
    image, labels = nuclei
    root = tmp_path / "nuclei_image.zarr"
    micrometer = {"y": "micrometer", "x": "micrometer"}
    write_image(image, str(root), axes="yx", scale={"y": 0.5, "x": 0.5}, axes_units=micrometer)
    write_ome_zarr_labels(labels, root, "nuclei", NUCLEI_CLASSES, None, levels=3)

    found = nodes_by_kind(root)
    assert len(found["images"]) == 1 and len(found["labels groups"]) == 1
    (label_node,) = found["label images"]
    assert str(label_node.zarr).startswith(str(root / "labels" / "nuclei"))
    np.testing.assert_array_equal(np.asarray(label_node.data[0]), labels)
    assert [d.shape for d in label_node.data] == [(512, 256), (256, 128), (128, 64)]
    # The pixel size comes from the image, so the labels overlay it in physical space.
    assert label_node.metadata["coordinateTransformations"][0][0]["scale"] == [0.5, 0.5]
    assert [a.get("unit") for a in label_node.metadata["axes"]] == ["micrometer", "micrometer"]
    image_label = zarr.open_group(str(root / "labels" / "nuclei"), mode="r").attrs["ome"]["image-label"]
    assert image_label["source"] == {"image": "../../"}
    # The image itself is untouched.
    np.testing.assert_array_equal(np.asarray(found["images"][0].data[0]), image)


def test_labels_must_match_the_image(tmp_path, nuclei):
    image, labels = nuclei
    root = tmp_path / "nuclei_image.zarr"
    write_image(image, str(root), axes="yx")
    with pytest.raises(InputError, match=r"image is \(512, 256\)"):
        write_ome_zarr_labels(labels[:500], root, "nuclei", NUCLEI_CLASSES, None)
    with pytest.raises(ValueError, match="unknown spatial unit"):
        write_ome_zarr_labels(labels, root, "nuclei", NUCLEI_CLASSES, ((1, "furlong"), (1, "furlong")))
    with pytest.raises(ValueError, match="uint8"):
        write_ome_zarr_labels(labels.astype(np.int32), root, "nuclei", NUCLEI_CLASSES, None)
