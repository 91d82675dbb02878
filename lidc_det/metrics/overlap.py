"""Overlap and surface-distance metrics of two binary masks on one grid: Dice and HD95.

HD95 here is the larger of the two directed 95th-percentile surface
distances (mm): from every surface voxel of ``a`` to the nearest surface
voxel of ``b``, and back (what MONAI's ``compute_hausdorff_distance(percentile=95)``
reports). Surface voxels are mask voxels with a 6-neighbour outside the mask;
distances are between voxel centres in mm (the grid's spacing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lidc_det.boxes import box_slices, mask_to_box


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two bool masks (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float(np.logical_and(a, b).sum()) / s


def _surface_mm(mask: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    from scipy import ndimage as ndi

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.zeros((0, 3))
    box = box_slices(mask_to_box(m), m.shape, 1)
    sub = m[box]
    surf = sub & ~ndi.binary_erosion(sub, border_value=0)
    return (np.argwhere(surf) + np.array([s.start for s in box])) * np.asarray(spacing_zyx, dtype=float)


def hd95(a: np.ndarray, b: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (NaN when either mask is empty)."""
    from scipy.spatial import cKDTree

    pa, pb = _surface_mm(a, spacing_zyx), _surface_mm(b, spacing_zyx)
    if len(pa) == 0 or len(pb) == 0:
        return math.nan
    d_ab = cKDTree(pb).query(pa, k=1, workers=1)[0]
    d_ba = cKDTree(pa).query(pb, k=1, workers=1)[0]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
