"""The one definition of a mask's max axial diameter (lidc_det.measure), and that stage 2 and stage 3 use it.

The figures below pin the convention (pixel-centre distance + one pixel width, in-plane only): a change of
convention fails here, not silently in a malignancy AUC or a second-look feature.
"""

from __future__ import annotations

import numpy as np
import pytest

from lidc_det.geometry import VolumeGeometry
from lidc_det.measure import max_axial_diameter_mm


def test_convention_pixel_centres_plus_one_pixel_width() -> None:
    sp = (2.5, 0.5, 0.5)
    m = np.zeros((3, 9, 9), dtype=bool)
    assert max_axial_diameter_mm(m, sp) == 0.0  # empty
    m[1, 4, 4] = True
    assert max_axial_diameter_mm(m, sp) == pytest.approx(0.5)  # one pixel: one pixel width
    m[1, 4, 2:7] = True
    assert max_axial_diameter_mm(m, sp) == pytest.approx(5 * 0.5)  # 5 pixels in a row: 2.0 mm apart + 0.5
    sq = np.zeros((1, 5, 5), dtype=bool)
    sq[0, 0:4, 0:4] = True  # a 4 x 4 square: diagonal of 3 x 3 steps + one pixel
    assert max_axial_diameter_mm(sq, (2.0, 1.0, 1.0)) == pytest.approx(3 * np.sqrt(2) + 1)
    aniso = np.zeros((1, 5, 5), dtype=bool)
    aniso[0, 1, 0:4] = True  # along x at 0.8 mm, y spacing 0.6 mm: 3 * 0.8 + (0.6 + 0.8) / 2
    assert max_axial_diameter_mm(aniso, (1.0, 0.6, 0.8)) == pytest.approx(2.4 + 0.7)


def test_in_plane_only_and_the_largest_slice() -> None:
    m = np.zeros((6, 12, 12), dtype=bool)
    m[:, 5, 5] = True  # a 6-slice column: no in-plane extent beyond one pixel
    assert max_axial_diameter_mm(m, (3.0, 1.0, 1.0)) == pytest.approx(1.0)
    m[2, 2:10, 5] = True  # one slice with an 8-pixel run
    assert max_axial_diameter_mm(m, (3.0, 1.0, 1.0)) == pytest.approx(8.0)
    assert max_axial_diameter_mm(m, (0.5, 1.0, 1.0)) == pytest.approx(8.0)  # z spacing is not used
    disc = np.zeros((1, 41, 41), dtype=bool)
    yy, xx = np.mgrid[:41, :41]
    disc[0] = (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2  # a digitised disc of radius 15 px
    assert max_axial_diameter_mm(disc, (1.0, 0.5, 0.5)) == pytest.approx(31 * 0.5)


def test_stage2_and_stage3_measure_alike() -> None:
    from stage2_segment.crops import Crop
    from stage2_segment.predict import nodule_mask_from_crop
    from stage3_malignancy.shape import shape_features

    rng = np.random.default_rng(3)
    blob = np.zeros((8, 16, 16), dtype=bool)
    zz, yy, xx = np.mgrid[:8, :16, :16]
    blob[((zz - 4) / 3.0) ** 2 + ((yy - 8) / 5.0) ** 2 + ((xx - 7) / 4.0) ** 2 <= 1.0] = True
    blob &= rng.random(blob.shape) < 0.9
    blob[4, 8, 7] = True
    sp = (2.0, 0.7, 0.7)
    want = max_axial_diameter_mm(blob, sp)
    assert shape_features(blob, sp).max_axial_diameter_mm == pytest.approx(want)
    geom = VolumeGeometry((8, 16, 16), sp, (0.0, 0.0, 0.0))
    crop = Crop(series_uid="1.2.3", box_voxel=np.array([0, 0, 0, 8, 16, 16]), image=np.zeros((8, 16, 16), np.float32),
                label=None, kind="detection", center_xyz_mm=(5.0, 5.6, 8.0), volume_geometry=geom, score=0.9)
    nm = nodule_mask_from_crop(crop, blob, np.zeros(geom.shape_zyx, dtype=np.float32))
    assert nm.max_diameter_mm == pytest.approx(want)
