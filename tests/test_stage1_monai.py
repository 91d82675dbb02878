"""MONAI RetinaNet baseline adapter: tutorial configuration, axis mapping, fit/predict on a
tiny configuration, checkpoints and resume (the real configuration needs a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import monai  # noqa: F401  (a required dependency: a broken install fails)

from lidc_det.boxes import mask_to_box, to_monai_boxes  # noqa: E402
from stage1_detect.monai_baseline import (  # noqa: E402
    MonaiConfigError,
    MonaiRetinaNetConfig,
    MonaiRetinaNetDetector,
    _monai_xyz_to_zyx_boxes,
    _zyx_boxes_to_monai_xyz,
    resample_case,
)
from stage1_detect.registry import build_detector  # noqa: E402
from stage1_detect.toydata import random_sphere_cases, sphere_case  # noqa: E402

TINY = dict(
    spacing_xyz_mm=[1.0, 1.0, 1.0], block="basic", resnet_layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64],
    patch_size_xyz=[32, 32, 32], batch_size=1, val_patch_size_xyz=[32, 32, 32], epochs=1, steps_per_epoch=2,
    checkpoint_every=1, warmup_epochs=0, pos_fraction=1.0, score_thresh=0.0,
)


def test_defaults_are_the_luna16_tutorial_configuration() -> None:
    cfg = MonaiRetinaNetConfig()
    assert cfg.spacing_xyz_mm == (0.703125, 0.703125, 1.25)
    assert cfg.patch_size_xyz == (192, 192, 80) and cfg.val_patch_size_xyz == (512, 512, 208)
    assert cfg.base_anchor_shapes == ((6, 8, 4), (8, 6, 5), (10, 10, 6))
    assert cfg.returned_layers == (1, 2) and cfg.conv1_t_stride == (2, 2, 1) and cfg.resnet_layers == (3, 4, 6, 3)
    assert (cfg.lr, cfg.nms_thresh, cfg.score_thresh) == (0.01, 0.22, 0.02)
    assert cfg.size_divisible_xyz == (16, 16, 8)
    with pytest.raises(MonaiConfigError, match="divisible"):
        cfg.replace(patch_size_xyz=[100, 96, 40])
    with pytest.raises(MonaiConfigError, match="unknown"):
        cfg.replace(learning_rate=1.0)


def test_box_axes_follow_the_transposed_array() -> None:
    shape = (12, 20, 17)
    box = np.array([2.0, 5, 3, 9, 11, 8])
    m = np.zeros(shape, dtype=bool)
    m[2:9, 5:11, 3:8] = True
    # the MONAI box on the [x, y, z] array is the MONAI conversion of that array's own mask box
    expected = to_monai_boxes(mask_to_box(m.transpose(2, 1, 0)))
    np.testing.assert_allclose(_zyx_boxes_to_monai_xyz(box), expected)
    np.testing.assert_allclose(_monai_xyz_to_zyx_boxes(expected), box[None])


def test_resample_case_keeps_boxes_on_the_same_world_point() -> None:
    from lidc_det.boxes import boxes_to_world

    case = sphere_case("r", (20, 40, 40), [(10, 20, 18)], [8.0], rng=np.random.default_rng(0),
                       spacing_zyx=(2.5, 0.8, 0.8), origin_xyz=(5.0, -3.0, 40.0))
    out = resample_case(case, (1.25, 0.703125, 0.703125))
    assert out.geometry.spacing_zyx == (1.25, 0.703125, 0.703125)
    c0, s0 = boxes_to_world(case.boxes_voxel, case.geometry)
    c1, s1 = boxes_to_world(out.boxes_voxel, out.geometry)
    np.testing.assert_allclose(c1, c0, atol=1e-6)
    np.testing.assert_allclose(np.abs(s1), np.abs(s0), atol=1e-6)


def test_tiny_monai_fit_predict_checkpoint_and_resume(tmp_path: Path) -> None:
    cases = random_sphere_cases(2, shape_zyx=(32, 32, 32), spheres_per_case=1, diameter_range=(7.0, 10.0), seed=3)
    det = build_detector({"name": "monai_retinanet", "device": "cpu", "progress": False, **TINY})
    assert isinstance(det, MonaiRetinaNetDetector)
    # killed after one step: last.pt holds step 1, the rerun finishes the schedule from it
    first = det.fit(cases, [], tmp_path, stop_after_steps=1)
    assert first.steps == 1
    res = det.fit(cases, [], tmp_path)
    assert res.steps == 2 and res.best_checkpoint is None
    for name in ("last.pt", "config.yaml", "train_log.csv", "loss_curve.png"):
        assert (tmp_path / name).is_file(), name
    case = cases[0]
    dets = det.predict(case.image_hu, case.geometry, series_uid=case.series_uid)
    assert 0 < len(dets) <= 100 and dets.series_uid == case.series_uid
    # voxel boxes are on the input grid and agree with the world centres
    from lidc_det.boxes import boxes_to_world

    centres, _ = boxes_to_world(dets.boxes_voxel, case.geometry)
    np.testing.assert_allclose(centres, dets.centers_xyz_mm, atol=1e-6)
    # the checkpoint rebuilds the same detector (also through `lidc-det detect`'s loader)
    from stage1_detect.cli import load_detector

    again = load_detector(res.last_checkpoint, device="cpu", progress=False)
    assert isinstance(again, MonaiRetinaNetDetector) and again.config == det.config
    dets2 = again.predict(case.image_hu, case.geometry, series_uid=case.series_uid)
    np.testing.assert_allclose(dets2.scores, dets.scores, atol=1e-5)
