"""Stage-1 inference: window tiling, NMS and the cap, body mask, and the voxel -> world mapping
of sliding-window detections (with deterministic stand-in networks, independent of training)."""

from __future__ import annotations

import numpy as np
import pytest

import torch
import torch.nn.functional as F  # noqa: E402

from lidc_det.boxes import boxes_to_world  # noqa: E402
from lidc_det.geometry import VolumeGeometry  # noqa: E402
from stage1_detect.config import LEVEL_STRIDES, DetectorConfig  # noqa: E402
from stage1_detect.inference import nms_3d, plan_windows, predict_boxes, predict_scan  # noqa: E402
from stage1_detect.preprocess import body_mask, normalize_hu  # noqa: E402

CFG = DetectorConfig(window_zyx=(64, 64, 64), window_margin=16, window_batch=3, use_body_mask=False)


class BrightBlockNet(torch.nn.Module):
    """Stand-in for Retina3D: level-0 (stride 4) anchor 0 scores where the 12^3 block of
    stride cells around it is bright (mean normalised intensity > ``level``); all box codes 0,
    so a detection is exactly its 4 mm anchor. Counts the windows it sees."""

    def __init__(self, level: float = 0.9, gain: float = 50.0) -> None:
        super().__init__()
        self.level, self.gain, self.windows = level, gain, 0

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.windows += x.shape[0]
        cls, box = [], []
        for i, s in enumerate(LEVEL_STRIDES):
            p = F.avg_pool3d(x, s)
            c = torch.full((x.shape[0], 2, *p.shape[2:]), -50.0)
            if i == 0:
                q = F.avg_pool3d(p, 3, 1, 1)
                c[:, 0] = self.gain * (q[:, 0] - self.level)
            cls.append(c)
            box.append(torch.zeros(x.shape[0], 12, *p.shape[2:]))
        return cls, box


def _volume_with_cubes(shape, cubes) -> np.ndarray:
    hu = np.full(shape, -1000.0, dtype=np.float32)
    for lo, size in cubes:
        hu[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = 500.0
    return hu


@pytest.mark.parametrize("length,max_window,margin", [(100, 64, 16), (300, 192, 16), (16, 128, 16), (350, 256, 32), (50, 400, 0)])
def test_window_cores_tile_the_volume(length: int, max_window: int, margin: int) -> None:
    plan = plan_windows((length, length + 7, 33), (max_window, max_window, max_window), margin)
    for axis, n in enumerate(plan.shape_zyx):
        step, count = plan.step_zyx[axis], plan.counts_zyx[axis]
        assert step % 16 == 0 and plan.window_zyx[axis] == step + 2 * margin
        assert plan.window_zyx[axis] <= max(max_window, 16 + 2 * margin)
        assert count * step >= n > (count - 1) * step  # cores cover [0, n) with no wasted window
    starts = list(plan.core_starts())
    assert len(starts) == plan.n_windows == len(set(starts))


def test_nms_suppresses_overlaps_keeps_best_first_and_caps() -> None:
    boxes = torch.tensor(
        [[0, 0, 0, 10, 10, 10], [1, 1, 1, 11, 11, 11], [20, 20, 20, 30, 30, 30], [0, 0, 0, 10, 10, 10.5]], dtype=torch.float32
    )
    scores = torch.tensor([0.5, 0.9, 0.4, 0.1])
    keep = nms_3d(boxes, scores, iou_threshold=0.1)
    assert keep.tolist() == [1, 2]  # box 1 beats its overlapping boxes 0 and 3; box 2 is separate
    assert nms_3d(boxes, scores, iou_threshold=0.99).tolist() == [1, 0, 2, 3]
    assert nms_3d(boxes, scores, iou_threshold=0.99, max_keep=2).tolist() == [1, 0]
    assert nms_3d(torch.zeros(0, 6), torch.zeros(0), 0.1).numel() == 0


def test_nms_matches_monai_on_random_boxes() -> None:
    from monai.data.box_utils import non_max_suppression

    g = torch.Generator().manual_seed(0)
    for n, thr, cap in [(300, 0.1, 100), (200, 0.3, -1), (50, 0.0, 10)]:
        lo = torch.rand(n, 3, generator=g) * 60
        boxes = torch.cat([lo, lo + 2 + torch.rand(n, 3, generator=g) * 20], 1)
        scores = torch.rand(n, generator=g)
        ours = nms_3d(boxes, scores, thr, cap)
        ref = non_max_suppression(boxes, scores, thr, max_proposals=cap)
        assert ours.tolist() == torch.as_tensor(ref).tolist()


def test_whole_scan_output_is_capped_at_max_detections_and_sorted() -> None:
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1, 1, (64, 96, 96)).astype(np.float32)  # many bright-ish spots
    net = BrightBlockNet(level=-0.5, gain=5.0)
    boxes, scores = predict_boxes(net, volume, CFG.replace(max_detections=100, nms_iou=0.5), progress=False)
    assert len(scores) == 100 and boxes.shape == (100, 6)
    assert np.all(np.diff(scores) <= 0)
    boxes7, _ = predict_boxes(net, volume, CFG.replace(max_detections=7), progress=False)
    assert len(boxes7) == 7


@pytest.mark.parametrize(
    "direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, -1)], ids=["identity", "flipped-x-z"]
)
def test_sliding_window_centres_match_planted_objects_in_world_mm(direction) -> None:
    shape = (100, 150, 140)
    # cube A inside one window core; cube B straddles core boundaries on all three axes
    cubes = [((40, 92, 60), 12), ((56, 28, 92), 12)]
    hu = _volume_with_cubes(shape, cubes)
    geom = VolumeGeometry(shape, (1.0, 1.0, 1.0), (-50.0, 20.0, -300.0), direction)
    net = BrightBlockNet()
    plan = plan_windows(shape, CFG.window_zyx, CFG.window_margin)
    assert plan.n_windows > 8
    dets = predict_scan(net, hu, geom, CFG, series_uid="s1", progress=False)
    assert net.windows == plan.n_windows
    assert len(dets) == 2  # one detection per object: no duplicates across overlapping windows
    truth = geom.voxel_to_world(np.array([[lo[0] + size / 2 - 0.5, lo[1] + size / 2 - 0.5, lo[2] + size / 2 - 0.5] for lo, size in cubes]))
    got = dets.centers_xyz_mm
    for t in truth:
        assert np.min(np.linalg.norm(got - t, axis=1)) < 1e-6, (got, truth)
    np.testing.assert_allclose(dets.diameters_mm, 4.0)
    # voxel boxes are on the input grid: the 4-voxel anchor at the cube centre
    expected = {tuple(float(v) for v in [*(np.array(lo) + 4), *(np.array(lo) + 8)]) for lo, _ in cubes}
    assert {tuple(b) for b in dets.boxes_voxel} == expected
    assert dets.series_uid == "s1" and np.all(dets.scores > 0.9)


def test_detections_are_mapped_back_to_a_resampled_input_grid() -> None:
    spacing = (2.0, 0.8, 0.8)
    shape = (50, 190, 175)
    geom = VolumeGeometry(shape, spacing, (-60.0, 15.0, -250.0))
    # a 16 mm cube centred at a known world point
    centre_world = np.array([-60 + 0.8 * 100, 15 + 0.8 * 60, -250 + 2.0 * 24.5])
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    world = np.stack([-60 + 0.8 * xx, 15 + 0.8 * yy, -250 + 2.0 * zz], -1)
    hu = np.where(np.all(np.abs(world - centre_world) < 8.0, axis=-1), 500.0, -1000.0).astype(np.float32)
    dets = predict_scan(BrightBlockNet(level=0.8), hu, geom, CFG, series_uid="r", progress=False)
    assert len(dets) >= 1
    top = dets.top_k(1)
    assert np.linalg.norm(top.centers_xyz_mm[0] - centre_world) < 3.5
    # every confident detection lies inside the cube, and its input-grid box maps to the same world point
    assert np.all(np.abs(dets.centers_xyz_mm - centre_world) < 8.0)
    centres, sizes = boxes_to_world(dets.boxes_voxel, geom)
    np.testing.assert_allclose(centres, dets.centers_xyz_mm, atol=1e-6)
    np.testing.assert_allclose(np.abs(sizes), 4.0, atol=1e-6)


def test_body_mask_covers_lungs_and_skips_air_windows() -> None:
    shape = (64, 160, 160)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((yy - 50) / 40.0) ** 2 + ((xx - 50) / 45.0) ** 2 <= 1.0
    hu[body] = 0.0
    lung = ((yy - 50) / 25.0) ** 2 + ((xx - 50) / 15.0) ** 2 <= 1.0
    hu[lung] = -850.0
    mask = body_mask(hu)
    assert mask.shape == shape
    assert mask[lung].all() and mask[body].all()
    assert not mask[:, 140:, 140:].any()  # the far corner is air
    net = BrightBlockNet()
    cfg = CFG.replace(window_zyx=(96, 96, 96), use_body_mask=True)
    predict_scan(net, hu, VolumeGeometry(shape, (1, 1, 1), (0, 0, 0)), cfg, series_uid="b", progress=False)
    full = plan_windows(shape, cfg.window_zyx, cfg.window_margin).n_windows
    assert 0 < net.windows < full


def test_normalize_hu_window() -> None:
    out = normalize_hu(np.array([-2000.0, -1000.0, 0.0, 500.0, 3000.0]), (-1000.0, 500.0))
    np.testing.assert_allclose(out, [-1.0, -1.0, 1.0 / 3.0, 1.0, 1.0], atol=1e-6)
    assert out.dtype == np.float32


def _mirror_boxes_x(boxes: np.ndarray, width: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 2], out[:, 5] = width - boxes[:, 5], width - boxes[:, 2]
    return out


def test_flip_tta_output_is_exactly_mirror_symmetric_and_none_is_the_model() -> None:
    """Whatever the network, its flip-averaged output on a mirrored input is the mirrored output:
    probabilities flipped back, x-centre codes negated (wrong un-flipping or signs break it)."""
    from stage1_detect.inference import FlipTTA
    from stage1_detect.model import Retina3D

    torch.manual_seed(0)
    net = Retina3D(DetectorConfig(channels=(4, 8, 8, 8), fpn_channels=8), generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 1, 32, 48, 64).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        cls0, box0 = net(x)
        cls_id, box_id = FlipTTA(net, ())(x)
        for a, b in zip(cls0 + box0, cls_id + box_id):
            torch.testing.assert_close(a.float(), b, atol=1e-4, rtol=1e-4)
        tta = FlipTTA(net, (2,))
        cls, box = tta(x)
        cls_m, box_m = tta(torch.flip(x, [4]))
        for c, cm in zip(cls, cls_m):
            torch.testing.assert_close(torch.flip(cm, [4]), c, atol=1e-4, rtol=1e-4)
        for b, bm in zip(box, box_m):
            n, ab, d, h, w = b.shape
            back = torch.flip(bm, [4]).reshape(n, ab // 6, 6, d, h, w).clone()
            back[:, :, 2] *= -1.0
            torch.testing.assert_close(back.reshape(b.shape), b, atol=1e-4, rtol=1e-4)
        # and it is not the plain network (the mirror pass changes the scores)
        assert not torch.allclose(cls[0], cls0[0].float(), atol=1e-3)
    assert len(FlipTTA(net, (0, 1, 2)).flips) == 8


def test_predict_boxes_with_flip_tta_mirrors_detections_of_a_mirrored_scan() -> None:
    """Decoding after the flip average: detections of a mirrored volume are the mirrored detections."""
    from stage1_detect.model import Retina3D

    cfg = DetectorConfig(channels=(4, 8, 8, 8), fpn_channels=8, window_zyx=(96, 96, 96), window_margin=16,
                         use_body_mask=False, score_thresh=0.0, max_detections=20, nms_iou=0.3, tta_flip_axes=(2,))
    net = Retina3D(cfg, generator=torch.Generator().manual_seed(1)).eval()
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1, 1, (32, 48, 64)).astype(np.float32)  # sides multiples of 16: symmetric padding
    boxes, scores = predict_boxes(net, volume, cfg, progress=False)
    boxes_m, scores_m = predict_boxes(net, np.ascontiguousarray(volume[:, :, ::-1]), cfg, progress=False)
    assert len(scores) == 20
    np.testing.assert_allclose(scores_m, scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(boxes_m, _mirror_boxes_x(boxes, volume.shape[2]), atol=1e-3)
    plain, _ = predict_boxes(net, volume, cfg.replace(tta_flip_axes=()), progress=False)
    assert not np.allclose(plain[:5], boxes[:5], atol=1e-3)
