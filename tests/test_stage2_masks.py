"""Stage 2 paste-back, FP rejection and Dice / human-reference math on hand-made examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lidc_det.geometry import VolumeGeometry
from lidc_det.measure import max_axial_diameter_mm
from lidc_det.results import Detections
from stage2_segment.crops import CropConfig, detection_crops
from stage2_segment.metrics import (
    consensus,
    dice,
    leave_one_out_dice,
    model_leave_one_out_dice,
    nodule_scores,
    summarize,
)
from stage2_segment.predict import masks_from_probabilities, nearest_component
from stage2_segment.segmenter import passes_rejection, reject_false_positives

GEOM = VolumeGeometry((30, 40, 40), (1.0, 1.0, 1.0), (10.0, 20.0, -30.0))


def _crops(centres_vox: list[list[float]], size_mm: float = 12.0):
    hu = np.full(GEOM.shape_zyx, -900.0, dtype=np.float32)
    world = GEOM.voxel_to_world(np.asarray(centres_vox, dtype=float))
    det = Detections("1.2.3", world, np.zeros(len(world)), np.linspace(0.9, 0.1, len(world)))
    return hu, det, detection_crops(hu, GEOM, det, CropConfig(size_mm=size_mm))


def test_paste_back_keeps_the_component_nearest_the_centre_and_clips_at_the_border() -> None:
    hu, det, crops = _crops([[10, 10, 10], [2, 20, 38]])
    hu[9:12, 9:12, 9:12] = 40.0  # the nodule under crop 0's centre
    p0 = np.zeros((12, 12, 12), dtype=np.float32)
    p0[5:8, 5:8, 5:8] = 0.9  # centre component (crop voxel 6 = volume voxel 10)
    p0[0:2, 0:2, 0:2] = 0.8  # a far component: dropped
    p1 = np.ones((12, 12, 12), dtype=np.float32)  # everything, also outside the volume
    masks = masks_from_probabilities(crops, [p0, p1], hu)
    m0, m1 = masks
    box0 = crops[0].box_voxel
    np.testing.assert_array_equal(m0.box_voxel, np.concatenate([box0[:3] + 5, box0[:3] + 8]))
    assert m0.volume_mm3 == 27.0 and m0.mean_hu == pytest.approx(40.0)
    full = m0.full_mask(GEOM.shape_zyx)
    assert full.sum() == 27 and full[9:12, 9:12, 9:12].all()
    np.testing.assert_allclose(m0.center_xyz_mm, GEOM.voxel_to_world(np.array([10.0, 10.0, 10.0])))
    assert m0.score == pytest.approx(0.9) and m0.source == "detection"
    # crop 1 reaches outside z < 0 and x >= 40: only voxels inside the volume are kept
    assert np.all(m1.box_voxel[:3] >= 0) and np.all(m1.box_voxel[3:] <= np.asarray(GEOM.shape_zyx))
    assert m1.volume_mm3 == float(m1.full_mask(GEOM.shape_zyx).sum())
    # an empty prediction gives an empty mask with volume 0
    empty = masks_from_probabilities(crops[:1], [np.zeros((12, 12, 12))], hu)[0]
    assert empty.empty and empty.volume_mm3 == 0.0


def test_nearest_component_and_axial_diameter() -> None:
    m = np.zeros((5, 9, 9), dtype=bool)
    m[2, 1, 1] = True
    m[2, 5:8, 5] = True
    got = nearest_component(m, np.array([2, 6, 5]))
    assert got.sum() == 3 and not got[2, 1, 1]
    got = nearest_component(m, np.array([2, 0, 0]))  # centre outside both: the closest one
    assert got.sum() == 1 and got[2, 1, 1]
    # a 3-voxel line along y at 0.5 mm: centres 1 mm apart + one voxel = 1.5 mm
    assert max_axial_diameter_mm(got, (1.0, 0.5, 0.5)) == pytest.approx(0.5)
    line = np.zeros((1, 5, 5), dtype=bool)
    line[0, 1:4, 2] = True
    assert max_axial_diameter_mm(line, (1.0, 0.5, 0.5)) == pytest.approx(1.5)
    sq = np.zeros((1, 5, 5), dtype=bool)
    sq[0, 0:4, 0:4] = True  # diagonal of 3 x 3 voxel steps + one voxel
    assert max_axial_diameter_mm(sq, (2.0, 1.0, 1.0)) == pytest.approx(3 * np.sqrt(2) + 1)


def test_reject_false_positives_drop_and_downweight() -> None:
    hu, det, crops = _crops([[10, 10, 10], [20, 20, 20], [15, 30, 30]])
    probs = [np.zeros((12, 12, 12)) for _ in crops]
    probs[0][4:8, 4:8, 4:8] = 1.0  # 64 mm^3
    probs[1][6, 6, 6] = 1.0  # 1 mm^3
    masks = masks_from_probabilities(crops, probs, hu)
    kept = reject_false_positives(det, masks, 10.0)
    assert len(kept) == 1 and kept.scores[0] == pytest.approx(0.9)
    assert len(reject_false_positives(det, masks, 0.0)) == 3  # threshold 0 rejects nothing
    assert len(reject_false_positives(det, masks, 0.5)) == 2  # any positive threshold rejects empty masks
    dw = reject_false_positives(det, masks, 10.0, mode="downweight", factor=0.5)
    np.testing.assert_allclose(dw.scores, [0.9, 0.25, 0.05])
    np.testing.assert_array_equal(passes_rejection(masks, 10.0), [True, False, False])
    np.testing.assert_array_equal(passes_rejection(masks, 0.5), [True, True, False])
    with pytest.raises(ValueError):
        reject_false_positives(det, masks[:2], 1.0)


def test_dice_and_leave_one_out_by_hand() -> None:
    a = np.array([1, 1, 1, 1, 0, 0], bool)
    b = np.array([0, 0, 1, 1, 1, 1], bool)
    assert dice(a, b) == pytest.approx(2 * 2 / 8)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(a, np.zeros(6, bool)) == 0.0
    r = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], bool)
    np.testing.assert_array_equal(consensus(r), [0, 1, 1, 1, 0])
    # reader 0 vs others (1, 2): >= 50 % of 2 readers = union -> [0,1,1,1,1]
    loo = leave_one_out_dice(r)
    assert loo[0] == pytest.approx(2 * 2 / (3 + 4))
    assert loo[1] == pytest.approx(2 * 3 / (3 + 5))
    assert loo[2] == pytest.approx(loo[0])
    # a model equal to the middle reader scores like that reader against each leave-one-out consensus
    model = r[1]
    expected = np.mean([dice(model, consensus(np.delete(r, k, axis=0))) for k in range(3)])
    assert model_leave_one_out_dice(model, r) == pytest.approx(expected)
    s = summarize([0.1, 0.2, 0.3, 0.4, float("nan")])
    assert s["n"] == 4 and s["median"] == pytest.approx(0.25) and s["q25"] == pytest.approx(0.175)


def test_nodule_scores_against_full_volume_references() -> None:
    hu, det, crops = _crops([[10, 10, 10]])
    p = np.zeros((12, 12, 12))
    p[4:8, 4:8, 4:8] = 1.0  # volume voxels 8..11
    pred = masks_from_probabilities(crops, [p], hu)[0]
    cons = np.zeros(GEOM.shape_zyx, bool)
    cons[8:12, 8:12, 8:10] = True  # half of the prediction
    r1 = cons.copy()
    r2 = np.zeros_like(cons)
    r2[8:12, 8:12, 8:12] = True
    s = nodule_scores(pred, cons, [r1, r2])
    assert s["dice_consensus"] == pytest.approx(2 * 32 / (64 + 32))
    assert s["volume_error_pct"] == pytest.approx(100.0)
    assert s["dice_readers"] == pytest.approx([2 * 32 / 96, 1.0])
    assert s["dice_human_loo"] == pytest.approx([2 * 32 / 96, 2 * 32 / 96])


def test_histogram_png(tmp_path: Path) -> None:
    from stage2_segment.metrics import plot_dice_histogram

    out = plot_dice_histogram({"model": [0.5, 0.7, 0.9]}, tmp_path / "h.png", reference={"human median": 0.793})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_min_volume_picks_the_best_threshold_and_respects_the_tolerance() -> None:
    """One scan, one nodule: the top candidate is a false positive with a 5 mm3 mask, the
    second hits the nodule with a 100 mm3 mask. Dropping masks < 100 mm3 removes the FP."""
    from lidc_det.data.luna import LunaFinding
    from lidc_det.results import NoduleMask
    from stage2_segment.segmenter import tune_min_volume

    uid = "1.2.3"
    det = Detections(uid, np.array([[50.0, 0, 0], [0.0, 0, 0]]), np.array([5.0, 10.0]), np.array([0.9, 0.8]))

    def mask(volume: float, centre: tuple[float, float, float]) -> NoduleMask:
        return NoduleMask(uid, np.array([0, 0, 0, 1, 1, 1]), np.ones((1, 1, 1), bool), (1.0, 1.0, 1.0), centre,
                          volume, 1.0, 0.0)

    masks = [mask(5.0, (50.0, 0, 0)), mask(100.0, (0.0, 0, 0))]
    truth = [LunaFinding(uid, (0.0, 0.0, 0.0), 10.0)]
    best = tune_min_volume([det], [masks], truth)
    # without rejection the nodule is found at 1 FP/scan: sensitivity 0 at 1/8, 1/4, 1/2, then 1
    assert best["cpm_without"] == pytest.approx(4 / 7)
    assert best["min_volume_mm3"] == pytest.approx(100.0) and best["cpm_with"] == pytest.approx(1.0)
    # a gain smaller than the tolerance does not buy a threshold
    lenient = tune_min_volume([det], [masks], truth, tolerance=0.5)
    assert lenient["min_volume_mm3"] == 0.0 and lenient["cpm_best"] == pytest.approx(1.0)


def test_component_detections_one_candidate_per_blob() -> None:
    from stage2_segment.fullvolume import component_detections

    prob = np.zeros(GEOM.shape_zyx, dtype=np.float32)
    prob[2:5, 2:5, 2:5] = 0.7  # 27 voxels ...
    prob[3, 3, 5] = 0.9  # ... + 1 along x: centroid (3, 3, 3 + 2/28)
    prob[20, 30, 30] = 0.6  # one voxel
    prob[10, 10, 30] = 0.4  # below the threshold
    det = component_detections(prob, GEOM, "1.2.3")
    assert len(det) == 2
    order = np.argsort(-det.scores)
    np.testing.assert_allclose(det.scores[order], [0.9, 0.6], rtol=1e-6)
    np.testing.assert_allclose(det.centers_xyz_mm[order[0]], GEOM.voxel_to_world(np.array([3.0, 3.0, 3.0 + 2 / 28])))
    np.testing.assert_allclose(det.diameters_mm[order], 2 * np.cbrt(3 * np.array([28.0, 1.0]) / (4 * np.pi)))
    assert len(component_detections(np.zeros((4, 4, 4)), GEOM, "1.2.3")) == 0
