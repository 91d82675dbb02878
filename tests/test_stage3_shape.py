"""Shape features of masks (stage3_malignancy.shape)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stage3_malignancy.shape import SHAPE_FEATURE_NAMES, shape_features


def _ellipsoid(radii_mm: tuple[float, float, float], spacing: tuple[float, float, float]) -> np.ndarray:
    n = [int(2 * r / s) + 6 for r, s in zip(radii_mm, spacing)]
    zz, yy, xx = np.meshgrid(*[(np.arange(k) - (k - 1) / 2) * s for k, s in zip(n, spacing)], indexing="ij")
    return (zz / radii_mm[0]) ** 2 + (yy / radii_mm[1]) ** 2 + (xx / radii_mm[2]) ** 2 <= 1.0


def test_sphere() -> None:
    r = 10.0
    f = shape_features(_ellipsoid((r, r, r), (0.5, 0.5, 0.5)), (0.5, 0.5, 0.5))
    assert f.volume_mm3 == pytest.approx(4 / 3 * math.pi * r**3, rel=0.02)
    assert f.mesh_volume_mm3 == pytest.approx(4 / 3 * math.pi * r**3, rel=0.03)
    assert 0.88 < f.sphericity < 0.97  # marching-cubes staircase: not 1 (module docstring)
    assert f.compactness == pytest.approx(f.sphericity**3, rel=1e-6)
    assert f.elongation == pytest.approx(1.0, abs=0.02) and f.flatness == pytest.approx(1.0, abs=0.02)
    assert f.major_axis_mm == pytest.approx(2 * r, rel=0.03)
    assert f.equivalent_diameter_mm == pytest.approx(2 * r, rel=0.01)
    assert f.max_3d_diameter_mm == pytest.approx(2 * r, rel=0.05)
    assert f.max_axial_diameter_mm == pytest.approx(2 * r, abs=1.0)
    assert f.solidity > 0.95 and f.convexity > 0.9
    assert f.n_components == 1
    assert list(f.to_dict()) == list(SHAPE_FEATURE_NAMES)


def test_anisotropic_spacing_and_elongation() -> None:
    # a 2:1 prolate ellipsoid on CT-like voxels (0.7 mm in-plane, 2.5 mm slices)
    sp = (2.5, 0.7, 0.7)
    f = shape_features(_ellipsoid((12.0, 6.0, 6.0), sp), sp)
    assert f.volume_mm3 == pytest.approx(4 / 3 * math.pi * 12 * 6 * 6, rel=0.08)
    assert f.elongation == pytest.approx(0.5, abs=0.06)
    assert f.major_axis_mm == pytest.approx(24.0, rel=0.08)
    assert f.max_axial_diameter_mm == pytest.approx(12.0, abs=1.5)


def test_two_components_and_errors() -> None:
    m = np.zeros((10, 20, 20), bool)
    m[2:5, 2:6, 2:6] = True
    m[2:5, 12:16, 12:16] = True
    f = shape_features(m, (1.0, 1.0, 1.0))
    assert f.n_components == 2 and f.solidity < 0.6
    with pytest.raises(ValueError, match="empty"):
        shape_features(np.zeros((3, 3, 3), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        shape_features(m, (0, 1, 1))
