"""Second look (stage 2 false-positive reduction): features, labels, LightGBM, paired CPM bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from lidc_det.data.luna import LunaCandidate, LunaFinding
from lidc_det.geometry import VolumeGeometry
from lidc_det.metrics.froc import FrocInputError, match_candidates, paired_cpm_difference
from lidc_det.results import Detections, NoduleMask
from stage2_segment.candidate_features import FEATURE_NAMES, candidate_features, lung_field
from stage2_segment.second_look import (
    CandidateTable,
    SecondLook,
    SecondLookConfig,
    SecondLookError,
    candidate_labels,
    patient_folds,
)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _scene() -> tuple[np.ndarray, VolumeGeometry, np.ndarray, np.ndarray]:
    """A 'chest': soft-tissue wall around lung air, a 5 mm-radius ball and a 2 mm-radius tube."""
    g = VolumeGeometry((80, 120, 120), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    hu = np.full(g.shape_zyx, -850.0, np.float32)
    hu[:, :10], hu[:, -10:], hu[:, :, :10], hu[:, :, -10:] = 40, 40, 40, 40
    zz, yy, xx = np.indices(g.shape_zyx)
    ball = (zz - 40) ** 2 + (yy - 40) ** 2 + (xx - 40) ** 2 <= 25
    tube = ((yy - 80) ** 2 + (xx - 80) ** 2 <= 4) & (zz >= 10) & (zz < 70)
    hu[ball], hu[tube] = 20, 30
    return hu, g, ball, tube & (abs(zz - 40) <= 14)


def _mask(uid: str, full: np.ndarray, g: VolumeGeometry) -> NoduleMask:
    idx = np.argwhere(full)
    lo, hi = idx.min(0), idx.max(0) + 1
    return NoduleMask(uid, np.r_[lo, hi], full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], g.spacing_zyx,
                      tuple(g.voxel_to_world(idx.mean(0))), float(full.sum()), 10.0, 0.0)


def _empty(uid: str) -> NoduleMask:
    return NoduleMask(uid, np.array([0, 0, 0, 0, 0, 0]), np.zeros((0, 0, 0), bool), (1.0, 1.0, 1.0),
                      (0.0, 0.0, 0.0), 0.0, 0.0, float("nan"))


def test_features_tell_a_ball_from_a_tube() -> None:
    hu, g, ball, tube = _scene()
    det = Detections("s", [[40, 40, 40], [80, 80, 40], [60, 30, 40]], [10, 5, 4], [0.5, 0.9, 0.1])
    feats = candidate_features(hu, g, det, [_mask("s", ball, g), _mask("s", tube, g), _empty("s")])
    f = {n: feats.values[:, i] for i, n in enumerate(FEATURE_NAMES)}
    assert feats.values.shape == (3, len(FEATURE_NAMES))
    np.testing.assert_array_equal(f["det_rank"], [1, 0, 2])
    assert f["elongation"][0] > 0.9 and f["elongation"][1] < 0.3
    assert f["sphericity"][0] > 0.8 > f["sphericity"][1]
    assert f["rb_s3"][0] > 0.9 and f["rb_s3"][1] < 0.1  # ball-like vs tube-like Hessian
    assert f["crossings"][0] == 0 and f["crossings"][1] == 2  # the tube crosses the sphere twice
    assert f["hu_mean"][0] == pytest.approx(20.0)
    assert f["wall_contact"][0] == 0.0 and f["lung_depth_mm"][0] > 20
    # empty mask: shape features undefined, intensity from a small ball at the detection (lung air)
    assert f["mask_empty"][2] == 1.0 and np.isnan(f["sphericity"][2]) and f["hu_mean"][2] < -800


def test_lung_field_excludes_the_wall_and_outside_air() -> None:
    hu, g, _, _ = _scene()
    hu = np.pad(hu, ((0, 0), (5, 5), (5, 5)), constant_values=-1000)  # air outside the body
    lf = lung_field(hu, g.spacing_zyx)
    inside, depth = lf.lookup(np.array([[40, 60, 60], [40, 8, 60], [40, 1, 1]]))
    assert inside.tolist() == [True, False, False]
    assert depth[0] > 20 and depth[1] == 0


def test_features_reject_mismatched_masks() -> None:
    hu, g, ball, _ = _scene()
    det = Detections("s", [[40, 40, 40]], [10], [0.5])
    with pytest.raises(ValueError, match="1 detections but 2 masks"):
        candidate_features(hu, g, det, [_mask("s", ball, g)] * 2)
    with pytest.raises(ValueError, match="mask of scan t"):
        candidate_features(hu, g, det, [_mask("t", ball, g)])


def test_candidate_labels_follow_the_luna16_rules() -> None:
    det = Detections("s", [[0, 0, 0], [50, 0, 0], [100, 0, 0], [1, 0, 0]], [0] * 4, [0.1, 0.9, 0.5, 0.2])
    targets = [LunaFinding("s", (0.0, 0.0, 0.0), 6.0)]
    excluded = [LunaFinding("s", (100.0, 0.0, 0.0), 6.0)]
    np.testing.assert_array_equal(candidate_labels(det, targets, excluded), [1, 0, -1, 1])


def _table(n_scans: int, rng: np.random.Generator) -> CandidateTable:
    """Candidates whose 'sphericity' tells nodules from FPs and whose detector score is noise."""
    tables = []
    for s in range(n_scans):
        n = 30
        y = np.zeros(n, np.int8)
        y[:3] = 1
        y[3] = -1
        x = rng.normal(size=(n, len(FEATURE_NAMES)))
        x[:, FEATURE_NAMES.index("sphericity")] = np.where(y == 1, 0.9, 0.4) + 0.05 * rng.normal(size=n)
        scores = rng.uniform(size=n)
        x[:, FEATURE_NAMES.index("det_score")] = scores
        from stage2_segment.candidate_features import CandidateFeatures

        tables.append(CandidateTable.of_scan(CandidateFeatures(f"scan{s}", FEATURE_NAMES, x), y, f"p{s}", scores))
    return CandidateTable.concat(tables)


def test_second_look_learns_and_cross_validates_by_patient(tmp_path) -> None:
    rng = np.random.default_rng(0)
    table = _table(10, rng)
    cfg = SecondLookConfig(num_boost_round=50, min_data_in_leaf=5, n_folds=5)
    folds = patient_folds(table.groups, 5, 0)
    for p in set(table.groups.tolist()):  # a patient never spans two folds
        assert len(set(folds[table.groups == p].tolist())) == 1
    oof = SecondLook(cfg).out_of_fold(table)
    labelled = table.labels >= 0
    y = table.labels[labelled]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, oof[labelled]) > 0.95
    assert roc_auc_score(y, table.det_scores[labelled]) < 0.8
    look = SecondLook(cfg).fit(table)
    assert look.info["n_hits"] == 30 and look.info["n_candidates"] == 290
    look.save(tmp_path / "sl")
    again = SecondLook.load(tmp_path / "sl")
    from stage2_segment.candidate_features import CandidateFeatures

    f = CandidateFeatures("x", FEATURE_NAMES, table.features[:30])
    np.testing.assert_allclose(again.score_features(f, table.det_scores[:30]),
                               look.score_features(f, table.det_scores[:30]))
    geo = SecondLook(SecondLookConfig(num_boost_round=50, min_data_in_leaf=5, combine="geometric", weight=1.0))
    geo.booster = look.booster
    np.testing.assert_allclose(geo.score_features(f, table.det_scores[:30]),
                               np.clip(look.score_features(f, table.det_scores[:30]), 1e-6, 1))


def test_second_look_needs_hits_and_a_model(tmp_path) -> None:
    table = _table(2, np.random.default_rng(1))
    no_hits = CandidateTable(table.features, np.zeros(len(table), np.int8), table.groups, table.series_uids,
                             table.index, table.det_scores)
    with pytest.raises(SecondLookError, match="needs >= 2 hits"):
        SecondLook().fit(no_hits)
    with pytest.raises(SecondLookError, match="not trained"):
        SecondLook().save(tmp_path)
    with pytest.raises(SecondLookError, match="no second-look model"):
        SecondLook.load(tmp_path)
    with pytest.raises(ValueError, match="combine"):
        SecondLookConfig(combine="max")


def test_table_round_trip(tmp_path) -> None:
    table = _table(2, np.random.default_rng(2))
    table.save(tmp_path / "t.npz")
    back = CandidateTable.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.features, table.features)
    assert back.groups.tolist() == table.groups.tolist()


def test_rescore_keeps_candidates_and_order() -> None:
    hu, g, ball, tube = _scene()
    det = Detections("s", [[40, 40, 40], [80, 80, 40]], [10, 5], [0.2, 0.9])
    masks = [_mask("s", ball, g), _mask("s", tube, g)]
    feats = candidate_features(hu, g, det, masks)
    y = np.array([1, 0], np.int8)
    rows = [CandidateTable.of_scan(feats, y, f"p{k}", det.scores) for k in range(4)]
    look = SecondLook(SecondLookConfig(use_detector=False, num_boost_round=20, min_data_in_leaf=1)).fit(
        CandidateTable.concat(rows))
    out = look.rescore(hu, g, det, masks)
    assert len(out) == 2 and out.series_uid == "s"
    np.testing.assert_array_equal(out.centers_xyz_mm, det.centers_xyz_mm)
    assert out.scores[0] > out.scores[1]  # the ball now outranks the tube


def _matches(scores: list[list[float]]):
    annotations, cands, uids = [], [], []
    for s, sc in enumerate(scores):
        uid = f"s{s}"
        uids.append(uid)
        annotations.append(LunaFinding(uid, (0.0, 0.0, 0.0), 10.0))
        cands += [LunaCandidate(uid, (0.0 if i == 0 else 100.0 + i * 20, 0.0, 0.0), p) for i, p in enumerate(sc)]
    return match_candidates(annotations, cands, series_uids=uids)


def test_paired_cpm_difference() -> None:
    # candidate 0 of each scan is the nodule; b ranks it first everywhere, a below 3 FPs in half the scans
    a = _matches([[0.5, 0.9, 0.8, 0.7] if s % 2 else [0.9, 0.5, 0.4, 0.3] for s in range(10)])
    b = _matches([[0.95, 0.9, 0.8, 0.7] for _ in range(10)])
    same = paired_cpm_difference(a, a, n_bootstrap=200)
    assert same.difference == 0 and same.ci_low == 0 and same.ci_high == 0 and same.p_not_better == 1.0
    d = paired_cpm_difference(a, b, n_bootstrap=500, seed=3)
    assert d.cpm_b == pytest.approx(1.0) and d.difference > 0.2
    assert 0 < d.ci_low <= d.difference <= d.ci_high and d.p_not_better < 0.01  # ties: only even scans drawn
    assert d.to_dict()["n_scans"] == 10
    with pytest.raises(FrocInputError, match="different scans"):
        paired_cpm_difference(a, _matches([[0.9]] * 3))


def test_closed_form_eigenvalues_match_numpy() -> None:
    from stage2_segment.candidate_features import _sym3_eigenvalues

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3, 3))
    a = a + a.transpose(0, 2, 1)
    a[0], a[1] = np.eye(3), np.diag([1.0, 1.0, -2.0])  # repeated eigenvalues
    ev = _sym3_eigenvalues({(i, j): a[:, i, j] for i in range(3) for j in range(i, 3)})
    ref = np.linalg.eigvalsh(a)
    np.testing.assert_allclose(np.sort(ev, axis=1), ref, atol=1e-9)
    assert np.all(np.diff(np.abs(ev), axis=1) >= -1e-12)  # sorted by magnitude
