"""Exports of a scan's stage-2 masks: a merged label NIfTI and a JSON table.

The label map has the scan's geometry (open it over the image in ITK-SNAP or
3D Slicer); voxel value ``i + 1`` is ``masks[i]``. Where masks overlap, the
earlier mask keeps the voxel (detections come best first).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import write_json
from lidc_det.geometry import VolumeGeometry
from lidc_det.io.nifti import write_nifti
from lidc_det.results import NoduleMask


def merged_label_map(masks: Sequence[NoduleMask], shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """``uint16 [z, y, x]``: 0 background, ``i + 1`` = ``masks[i]`` (first mask wins on overlap)."""
    if len(masks) >= 65535:
        raise ValueError(f"{len(masks)} masks do not fit a uint16 label map")
    out = np.zeros(shape_zyx, dtype=np.uint16)
    for i, m in enumerate(masks):
        if m.empty:
            continue
        lo = np.maximum(m.box_voxel[:3], 0)
        hi = np.minimum(m.box_voxel[3:], np.asarray(shape_zyx))
        if np.any(hi <= lo):
            continue
        src = m.mask[tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, m.box_voxel[:3]))]
        dst = out[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
        dst[(dst == 0) & src] = i + 1
    return out


def mask_records(masks: Sequence[NoduleMask]) -> list[dict[str, Any]]:
    """One JSON-friendly row per mask (label value, box, centre, volume, diameter, mean HU, score)."""
    return [
        {
            "label": i + 1,
            "series_uid": m.series_uid,
            "source": m.source,
            "score": float(m.score),
            "empty": bool(m.empty),
            "box_voxel": [int(v) for v in m.box_voxel],
            "center_xyz_mm": [float(v) for v in m.center_xyz_mm],
            "volume_mm3": float(m.volume_mm3),
            "max_diameter_mm": float(m.max_diameter_mm),
            "mean_hu": None if not np.isfinite(m.mean_hu) else float(m.mean_hu),
        }
        for i, m in enumerate(masks)
    ]


def export_masks(
    masks: Sequence[NoduleMask], geometry: VolumeGeometry, out_dir: Path, *, stem: str, extra: dict | None = None
) -> tuple[Path, Path]:
    """Write ``<stem>_masks.nii.gz`` (merged labels) and ``<stem>_masks.json``; returns both paths."""
    out_dir = Path(out_dir)
    nii = write_nifti(merged_label_map(masks, geometry.shape_zyx), geometry, out_dir / f"{stem}_masks.nii.gz")
    js = out_dir / f"{stem}_masks.json"
    write_json(js, {**(extra or {}), "geometry": geometry.to_dict(), "masks": mask_records(masks)})
    return nii, js


def export_dicom_seg(
    masks: Sequence[NoduleMask],
    mask_geometry: VolumeGeometry,
    series_folder: Path,
    out_path: Path,
    *,
    series_uid: str | None = None,
    series_number: int = 901,
) -> Path:
    """Write the masks as one DICOM Segmentation (highdicom) referencing the original CT series.

    The masks (on ``mask_geometry``, e.g. the prepared 1 mm grid) are resampled
    onto the geometry of the DICOM series in ``series_folder`` (nearest-style:
    linear on the binary mask, >= 0.5) and stored as a BINARY segmentation, one
    segment per non-empty mask ("Nodule", automatic, lidc-det stage 2), frames
    on the source slices. Opens in 3D Slicer (QuantitativeReporting) and OHIF.

    Needs ``highdicom`` (``pip install highdicom``; not a default dependency).

    Raises:
        ImportError: highdicom is missing.
        ValueError: no mask has a voxel (an empty DICOM SEG is not allowed).
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"DICOM SEG export needs highdicom: pip install highdicom ({err})") from err
    import pydicom
    from pydicom.uid import generate_uid

    from lidc_det import __version__
    from lidc_det.io.dicom import read_series
    from lidc_det.resample import resample_mask

    vol = read_series(series_folder, series_uid=series_uid)
    geom = vol.geometry
    files = sorted(p for p in Path(series_folder).iterdir() if p.is_file())
    sources, slice_index = [], []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # not DICOM (read_series skipped it as well)
            continue
        if str(ds.get("SeriesInstanceUID", "")) != vol.series_uid or "ImagePositionPatient" not in ds:
            continue
        k = int(np.rint(geom.world_to_voxel(np.asarray(ds.ImagePositionPatient, dtype=np.float64))[0]))
        sources.append(ds)
        slice_index.append(k)
    order = np.argsort(slice_index)
    sources = [sources[i] for i in order]
    slice_index = [slice_index[i] for i in order]
    label = np.zeros(geom.shape_zyx, dtype=np.uint16)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name="lidc-det stage 2 (nnU-Net v2 crops)", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    for m in masks:
        if m.empty:
            continue
        full = resample_mask(m.full_mask(mask_geometry.shape_zyx), mask_geometry, geom)
        if not full.any():
            continue
        number = len(descriptions) + 1
        label[(label == 0) & full] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"nodule {number} (score {m.score:.3f}, {m.volume_mm3:.0f} mm3)",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Nodule,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    if not descriptions:
        raise ValueError(f"{series_folder}: no non-empty mask to write as DICOM SEG")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=label[slice_index],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="lidc-det",
        manufacturer_model_name="stage2_segment",
        software_versions=__version__,
        device_serial_number="0",
    )
    out_path = Path(out_path)
    from lidc_det.atomic import write_with

    write_with(out_path, lambda p: seg.save_as(p))
    return out_path
