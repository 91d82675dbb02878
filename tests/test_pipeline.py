"""lidc_det.pipeline: the chaining (kept / rejected with reasons, second look, malignancy on kept
masks only), the Rejection record, and the models-folder manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from lidc_det.geometry import VolumeGeometry
from lidc_det.pipeline import Pipeline, PipelineError, read_manifest, write_manifest
from lidc_det.results import Detections, MalignancyScore, NoduleMask
from stage2_segment.config import SegmenterConfig
from stage2_segment.segmenter import rejection, reject_false_positives

GEOM = VolumeGeometry((20, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
UID = "1.2.840.1"
CENTRES = np.array([[30.0, 30.0, 5.0], [10.0, 10.0, 10.0], [30.0, 5.0, 5.0], [5.0, 30.0, 15.0]])
SCORES = np.array([0.9, 0.6, 0.7, 0.8])


def _mask(volume: float, centre: np.ndarray) -> NoduleMask:
    empty = volume == 0.0
    return NoduleMask(UID, np.array([0, 0, 0, 2, 2, 2]), np.full((2, 2, 2), not empty), (1.0, 1.0, 1.0),
                      tuple(float(v) for v in centre), volume, 0.0 if empty else 4.0, -100.0)


@dataclass
class _Detector:
    def predict(self, hu: np.ndarray, geometry: VolumeGeometry, *, series_uid: str) -> Detections:
        return Detections(series_uid, CENTRES, np.full(4, 6.0), SCORES)


@dataclass
class _Segmenter:
    """Stage-2 double: fixed mask volumes per candidate centre; the real rejection rule."""

    volumes: dict[float, float]
    min_volume_mm3: float = 10.0
    config: SegmenterConfig = field(default_factory=SegmenterConfig)
    seen: list[int] = field(default_factory=list)

    def segment(self, hu: np.ndarray, geometry: VolumeGeometry, det: Detections) -> list[NoduleMask]:
        self.seen.append(len(det))
        return [_mask(self.volumes[float(c[0] * 100 + c[1])], c) for c in det.centers_xyz_mm]

    def reject(self, det: Detections, masks: list[NoduleMask]):  # noqa: ANN201
        return rejection(det, masks, self.min_volume_mm3)


@dataclass
class _Malignancy:
    calls: list[int] = field(default_factory=list)

    def predict(self, samples: list) -> list[MalignancyScore]:  # noqa: ANN001
        self.calls.append(len(samples))
        return [MalignancyScore(s.series_uid, s.center_xyz_mm, 0.5 + 0.01 * i, "test") for i, s in enumerate(samples)]


@dataclass
class _SecondLook:
    min_score: float | None = 0.15

    def rescore(self, hu, geometry, detections, masks):  # noqa: ANN001, ANN201
        # candidate at x=30, y=5 scores low; the others keep their order reversed
        return np.where(detections.centers_xyz_mm[:, 1] == 5.0, 0.1, 1.1 - detections.scores)


VOLS = {3030.0: 0.0, 1010.0: 50.0, 3005.0: 30.0, 530.0: 80.0}


def _run(**kw) -> object:  # noqa: ANN003
    pipe = Pipeline(_Detector(), _Segmenter(VOLS), _Malignancy(), **kw)
    return pipe.run_volume(np.full(GEOM.shape_zyx, -800.0), GEOM, series_uid=UID, patient_id="P1")


def test_rejection_record_matches_reject_false_positives() -> None:
    det = Detections(UID, CENTRES, np.full(4, 6.0), SCORES)
    masks = [_mask(v, c) for v, c in zip([0.0, 50.0, 5.0, 80.0], CENTRES)]
    rec = rejection(det, masks, 10.0)
    assert rec.kept.tolist() == [False, True, False, True]
    assert rec.reasons == ("empty mask", "mask 50 mm3 >= 10 mm3", "mask 5 mm3 < 10 mm3", "mask 80 mm3 >= 10 mm3")
    ref = reject_false_positives(det, masks, 10.0)
    np.testing.assert_array_equal(rec.apply(det).scores, ref.scores)
    np.testing.assert_array_equal(rec.apply(det).centers_xyz_mm, ref.centers_xyz_mm)
    dw = rejection(det, masks, 10.0, mode="downweight", factor=0.5)
    np.testing.assert_allclose(dw.apply(det).scores, [0.45, 0.6, 0.35, 0.8])
    np.testing.assert_allclose(dw.apply(det).scores, reject_false_positives(det, masks, 10.0, mode="downweight",
                                                                           factor=0.5).scores)


def test_pipeline_keeps_rejects_with_reasons_and_scores_kept_masks_only() -> None:
    r = _run()
    assert [c.rank for c in r.candidates] == [1, 2, 3, 4]  # detection order
    assert [c.detection_score for c in r.candidates] == [0.9, 0.8, 0.7, 0.6]
    kept = {c.rank: c.kept for c in r.candidates}
    assert kept == {1: False, 2: True, 3: True, 4: True}
    assert r.candidates[0].reason == "rejected: empty mask"
    assert r.candidates[1].reason == "kept: mask 80 mm3 >= 10 mm3"
    assert r.candidates[0].p_malignant is None and all(c.p_malignant is not None for c in r.candidates[1:])
    assert len(r.malignancy) == 3 and r.rejection is not None and r.rejection.n_kept == 3
    final = r.final_detections()
    assert final.scores.tolist() == [0.8, 0.7, 0.6]
    assert final.centers_xyz_mm[0].tolist() == [5.0, 30.0, 15.0]


def test_max_candidates_bounds_stage_two() -> None:
    seg = _Segmenter(VOLS)
    r = Pipeline(_Detector(), seg, None, max_candidates=2).run_volume(
        np.zeros(GEOM.shape_zyx), GEOM, series_uid=UID)
    assert seg.seen == [2] and len(r.candidates) == 2 and len(r.detections) == 4


def test_second_look_rescores_and_rejects_below_min_score() -> None:
    r = _run(second_look=_SecondLook())
    by_rank = {c.rank: c for c in r.candidates}
    assert by_rank[3].reason == "second look 0.10 < 0.15" and not by_rank[3].kept  # x=30, y=5
    assert by_rank[1].reason == "rejected: empty mask"
    # survivors ranked by the second look's score (1.1 - detection score)
    assert [c.rank for c in r.kept] == [4, 2]
    assert r.kept[0].score == pytest.approx(0.5) and r.kept[0].second_look_score == pytest.approx(0.5)


def test_without_stage_two_everything_is_kept() -> None:
    r = Pipeline(_Detector()).run_volume(np.zeros(GEOM.shape_zyx), GEOM, series_uid=UID)
    assert all(c.kept and c.reason == "kept (no stage 2)" and c.mask is None for c in r.candidates)
    assert r.rejection is None and r.malignancy == ()


def test_manifest_round_trip_and_errors(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no pipeline.json"):
        read_manifest(tmp_path)
    (tmp_path / "det.pt").write_bytes(b"x")
    write_manifest(tmp_path, detector=tmp_path / "det.pt", segmenter=None, malignancy=None, max_candidates=7)
    m = read_manifest(tmp_path)
    assert m["detector"] == (tmp_path / "det.pt").resolve() and m["max_candidates"] == 7 and m["segmenter"] is None
    write_manifest(tmp_path, detector=tmp_path / "det.pt", segmenter=tmp_path / "missing", malignancy=None)
    with pytest.raises(PipelineError, match="segmenter model .* does not exist"):
        read_manifest(tmp_path)
