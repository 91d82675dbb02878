"""benchmarks.edge_contrast: a sharp edge has more contrast across it than a blurred one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from benchmarks.edge_contrast import edge_shells_hu


def _ball(n: int = 40, r: float = 8.0) -> np.ndarray:
    z, y, x = np.mgrid[:n, :n, :n] - n / 2
    return z**2 + y**2 + x**2 <= r**2


def test_sharp_edge_has_the_full_step_and_blur_lowers_it() -> None:
    m = _ball()
    sharp = np.where(m, 0.0, -800.0)
    inside, outside = edge_shells_hu(sharp, m)
    assert inside == pytest.approx(0.0) and outside == pytest.approx(-800.0)
    blurred = ndimage.gaussian_filter(sharp, 1.5)
    b_in, b_out = edge_shells_hu(blurred, m)
    assert -800.0 < b_out < b_in < 0.0
    assert b_in - b_out < 0.6 * 800.0
    s_in, s_out = edge_shells_hu(ndimage.gaussian_filter(sharp, 0.7), m)
    assert s_in - s_out > b_in - b_out


def test_empty_mask_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        edge_shells_hu(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool))


def test_profile_is_flat_on_a_step_and_ramps_under_blur() -> None:
    from benchmarks.edge_contrast import PROFILE_VOXELS, edge_profile_hu

    m = _ball()
    sharp = np.where(m, 0.0, -800.0)
    prof = edge_profile_hu(sharp, m)
    assert len(prof) == len(PROFILE_VOXELS)
    inside = [v for d, v in zip(PROFILE_VOXELS, prof) if d <= 0]
    outside = [v for d, v in zip(PROFILE_VOXELS, prof) if d > 0]
    assert all(v == pytest.approx(0.0) for v in inside) and all(v == pytest.approx(-800.0) for v in outside)
    blurred = edge_profile_hu(ndimage.gaussian_filter(sharp, 1.5), m)
    assert all(a > b for a, b in zip(blurred, blurred[1:]))  # falls monotonically across the edge
    assert blurred[PROFILE_VOXELS.index(-2)] < -40.0  # the fall starts inside the mask
    assert -800.0 * 0.7 < blurred[PROFILE_VOXELS.index(0)] < -800.0 * 0.3  # the boundary shell sits mid-ramp
