"""Painting a reader's mask as a nodule: the edge blur (scanner slice profile and PSF) of the twin."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
from scipy.ndimage import distance_transform_edt

from lidc_det.synthetic.nodules import NoduleSpec, ReaderMask, paint_nodule
from lidc_det.synthetic.render import Grid

LUNG_HU = -850.0
SPACING = np.array([1.25, 0.7, 0.7])  # z, y, x mm


def _painted(edge_blur_mm: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU after painting a solid 7 mm-radius sphere into flat lung; its mask's inner and outer distances (mm)."""
    shape = (32, 48, 48)
    grid = Grid(np.arange(shape[2]) * SPACING[2], np.arange(shape[1]) * SPACING[1], np.arange(shape[0]) * SPACING[0], 1.25)
    zz, yy, xx = np.indices(shape) * SPACING[:, None, None, None]
    centre = np.array(shape) / 2 * SPACING
    full = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= 7.0**2
    lo = np.argwhere(full).min(axis=0)
    hi = np.argwhere(full).max(axis=0) + 1
    reader = ReaderMask(1, tuple(int(v) for v in lo), full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]],  # type: ignore[arg-type]
                        MappingProxyType({"texture": 5, "calcification": 6}))
    hu = np.full(shape, LUNG_HU, dtype=np.float32)
    paint_nodule(hu, grid, NoduleSpec(0, (reader,)), np.random.default_rng(0), edge_blur_mm=edge_blur_mm)
    inside = distance_transform_edt(full, sampling=SPACING)
    outside = distance_transform_edt(~full, sampling=SPACING)
    return hu, np.where(full, inside, 0.0), np.where(full, 0.0, outside)


def _occupancy(hu: np.ndarray, core: float) -> np.ndarray:
    return (hu - LUNG_HU) / (core - LUNG_HU)


def test_blurred_edge_ramps_inside_and_leaves_a_halo_outside_like_real_ct() -> None:
    hu, inside, outside = _painted((1.2, 1.0))
    core = float(hu[inside > 4.0].mean())
    assert core > -120.0  # solid
    rim_in = _occupancy(hu[(inside > 0) & (inside <= 1.0)], core).mean()
    halo = _occupancy(hu[(outside > 0) & (outside <= 1.0)], core).mean()
    far = _occupancy(hu[(outside > 1.0) & (outside <= 2.0)], core).mean()
    # about half occupancy across the contour, as on the real 0001 nodule (about 0.54 inside, 0.31 outside)
    assert 0.45 < rim_in < 0.8
    assert 0.15 < halo < 0.5
    assert 0.02 < far < halo


def test_default_edge_is_sharp() -> None:
    hu, inside, outside = _painted(None)
    core = float(hu[inside > 4.0].mean())
    rim_in = _occupancy(hu[(inside > 0) & (inside <= 1.0)], core).mean()
    far = _occupancy(hu[(outside > 1.0) & (outside <= 2.0)], core).mean()
    assert rim_in > 0.8  # the interior is kept at >= 0.8
    assert far < 0.02
