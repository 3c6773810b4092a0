"""labels.nii.gz of a volume: NIfTI-1 on the source's voxel grid (see pipelines.sources.volume
for the axis convention)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import Opener

from pipelines.outputs import Output, OutputContext
from pipelines.sources.volume import NIFTI_SUFFIXES, swap_voxel_axes

# Uncompressed bytes per slab when writing labels: bounds the writer's memory.
WRITE_SLAB_BYTES = 64 * 2**20


def write_labels_nifti(labels, path: str | Path, source) -> None:
    """Write a (D, H, W) uint8 label volume (numpy or zarr) as NIfTI-1 on the grid of `source`
    (anything with the volume's `shape` and 4x4 `affine`: a VolumeInfo or a VolumeSource).

    qform and sform both carry source.affine (code 2, "aligned": the labels are aligned to the
    source), so 3D Slicer and ITK-SNAP overlay the labels on the source image. The qform can only
    hold a rigid rotation, zooms and a flip; for a sheared affine it holds the nearest such
    transform and the sform the exact one. NIfTI stores both in float32.

    nibabel's own writer turns the data into one in-memory array, so the data block is written
    here in slabs of whole D planes (pipelines.sources.volume: a C-order (D, H, W) slab is the
    NIfTI byte order), and only one slab is in memory at a time. '.nii.gz' is gzip-compressed.
    """
    path = str(path)
    if not path.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI label file must end in .nii or .nii.gz")
    if labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8, got {labels.dtype}")
    if tuple(labels.shape) != tuple(source.shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} is not the source's {source.shape}")

    depth, height, width = source.shape
    header = nib.Nifti1Header()
    header.set_data_shape((width, height, depth))
    header.set_data_dtype(np.uint8)
    header.set_xyzt_units(xyz="mm")
    nifti_affine = swap_voxel_axes(np.asarray(source.affine, dtype=np.float64))
    header.set_qform(nifti_affine, code="aligned")
    header.set_sform(nifti_affine, code="aligned")
    header.set_slope_inter(1.0, 0.0)  # class indices are stored as they are
    header.set_intent("label", name="segpipe labels")  # NIFTI_INTENT_LABEL: the values are labels

    slab = _slab_depth(labels, height * width)
    with Opener(path, "wb") as out:
        header.write_to(out)
        out.write(b"\0" * (int(header.get_data_offset()) - out.tell()))
        for d0 in range(0, depth, slab):
            out.write(np.ascontiguousarray(labels[d0 : d0 + slab], dtype=np.uint8).tobytes())




def _slab_depth(labels, plane_bytes: int) -> int:
    """D planes per written slab: about WRITE_SLAB_BYTES, a whole number of the zarr array's
    chunk (or shard) depth so that no chunk is decoded twice."""
    chunk_depth = (getattr(labels, "shards", None) or getattr(labels, "chunks", None) or (1,))[0]
    return chunk_depth * max(1, WRITE_SLAB_BYTES // (plane_bytes * chunk_depth))




def write(context: OutputContext, folder: Path) -> None:
    write_labels_nifti(context.labels, folder / OUTPUT.file, context.source)
    write_label_tables(context.card.classes, folder)


SLICER_TABLE = "labels.ctbl"
ITKSNAP_TABLE = "labels.itksnap.txt"


def write_label_tables(classes, folder: Path) -> None:
    """The class names and colours for the viewers of volumes: a 3D Slicer colour table
    (`labels.ctbl`: index name r g b a; load it with the volume and pick it as the labelmap's
    colours) and an ITK-SNAP label description file (`labels.itksnap.txt`: Segmentation >
    Import Label Descriptions). ITK-SNAP shows label 0 as its "clear" label: class 0 is listed
    under its name all the same."""
    slicer = ["# segpipe class colours for 3D Slicer", f"# {len(classes)} values"]
    slicer += [f"{c.id} {c.name.replace(' ', '_')} {c.color[0]} {c.color[1]} {c.color[2]} 255" for c in classes]
    (folder / SLICER_TABLE).write_text("\n".join(slicer) + "\n")
    itksnap = ["################################################", "# ITK-SnAP Label Description File",
               "# File format: ", "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
               "################################################"]
    itksnap += [f"{c.id:5d} {c.color[0]:5d} {c.color[1]:4d} {c.color[2]:4d}        1  1  1    \"{c.name}\""
                for c in classes]
    (folder / ITKSNAP_TABLE).write_text("\n".join(itksnap) + "\n")


OUTPUT = Output("nifti-labels", "labels.nii.gz", write, spatial_dims=(3,),
                description="class per voxel, NIfTI-1 with the source's affine")
