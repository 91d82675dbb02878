"""Stage-2 acquisition augmentation: blur and noise on the image of extra crops, never on the label."""

from __future__ import annotations

from math import erf, sqrt

import numpy as np
import pytest

from stage2_segment.config import SegmenterConfig
from stage2_segment.crop_augment import CropAugmentConfig, acquired, augment_crops, zoomed
from stage2_segment.crops import CropConfig
from stage2_segment.segmenter import training_crops
from tests.test_stage2_crops import _case


def _phi(t: float) -> float:
    return 0.5 * (1.0 + erf(t / sqrt(2.0)))


def test_blur_is_gaussian_per_axis_in_millimetres() -> None:
    step = np.zeros((24, 24, 24), dtype=np.float32)
    step[:, :, 12:] = 100.0  # an edge across x, between voxels 11 and 12
    rng = np.random.default_rng(0)
    # sigma 1.5 mm in-plane on 0.5 mm voxels is 3 voxels: voxel 11 sits 0.5 voxel before the edge
    out = acquired(step, (2.0, 0.5, 0.5), (4.0, 1.5, 1.5), 0.0, rng)
    assert out[12, 12, 11] == pytest.approx(100 * _phi(-0.5 / 3.0), abs=0.2)
    assert out[12, 12, 14] == pytest.approx(100 * _phi(2.5 / 3.0), abs=0.2)
    # a blur along z alone leaves an edge across x sharp
    z_only = acquired(step, (1.0, 1.0, 1.0), (2.0, 0.0, 0.0), 0.0, rng)
    np.testing.assert_allclose(z_only, step, atol=1e-4)
    # and softens an edge across z
    zstep = np.moveaxis(step, 2, 0)
    assert acquired(zstep, (1.0, 1.0, 1.0), (2.0, 0.0, 0.0), 0.0, rng)[11, 5, 5] == pytest.approx(100 * _phi(-0.25), abs=0.2)


def test_noise_has_the_requested_sd() -> None:
    flat = np.full((20, 20, 20), -800.0, dtype=np.float32)
    out = acquired(flat, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 15.0, np.random.default_rng(1))
    assert out.dtype == np.float32
    assert float(out.std()) == pytest.approx(15.0, rel=0.05)
    assert float(out.mean()) == pytest.approx(-800.0, abs=1.0)


def test_copies_keep_label_and_box_and_record_their_acquisition() -> None:
    rng = np.random.default_rng(0)
    case = _case(rng)
    cfg = SegmenterConfig(crop=CropConfig(size_mm=16.0, jitter_mm=0.0, negatives_per_scan=1, negative_max_mean_hu=None))
    plain = training_crops([case], cfg, np.random.default_rng(3))
    aug_cfg = SegmenterConfig(crop=cfg.crop, augment=CropAugmentConfig(copies=2, noise_sd_hu=(5.0, 5.0)))
    crops = training_crops([case], aug_cfg, np.random.default_rng(3))
    assert len(plain) == 2 and len(crops) == 3 * len(plain)
    for k, c in enumerate(crops):
        p = plain[k % len(plain)]
        assert c.kind == p.kind and c.series_uid == p.series_uid and c.nodule_id == p.nodule_id
        np.testing.assert_array_equal(c.box_voxel, p.box_voxel)
        np.testing.assert_array_equal(c.label, p.label)
        if k < len(plain):  # the originals come first, unchanged, and say nothing of an acquisition
            np.testing.assert_array_equal(c.image, p.image)
            assert c.acquisition is None and "acquisition" not in c.manifest()
        else:
            assert not np.array_equal(c.image, p.image)
            lo_z, hi_z = aug_cfg.augment.blur_sigma_z_mm
            sz, sy, sx = c.acquisition["sigma_zyx_mm"]
            assert lo_z <= sz <= hi_z and sy == sx and c.acquisition["noise_sd_hu"] == 5.0
            assert c.acquisition["zoom"] == 1.0
            assert c.manifest()["acquisition"] == c.acquisition
    # the nodule copy is softer at the ball's edge: its interior HU falls, its surround rises
    nod, nod_copy = crops[0], crops[2]
    inside = nod.label.astype(bool)
    assert nod_copy.image[inside].mean() < nod.image[inside].mean() - 20


def test_no_copies_draws_nothing_and_changes_nothing() -> None:
    crops = training_crops([_case(np.random.default_rng(0))], SegmenterConfig(crop=CropConfig(size_mm=16.0)),
                           np.random.default_rng(5))
    rng = np.random.default_rng(9)
    assert augment_crops(crops, CropAugmentConfig(), rng) == crops
    assert rng.random() == np.random.default_rng(9).random()


@pytest.mark.parametrize("bad", [{"copies": -1}, {"blur_sigma_xy_mm": (1.0, 0.5)}, {"noise_sd_hu": (-1.0, 5.0)},
                                 {"zoom": (0.0, 1.0)}, {"zoom": (1.5, 1.2)}])
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="CropAugmentConfig"):
        CropAugmentConfig(**bad)


def test_segmenter_config_reads_augment_from_yaml_dict() -> None:
    cfg = SegmenterConfig.from_dict({"augment": {"copies": 1, "blur_sigma_z_mm": [0.5, 2.0]}})
    assert cfg.augment == CropAugmentConfig(copies=1, blur_sigma_z_mm=(0.5, 2.0))


def test_zoom_magnifies_image_and_label_about_the_centre() -> None:
    img = np.full((21, 21, 21), -800.0, dtype=np.float32)
    lab = np.zeros((21, 21, 21), dtype=np.uint8)
    zz, yy, xx = np.ogrid[:21, :21, :21]
    ball = (zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 16  # radius 4 voxels about the centre
    img[ball], lab[ball] = 40.0, 1
    big_img, big_lab = zoomed(img, lab, 1.5, -1000.0)
    assert big_img.shape == img.shape and big_lab.dtype == lab.dtype
    assert big_lab.sum() == pytest.approx(lab.sum() * 1.5**3, rel=0.15)
    assert big_lab[10, 10, 15] == 1 and lab[10, 10, 15] == 0  # the edge moved out from 4 to 6 voxels
    bright, inside = big_img > -380, big_lab.astype(bool)  # image and label stay aligned (edge voxels aside)
    assert 2 * (bright & inside).sum() / (bright.sum() + inside.sum()) > 0.9
    same_img, same_lab = zoomed(img, lab, 1.0, -1000.0)
    assert same_img is img and same_lab is lab


def test_zoomed_copies_record_their_factor() -> None:
    case = _case(np.random.default_rng(0))
    cfg = SegmenterConfig(crop=CropConfig(size_mm=16.0, jitter_mm=0.0, negatives_per_scan=0),
                          augment=CropAugmentConfig(copies=1, zoom=(1.4, 1.6), noise_sd_hu=(0.0, 0.0)))
    orig, copy = training_crops([case], cfg, np.random.default_rng(2))
    assert 1.4 <= copy.acquisition["zoom"] <= 1.6
    assert copy.label.sum() > 2 * orig.label.sum()
