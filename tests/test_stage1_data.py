"""Stage-1 training data: box geometry under augmentation, patch sampling, case adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lidc_det.boxes import mask_to_box
from lidc_det.data.prepared import PreparedCase, PreparedNodule
from lidc_det.geometry import VolumeGeometry
from stage1_detect.config import DetectorConfig
from stage1_detect.data import (
    InMemoryCase,
    PatchDataset,
    SpacingMismatchError,
    augment,
    boxes_in_patch,
    case_boxes,
    case_findings,
    crop_with_padding,
    dense_lung_voxels,
    flip_boxes,
    rot90_boxes,
)
from stage1_detect.toydata import random_sphere_cases, sphere_case

CFG = DetectorConfig(patch_size=(32, 32, 32))


def _mask(shape, box) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    b = np.asarray(box, dtype=int)
    m[b[0] : b[3], b[1] : b[4], b[2] : b[5]] = True
    return m


@pytest.mark.parametrize("shape", [(10, 12, 12), (9, 11, 14)])
def test_flip_and_rot90_boxes_follow_the_array(shape) -> None:
    box = np.array([2, 3, 1, 5, 7, 4], dtype=float)
    m = _mask(shape, box)
    for axis in range(3):
        np.testing.assert_array_equal(flip_boxes(box, axis, shape[axis])[0], mask_to_box(np.flip(m, axis)))
    for k in range(1, 5):
        np.testing.assert_array_equal(rot90_boxes(box, k, shape)[0], mask_to_box(np.rot90(m, k, axes=(1, 2))))


def test_augment_keeps_boxes_on_the_object() -> None:
    rng = np.random.default_rng(0)
    box = np.array([[3, 5, 9, 10, 12, 20]], dtype=float)
    img = _mask((32, 32, 32), box[0]).astype(np.float32)
    cfg = CFG.replace(intensity_scale=0.0, intensity_shift=0.0)
    seen = set()
    for _ in range(20):
        out, b = augment(img, box, cfg, rng)
        np.testing.assert_array_equal(b[0], mask_to_box(out > 0.5))
        seen.add(tuple(b[0]))
    assert len(seen) > 4  # the augmentation does vary
    out, _ = augment(img, box, CFG.replace(aug_flip=False, aug_rot90=False, intensity_scale=0.1, intensity_shift=0.05), rng)
    assert not np.allclose(out, img) and np.corrcoef(out.ravel(), img.ravel())[0, 1] > 0.999


def test_crop_with_padding_and_boxes_in_patch() -> None:
    img = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    out = crop_with_padding(img, (-2, 3, 4), (4, 4, 4), -9.0)
    assert out.shape == (4, 4, 4)
    np.testing.assert_array_equal(out[:2], -9.0)
    np.testing.assert_array_equal(out[2:, :3, :3], img[:2, 3:6, 4:7])
    np.testing.assert_array_equal(out[2:, 3:], -9.0)
    np.testing.assert_array_equal(crop_with_padding(img, (10, 10, 10), (2, 2, 2), 1.0), 1.0)
    boxes = np.array([[10, 10, 10, 20, 20, 20], [0, 0, 0, 4, 4, 4], [28, 28, 28, 40, 40, 40]], dtype=float)
    got = boxes_in_patch(boxes, (8, 8, 8), (24, 24, 24))
    # first: shifted; second: centre outside -> dropped; third: centre (34) outside the patch (8..32) -> dropped
    np.testing.assert_array_equal(got, [[2, 2, 2, 12, 12, 12]])
    got = boxes_in_patch(np.array([[4, 4, 4, 14, 14, 14]], dtype=float), (6, 6, 6), (24, 24, 24))
    np.testing.assert_array_equal(got, [[0, 0, 0, 8, 8, 8]])  # clipped at the patch border


def test_patch_dataset_is_a_function_of_seed_and_index() -> None:
    cases = random_sphere_cases(3, seed=0)
    a = PatchDataset(cases, CFG, seed=5, length=50)
    b = PatchDataset(cases, CFG, seed=5, length=50)
    c = PatchDataset(cases, CFG, seed=6, length=50)
    for i in (0, 7, 49):
        ia, ba = a[i]
        ib, bb = b[i]
        assert ia.shape == (1, 32, 32, 32) and ba.ndim == 2 and ba.shape[1] == 6
        assert np.array_equal(ia.numpy(), ib.numpy()) and np.array_equal(ba.numpy(), bb.numpy())
    assert not all(np.array_equal(a[i][0].numpy(), c[i][0].numpy()) for i in range(5))
    # out-of-order access gives the same item (what resuming relies on)
    assert np.array_equal(a[30][0].numpy(), PatchDataset(cases, CFG, seed=5, length=50)[30][0].numpy())


def test_positive_patches_hold_their_nodule_and_fraction_is_respected() -> None:
    cases = random_sphere_cases(2, seed=1, spheres_per_case=1, diameter_range=(8.0, 10.0))
    cfg = CFG.replace(aug_flip=False, aug_rot90=False, intensity_scale=0.0, intensity_shift=0.0, pos_fraction=0.5)
    ds = PatchDataset(cases, cfg, seed=0, length=200)
    positives = 0
    for i in range(200):
        image, boxes, info = ds.sample(i)
        if info["positive"]:
            positives += 1
            assert len(boxes) == 1
            b = boxes[0].astype(int)
            # the sphere (bright) is inside its box in the patch
            inner = image[(b[0] + b[3]) // 2, (b[1] + b[4]) // 2, (b[2] + b[5]) // 2]
            assert inner > 0.0  # 50 HU -> 0.4 normalised; background -800 HU -> -0.73
    assert 75 <= positives <= 125


def test_cases_with_another_spacing_are_rejected() -> None:
    case = sphere_case("aniso", (32, 32, 32), [(16, 16, 16)], [6.0], rng=np.random.default_rng(0), spacing_zyx=(2.5, 0.7, 0.7))
    with pytest.raises(SpacingMismatchError, match="aniso"):
        PatchDataset([case], CFG, seed=0, length=1)


def test_prepared_cases_are_accepted_directly() -> None:
    geom = VolumeGeometry((40, 40, 40), (1.0, 1.0, 1.0), (10.0, -20.0, 30.0))
    image = np.full((40, 40, 40), -800, dtype=np.int16)
    image[15:23, 15:23, 15:23] = 40

    def nodule(nid: str, box, label) -> PreparedNodule:
        return PreparedNodule(nid, label, (13.0, -1.0, 48.0), 8.0, 268.0, 4, 3.0, {}, box)

    case = PreparedCase(
        series_uid="1.2.3",
        patient_id="P",
        fold=0,
        geometry=geom,
        image_hu=image,
        labels=np.zeros((40, 40, 40), dtype=np.uint8),
        nodules=(nodule("a", (15.0, 15.0, 15.0, 23.0, 23.0, 23.0), 1), nodule("b", None, None)),
        irrelevant=(nodule("c", None, None),),
        folder=Path("."),
    )
    np.testing.assert_array_equal(case_boxes(case), [[15, 15, 15, 23, 23, 23]])
    targets, irrelevant = case_findings(case)
    assert len(targets) == 2 and len(irrelevant) == 1 and targets[0] == ((13.0, -1.0, 48.0), 8.0)
    image_t, boxes_t = PatchDataset([case], CFG.replace(pos_fraction=1.0), seed=0, length=1)[0]
    assert image_t.shape == (1, 32, 32, 32) and boxes_t.shape == (1, 6)


def test_in_memory_case_findings_are_world_mm() -> None:
    geom = VolumeGeometry((20, 20, 20), (1.0, 1.0, 1.0), (5.0, 6.0, 7.0))
    case = InMemoryCase("x", np.zeros((20, 20, 20), np.float32), geom, np.array([[2, 4, 6, 8, 10, 12]], float))
    (centre, diameter), = case_findings(case)[0]
    np.testing.assert_allclose(centre, (5 + 8.5, 6 + 6.5, 7 + 4.5))
    assert diameter == 6.0


def _lung_with_vessel() -> InMemoryCase:
    """A 96^3 1 mm 'lung' (-850 HU) in soft tissue with one dense vessel (+40 HU) along z."""
    hu = np.full((96, 96, 96), 40.0, np.float32)
    hu[8:-8, 8:-8, 8:-8] = -850.0
    hu[8:-8, 60:63, 30:33] = 40.0
    return InMemoryCase("v", hu, VolumeGeometry((96, 96, 96), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), np.zeros((0, 6)))


def test_dense_negatives_are_centred_on_vessels_in_the_lung() -> None:
    case = _lung_with_vessel()
    dense = dense_lung_voxels(case.image_hu)
    assert len(dense) and np.all(np.abs(dense[:, 1] - 61) <= 2) and np.all(np.abs(dense[:, 2] - 31) <= 2)
    cfg = DetectorConfig(patch_size=(32, 32, 32), pos_fraction=0.0, neg_dense_fraction=1.0, pos_jitter=0.1)
    ds = PatchDataset([case], cfg, seed=0, length=20, augment=False)
    for i in range(len(ds)):
        _, _, info = ds.sample(i)
        centre = np.asarray(info["start"]) + 16
        assert abs(centre[1] - 61) <= 5 and abs(centre[2] - 31) <= 5, centre
    # without the option the centres spread over the whole volume
    plain = PatchDataset([case], DetectorConfig(patch_size=(32, 32, 32), pos_fraction=0.0), seed=0, length=20, augment=False)
    far = [abs(np.asarray(plain.sample(i)[2]["start"])[2] + 16 - 31) > 8 for i in range(20)]
    assert sum(far) >= 10


def test_domain_randomisation_blurs_and_adds_noise() -> None:
    rng_img = np.random.default_rng(0).standard_normal((32, 32, 32)).astype(np.float32) * 0.2
    base = DetectorConfig(patch_size=(32, 32, 32), aug_flip=False, aug_rot90=False, intensity_scale=0.0, intensity_shift=0.0)
    same, _ = augment(rng_img.copy(), np.zeros((0, 6)), base, np.random.default_rng(1))
    assert np.array_equal(same, rng_img)  # both probabilities 0: untouched
    blurred, _ = augment(rng_img.copy(), np.zeros((0, 6)), base.replace(aug_blur_prob=1.0, aug_blur_sigma_mm=[1.0, 1.0]), np.random.default_rng(1))
    assert blurred.std() < 0.5 * rng_img.std()
    flat = np.zeros((32, 32, 32), np.float32)
    noisy, _ = augment(flat, np.zeros((0, 6)), base.replace(aug_noise_prob=1.0, aug_noise_hu=[30.0, 30.0]), np.random.default_rng(1))
    assert noisy.std() == pytest.approx(30.0 / 750.0, rel=0.1)  # 30 HU in units of half the (-1000, 500) window
