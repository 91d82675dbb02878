"""Tiny synthetic scans (bright spheres in noisy soft tissue) for tests and smoke runs.

Not a CT simulator (see :mod:`lidc_det.synthetic` for the LIDC twin); just enough
structure for a detector to learn something in a few dozen CPU steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lidc_det.geometry import VolumeGeometry
from stage1_detect.data import InMemoryCase


def sphere_case(
    series_uid: str,
    shape_zyx: Sequence[int],
    centres_zyx: Sequence[Sequence[float]],
    diameters_vox: Sequence[float],
    *,
    rng: np.random.Generator,
    background_hu: float = -800.0,
    sphere_hu: float = 50.0,
    noise_hu: float = 40.0,
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> InMemoryCase:
    """A volume of ``background_hu`` + Gaussian noise with solid spheres of ``sphere_hu``.

    ``centres_zyx`` are voxel coordinates (voxel centres at integers); each sphere's
    target box is its tight cube ``centre -/+ d / 2`` in the box format of
    :mod:`lidc_det.boxes` (so the box centre is the sphere centre).
    """
    shape = tuple(int(s) for s in shape_zyx)
    hu = background_hu + noise_hu * rng.standard_normal(shape).astype(np.float32)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    boxes = []
    for c, d in zip(centres_zyx, diameters_vox):
        r2 = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        hu[r2 <= (d / 2) ** 2] = sphere_hu + noise_hu * rng.standard_normal(int((r2 <= (d / 2) ** 2).sum()))
        lo = np.asarray(c, dtype=np.float64) - d / 2 + 0.5
        boxes.append(np.concatenate([lo, lo + d]))
    geom = VolumeGeometry(shape, spacing_zyx, origin_xyz)  # type: ignore[arg-type]
    return InMemoryCase(series_uid, hu.astype(np.float32), geom, np.asarray(boxes, dtype=np.float64).reshape(-1, 6))


def random_sphere_cases(
    n: int,
    *,
    shape_zyx: Sequence[int] = (64, 64, 64),
    spheres_per_case: int = 2,
    diameter_range: tuple[float, float] = (5.0, 12.0),
    seed: int = 0,
    prefix: str = "toy",
) -> list[InMemoryCase]:
    """``n`` :func:`sphere_case` scans with randomly placed, non-overlapping spheres."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        centres: list[np.ndarray] = []
        diams: list[float] = []
        while len(centres) < spheres_per_case:
            d = float(rng.uniform(*diameter_range))
            c = rng.uniform(d, np.asarray(shape_zyx) - d)
            if all(np.linalg.norm(c - o) > (d + od) / 2 + 4 for o, od in zip(centres, diams)):
                centres.append(c)
                diams.append(d)
        cases.append(sphere_case(f"{prefix}-{i}", shape_zyx, centres, diams, rng=rng))
    return cases
