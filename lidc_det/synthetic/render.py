"""Fast rasterisers used by the twin: soft tubes (capsule chains), ellipsoids, smooth noise.

All shapes are drawn with a soft edge (a linear ramp of width ``edge_mm``
centred on the surface), which stands in for the in-plane blur of a CT kernel:
nothing in the twin is blurred after rendering. Coordinates are millimetres
on a :class:`Grid` (x, y relative to the image centre, z world), so slices
need not be evenly spaced.

Speed matters (a whole 512 x 512 x 300 scan in a few seconds on 2 cores):
every primitive works in its own bounding box with broadcast 1D coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "TubeSet", "draw_ellipsoid", "draw_tubes", "interp_matrix", "smooth_noise"]


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a ``[z, y, x]`` volume in millimetres.

    Attributes:
        x_mm: (nx,) column centres, mm, relative to the image centre (+x = patient left).
        y_mm: (ny,) row centres, mm, relative to the image centre (+y = posterior).
        z_mm: (nz,) slice centres, world mm (+z = superior), strictly increasing.
        thickness_mm: reconstructed slice thickness (the z partial-volume width).
    """

    x_mm: np.ndarray
    y_mm: np.ndarray
    z_mm: np.ndarray
    thickness_mm: float

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (len(self.z_mm), len(self.y_mm), len(self.x_mm))

    @property
    def pixel_mm(self) -> float:
        return float(self.x_mm[1] - self.x_mm[0])

    def index_range(self, axis: int, lo: float, hi: float) -> tuple[int, int]:
        """Half-open index range ``[i0, i1)`` of the voxels with centre in ``[lo, hi]`` along axis 0=z, 1=y, 2=x."""
        c = (self.z_mm, self.y_mm, self.x_mm)[axis]
        return int(np.searchsorted(c, lo, "left")), int(np.searchsorted(c, hi, "right"))


@dataclass(frozen=True)
class TubeSet:
    """Capsule segments with linearly varying radius (a vessel tree, a rib, the aorta...).

    Attributes:
        a_xyz, b_xyz: (N, 3) end points, mm (x, y relative to the image centre, z world).
        ra_mm, rb_mm: (N,) radius at ``a`` and at ``b``, mm.
    """

    a_xyz: np.ndarray
    b_xyz: np.ndarray
    ra_mm: np.ndarray
    rb_mm: np.ndarray

    def __len__(self) -> int:
        return len(self.ra_mm)

    @staticmethod
    def polyline(points_xyz: np.ndarray, radii_mm: np.ndarray) -> TubeSet:
        """Segments joining consecutive points (``(N, 3)`` points, ``(N,)`` radii)."""
        p = np.asarray(points_xyz, dtype=np.float64)
        r = np.broadcast_to(np.asarray(radii_mm, dtype=np.float64), (len(p),))
        return TubeSet(p[:-1], p[1:], r[:-1].copy(), r[1:].copy())

    @staticmethod
    def concat(sets: list[TubeSet]) -> TubeSet:
        sets = [s for s in sets if len(s)]
        if not sets:
            z = np.zeros((0, 3))
            return TubeSet(z, z, np.zeros(0), np.zeros(0))
        return TubeSet(
            np.concatenate([s.a_xyz for s in sets]),
            np.concatenate([s.b_xyz for s in sets]),
            np.concatenate([s.ra_mm for s in sets]),
            np.concatenate([s.rb_mm for s in sets]),
        )

    def subdivided(self, max_len_mm: float) -> TubeSet:
        """Split segments longer than ``max_len_mm`` into equal pieces (radius interpolated)."""
        if len(self) == 0:
            return self
        length = np.linalg.norm(self.b_xyz - self.a_xyz, axis=1)
        k = np.maximum(1, np.ceil(length / max_len_mm).astype(np.int64))
        if np.all(k == 1):
            return self
        seg = np.repeat(np.arange(len(self)), k)
        start = np.repeat(np.cumsum(k) - k, k)
        j = np.arange(len(seg)) - start
        f0 = (j / k[seg])[:, None]
        f1 = ((j + 1) / k[seg])[:, None]
        d = self.b_xyz - self.a_xyz
        dr = self.rb_mm - self.ra_mm
        return TubeSet(
            self.a_xyz[seg] + f0 * d[seg],
            self.a_xyz[seg] + f1 * d[seg],
            self.ra_mm[seg] + f0[:, 0] * dr[seg],
            self.ra_mm[seg] + f1[:, 0] * dr[seg],
        )

    def scaled(self, factor: float, add_mm: float = 0.0) -> TubeSet:
        """Same axes, radii ``r * factor + add_mm``."""
        return TubeSet(self.a_xyz, self.b_xyz, self.ra_mm * factor + add_mm, self.rb_mm * factor + add_mm)


def _segment_params(tubes: TubeSet, T: float, z_partial_volume: bool, weight: np.ndarray) -> dict[str, np.ndarray]:
    """Per-segment direction, stretch along z and peak (vectorised)."""
    d = tubes.b_xyz - tubes.a_xyz
    L2 = np.einsum("ij,ij->i", d, d)
    tiny = L2 < 1e-12
    d[tiny] = np.array([0.0, 0.0, 1e-3])
    L2[tiny] = 1e-6
    cosz = np.abs(d[:, 2]) / np.sqrt(L2)
    sinz = np.sqrt(np.clip(1.0 - cosz * cosz, 0.0, None))
    rmean = np.maximum(0.5 * (tubes.ra_mm + tubes.rb_mm), 0.2)
    if z_partial_volume and T > 0:
        kz = (rmean + 0.5 * T * sinz) / rmean
        amp = np.minimum(1.0, 2.0 * rmean / np.maximum(T * sinz, 1e-6))
    else:
        kz = np.ones_like(rmean)
        amp = np.ones_like(rmean)
    return {"d": d, "L2": L2, "kz": kz, "amp": amp * weight}


def draw_tubes(
    occ: np.ndarray,
    grid: Grid,
    tubes: TubeSet,
    *,
    edge_mm: float,
    z_partial_volume: bool = True,
    weight: float | np.ndarray = 1.0,
) -> None:
    """Rasterise soft capsules into ``occ`` (``[z, y, x]`` float32, in place) with ``max``.

    Each voxel gets ``clip((r(t) - d) / edge_mm + 0.5, 0, 1) * amp`` where ``d`` is
    its distance to the segment axis and ``r(t)`` the radius at the nearest axis
    point. With ``z_partial_volume`` the slab of thickness ``grid.thickness_mm``
    is approximated: a segment that is not parallel to z is stretched along z
    (by ``r + T/2 * sin(angle)``) and its peak is lowered to
    ``min(1, 2r / (T * sin(angle)))``, the fraction of the slab it fills.

    Small segments (most of a vessel tree) are evaluated together in batches
    of equal-sized boxes and scattered with ``np.maximum.at``; large ones one
    by one in their own bounding box.

    Args:
        occ: float32 occupancy volume on ``grid`` (may be a view); updated with ``max``.
        grid: voxel centres of ``occ``.
        tubes: the segments.
        edge_mm: width of the soft edge (mm), ~ the kernel's resolution.
        z_partial_volume: model the slice thickness (see above).
        weight: scalar or ``(N,)`` peak value per segment (default 1).
    """
    n = len(tubes)
    if n == 0:
        return
    w = np.broadcast_to(np.asarray(weight, dtype=np.float64), (n,))
    sp = _segment_params(tubes, float(grid.thickness_mm), z_partial_volume, w)
    keep = sp["amp"] > 0.01
    rmax = np.maximum(tubes.ra_mm, tubes.rb_mm)
    half_edge = 0.5 * edge_mm
    pad_xy = rmax + half_edge
    pad_z = (rmax + half_edge) * sp["kz"]
    lo = np.minimum(tubes.a_xyz, tubes.b_xyz)
    hi = np.maximum(tubes.a_xyz, tubes.b_xyz)
    z0 = np.searchsorted(grid.z_mm, lo[:, 2] - pad_z, "left")
    z1 = np.searchsorted(grid.z_mm, hi[:, 2] + pad_z, "right")
    y0 = np.searchsorted(grid.y_mm, lo[:, 1] - pad_xy, "left")
    y1 = np.searchsorted(grid.y_mm, hi[:, 1] + pad_xy, "right")
    x0 = np.searchsorted(grid.x_mm, lo[:, 0] - pad_xy, "left")
    x1 = np.searchsorted(grid.x_mm, hi[:, 0] + pad_xy, "right")
    keep &= (z1 > z0) & (y1 > y0) & (x1 > x0)
    vol = (z1 - z0) * (y1 - y0) * (x1 - x0)
    small = keep & (vol <= 4000)
    # group small segments by their box shape (rounded up) so a batch wastes little
    qz = -(-(z1 - z0) // 2) * 2
    qy = -(-(y1 - y0) // 4) * 4
    qx = -(-(x1 - x0) // 4) * 4
    idx_small = np.flatnonzero(small)
    keys = (qz[idx_small] * 10_000 + qy[idx_small]) * 10_000 + qx[idx_small]
    order = np.argsort(keys, kind="stable")
    idx_small, keys = idx_small[order], keys[order]
    bounds = np.flatnonzero(np.diff(keys)) + 1
    budget = 2_000_000
    for group in np.split(idx_small, bounds):
        if len(group) == 0:
            continue
        s0 = group[0]
        box = (int(qz[s0]), int(qy[s0]), int(qx[s0]))
        per = max(1, budget // (box[0] * box[1] * box[2]))
        for i in range(0, len(group), per):
            _draw_batch(occ, grid, tubes, sp, group[i : i + per], z0, y0, x0, box, edge_mm)
    for s in np.flatnonzero(keep & ~small):
        _draw_one(occ, grid, tubes, sp, int(s), (z0[s], z1[s], y0[s], y1[s], x0[s], x1[s]), edge_mm)


def _draw_batch(
    occ: np.ndarray,
    grid: Grid,
    tubes: TubeSet,
    sp: dict[str, np.ndarray],
    sel: np.ndarray,
    z0: np.ndarray,
    y0: np.ndarray,
    x0: np.ndarray,
    box: tuple[int, int, int],
    edge_mm: float,
) -> None:
    """Evaluate segments ``sel`` in equal boxes ``(bz, by, bx)`` and scatter-max them into ``occ``."""
    bz, by, bx = box
    nz, ny, nx = occ.shape
    a = tubes.a_xyz[sel]
    d = sp["d"][sel]
    inv = 1.0 / sp["L2"][sel]
    zi = z0[sel, None] + np.arange(bz)[None, :]
    yi = y0[sel, None] + np.arange(by)[None, :]
    xi = x0[sel, None] + np.arange(bx)[None, :]
    vz, vy, vx = zi < nz, yi < ny, xi < nx
    zi, yi, xi = np.minimum(zi, nz - 1), np.minimum(yi, ny - 1), np.minimum(xi, nx - 1)
    Z = (grid.z_mm[zi] - a[:, 2:3]).astype(np.float32)
    Y = (grid.y_mm[yi] - a[:, 1:2]).astype(np.float32)
    X = (grid.x_mm[xi] - a[:, 0:1]).astype(np.float32)
    f32 = np.float32
    t = (Z * (d[:, 2:3] * inv[:, None]).astype(f32))[:, :, None, None] + (Y * (d[:, 1:2] * inv[:, None]).astype(f32))[:, None, :, None]
    t = t + (X * (d[:, 0:1] * inv[:, None]).astype(f32))[:, None, None, :]
    np.clip(t, 0.0, 1.0, out=t)
    dd = d.astype(f32)
    c = dd[:, 0][:, None, None, None]
    px = X[:, None, None, :] - t * c
    dist2 = px * px
    c = dd[:, 1][:, None, None, None]
    py = Y[:, None, :, None] - t * c
    dist2 += py * py
    c = dd[:, 2][:, None, None, None]
    pz = Z[:, :, None, None] - t * c
    pz *= (1.0 / sp["kz"][sel]).astype(f32)[:, None, None, None]
    dist2 += pz * pz
    np.sqrt(dist2, out=dist2)
    ra = tubes.ra_mm[sel].astype(f32)[:, None, None, None]
    rb = tubes.rb_mm[sel].astype(f32)[:, None, None, None]
    val = (ra + t * (rb - ra) - dist2) * f32(1.0 / edge_mm) + f32(0.5)
    np.clip(val, 0.0, 1.0, out=val)
    val *= sp["amp"][sel].astype(f32)[:, None, None, None]
    val *= (vz[:, :, None, None] & vy[:, None, :, None] & vx[:, None, None, :])
    hit = val > 1e-3
    if not hit.any():
        return
    n_sel = len(sel)
    zz = np.broadcast_to(zi[:, :, None, None], (n_sel, bz, by, bx))[hit]
    yy = np.broadcast_to(yi[:, None, :, None], (n_sel, bz, by, bx))[hit]
    xx = np.broadcast_to(xi[:, None, None, :], (n_sel, bz, by, bx))[hit]
    np.maximum.at(occ, (zz, yy, xx), val[hit])


def _draw_one(
    occ: np.ndarray,
    grid: Grid,
    tubes: TubeSet,
    sp: dict[str, np.ndarray],
    s: int,
    bounds: tuple[int, int, int, int, int, int],
    edge_mm: float,
) -> None:
    """Evaluate one (large) segment in its own bounding box."""
    z0, z1, y0, y1, x0, x1 = (int(v) for v in bounds)
    a = tubes.a_xyz[s]
    d = sp["d"][s]
    inv = 1.0 / float(sp["L2"][s])
    kz = float(sp["kz"][s])
    amp = float(sp["amp"][s])
    ra, rb = float(tubes.ra_mm[s]), float(tubes.rb_mm[s])
    f32 = np.float32
    X = (grid.x_mm[x0:x1] - a[0]).astype(f32)
    Y = (grid.y_mm[y0:y1] - a[1]).astype(f32)
    Z = (grid.z_mm[z0:z1] - a[2]).astype(f32)
    t = (Z * f32(d[2] * inv))[:, None, None] + (Y * f32(d[1] * inv))[None, :, None]
    t = t + (X * f32(d[0] * inv))[None, None, :]
    np.clip(t, 0.0, 1.0, out=t)
    px = X[None, None, :] - t * f32(d[0])
    dist2 = px * px
    py = Y[None, :, None] - t * f32(d[1])
    dist2 += py * py
    pz = Z[:, None, None] - t * f32(d[2])
    if kz != 1.0:
        pz *= f32(1.0 / kz)
    dist2 += pz * pz
    np.sqrt(dist2, out=dist2)
    if ra != rb:
        val = t * f32((rb - ra) / edge_mm) + f32(ra / edge_mm + 0.5)
    else:
        val = np.full_like(t, f32(ra / edge_mm + 0.5))
    val -= dist2 * f32(1.0 / edge_mm)
    np.clip(val, 0.0, 1.0, out=val)
    if amp != 1.0:
        val *= f32(amp)
    sub = occ[z0:z1, y0:y1, x0:x1]
    np.maximum(sub, val, out=sub)


def draw_ellipsoid(
    occ: np.ndarray,
    grid: Grid,
    center_xyz: np.ndarray,
    semi_axes_mm: np.ndarray,
    rotation: np.ndarray,
    *,
    edge_mm: float,
    mode: str = "max",
) -> tuple[slice, slice, slice]:
    """Rasterise a soft ellipsoid into ``occ`` (in place).

    The ellipsoid is ``{p : |R^T (p - c) / s| <= 1}`` with ``R`` (3, 3) whose
    columns are the axes (world x, y, z components) and ``s`` the semi-axes.
    The soft edge uses the normalised radius times the mean semi-axis as a
    distance (exact for a sphere).

    Args:
        mode: ``"max"`` (union) or ``"min"`` (intersection with the existing
            occupancy inside the box is not supported; use ``"max"``) or
            ``"set"`` (overwrite inside the bounding box).

    Returns:
        The bounding box slices (z, y, x) that were touched.
    """
    c = np.asarray(center_xyz, dtype=np.float64)
    s = np.asarray(semi_axes_mm, dtype=np.float64)
    R = np.asarray(rotation, dtype=np.float64)
    ext = np.sqrt((R * R) @ (s * s)) + edge_mm  # half extent along world axes
    z0, z1 = grid.index_range(0, c[2] - ext[2], c[2] + ext[2])
    y0, y1 = grid.index_range(1, c[1] - ext[1], c[1] + ext[1])
    x0, x1 = grid.index_range(2, c[0] - ext[0], c[0] + ext[0])
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    if z0 >= z1 or y0 >= y1 or x0 >= x1:
        return box
    X = (grid.x_mm[x0:x1] - c[0]).astype(np.float32)
    Y = (grid.y_mm[y0:y1] - c[1]).astype(np.float32)
    Z = (grid.z_mm[z0:z1] - c[2]).astype(np.float32)
    q = None
    for ax in range(3):  # coordinate along ellipsoid axis ax, normalised by its semi-axis
        u = R[:, ax] / s[ax]
        v = (Z * np.float32(u[2]))[:, None, None] + (Y * np.float32(u[1]))[None, :, None]
        v = v + (X * np.float32(u[0]))[None, None, :]
        v *= v
        q = v if q is None else q + v
    assert q is not None
    np.sqrt(q, out=q)
    rbar = float(np.mean(s))
    val = (1.0 - q) * np.float32(rbar / edge_mm) + np.float32(0.5)
    np.clip(val, 0.0, 1.0, out=val)
    sub = occ[box]
    if mode == "max":
        np.maximum(sub, val, out=sub)
    elif mode == "set":
        sub[...] = val
    else:
        raise ValueError(f"mode must be 'max' or 'set', got {mode!r}")
    return box


def interp_matrix(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """(len(fine), len(coarse)) float32 linear-interpolation weights (clamped at the ends)."""
    fine = np.asarray(fine, dtype=np.float64)
    coarse = np.asarray(coarse, dtype=np.float64)
    pos = np.interp(fine, coarse, np.arange(len(coarse), dtype=np.float64))
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, len(coarse) - 1)
    i1 = np.minimum(i0 + 1, len(coarse) - 1)
    f = pos - i0
    m = np.zeros((len(fine), len(coarse)), dtype=np.float32)
    rows = np.arange(len(fine))
    m[rows, i0] += (1.0 - f).astype(np.float32)
    m[rows, i1] += f.astype(np.float32)
    return m


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (float32) with unit standard deviation."""
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    sd = float(f.std())
    return f / (sd if sd > 0 else 1.0)
