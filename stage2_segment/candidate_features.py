"""Features of each stage-1 candidate for the second look (false-positive reduction).

For candidate ``i`` of a scan, from its stage-2 :class:`~lidc_det.results.NoduleMask`
``masks[i]``, the image around it and the detector's output, one row of
:data:`FEATURE_NAMES` (``float64``, NaN where a feature is undefined, e.g. shape
features of an empty mask; LightGBM handles NaN):

* detector: score, rank within the scan (0 = best), estimated diameter (mm);
* mask size and shape: volume (mm^3, and log), max axial diameter, number of voxels
  on the segmentation crop's faces (a vessel leaks out of the crop, a nodule does not),
  PCA of the voxel positions in mm (major axis, elongation ``sqrt(l2/l1)``, flatness
  ``sqrt(l3/l1)``), sphericity ``pi^(1/3) (6V)^(2/3) / A`` (surface ``A`` by marching
  cubes), compactness (volume / volume of the sphere through its farthest voxel), the
  bounding-box fill, the distance between the mask centroid and the detection (mm);
* intensity (HU): mean, std, 10th / 50th / 90th percentile and max under the mask,
  the mean of a 1-3 mm shell outside it and the contrast between the two;
* chest wall: depth of the candidate inside the lung field (mm, 0 outside) and the
  fraction of the mask's outer shell outside the lung field (contact with the wall
  or mediastinum), from a coarse classical lung field (:func:`lung_field`);
* local structure: Hessian eigenvalue ratios of the image at scales of 1, 2, 3 and
  5 mm at the brightest blob point near the centre (``Rb = |l1| / sqrt(|l2 l3|)``: 1 for
  a ball, 0 for a tube; ``Ra = |l2| / |l3|``: 1 for a ball or tube, 0 for a plate;
  eigenvalues sorted by magnitude), the scale-normalised strength, Frangi vesselness
  (Frangi et al. 1998, bright tubes, maximum over 1-3 mm; :func:`_vesselness`) inside the
  mask and in a shell around it, and the
  number of dense (> ``dense_hu``) structures crossing a sphere around the candidate
  (a vessel crosses it twice, a bifurcation three times, an isolated nodule not at all)
  with the dense fraction of that sphere.

Arrays are ``[z, y, x]`` on the scan's grid (world points LPS mm, as everywhere);
the crops here are cut on that grid, so features are in mm when the grid is not
isotropic, except the Hessian scales, which use the mean spacing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections, NoduleMask

HESSIAN_SCALES_MM: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)

DETECTOR_FEATURES: tuple[str, ...] = ("det_score", "det_rank", "det_diameter_mm")
"""The features that come from the detector (left out by ``SecondLookConfig(use_detector=False)``)."""

FEATURE_NAMES: tuple[str, ...] = (
    *DETECTOR_FEATURES,
    "mask_empty", "volume_mm3", "log_volume", "max_diameter_mm", "crop_face_voxels",
    "major_axis_mm", "elongation", "flatness", "sphericity", "compactness", "box_fill", "offset_mm",
    "hu_mean", "hu_std", "hu_p10", "hu_p50", "hu_p90", "hu_max", "shell_hu_mean", "contrast_hu",
    "lung_depth_mm", "wall_contact",
    *[f"{k}_s{s:g}" for s in HESSIAN_SCALES_MM for k in ("rb", "ra", "strength")],
    "frangi_mask", "frangi_shell", "crossings", "sphere_dense_frac",
)


@dataclass(frozen=True)
class FeatureConfig:
    """Settings of :func:`candidate_features`.

    Attributes:
        crop_mm: edge of the stage-2 segmentation crop (mm); a mask voxel on its faces
            means the mask was cut by the crop (``crop_face_voxels``).
        window_mm: edge of the cube around each candidate in which the Hessian and
            Frangi filters run (mm).
        dense_hu: HU above which a voxel counts as dense (vessel, wall, nodule).
        sphere_gap_mm: the crossing sphere lies this far outside the candidate's
            equivalent radius (mm), 2 mm thick.
        empty_radius_mm: radius of the ball used for the intensity features when the
            mask is empty (mm; or half the detector's diameter when that is larger).
    """

    crop_mm: float = 32.0
    window_mm: float = 32.0
    dense_hu: float = -500.0
    sphere_gap_mm: float = 4.0
    empty_radius_mm: float = 2.0

    def __post_init__(self) -> None:
        if min(self.crop_mm, self.window_mm, self.sphere_gap_mm, self.empty_radius_mm) <= 0:
            raise ValueError("FeatureConfig: crop_mm, window_mm, sphere_gap_mm, empty_radius_mm must be > 0")


@dataclass(frozen=True, eq=False)
class CandidateFeatures:
    """Feature rows of one scan's candidates.

    Attributes:
        series_uid: the scan.
        names: column names (:data:`FEATURE_NAMES`).
        values: ``float64 (N, F)``, row ``i`` = candidate ``i`` of the Detections.
    """

    series_uid: str
    names: tuple[str, ...]
    values: np.ndarray

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float64).reshape(-1, len(self.names))
        object.__setattr__(self, "values", v)

    def __len__(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True, eq=False)
class LungField:
    """A coarse lung field of a scan.

    Attributes:
        mask: ``bool [z', y', x']``, the scan subsampled by ``stride`` (closed and
            hole-filled, so vessels and nodules inside the lung belong to it).
        stride: ``(sz, sy, sx)`` subsampling of the scan grid.
        depth_mm: ``float32 [z', y', x']`` distance to the field's edge (mm, 0 outside).
    """

    mask: np.ndarray
    stride: tuple[int, int, int]
    depth_mm: np.ndarray

    def lookup(self, voxels_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inside ``bool (P,)``, depth mm ``(P,)``) at full-grid voxel indices ``(P, 3)``."""
        idx = np.floor(np.asarray(voxels_zyx, dtype=np.float64).reshape(-1, 3) / np.asarray(self.stride)).astype(int)
        ok = np.all((idx >= 0) & (idx < np.asarray(self.mask.shape)), axis=1)
        inside = np.zeros(len(idx), dtype=bool)
        depth = np.zeros(len(idx))
        i = idx[ok]
        inside[ok] = self.mask[i[:, 0], i[:, 1], i[:, 2]]
        depth[ok] = self.depth_mm[i[:, 0], i[:, 1], i[:, 2]]
        return inside, depth


def lung_field(hu: np.ndarray, spacing_zyx: tuple[float, float, float], *, step_mm: float = 2.0,
               air_hu: float = -400.0, close_mm: float = 6.0) -> LungField:
    """Classical lung field: air (< ``air_hu``) not connected to the in-plane borders of the
    scan (outside air), components of at least 5% of the largest, closed by ``close_mm``
    and hole-filled, on a grid subsampled to about ``step_mm``.

    Args:
        hu: ``[z, y, x]`` HU.
        spacing_zyx: voxel size of ``hu`` (mm).
    """
    from scipy import ndimage

    stride = tuple(max(1, int(round(step_mm / float(s)))) for s in spacing_zyx)
    sub = np.asarray(hu)[:: stride[0], :: stride[1], :: stride[2]]
    coarse = np.asarray(spacing_zyx, dtype=np.float64) * np.asarray(stride)
    air = sub < air_hu
    lab, n = ndimage.label(air)
    mask = np.zeros(sub.shape, dtype=bool)
    if n:
        border = np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(),
                                           lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
        sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
        sizes[0] = 0
        sizes[border] = 0
        if sizes.max() > 0:
            keep = np.flatnonzero(sizes >= 0.05 * sizes.max())
            mask = np.isin(lab, keep)
            it = max(1, int(round(close_mm / float(coarse.mean()))))
            mask = ndimage.binary_closing(np.pad(mask, it), iterations=it)[it:-it, it:-it, it:-it]
            mask = ndimage.binary_fill_holes(mask)
    depth = ndimage.distance_transform_edt(mask, sampling=coarse).astype(np.float32) if mask.any() else \
        np.zeros(sub.shape, dtype=np.float32)
    return LungField(mask=mask, stride=stride, depth_mm=depth)  # type: ignore[arg-type]


def _cut(hu: np.ndarray, lo: np.ndarray, size: np.ndarray, pad: float = -1024.0) -> np.ndarray:
    """``float32`` block of ``hu`` starting at voxel ``lo`` with shape ``size``, padded outside."""
    out = np.full(tuple(int(v) for v in size), pad, dtype=np.float32)
    shape = np.asarray(hu.shape)
    a = np.maximum(lo, 0)
    b = np.minimum(lo + size, shape)
    if np.all(b > a):
        src = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
        dst = tuple(slice(int(x - o), int(y - o)) for x, y, o in zip(a, b, lo))
        out[dst] = hu[src]
    return out


def _sym3_eigenvalues(h: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """Eigenvalues ``[..., 3]`` of symmetric 3x3 matrices given by their upper entries
    (closed form, Smith 1961), sorted by increasing magnitude."""
    a00, a11, a22, a01, a02, a12 = (h[k] for k in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)))
    q = (a00 + a11 + a22) / 3.0
    p1 = a01**2 + a02**2 + a12**2
    p2 = (a00 - q) ** 2 + (a11 - q) ** 2 + (a22 - q) ** 2 + 2.0 * p1
    p = np.sqrt(p2 / 6.0)
    safe = np.where(p > 0, p, 1.0)
    b00, b11, b22 = (a00 - q) / safe, (a11 - q) / safe, (a22 - q) / safe
    b01, b02, b12 = a01 / safe, a02 / safe, a12 / safe
    det = b00 * (b11 * b22 - b12**2) - b01 * (b01 * b22 - b12 * b02) + b02 * (b01 * b12 - b11 * b02)
    phi = np.arccos(np.clip(det / 2.0, -1.0, 1.0)) / 3.0
    e1 = q + 2.0 * p * np.cos(phi)
    e3 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    ev = np.stack([e1, 3.0 * q - e1 - e3, e3], axis=-1)
    return np.take_along_axis(ev, np.argsort(np.abs(ev), axis=-1), axis=-1)


def _hessian_eigenvalues(img: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Eigenvalues ``[z, y, x, 3]`` of the Gaussian Hessian of ``img`` at every voxel,
    scale-normalised by ``sigma^2`` and sorted by increasing magnitude."""
    from scipy import ndimage

    orders = {(0, 0): (2, 0, 0), (1, 1): (0, 2, 0), (2, 2): (0, 0, 2),
              (0, 1): (1, 1, 0), (0, 2): (1, 0, 1), (1, 2): (0, 1, 1)}
    h = {k: ndimage.gaussian_filter(img.astype(np.float64), sigma_vox, order=o, mode="nearest") * sigma_vox**2
         for k, o in orders.items()}
    return _sym3_eigenvalues(h)


def _vesselness(ev: np.ndarray, alpha: float = 0.5, beta: float = 0.5) -> np.ndarray:
    """Frangi et al. (1998) vesselness of bright tubes from sorted eigenvalues ``[..., 3]``
    (``c`` = half the largest structure strength, as in :func:`skimage.filters.frangi`)."""
    a1, a2, a3 = np.abs(ev[..., 0]), np.abs(ev[..., 1]), np.abs(ev[..., 2])
    ra = np.divide(a2, a3, out=np.zeros_like(a2), where=a3 > 0)
    rb = np.divide(a1, np.sqrt(a2 * a3), out=np.zeros_like(a1), where=a2 * a3 > 0)
    s2 = a1**2 + a2**2 + a3**2
    c2 = max(float(s2.max()) / 4.0, 1e-12)
    v = (1 - np.exp(-(ra**2) / (2 * alpha**2))) * np.exp(-(rb**2) / (2 * beta**2)) * (1 - np.exp(-s2 / (2 * c2)))
    return np.where((ev[..., 1] < 0) & (ev[..., 2] < 0), v, 0.0)


def _surface_area_mm2(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    from skimage.measure import marching_cubes, mesh_surface_area

    padded = np.pad(mask.astype(np.float32), 1)
    verts, faces, _, _ = marching_cubes(padded, 0.5, spacing=spacing)
    return float(mesh_surface_area(verts, faces))


def _shell(mask: np.ndarray, inner_vox: int, outer_vox: int) -> np.ndarray:
    from scipy import ndimage

    outer = ndimage.binary_dilation(mask, iterations=outer_vox)
    inner = ndimage.binary_dilation(mask, iterations=inner_vox) if inner_vox > 0 else mask
    return outer & ~inner


def _one_candidate(
    hu: np.ndarray, geometry: VolumeGeometry, center_xyz: np.ndarray, det_diameter: float, m: NoduleMask,
    lung: LungField, cfg: FeatureConfig,
) -> dict[str, float]:
    from scipy import ndimage

    sp = np.asarray(geometry.spacing_zyx, dtype=np.float64)
    mean_sp = float(sp.mean())
    f: dict[str, float] = {}
    # the analysis window, centred on the detection, holding the mask
    wsize = np.maximum(1, np.rint(cfg.window_mm / sp)).astype(int)
    c_vox = np.rint(geometry.world_to_voxel(np.asarray(center_xyz, dtype=np.float64))).astype(int)
    wlo = c_vox - wsize // 2
    win = _cut(hu, wlo, wsize)
    wmask = np.zeros(win.shape, dtype=bool)
    if not m.empty:
        full_idx = np.argwhere(m.mask) + m.box_voxel[:3]
        local = full_idx - wlo
        ok = np.all((local >= 0) & (local < wsize), axis=1)
        wmask[tuple(local[ok].T)] = True
    empty = not wmask.any()
    f["mask_empty"] = float(m.empty)
    f["volume_mm3"] = float(m.volume_mm3)
    f["log_volume"] = float(np.log1p(m.volume_mm3))
    f["max_diameter_mm"] = float(m.max_diameter_mm)
    center_local = c_vox - wlo
    if empty:  # a small ball at the detection for the intensity features
        r = max(cfg.empty_radius_mm, det_diameter / 2.0)
        zz, yy, xx = np.indices(win.shape)
        d2 = ((zz - center_local[0]) * sp[0]) ** 2 + ((yy - center_local[1]) * sp[1]) ** 2 + \
            ((xx - center_local[2]) * sp[2]) ** 2
        region = d2 <= r * r
        for k in ("crop_face_voxels", "major_axis_mm", "elongation", "flatness", "sphericity", "compactness",
                  "box_fill", "offset_mm"):
            f[k] = float("nan")
        eq_radius = r
        centroid_local = center_local.astype(np.float64)
    else:
        region = wmask
        idx = np.argwhere(m.mask)
        full_idx = idx + m.box_voxel[:3]
        csize = np.maximum(1, np.rint(cfg.crop_mm / sp)).astype(int)
        clo = c_vox - csize // 2
        chi = clo + csize
        f["crop_face_voxels"] = float(np.count_nonzero(np.any((full_idx == clo) | (full_idx == chi - 1), axis=1)))
        pts = idx * sp
        if len(pts) >= 3:
            lam = np.sort(np.clip(np.linalg.eigvalsh(np.cov(pts.T)), 0.0, None))[::-1]
        else:
            lam = np.zeros(3)
        f["major_axis_mm"] = float(4.0 * np.sqrt(lam[0]))
        f["elongation"] = float(np.sqrt(lam[1] / lam[0])) if lam[0] > 0 else float("nan")
        f["flatness"] = float(np.sqrt(lam[2] / lam[0])) if lam[0] > 0 else float("nan")
        vol = float(len(idx) * np.prod(sp))
        area = _surface_area_mm2(m.mask, tuple(sp))  # type: ignore[arg-type]
        f["sphericity"] = float(np.pi ** (1 / 3) * (6 * vol) ** (2 / 3) / area) if area > 0 else float("nan")
        centroid = pts.mean(axis=0)
        rmax = float(np.sqrt(np.max(np.sum((pts - centroid) ** 2, axis=1)))) + mean_sp / 2.0
        f["compactness"] = vol / (4.0 / 3.0 * np.pi * rmax**3)
        f["box_fill"] = float(len(idx) / np.prod(m.mask.shape))
        f["offset_mm"] = float(np.linalg.norm(np.asarray(m.center_xyz_mm) - np.asarray(center_xyz)))
        eq_radius = float((3.0 * vol / (4.0 * np.pi)) ** (1 / 3))
        centroid_local = (idx.mean(axis=0) + m.box_voxel[:3] - wlo).astype(np.float64)
    vals = win[region]
    if vals.size == 0:
        vals = np.array([np.nan])
    f["hu_mean"] = float(np.mean(vals))
    f["hu_std"] = float(np.std(vals))
    f["hu_p10"], f["hu_p50"], f["hu_p90"] = (float(v) for v in np.percentile(vals, [10, 50, 90]))
    f["hu_max"] = float(np.max(vals))
    one, three = max(1, int(round(1.0 / mean_sp))), max(2, int(round(3.0 / mean_sp)))
    shell = _shell(region, one, three)
    f["shell_hu_mean"] = float(win[shell].mean()) if shell.any() else float("nan")
    f["contrast_hu"] = f["hu_mean"] - f["shell_hu_mean"]

    # chest wall: depth of the candidate in the lung field and contact of the mask's shell
    _, depth = lung.lookup(c_vox[None])
    f["lung_depth_mm"] = float(depth[0])
    contact_shell = _shell(region, 0, max(1, int(round(1.5 / mean_sp))))
    shell_vox = np.argwhere(contact_shell) + wlo
    inside, _ = lung.lookup(shell_vox)
    f["wall_contact"] = float(1.0 - inside.mean()) if len(inside) else float("nan")

    # Hessian ratios at the brightest blob point within 3 mm of the centroid
    zz, yy, xx = np.indices(win.shape)
    near = ((zz - centroid_local[0]) * sp[0]) ** 2 + ((yy - centroid_local[1]) * sp[1]) ** 2 + \
        ((xx - centroid_local[2]) * sp[2]) ** 2 <= 9.0
    pts_near = np.argwhere(near)
    if len(pts_near) == 0:
        pts_near = np.clip(np.rint(centroid_local), 0, np.asarray(win.shape) - 1).astype(int)[None]
    vessel = np.zeros(win.shape)
    for s in HESSIAN_SCALES_MM:
        ev_all = _hessian_eigenvalues(win, s / mean_sp)
        if s <= 3.0:
            vessel = np.maximum(vessel, _vesselness(ev_all))
        ev = ev_all[tuple(pts_near.T)]
        best = int(np.argmin(ev.sum(axis=1)))  # most negative trace: brightest blob / tube
        l1, l2, l3 = (float(abs(v)) for v in ev[best])
        bright = ev[best, 2] < 0
        f[f"rb_s{s:g}"] = float(l1 / np.sqrt(l2 * l3)) if bright and l2 * l3 > 0 else 0.0
        f[f"ra_s{s:g}"] = float(l2 / l3) if bright and l3 > 0 else 0.0
        f[f"strength_s{s:g}"] = float(np.sqrt(np.sum(ev[best] ** 2)))
    f["frangi_mask"] = float(vessel[region].mean())
    ring = _shell(region, max(1, int(round(2.0 / mean_sp))), max(2, int(round(5.0 / mean_sp))))
    f["frangi_shell"] = float(vessel[ring].mean()) if ring.any() else float("nan")

    # dense structures crossing a sphere around the candidate
    r_in = eq_radius + cfg.sphere_gap_mm
    d = np.sqrt(((zz - centroid_local[0]) * sp[0]) ** 2 + ((yy - centroid_local[1]) * sp[1]) ** 2 +
                ((xx - centroid_local[2]) * sp[2]) ** 2)
    sphere = (d >= r_in) & (d < r_in + 2.0)
    dense = sphere & (win > cfg.dense_hu)
    lab, n = ndimage.label(dense, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(lab.ravel())[1:] if n else np.zeros(0)
    f["crossings"] = float(np.count_nonzero(sizes >= 3))
    f["sphere_dense_frac"] = float(dense.sum() / sphere.sum()) if sphere.any() else float("nan")
    return f


def candidate_features(
    hu: np.ndarray,
    geometry: VolumeGeometry,
    detections: Detections,
    masks: Sequence[NoduleMask],
    *,
    config: FeatureConfig = FeatureConfig(),
    lung: LungField | None = None,
) -> CandidateFeatures:
    """One row of :data:`FEATURE_NAMES` per candidate (``masks[i]`` belongs to candidate ``i``).

    Args:
        hu: ``[z, y, x]`` HU of the scan on ``geometry``.
        detections: the scan's stage-1 candidates (world mm).
        masks: their stage-2 masks, same order (:meth:`NnUnetSegmenter.segment`).
        lung: the scan's :func:`lung_field` (computed here when None).

    Raises:
        ValueError: ``masks`` and ``detections`` differ in length or scan.
    """
    if len(masks) != len(detections):
        raise ValueError(f"{len(detections)} detections but {len(masks)} masks")
    for m in masks:
        if m.series_uid != detections.series_uid:
            raise ValueError(f"mask of scan {m.series_uid} given for detections of {detections.series_uid}")
    hu = np.asarray(hu)
    if lung is None and len(detections):
        lung = lung_field(hu, geometry.spacing_zyx)
    rank = np.empty(len(detections))
    rank[np.argsort(-detections.scores, kind="stable")] = np.arange(len(detections))
    rows = []
    for i, m in enumerate(masks):
        assert lung is not None
        f = _one_candidate(hu, geometry, detections.centers_xyz_mm[i], float(detections.diameters_mm[i]), m, lung,
                           config)
        f["det_score"] = float(detections.scores[i])
        f["det_rank"] = float(rank[i])
        f["det_diameter_mm"] = float(detections.diameters_mm[i])
        rows.append([f[k] for k in FEATURE_NAMES])
    values = np.asarray(rows, dtype=np.float64).reshape(len(masks), len(FEATURE_NAMES))
    return CandidateFeatures(detections.series_uid, FEATURE_NAMES, values)
