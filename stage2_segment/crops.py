"""Fixed physical-size crops of a CT volume around nodules, negatives and detections.

A crop is a cube of ``CropConfig.size_mm`` millimetres on the volume's own
voxel grid (for a prepared data set, 1 mm isotropic), placed so that the
voxel nearest the requested world centre sits at index ``size // 2`` of
every axis. Its location in the full volume is an integer voxel box
``z0, y0, x0, z1, y1, x1`` (exclusive ends, :mod:`lidc_det.boxes`); parts
of the box outside the volume are filled with ``CropConfig.pad_hu``
(image) and 0 (label). :meth:`Crop.geometry` is the crop's own
:class:`~lidc_det.geometry.VolumeGeometry`, so a crop written as NIfTI
sits at the right place in the patient.

Three sources of crops:

* :func:`nodule_crops`: around each target nodule of a prepared scan, the
  centre jittered uniformly by up to ``jitter_mm`` per axis (training);
  the label is every target nodule voxel inside the crop.
* :func:`negative_crops`: at random tissue locations (HU above
  ``negative_min_hu``, e.g. vessels and walls, the usual detector false
  positives) whose crop holds no target nodule voxel and whose centre is
  away from every reader finding (training; empty label).
* :func:`detection_crops`: around each candidate of a
  :class:`~lidc_det.results.Detections` (inference; no label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lidc_det.geometry import VolumeGeometry

if TYPE_CHECKING:
    from lidc_det.data.prepared import PreparedCase
    from lidc_det.results import Detections


@dataclass(frozen=True)
class CropConfig:
    """How crops are cut.

    Attributes:
        size_mm: edge of the cube (mm); the crop has ``round(size_mm / spacing)``
            voxels per axis.
        jitter_mm: training crops are centred up to this far (uniform, per
            axis) from the nodule centre, so the model does not learn
            "the nodule is always exactly in the middle".
        negatives_per_scan: random non-nodule crops per training scan.
        negative_min_hu: a negative crop is centred on a voxel at least this
            dense (vessels, walls, fissures: the look of false positives).
        negative_max_mean_hu: and the mean HU of its central half-size cube is at most
            this, so the dense voxel is surrounded by lung (a vessel, airway wall or
            fissure, where detector false positives sit) rather than deep in the chest
            wall or mediastinum, which is easy to call empty. None = no such condition.
        negative_margin_mm: a negative centre keeps this distance (plus the
            finding's radius) from every reader finding, irrelevant ones included.
        pad_hu: value of image voxels outside the scan.
    """

    size_mm: float = 48.0
    jitter_mm: float = 6.0
    negatives_per_scan: int = 2
    negative_min_hu: float = -400.0
    negative_max_mean_hu: float | None = -500.0
    negative_margin_mm: float = 10.0
    pad_hu: float = -1024.0

    def __post_init__(self) -> None:
        if self.size_mm <= 0:
            raise ValueError(f"CropConfig.size_mm must be > 0, got {self.size_mm}")
        if self.jitter_mm < 0 or self.negatives_per_scan < 0 or self.negative_margin_mm < 0:
            raise ValueError("CropConfig: jitter_mm, negatives_per_scan, negative_margin_mm must be >= 0")

    def size_voxels(self, spacing_zyx: tuple[float, float, float]) -> tuple[int, int, int]:
        """Crop shape ``(nz, ny, nx)`` on a grid of ``spacing_zyx`` mm."""
        return tuple(max(1, int(round(self.size_mm / s))) for s in spacing_zyx)  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class Crop:
    """One crop of a scan.

    Attributes:
        series_uid: the scan.
        box_voxel: ``(6,)`` int64 voxel box of the crop in the full volume (may
            reach outside it; those voxels are padding).
        image: ``[nz, ny, nx]`` HU (``float32`` for cut crops; a whole scan
            from :func:`stage2_segment.fullvolume.scan_crop` keeps its stored dtype).
        label: ``uint8 [nz, ny, nx]`` (1 = nodule) or None (inference crops).
        kind: ``"nodule"``, ``"negative"``, ``"detection"`` or ``"scan"`` (whole scan).
        center_xyz_mm: world LPS (x, y, z) mm of the point the crop was cut
            around (after jitter).
        volume_geometry: geometry of the full volume the box refers to.
        nodule_id: the target nodule of a ``"nodule"`` crop.
        index: position of the detection in its :class:`Detections` (``"detection"``).
        score: the detection's score (``"detection"``), else 1.0.
        acquisition: the randomised acquisition of an augmented copy
            (:mod:`stage2_segment.crop_augment`: ``sigma_zyx_mm``, ``noise_sd_hu``), None for a crop as cut.
    """

    series_uid: str
    box_voxel: np.ndarray
    image: np.ndarray
    label: np.ndarray | None
    kind: str
    center_xyz_mm: tuple[float, float, float]
    volume_geometry: VolumeGeometry
    nodule_id: str | None = None
    index: int | None = None
    score: float = 1.0
    acquisition: dict[str, Any] | None = None

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.box_voxel[3:] - self.box_voxel[:3])  # type: ignore[return-value]

    @property
    def geometry(self) -> VolumeGeometry:
        """The crop's own geometry: same spacing and direction, origin at the box's first voxel."""
        g = self.volume_geometry
        origin = g.voxel_to_world(self.box_voxel[:3].astype(np.float64))
        return VolumeGeometry(self.shape_zyx, g.spacing_zyx, tuple(origin), g.direction)  # type: ignore[arg-type]

    def manifest(self) -> dict[str, Any]:
        """JSON-friendly description (no arrays); ``acquisition`` only for an augmented copy."""
        out = {
            "series_uid": self.series_uid,
            "box_voxel": [int(v) for v in self.box_voxel],
            "kind": self.kind,
            "center_xyz_mm": [float(v) for v in self.center_xyz_mm],
            "nodule_id": self.nodule_id,
            "index": self.index,
            "score": float(self.score),
            "volume_geometry": self.volume_geometry.to_dict(),
        }
        if self.acquisition is not None:
            out["acquisition"] = self.acquisition
        return out


def crop_box(center_xyz_mm: np.ndarray, geometry: VolumeGeometry, size_zyx: tuple[int, int, int]) -> np.ndarray:
    """Integer voxel box ``(6,)`` of a ``size_zyx`` crop whose voxel ``size // 2`` is nearest the centre.

    Args:
        center_xyz_mm: world LPS (x, y, z) mm.
        geometry: the full volume's geometry.
        size_zyx: crop shape in voxels.
    """
    c = np.rint(geometry.world_to_voxel(np.asarray(center_xyz_mm, dtype=np.float64).reshape(3))).astype(np.int64)
    size = np.asarray(size_zyx, dtype=np.int64)
    lo = c - size // 2
    return np.concatenate([lo, lo + size])


def extract(volume: np.ndarray, box_voxel: np.ndarray, fill: float | int) -> np.ndarray:
    """``volume[z0:z1, y0:y1, x0:x1]`` with voxels outside ``volume`` set to ``fill`` (same dtype)."""
    box = np.asarray(box_voxel, dtype=np.int64).reshape(6)
    size = box[3:] - box[:3]
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    lo = np.maximum(box[:3], 0)
    hi = np.minimum(box[3:], np.asarray(volume.shape))
    if np.any(hi <= lo):
        return out
    src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    dst = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, box[:3]))
    out[dst] = volume[src]
    return out


def make_crop(
    hu: np.ndarray,
    geometry: VolumeGeometry,
    series_uid: str,
    center_xyz_mm: np.ndarray,
    cfg: CropConfig,
    *,
    kind: str,
    labels: np.ndarray | None = None,
    nodule_id: str | None = None,
    index: int | None = None,
    score: float = 1.0,
) -> Crop:
    """Cut one crop around a world centre; ``labels`` (any int map, > 0 = nodule) gives a binary label."""
    if hu.shape != geometry.shape_zyx:
        raise ValueError(f"image shape {hu.shape} does not match geometry {geometry.shape_zyx}")
    box = crop_box(center_xyz_mm, geometry, cfg.size_voxels(geometry.spacing_zyx))
    image = extract(np.asarray(hu), box, cfg.pad_hu).astype(np.float32)
    label = None
    if labels is not None:
        label = (extract(np.asarray(labels), box, 0) > 0).astype(np.uint8)
    return Crop(
        series_uid=series_uid,
        box_voxel=box,
        image=image,
        label=label,
        kind=kind,
        center_xyz_mm=tuple(float(v) for v in np.asarray(center_xyz_mm).reshape(3)),  # type: ignore[arg-type]
        volume_geometry=geometry,
        nodule_id=nodule_id,
        index=index,
        score=float(score),
    )


def nodule_crops(case: PreparedCase, cfg: CropConfig, rng: np.random.Generator) -> list[Crop]:
    """One jittered crop per target nodule of a prepared scan (nodules lost at the
    prepared spacing, ``box_voxel is None``, are skipped)."""
    crops = []
    for nodule in case.nodules:
        if nodule.box_voxel is None:
            continue
        jitter = rng.uniform(-cfg.jitter_mm, cfg.jitter_mm, size=3) if cfg.jitter_mm > 0 else np.zeros(3)
        center = np.asarray(nodule.center_xyz_mm) + jitter
        crops.append(
            make_crop(case.image_hu, case.geometry, case.series_uid, center, cfg,
                      kind="nodule", labels=case.labels, nodule_id=nodule.nodule_id)
        )
    return crops


def negative_crops(
    case: PreparedCase, cfg: CropConfig, rng: np.random.Generator, *, max_tries: int = 2000
) -> list[Crop]:
    """Up to ``cfg.negatives_per_scan`` crops with no target nodule voxel, centred on dense tissue
    (in lung unless ``cfg.negative_max_mean_hu`` is None) away from every reader finding. Fewer
    are returned when ``max_tries`` random draws do not find them."""
    if cfg.negatives_per_scan == 0:
        return []
    geom = case.geometry
    hu = np.asarray(case.image_hu)
    labels = np.asarray(case.labels)
    size = cfg.size_voxels(geom.spacing_zyx)
    findings = [*case.nodules, *case.irrelevant]
    centers = np.array([f.center_xyz_mm for f in findings], dtype=np.float64).reshape(-1, 3)
    keep_out = np.array([f.diameter_mm / 2.0 + cfg.negative_margin_mm for f in findings])
    # stay a crop half-width inside the scan, on dense voxels
    half = np.asarray(size) // 2
    lo, hi = half, np.maximum(np.asarray(geom.shape_zyx) - half, half + 1)
    crops: list[Crop] = []
    for _ in range(max_tries):
        if len(crops) >= cfg.negatives_per_scan:
            break
        vox = rng.integers(lo, hi)
        if hu[tuple(vox)] < cfg.negative_min_hu:
            continue
        world = geom.voxel_to_world(vox.astype(np.float64))
        if len(centers) and np.any(np.linalg.norm(centers - world, axis=1) < keep_out):
            continue
        box = crop_box(world, geom, size)
        if extract(labels, box, 0).any():
            continue
        if cfg.negative_max_mean_hu is not None:
            q = np.asarray(size) // 4
            core = extract(hu, np.concatenate([vox - q, vox + q + 1]), cfg.pad_hu)
            if float(core.mean()) > cfg.negative_max_mean_hu:
                continue
        crops.append(make_crop(hu, geom, case.series_uid, world, cfg, kind="negative", labels=labels))
    return crops


def detection_crops(
    hu: np.ndarray, geometry: VolumeGeometry, detections: Detections, cfg: CropConfig
) -> list[Crop]:
    """One crop per candidate, in the order of ``detections`` (``Crop.index`` = position)."""
    return [
        make_crop(hu, geometry, detections.series_uid, c, cfg, kind="detection", index=i, score=float(s))
        for i, (c, s) in enumerate(zip(detections.centers_xyz_mm, detections.scores))
    ]
