"""Classical lung fields: right and left lung masks from a CT volume (no training).

:func:`lung_fields` works on a block-averaged copy of the scan (voxels of about
``work_mm``; 0.7 x 0.7 x 2.5 mm LIDC voxels become 2.1 x 2.1 x 2.5 mm) and
upsamples the labels to the scan's grid by repetition. In that copy, with the
array flipped so that index x grows to the patient's left, y posterior and z
superior:

1. **Air**: voxels below ``threshold_hu``.
2. **Outside air** (around the body, the table, the scanner's field-of-view
   padding) is every axial 2D air component that touches the image border;
   the rest is air inside the body. Its 3D components of at least
   ``min_component_ml`` and ``component_fraction`` of the largest are the lung
   candidates (bowel gas and small pockets fall out).
3. **Airways**: the lung apex level is the highest slice of an unbroken run
   (upwards from the slice with the most air) of slices holding a wide air
   section (reaching ``lateral_mm + 15`` mm from the body's midline);
   narrower sections above it (trachea, larynx, pharynx) are airway. The
   trachea is the longest vertical chain of central, trachea-sized 2D
   sections, in the air mask or, where the trachea touches a lung in that
   mask, in the lumen mask (block mean below ``airway_hu``: lumen -1000 HU,
   parenchyma about -850). From the chain's ends it is followed slice by
   slice (:func:`_follow`): a section joins when it overlaps the airway of
   the previous slice and is at most ``max_airway_area_mm2`` (a larger one
   is lung that a bronchus opened into: that branch ends). That takes the
   trachea and the main bronchi down to where they enter the lungs. The
   airway, grown by one voxel in plane, is removed.
4. **Left / right**: the two largest remaining components, when the second is
   large; otherwise (lungs touching at the anterior or posterior junction
   line, or joined by a bronchus the tracking missed) the component is
   eroded (distance transform) until it falls into two large cores, and each
   voxel goes to the nearer core; stray pieces go to the other lung. If
   erosion never separates it, the cut is the thinnest column near the
   midline, slice by slice. The lung with the smaller world x is the right
   lung (LPS: +x is the patient's left).
5. **Vessels and nodules**: per lung, axial holes are filled, then a 3D
   closing with a ball of radius ``close_mm`` (exact, by distance transforms
   with the voxel spacing) fills the dents that juxtapleural and
   juxtavascular nodules up to about ``2 * close_mm`` across make in the lung
   surface; holes are filled again.

Timing: LIDC-IDRI-0001 (133 x 512 x 512) takes 1.5 s of CPU time (3-4 s wall
on the loaded 2-core development machine); see docs/lungs.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lidc_det.boxes import box_slices, label_boxes, mask_to_box
from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections

RIGHT = 1
"""Label of the right lung (patient's right: world x smaller, LPS)."""
LEFT = 2
"""Label of the left lung."""
LABEL_NAMES = {0: "background", RIGHT: "right lung", LEFT: "left lung"}

class LungFieldError(LidcDetError):
    """No lung field could be found in a volume (the message says why)."""


@dataclass(frozen=True, eq=False)
class LungFields:
    """Right and left lung fields of one CT volume.

    Attributes:
        labels: ``[z, y, x]`` uint8 on ``geometry``: 0 background, :data:`RIGHT`
            (1) right lung, :data:`LEFT` (2) left lung. Vessels, airways inside
            the lung and nodules (juxtapleural ones included, up to about
            ``2 * close_mm``) are inside the field.
        geometry: the volume's geometry (the labels' grid).
        airways: ``[z, y, x]`` bool, the trachea / main bronchi (and the larynx
            and pharynx when the scan reaches them) that were removed; all False
            when no trachea was found (for example a scan that starts below the carina).
        split: how the lungs were separated: ``"components"`` (already apart),
            ``"erosion"``, ``"midline"`` or ``"one lung"`` (only one was found).
        work_spacing_zyx: voxel size (mm) of the block-averaged copy the labels were made on.
        threshold_hu, close_mm: the settings used.
        seconds: wall time of :func:`lung_fields`.
    """

    labels: np.ndarray
    geometry: VolumeGeometry
    airways: np.ndarray
    split: str
    work_spacing_zyx: tuple[float, float, float]
    threshold_hu: float
    close_mm: float
    seconds: float

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.geometry.spacing_zyx)) / 1000.0

    @property
    def mask(self) -> np.ndarray:
        """``[z, y, x]`` bool: either lung."""
        return self.labels > 0

    @property
    def right(self) -> np.ndarray:
        """``[z, y, x]`` bool: the right lung."""
        return self.labels == RIGHT

    @property
    def left(self) -> np.ndarray:
        """``[z, y, x]`` bool: the left lung."""
        return self.labels == LEFT

    @property
    def volumes_ml(self) -> dict[str, float]:
        """``{"right": ml, "left": ml, "total": ml}``."""
        counts = np.bincount(self.labels.ravel(), minlength=3)
        r, le = float(counts[RIGHT]) * self.voxel_ml, float(counts[LEFT]) * self.voxel_ml
        return {"right": r, "left": le, "total": r + le}

    def label_at(self, points_xyz_mm: np.ndarray) -> np.ndarray:
        """Label (0, 1, 2) of the voxel nearest each world LPS point ``(N, 3)`` mm; 0 outside the volume."""
        vox = np.atleast_2d(self.geometry.world_to_voxel(np.asarray(points_xyz_mm, dtype=float)))
        idx = np.rint(vox).astype(np.int64)
        inside = self.geometry.contains_voxel(vox)
        out = np.zeros(len(idx), dtype=np.uint8)
        if inside.any():
            k = idx[inside]
            out[inside] = self.labels[k[:, 0], k[:, 1], k[:, 2]]
        return out

    def near(self, points_xyz_mm: np.ndarray, margin_mm: float) -> np.ndarray:
        """``(N,)`` bool: a lung voxel lies within ``margin_mm`` of each world point.

        The same as asking whether the point is inside the lung field dilated
        by a ball of ``margin_mm`` (voxel centres, physical spacing), without
        dilating the whole volume; a point in a lung voxel is near at any margin
        (0 included). Points outside the volume are False.
        """
        pts = np.atleast_2d(np.asarray(points_xyz_mm, dtype=float))
        vox = np.atleast_2d(self.geometry.world_to_voxel(pts)) if len(pts) else np.zeros((0, 3))
        sp = np.asarray(self.geometry.spacing_zyx)
        half = np.floor(max(0.0, margin_mm) / sp).astype(int)
        shape = np.asarray(self.labels.shape)
        out = self.label_at(pts) > 0 if len(pts) else np.zeros(0, dtype=bool)
        for i, v in enumerate(vox):
            c = np.rint(v).astype(int)
            if out[i] or np.any(c < 0) or np.any(c >= shape):
                continue
            lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, shape)
            win = self.labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > 0
            if not win.any():
                continue
            zz, yy, xx = np.nonzero(win)
            d2 = ((zz + lo[0] - v[0]) * sp[0]) ** 2 + ((yy + lo[1] - v[1]) * sp[1]) ** 2 + ((xx + lo[2] - v[2]) * sp[2]) ** 2
            out[i] = bool(d2.min() <= margin_mm**2 + 1e-9)
        return out


# ------------------------------------------------------------------ orientation
def _canonical_flips(geometry: VolumeGeometry) -> tuple[bool, bool, bool]:
    """Which array axes (z, y, x) to flip so that x grows left, y posterior, z superior.

    Raises:
        LungFieldError: the index axes are not (close to) the world axes in
            order (a sagittal or coronal acquisition).
    """
    m = geometry.direction_matrix  # column c: world vector of index axis c (x, y, z)
    flips = []
    for index_axis in (2, 1, 0):  # z, y, x index axes -> world z, y, x
        col = m[:, index_axis]
        if int(np.argmax(np.abs(col))) != index_axis:
            raise LungFieldError(
                f"lung fields need an axial series (index axes along world x, y, z); direction {geometry.direction}"
            )
        flips.append(bool(col[index_axis] < 0))
    return (flips[0], flips[1], flips[2])


def _flip(a: np.ndarray, flips: tuple[bool, bool, bool]) -> np.ndarray:
    axes = tuple(i for i, f in enumerate(flips) if f)
    return np.flip(a, axis=axes) if axes else a


# ------------------------------------------------------------------ helpers
def _block_factors(spacing_zyx: Sequence[float], work_mm: float) -> tuple[int, int, int]:
    return tuple(max(1, int(round(work_mm / s))) for s in spacing_zyx)  # type: ignore[return-value]


def _block_mean(hu: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``f``-sized blocks, float32; a last partial block along an axis is dropped."""
    a = np.asarray(hu)
    if f == (1, 1, 1):
        return a.astype(np.float32, copy=False)
    out: np.ndarray = a
    for axis, k in enumerate(f):
        if k == 1:
            continue
        n = (out.shape[axis] // k) * k
        sl: list[slice] = [slice(None)] * 3
        sl[axis] = slice(0, n, k)
        acc = out[tuple(sl)].astype(np.float32)
        for j in range(1, k):
            sl[axis] = slice(j, n, k)
            acc += out[tuple(sl)]
        out = acc
    return out * np.float32(1.0 / np.prod(f))


def _upsample(small: np.ndarray, f: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Repeat each voxel ``f`` times along each axis; edge values fill a last partial block."""
    out = small
    for axis, k in enumerate(f):
        if k > 1:
            out = np.repeat(out, k, axis=axis)
    pad = [(0, max(0, n - m)) for n, m in zip(shape, out.shape)]
    if any(p[1] for p in pad):
        out = np.pad(out, pad, mode="edge")
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])


_PLANE8 = np.zeros((3, 3, 3), dtype=bool)
_PLANE8[1] = True  # 8-connected within an axial slice, no connection across slices


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice of a ``[z, y, x]`` bool mask."""
    from scipy import ndimage as ndi

    if not mask.any():
        return mask.copy()
    box = box_slices(mask_to_box(mask), mask.shape, 1)
    out = mask.copy()
    padded = np.pad(mask[box], ((1, 1), (0, 0), (0, 0)))
    out[box] = ndi.binary_fill_holes(padded, structure=_PLANE8)[1:-1]
    return out


def _components(mask: np.ndarray, min_vox: float, fraction: float) -> list[np.ndarray]:
    """3D (6-connected) components of ``mask`` with at least ``min_vox`` voxels and
    ``fraction`` of the largest, largest first."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] > 0 and sizes[i] >= min_vox and sizes[i] >= fraction * sizes.max()]
    return [lab == i for i in keep]


def _closing(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Binary closing with a ball of ``radius_mm`` (exact Euclidean, anisotropic spacing)."""
    from scipy import ndimage as ndi

    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    margin = [int(np.ceil(radius_mm / s)) + 2 for s in spacing]
    tight = box_slices(mask_to_box(mask), mask.shape)
    sub = mask[tight]
    sub = np.pad(sub, [(m, m) for m in margin])
    dil = ndi.distance_transform_edt(~sub, sampling=spacing) <= radius_mm
    closed = ndi.distance_transform_edt(dil, sampling=spacing) > radius_mm
    closed = closed[margin[0] : closed.shape[0] - margin[0], margin[1] : closed.shape[1] - margin[1], margin[2] : closed.shape[2] - margin[2]]
    out = mask.copy()
    out[tight] |= closed
    return out


# ------------------------------------------------------------------ airways
def _airways(
    cand: np.ndarray,
    lumen: np.ndarray,
    spacing: tuple[float, float, float],
    midline_x: float,
    *,
    lateral_mm: float,
    max_airway_area_mm2: float,
    max_depth_mm: float,
) -> np.ndarray:
    """Trachea, main bronchi and the airway above the lung apices in the canonical small grid.

    Args:
        cand: ``[z, y, x]`` bool, lung candidates (air inside the body, large components).
        lumen: ``[z, y, x]`` bool, airway-lumen air (strict threshold).
        spacing: working voxel size (mm, z, y, x).
        midline_x: x index of the body's midline.

    The trachea is the longest vertical chain of central, trachea-sized lumen
    cross-sections; from its lower end it is followed down (main bronchi) and
    from its upper end up (larynx), slice by slice, by :func:`_follow`.
    """
    from scipy import ndimage as ndi

    sz, sy, sx = spacing
    px_mm2 = sy * sx
    airway = np.zeros_like(cand)
    offset = np.abs(np.arange(cand.shape[2], dtype=float) - midline_x) * sx  # mm from the midline per x column
    # ---- lung apex level: highest slice of an unbroken run of lung-like (wide-reaching) sections
    lab, n = ndi.label(cand, structure=_PLANE8)
    if n == 0:
        return airway
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(float) * px_mm2
    boxes = label_boxes(lab, n).astype(int)
    cz = boxes[:, 0]
    reach = np.maximum(offset[boxes[:, 2]], offset[boxes[:, 5] - 1])  # farthest from the midline
    lung_like = (reach >= lateral_mm + 15.0) & (area >= 100.0)
    has_lung = np.zeros(cand.shape[0], dtype=bool)
    has_lung[cz[lung_like]] = True
    k_max = int(np.argmax(cand.sum(axis=(1, 2))))
    k_apex = k_max
    while k_apex + 1 < cand.shape[0] and has_lung[k_apex + 1]:
        k_apex += 1
    above = np.zeros(n + 1, dtype=bool)
    above[1:] = (cz > k_apex) & (reach < lateral_mm + 15.0)
    airway |= above[lab]
    del lab
    # ---- trachea: longest vertical chain of central, trachea-sized sections (in the air mask
    # or, where the trachea touches a lung there, in the lumen mask)
    lum = lumen & cand
    sections = np.zeros_like(cand)
    for mask in (cand, lum):
        lab, n = ndi.label(mask, structure=_PLANE8)
        if n == 0:
            continue
        flat = lab.ravel()
        cnt = np.bincount(flat, minlength=n + 1)
        mean_off = np.bincount(flat, weights=np.broadcast_to(offset, cand.shape).ravel(), minlength=n + 1) / np.maximum(cnt, 1)
        area = cnt.astype(float) * px_mm2
        tr_like = (mean_off <= lateral_mm) & (area >= 50.0) & (area <= max_airway_area_mm2)
        tr_like[0] = False
        sections |= tr_like[lab]
        del lab
    chain_st = np.zeros((3, 3, 3), dtype=bool)
    chain_st[1] = True
    chain_st[0, 1, 1] = chain_st[2, 1, 1] = True
    chains, nc = ndi.label(sections, structure=chain_st)
    if nc == 0:
        return airway
    boxes = label_boxes(chains, nc).astype(int)
    ext = boxes[:, 3] - boxes[:, 0]  # z extent of each chain (slices)
    best = int(np.argmax(ext)) + 1
    if ext[best - 1] * sz < 20.0:  # no trachea (e.g. the scan starts below the carina)
        return airway
    trachea = chains == best
    airway |= trachea
    z0, z1 = int(boxes[best - 1, 0]), int(boxes[best - 1, 3]) - 1
    max_gap = max(1, int(round(5.0 / sz)))
    airway |= _follow(cand, lum, trachea[z0], z0, -1, max(0, z0 - int(np.ceil(max_depth_mm / sz))), px_mm2, max_airway_area_mm2, max_gap)
    airway |= _follow(cand, lum, trachea[z1], z1, +1, cand.shape[0] - 1, px_mm2, max_airway_area_mm2, max_gap)
    # the lumen's rim (partial-volume voxels between lumen and wall), in plane
    return ndi.binary_dilation(airway, structure=_PLANE8) & cand


def _follow(
    cand: np.ndarray,
    lum: np.ndarray,
    start: np.ndarray,
    k0: int,
    step: int,
    k_end: int,
    px_mm2: float,
    max_area_mm2: float,
    max_gap: int,
) -> np.ndarray:
    """Follow an airway slice by slice from ``start`` (2D mask at slice ``k0``).

    In the next slice, the 2D components of the air mask ``cand`` that overlap
    the current airway (grown by 2 voxels) join it when none of them is larger
    than ``max_area_mm2``; when one is (the airway touches a lung there), the
    lumen mask ``lum`` is tried the same way, keeping its components up to
    that size. A slice where neither gives anything keeps the airway where it
    was (within ``cand``), for at most ``max_gap`` slices (streak artefacts
    can lift the lumen above the lumen threshold); then the branch ends.
    Returns a ``[z, y, x]`` bool mask (``start`` itself excluded).
    """
    from scipy import ndimage as ndi

    out = np.zeros(cand.shape, dtype=bool)
    region = start
    grow = np.ones((3, 3), dtype=bool)
    gap = 0
    for k in range(k0 + step, k_end + step, step):
        near = ndi.binary_dilation(region, structure=grow, iterations=2)
        found = None
        for mask, strict in ((cand[k], True), (lum[k], False)):
            lab2, n2 = ndi.label(mask, structure=grow)
            hit = np.unique(lab2[near & (lab2 > 0)])
            if len(hit) == 0:
                continue
            a2 = np.bincount(lab2.ravel(), minlength=n2 + 1).astype(float) * px_mm2
            small = [int(i) for i in hit if a2[i] <= max_area_mm2]
            if small and (not strict or len(small) == len(hit)):
                found = np.isin(lab2, small)
                break
        if found is None:
            gap += 1
            if gap > max_gap:
                break
            found = region & cand[k]
            if not found.any():
                break
        else:
            gap = 0
        region = found
        out[k] = region
    return out


# ------------------------------------------------------------------ left / right
def _split_one(
    comp: np.ndarray, midline_x: float, spacing: tuple[float, float, float], max_erosion_mm: float
) -> tuple[np.ndarray, np.ndarray, str]:
    """Split one component into two lungs: erosion + nearest-core assignment, else a midline cut.

    The component is eroded by growing depths (the distance transform, mm)
    until it falls into two parts of at least 8 % of it each; every voxel then
    goes to the nearer part. Returns ``(part with smaller x, part with larger x, method)``.
    """
    from scipy import ndimage as ndi

    box = box_slices(mask_to_box(comp), comp.shape, 1)
    sub = comp[box]
    total = int(sub.sum())
    depth = ndi.distance_transform_edt(sub, sampling=spacing)
    step = min(spacing)
    t = step
    while t <= max_erosion_mm:
        parts = _components(depth > t, 0.08 * total, 0.0)
        if len(parts) >= 2:
            seeds = np.zeros(sub.shape, dtype=np.uint8)
            seeds[parts[0]] = 1
            seeds[parts[1]] = 2
            _, nearest = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
            owner = seeds[tuple(nearest)]
            a, b = np.zeros_like(comp), np.zeros_like(comp)
            a[box] = sub & (owner == 1)
            b[box] = sub & (owner == 2)
            if np.nonzero(a)[2].mean() > np.nonzero(b)[2].mean():
                a, b = b, a
            return (*_tidy(a, b), "erosion")
        t += step
    # midline cut: per slice, the column with the fewest lung voxels within 40 voxels of the midline
    lo_x = np.zeros(comp.shape, dtype=bool)
    m = int(round(midline_x))
    x0, x1 = max(0, m - 40), min(comp.shape[2], m + 41)
    for k in range(comp.shape[0]):
        if not comp[k].any():
            continue
        cols = comp[k, :, x0:x1].sum(axis=0).astype(float)
        cols += 1e-3 * np.abs(np.arange(x0, x1) - m)  # ties: nearest the midline
        lo_x[k, :, : x0 + int(np.argmin(cols))] = True
    return comp & lo_x, comp & ~lo_x, "midline"


def _tidy(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give every piece of ``a`` (``b``) that is not its largest 3D component to the other lung."""
    from scipy import ndimage as ndi

    a, b = a.copy(), b.copy()
    for src, dst in ((a, b), (b, a)):
        lab, n = ndi.label(src)
        if n > 1:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            stray = (lab > 0) & (lab != int(np.argmax(sizes)))
            src[stray] = False
            dst[stray] = True
    return a, b


def _two_lungs(
    parts: list[np.ndarray], midline_x: float, spacing: tuple[float, float, float], *, lateral_mm: float,
    max_erosion_mm: float, merge_extras: bool,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Right / left of lung components (largest first): ``(part with smaller x index, other, method)``.

    Two or more components: the two largest (smaller ones go to the nearer lung by centroid x when
    ``merge_extras``, else are dropped). One component that reaches more than ``lateral_mm`` to both
    sides of column ``midline_x``: :func:`_split_one`. Else one lung, on its side of the midline
    (the other part empty).
    """
    if len(parts) >= 2:
        a, b = parts[0], parts[1]
        for extra in parts[2:] if merge_extras else ():
            xe = np.nonzero(extra)[2].mean()
            xa, xb = np.nonzero(a)[2].mean(), np.nonzero(b)[2].mean()
            if abs(xe - xa) <= abs(xe - xb):
                a = a | extra
            else:
                b = b | extra
        if np.nonzero(a)[2].mean() > np.nonzero(b)[2].mean():
            a, b = b, a
        return a, b, "components"
    comp = parts[0]
    xs = np.nonzero(comp)[2]
    reach = lateral_mm / spacing[2]
    if xs.min() < midline_x - reach and xs.max() > midline_x + reach:
        return _split_one(comp, midline_x, spacing, max_erosion_mm)
    empty = np.zeros_like(comp)
    return (comp, empty, "one lung") if xs.mean() < midline_x else (empty, comp, "one lung")


def split_lung_mask(
    mask: np.ndarray, geometry: VolumeGeometry, *, max_erosion_mm: float = 25.0, component_fraction: float = 0.15,
    lateral_mm: float = 25.0,
) -> tuple[np.ndarray, str]:
    """Right / left labels of a lung mask that does not say which lung is which (a network's, say).

    The same split as :func:`lung_fields`: components of at least ``component_fraction`` of the
    largest are lungs (the two largest; smaller pieces are dropped); one component that reaches
    more than ``lateral_mm`` to both sides of the image's centre column is split by erosion
    until two cores separate (else a thinnest-column cut); the part with the smaller world x
    (LPS) is the patient's right.

    Args:
        mask: ``[z, y, x]`` bool, both lungs, on ``geometry``.
        geometry: the mask's geometry (any orientation).

    Returns:
        (uint8 labels 0 / ``RIGHT`` / ``LEFT`` on ``geometry``, method: ``"components"``,
        ``"erosion"``, ``"midline"``, ``"one lung"`` or ``"empty"``).
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.uint8)
    parts = _components(mask, 1.0, component_fraction)
    if not parts:
        return out, "empty"

    def world_x(m: np.ndarray) -> float:
        return float(geometry.voxel_to_world(np.argwhere(m).mean(axis=0))[0])

    spacing = tuple(float(v) for v in geometry.spacing_zyx)
    # the reconstruction field is centred on the patient
    a, b, method = _two_lungs(parts, (mask.shape[2] - 1) / 2.0, spacing, lateral_mm=lateral_mm,  # type: ignore[arg-type]
                              max_erosion_mm=max_erosion_mm, merge_extras=False)
    if not (a.any() and b.any()):
        one = a if a.any() else b
        centre_x = float(geometry.voxel_to_world((np.array(mask.shape, dtype=float) - 1.0) / 2.0)[0])
        out[one] = RIGHT if world_x(one) < centre_x else LEFT
        return out, method
    if world_x(a) > world_x(b):
        a, b = b, a
    out[a] = RIGHT
    out[b] = LEFT
    return out, method


# ------------------------------------------------------------------ main entry
def lung_fields(
    hu: np.ndarray,
    geometry: VolumeGeometry,
    *,
    close_mm: float = 10.0,
    threshold_hu: float = -400.0,
    airway_hu: float = -950.0,
    work_mm: float = 2.0,
    min_component_ml: float = 30.0,
    component_fraction: float = 0.15,
    lateral_mm: float = 25.0,
    max_airway_area_mm2: float = 700.0,
    max_depth_mm: float = 150.0,
    max_erosion_mm: float = 25.0,
) -> LungFields:
    """Right and left lung fields of a CT volume (see the module docstring for the method).

    Args:
        hu: ``[z, y, x]`` Hounsfield units on ``geometry``.
        geometry: the volume's geometry (an axial series; slices in either z order).
        close_mm: radius (mm) of the ball closing that puts juxtapleural nodules
            (up to about ``2 * close_mm`` across) and vessels inside the lung field.
        threshold_hu: air / tissue threshold on the block-averaged copy.
        airway_hu: lumen threshold for following the trachea and main bronchi.
        work_mm: target voxel size (mm) of the block-averaged working copy
            (integer block factors; an axis already coarser is kept).
        min_component_ml, component_fraction: an air component inside the body
            is a lung candidate when it holds at least this volume and this
            fraction of the largest one.
        lateral_mm: distance from the body's midline beyond which an air
            component is lung rather than trachea.
        max_airway_area_mm2: largest axial cross-section of an airway lumen.
        max_depth_mm: how far below the apex level the trachea is followed.
        max_erosion_mm: deepest erosion tried to separate touching lungs (mm).

    Returns:
        :class:`LungFields` on ``geometry``.

    Raises:
        LungFieldError: the volume's shape does not match ``geometry``, the
            series is not axial, or no air region inside the body is large enough.
    """
    from scipy import ndimage as ndi

    t0 = time.perf_counter()
    hu = np.asarray(hu)
    if hu.shape != geometry.shape_zyx:
        raise LungFieldError(f"hu shape {hu.shape} does not match geometry {geometry.shape_zyx}")
    flips = _canonical_flips(geometry)
    f = _block_factors(geometry.spacing_zyx, work_mm)
    small = _block_mean(_flip(hu, flips), f)
    spacing = tuple(s * k for s, k in zip(geometry.spacing_zyx, f))
    vox_ml = float(np.prod(spacing)) / 1000.0

    air = small < threshold_hu
    # outside air: axial components touching the image border
    lab2d, _ = ndi.label(air, structure=_PLANE8)
    border = np.unique(np.concatenate([lab2d[:, 0, :].ravel(), lab2d[:, -1, :].ravel(), lab2d[:, :, 0].ravel(), lab2d[:, :, -1].ravel()]))
    border = border[border > 0]
    outside = np.isin(lab2d, border)
    del lab2d
    inside = air & ~outside
    cands = _components(inside, min_component_ml / vox_ml, component_fraction)
    if not cands:
        raise LungFieldError(
            f"no air region inside the body of at least {min_component_ml:g} ml below {threshold_hu:g} HU: not a chest CT?"
        )
    body_cols = (~outside).sum(axis=(0, 1)).astype(float)  # body voxels per x column
    midline = float((body_cols * np.arange(len(body_cols))).sum() / max(body_cols.sum(), 1.0))
    del outside, inside, air
    # from here on, work inside the candidates' bounding box
    full_cand = np.logical_or.reduce(cands)
    box = box_slices(mask_to_box(full_cand), full_cand.shape, 1)
    cand = full_cand[box]
    del cands, full_cand
    midline_x = midline - box[2].start
    airway = _airways(
        cand,
        small[box] < airway_hu,
        spacing,  # type: ignore[arg-type]
        midline_x,
        lateral_mm=lateral_mm,
        max_airway_area_mm2=max_airway_area_mm2,
        max_depth_mm=max_depth_mm,
    )
    lungs = _components(cand & ~airway, min_component_ml / vox_ml, component_fraction)
    if not lungs:
        raise LungFieldError("no lung left after removing the airways")
    a, b, split = _two_lungs(lungs, midline_x, spacing, lateral_mm=lateral_mm,  # type: ignore[arg-type]
                             max_erosion_mm=max_erosion_mm, merge_extras=True)
    # a (smaller x index) is the patient's right in the canonical orientation (x grows left)
    filled = []
    for m in (a, b):
        m = _fill_holes_2d(m)
        m = _fill_holes_2d(_closing(m, close_mm, spacing))  # type: ignore[arg-type]
        filled.append(m)
    sub = np.zeros(cand.shape, dtype=np.uint8)
    sub[filled[0]] = RIGHT
    sub[filled[1] & ~(filled[0] & a)] = LEFT
    out_small = np.zeros(small.shape, dtype=np.uint8)
    out_small[box] = sub
    air_small = np.zeros(small.shape, dtype=bool)
    air_small[box] = airway & (sub == 0)
    labels = _flip(_upsample(out_small, f, hu.shape), flips)
    airways = _flip(_upsample(air_small, f, hu.shape), flips)
    return LungFields(
        labels=np.ascontiguousarray(labels),
        geometry=geometry,
        airways=np.ascontiguousarray(airways),
        split=split,
        work_spacing_zyx=spacing,  # type: ignore[arg-type]
        threshold_hu=float(threshold_hu),
        close_mm=float(close_mm),
        seconds=time.perf_counter() - t0,
    )


# ------------------------------------------------------------------ candidate restriction
DEFAULT_MARGIN_MM = 10.0
"""Default dilation (mm) of the lung field when restricting candidates to it."""


@dataclass(frozen=True, eq=False)
class Restriction:
    """Candidates restricted to the dilated lung field (:func:`restrict_detections`).

    Attributes:
        detections: the candidates kept (in their original order).
        dropped: the candidates whose centre lies farther than ``margin_mm`` from the lung field.
        margin_mm: the dilation used.
    """

    detections: Detections
    dropped: Detections
    margin_mm: float


def restrict_detections(detections: Detections, fields: LungFields, margin_mm: float = DEFAULT_MARGIN_MM) -> Restriction:
    """Drop candidates whose world centre is more than ``margin_mm`` from the lung field.

    The margin keeps juxtapleural and juxtavascular nodules whose centre sits
    just outside the (closed) field, and detections of large nodules whose
    centre the detector places off the lung; ``fields`` may be on any grid
    (the test is in world mm), so any detector's output can be restricted.
    """
    keep = fields.near(detections.centers_xyz_mm, margin_mm) if len(detections) else np.zeros(0, dtype=bool)

    def pick(m: np.ndarray) -> Detections:
        return Detections(
            detections.series_uid,
            detections.centers_xyz_mm[m],
            detections.diameters_mm[m],
            detections.scores[m],
            None if detections.boxes_voxel is None else detections.boxes_voxel[m],
        )

    return Restriction(pick(keep), pick(~keep), float(margin_mm))
