"""Sizes of binary masks in millimetres: the one definition of a nodule's diameter.

Stage 2 (:class:`lidc_det.results.NoduleMask`'s ``max_diameter_mm``) and stage 3
(the ``max_axial_diameter_mm`` shape feature) both measure with
:func:`max_axial_diameter_mm`, so a mask has one diameter everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["max_axial_diameter_mm"]


def max_axial_diameter_mm(mask: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Largest in-plane (axial) diameter of a ``[z, y, x]`` mask, in mm.

    Convention: on each z slice, the greatest distance between the centres of two
    mask pixels (in mm, with the slice's y and x spacing) **plus one pixel width**
    (the mean of the y and x spacings); the maximum over the slices. So a single
    pixel measures one pixel width and a run of ``n`` pixels along x measures
    ``n * spacing_x``: the extent of the drawn pixels, not of their centres (LIDC
    readers measure the diameter in-plane, on a contour that lies outside the
    pixel centres). The z spacing is not used. 0 for an empty mask.

    Args:
        mask: bool (or 0/1) ``[z, y, x]`` array; any number of components.
        spacing_zyx: voxel size in mm, ``(z, y, x)``.

    Returns:
        The diameter in mm.
    """
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"max_axial_diameter_mm: mask must be [z, y, x], got shape {m.shape}")
    sy, sx = float(spacing_zyx[1]), float(spacing_zyx[2])
    best = 0.0
    for z in np.flatnonzero(m.any(axis=(1, 2))):
        pts = np.argwhere(m[z]).astype(np.float64) * np.array([sy, sx])
        if len(pts) > 2:
            try:  # the farthest pair are hull vertices: fewer pairs to compare
                pts = pts[ConvexHull(pts).vertices]
            except QhullError:  # collinear points: keep them all
                pass
        extent = float(pdist(pts).max()) if len(pts) > 1 else 0.0
        best = max(best, extent + (sy + sx) / 2.0)
    return best
