"""Geometry and box conventions: round trips and hand-checked values."""

from __future__ import annotations

import numpy as np
import pytest

from lidc_det import boxes as B
from lidc_det.geometry import GeometryError, VolumeGeometry

# LIDC-like axial scan: 0.7 mm pixels, 2.5 mm slices, patient origin at the first voxel centre
AXIAL = VolumeGeometry((10, 20, 30), (2.5, 0.7, 0.7), (-180.0, -170.0, -300.0))
# oblique-free but permuted and flipped axes (e.g. a coronal acquisition)
PERMUTED = VolumeGeometry(
    (12, 14, 16), (1.5, 0.8, 0.9), (10.0, -20.0, 30.0), (1, 0, 0, 0, 0, -1, 0, 1, 0)
)
_c, _s = np.cos(0.3), np.sin(0.3)
OBLIQUE = VolumeGeometry((8, 9, 10), (2.0, 1.0, 1.2), (0.0, 0.0, 0.0), (_c, -_s, 0, _s, _c, 0, 0, 0, 1))


def test_hand_checked_voxel_to_world() -> None:
    # voxel (z=2, y=3, x=4): x = -180 + 4*0.7, y = -170 + 3*0.7, z = -300 + 2*2.5
    np.testing.assert_allclose(AXIAL.voxel_to_world([2, 3, 4]), [-177.2, -167.9, -295.0])
    # permuted: index x axis -> world x, index y axis -> world z, index z axis -> world -y
    w = PERMUTED.voxel_to_world([1, 2, 3])
    np.testing.assert_allclose(w, [10 + 3 * 0.9, -20 - 1 * 1.5, 30 + 2 * 0.8])


@pytest.mark.parametrize("geom", [AXIAL, PERMUTED, OBLIQUE])
def test_point_round_trip(geom: VolumeGeometry) -> None:
    rng = np.random.default_rng(0)
    vox = rng.uniform(-5, 40, size=(50, 3))
    np.testing.assert_allclose(geom.world_to_voxel(geom.voxel_to_world(vox)), vox, atol=1e-9)
    world = rng.uniform(-300, 300, size=(50, 3))
    np.testing.assert_allclose(geom.voxel_to_world(geom.world_to_voxel(world)), world, atol=1e-9)


@pytest.mark.parametrize("geom", [AXIAL, PERMUTED, OBLIQUE])
def test_matches_simpleitk(geom: VolumeGeometry) -> None:
    img = geom.to_sitk(np.zeros(geom.shape_zyx, dtype=np.int16))
    assert VolumeGeometry.from_sitk(img) == geom
    for idx_xyz in [(0, 0, 0), (3, 5, 7), (9, 1, 2)]:
        expected = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx_xyz])
        got = geom.voxel_to_world(np.array(idx_xyz[::-1], dtype=float))
        np.testing.assert_allclose(got, expected, atol=1e-9)


def test_bad_geometries_rejected() -> None:
    with pytest.raises(GeometryError, match="spacing"):
        VolumeGeometry((2, 2, 2), (0.0, 1.0, 1.0), (0, 0, 0))
    with pytest.raises(GeometryError, match="spacing"):
        VolumeGeometry((2, 2, 2), (1.0, -1.0, 1.0), (0, 0, 0))
    with pytest.raises(GeometryError, match="orthonormal"):
        VolumeGeometry((2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 0))
    with pytest.raises(GeometryError, match="shape"):
        VolumeGeometry((0, 2, 2), (1, 1, 1), (0, 0, 0))


def test_dict_round_trip_and_with_spacing() -> None:
    assert VolumeGeometry.from_dict(PERMUTED.to_dict()) == PERMUTED
    g = AXIAL.with_spacing((1.0, 1.0, 1.0))
    assert g.shape_zyx == (25, 14, 21)  # 10*2.5, 20*0.7, 30*0.7 rounded
    assert g.origin_xyz == AXIAL.origin_xyz


def test_box_center_size_round_trip_and_convention() -> None:
    box = np.array([[2, 3, 4, 5, 9, 6]], dtype=float)  # covers arr[2:5, 3:9, 4:6]
    c, s = B.boxes_to_center_size(box)
    np.testing.assert_allclose(c, [[3.0, 5.5, 4.5]])  # centre of voxels 2,3,4 is 3
    np.testing.assert_allclose(s, [[3, 6, 2]])
    np.testing.assert_allclose(B.center_size_to_boxes(c, s), box)
    mask = np.zeros((8, 12, 8), dtype=bool)
    mask[2:5, 3:9, 4:6] = True
    np.testing.assert_allclose(B.mask_to_box(mask), box[0])
    assert B.box_volume(box)[0] == mask.sum()


def test_mask_boxes_label_boxes_and_slices() -> None:
    mask = np.zeros((8, 12, 8), dtype=bool)
    mask[2:5, 3:9, 4:6] = True
    mask[3, 10, 7] = True  # a second piece: the box covers both
    box = B.mask_to_box(mask)
    np.testing.assert_array_equal(box, [2, 3, 4, 5, 11, 8])
    sl = B.box_slices(box, mask.shape)
    assert mask[sl].sum() == mask.sum() and mask[sl].shape == (3, 8, 4)
    assert B.box_slices(box, mask.shape, 1) == (slice(1, 6), slice(2, 12), slice(3, 8))  # clipped at 12 and 8
    assert B.box_slices(box, mask.shape, (0, 2, 1)) == (slice(2, 5), slice(1, 12), slice(3, 8))
    assert B.box_slices([0.5, 1.2, 2.0, 2.5, 3.0, 4.7], (8, 8, 8)) == (slice(0, 3), slice(1, 3), slice(2, 5))
    with pytest.raises(ValueError, match="empty"):
        B.mask_to_box(np.zeros((3, 3, 3)))
    labels = np.zeros((8, 12, 8), dtype=np.int32)
    labels[2:5, 3:9, 4:6] = 1
    labels[3, 10, 7] = 3  # label 2 has no voxel
    lb = B.label_boxes(labels)
    np.testing.assert_array_equal(lb, [B.mask_to_box(labels == 1), np.zeros(6), B.mask_to_box(labels == 3)])
    assert B.label_boxes(labels, 4).shape == (4, 6) and not B.label_boxes(labels, 4)[3].any()


@pytest.mark.parametrize("geom", [AXIAL, PERMUTED])
def test_box_world_round_trip(geom: VolumeGeometry) -> None:
    box = np.array([[1, 2, 3, 4, 8, 9], [0, 0, 0, 1, 1, 1]], dtype=float)
    centers, sizes = B.boxes_to_world(box, geom)
    np.testing.assert_allclose(B.world_to_boxes(centers, sizes, geom), box, atol=1e-9)
    # a single voxel box is one voxel big in mm, and centred on the voxel centre
    np.testing.assert_allclose(centers[1], geom.voxel_to_world([0, 0, 0]))
    np.testing.assert_allclose(np.sort(sizes[1]), np.sort(geom.spacing_xyz))


def test_world_boxes_from_diameters() -> None:
    b = B.world_to_boxes([[-177.2, -167.9, -295.0]], [7.0], AXIAL)
    c, s = B.boxes_to_center_size(b)
    np.testing.assert_allclose(c, [[2, 3, 4]], atol=1e-9)
    np.testing.assert_allclose(s, [[7.0 / 2.5, 10.0, 10.0]])
    with pytest.raises(ValueError, match="oblique"):
        B.boxes_to_world(np.array([[0, 0, 0, 1, 1, 1.0]]), OBLIQUE)


def test_monai_box_modes_round_trip() -> None:
    import monai  # noqa: F401  (a required dependency: a broken install fails)
    box = np.array([[2, 3, 4, 5, 9, 6]], dtype=float)
    m = B.to_monai_boxes(box, "xyzxyz")
    np.testing.assert_allclose(m, [[1.5, 2.5, 3.5, 4.5, 8.5, 5.5]])
    cccwhd = B.to_monai_boxes(box, "cccwhd")
    np.testing.assert_allclose(cccwhd, [[3.0, 5.5, 4.5, 3, 6, 2]])  # centre = our voxel centre
    for mode in ("xyzxyz", "xxyyzz", "cccwhd"):
        np.testing.assert_allclose(B.from_monai_boxes(B.to_monai_boxes(box, mode), mode), box)


def test_clip_and_invalid_boxes() -> None:
    np.testing.assert_allclose(B.clip_boxes([[-2, 1, 1, 5, 30, 4]], (4, 20, 20)), [[0, 1, 1, 4, 20, 4]])
    with pytest.raises(ValueError, match="z1 >= z0"):
        B.boxes_to_center_size([[5, 0, 0, 4, 1, 1]])
    with pytest.raises(ValueError, match="shape"):
        B.boxes_to_center_size([[0, 0, 0, 1]])
