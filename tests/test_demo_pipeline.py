"""The demo's pipeline step: rejected candidates drop out and each row keeps its own mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.data.prepared import PreparedCase, PreparedNodule
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections, NoduleMask
from stage2_segment.config import SegmenterConfig
from stage2_segment.segmenter import rejection

GEOM = VolumeGeometry((20, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
UID = "1.2.840.1"


def _case() -> PreparedCase:
    hu = np.full(GEOM.shape_zyx, -850, dtype=np.int16)
    labels = np.zeros(GEOM.shape_zyx, dtype=np.uint8)
    labels[8:12, 8:12, 8:12] = 1
    nodule = PreparedNodule(f"{UID}:1", 1, (10.0, 10.0, 10.0), 6.0, 64.0, 4, 3.0, {}, (8, 8, 8, 12, 12, 12))
    return PreparedCase(UID, "P1", 0, GEOM, hu, labels, (nodule,), (), Path("."))


def _mask(volume: float, centre: np.ndarray) -> NoduleMask:
    empty = volume == 0.0
    return NoduleMask(UID, np.array([0, 0, 0, 1, 1, 1]), np.full((1, 1, 1), not empty), (1.0, 1.0, 1.0),
                      tuple(float(v) for v in centre), volume, 0.0 if empty else 4.0, -100.0)


@dataclass
class _FakeSegmenter:
    volumes: dict[tuple[float, ...], float]  # mask volume by candidate centre
    min_volume_mm3: float = 10.0
    config: SegmenterConfig = field(default_factory=SegmenterConfig)

    def segment(self, hu: np.ndarray, geometry: VolumeGeometry, det: Detections) -> list[NoduleMask]:
        return [_mask(self.volumes[tuple(c)], c) for c in det.centers_xyz_mm]

    def reject(self, det: Detections, masks: list[NoduleMask]) -> Any:
        return rejection(det, masks, self.min_volume_mm3)


@dataclass
class _Run:
    segmenter: Any
    test_detections: dict[str, Detections]


class _Data:
    def load_case(self, uid: str) -> PreparedCase:
        assert uid == UID
        return _case()


def test_pipeline_rows_follow_the_surviving_candidates_in_score_order(tmp_path: Path) -> None:
    from benchmarks.demo import _pipeline_findings

    centres = np.array([[30.0, 30.0, 5.0], [10.0, 10.0, 10.0], [30.0, 5.0, 5.0], [5.0, 30.0, 15.0]])
    # candidates 0 and 2 get empty masks (rejected); of the survivors, 3 scores higher than 1
    det = Detections(UID, centres, np.full(4, 6.0), np.array([0.9, 0.6, 0.7, 0.8]))
    seg = _FakeSegmenter(volumes=dict(zip(map(tuple, centres), [0.0, 50.0, 0.0, 80.0])))
    rows = _pipeline_findings(_Data(), _Run(seg, {UID: det}), tmp_path, 2, False, True)
    assert [r["detection_score"] for r in rows] == [0.8, 0.6]
    assert [r["volume_mm3"] for r in rows] == [80.0, 50.0]  # each row keeps its own candidate's mask
    assert rows[0]["center_xyz_mm"] == [5.0, 30.0, 15.0] and rows[1]["center_xyz_mm"] == [10.0, 10.0, 10.0]
    assert [r["finding"] for r in rows] == ["none (FP)", "target nodule"]
    assert all(r["p_malignant"] is None for r in rows)  # no malignancy model fitted in this run
    assert all((tmp_path / r["png"]).is_file() for r in rows)
