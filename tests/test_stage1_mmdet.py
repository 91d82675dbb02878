"""mmdet 2.5D adapter: slice stacks, 2D targets and 2D -> 3D merging (no mmdet needed);
the model itself only where mmdet + mmcv with compiled ops are installed."""

from __future__ import annotations

import numpy as np
import pytest

from stage1_detect.mmdet_adapter import (
    Mmdet2p5dDetector,
    MmdetUnavailableError,
    merge_slice_detections,
    mmdet_available,
    slice_stack,
    slice_targets,
)
from stage1_detect.registry import build_detector, list_detectors


def test_slice_stack_clamps_at_the_ends() -> None:
    vol = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 2, 3), np.float32)
    np.testing.assert_array_equal(slice_stack(vol, 2, 1)[:, 0, 0], [1, 2, 3])
    np.testing.assert_array_equal(slice_stack(vol, 0, 2)[:, 0, 0], [0, 0, 2])
    np.testing.assert_array_equal(slice_stack(vol, 4, 2)[:, 0, 0], [2, 4, 4])


def test_slice_targets_are_the_in_plane_boxes_of_the_slices_crossed() -> None:
    boxes = np.array([[3, 10, 20, 6, 18, 30], [5, 0, 0, 7, 4, 4]], dtype=float)
    assert len(slice_targets(boxes, 2)) == 0
    np.testing.assert_array_equal(slice_targets(boxes, 3), [[20, 10, 30, 18]])  # x0 y0 x1 y1
    assert len(slice_targets(boxes, 5)) == 2
    np.testing.assert_array_equal(slice_targets(boxes, 6), [[0, 0, 4, 4]])


def test_merging_links_consecutive_slices_into_one_box_per_object() -> None:
    a = np.array([[10.0, 10, 18, 18]])
    b = np.array([[40.0, 40, 46, 46]])
    per_slice = [
        (4, np.vstack([a, b]), np.array([0.6, 0.5])),
        (5, np.vstack([a + 1, b]), np.array([0.9, 0.4])),
        (6, a, np.array([0.7])),
        (7, np.zeros((0, 4)), np.zeros(0)),
        (8, a, np.array([0.3])),  # after a gap: a new object
    ]
    boxes, scores = merge_slice_detections(per_slice, link_iou=0.3, top_k_scores=2)
    assert len(boxes) == 3
    np.testing.assert_allclose(boxes[0], [4, 11, 11, 7, 19, 19])  # z 4..6, in-plane box of its best slice (k=5)
    assert scores[0] == pytest.approx((0.9 + 0.7) / 2)
    np.testing.assert_allclose(boxes[1], [4, 40, 40, 6, 46, 46])
    np.testing.assert_allclose(boxes[2], [8, 10, 10, 9, 18, 18])
    assert np.all(np.diff(scores) <= 0)
    assert merge_slice_detections([(0, np.zeros((0, 4)), np.zeros(0))])[0].shape == (0, 6)


def test_detector_is_registered_and_fails_clearly_without_mmdet() -> None:
    assert "mmdet_retinanet_2p5d" in list_detectors()
    if mmdet_available():
        pytest.skip("mmdet is installed: covered by the model test")
    with pytest.raises(MmdetUnavailableError, match="mmcv"):
        build_detector("mmdet_retinanet_2p5d")


@pytest.mark.slow
@pytest.mark.skipif(not mmdet_available(), reason="mmdet + mmcv with compiled ops not installed (the [mmdet] extra)")
def test_mmdet_model_trains_and_predicts_on_spheres(tmp_path) -> None:
    from stage1_detect.toydata import random_sphere_cases

    cases = random_sphere_cases(2, shape_zyx=(32, 64, 64), spheres_per_case=1, diameter_range=(8.0, 12.0), seed=0)
    det = Mmdet2p5dDetector(device="cpu", progress=False, steps=4, checkpoint_every=2, batch_size=2, score_thresh=0.0)
    ckpt = det.fit(cases, [], tmp_path)
    dets = det.predict(cases[0].image_hu, cases[0].geometry, series_uid="s")
    assert 0 < len(dets) <= 100
    again = Mmdet2p5dDetector(checkpoint=ckpt, device="cpu", progress=False)
    np.testing.assert_allclose(again.predict(cases[0].image_hu, cases[0].geometry, series_uid="s").scores, dets.scores, atol=1e-5)
