"""The second look's benchmark plumbing (benchmarks.second_look) with stand-in stage 1 / stage 2 models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.second_look import (
    ScanCandidates,
    ablation_markdown,
    collect,
    compare,
    model_folder,
    table_of,
    _volume_arm,
)
from lidc_det.data.luna import LunaFinding
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections, NoduleMask
from stage2_segment.second_look import SecondLook, SecondLookConfig

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class _Case:
    series_uid: str
    patient_id: str
    image_hu: np.ndarray
    geometry: VolumeGeometry
    nodules: list[tuple[float, float, float]]

    def luna_findings(self):
        return [LunaFinding(self.series_uid, c, 10.0) for c in self.nodules], []


class _DS:
    def __init__(self, cases):
        self.cases = {c.series_uid: c for c in cases}

    def load_case(self, uid):
        return self.cases[uid]


def _case(k: int, rng: np.random.Generator) -> _Case:
    """A lung box with one ball (nodule) and one tube (vessel) at random places."""
    g = VolumeGeometry((60, 90, 90), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    hu = np.full(g.shape_zyx, -850.0, np.float32)
    hu[:, :6], hu[:, -6:], hu[:, :, :6], hu[:, :, -6:] = 40, 40, 40, 40
    zz, yy, xx = np.indices(g.shape_zyx)
    b = np.array([30, 30 + rng.integers(-5, 5), 30 + rng.integers(-5, 5)])
    hu[(zz - b[0]) ** 2 + (yy - b[1]) ** 2 + (xx - b[2]) ** 2 <= 16] = 20
    t = np.array([60, 60 + rng.integers(-5, 5)])
    hu[(yy - t[0]) ** 2 + (xx - t[1]) ** 2 <= 4] = 30
    return _Case(f"s{k}", f"p{k}", hu, g, [tuple(float(v) for v in b[::-1])])


class _Detector:
    """Marks the ball and the tube; the tube scores higher (a detector fooled by vessels)."""

    def predict(self, hu, geometry, *, series_uid):
        ball = np.argwhere(hu == 20).mean(axis=0)
        tube = np.argwhere(hu == 30).mean(axis=0)
        return Detections(series_uid, [ball[::-1], tube[::-1]], [8.0, 4.0], [0.4, 0.8])


class _Segmenter:
    """Dense voxels in a 20 mm box around each detection."""

    def segment(self, hu, geometry, det):
        out = []
        for c in det.centers_xyz_mm:
            v = np.rint(geometry.world_to_voxel(c)).astype(int)
            lo = np.maximum(v - 10, 0)
            hi = np.minimum(v + 10, np.asarray(hu.shape))
            m = np.asarray(hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]) > -500
            out.append(NoduleMask(det.series_uid, np.r_[lo, hi], m, geometry.spacing_zyx, tuple(c), float(m.sum()),
                                  5.0, 0.0))
        return out


def test_collect_compare_and_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cases = [_case(k, rng) for k in range(8)]
    ds = _DS(cases)
    cfg = SecondLookConfig(num_boost_round=30, min_data_in_leaf=2, n_folds=4, use_detector=False)
    scans = collect("t", ds, [c.series_uid for c in cases], _Detector(), _Segmenter(), 40, cfg, tmp_path / "c",
                    progress=False)
    assert len(scans) == 8 and all(isinstance(s, ScanCandidates) for s in scans)
    assert scans[0].labels.tolist() == [0, 1]  # sorted by detector score: tube (FP) first, ball (hit) second
    assert len(list((tmp_path / "c").glob("*.det.npz"))) == 8  # stage-1 candidates
    assert len([p for p in (tmp_path / "c").glob("*.npz") if not p.name.endswith(".det.npz")]) == 8  # features
    again = collect("t", ds, [c.series_uid for c in cases], None, None, 40, cfg, tmp_path / "c", progress=False)
    np.testing.assert_array_equal(again[3].features.values, scans[3].features.values)  # from the cache
    table = table_of(scans)
    oof = SecondLook(cfg).out_of_fold(table)
    arms = {
        "detector": ([s.detections.scores for s in scans], None),
        "volume": _volume_arm(scans, 1e9, "drop", 0.1),
        "second look": ([oof[2 * i: 2 * i + 2] for i in range(8)], None),
    }
    res = compare(scans, arms, n_bootstrap=200, seed=0)
    a = res["arms"]
    assert res["n_scans"] == 8 and res["n_nodules"] == 8
    assert a["volume"]["n_kept"] == 0 and a["volume"]["cpm"] == 0.0
    assert a["detector"]["cpm"] < a["second look"]["cpm"]  # the tube no longer outranks the ball
    assert a["second look"]["gain"]["ci_low"] > 0
    md = ablation_markdown({"label": "SYNTHETIC", "config_path": "x.yaml", "config_hash": "h",
                            "provenance": {"git_revision": "abc"}, "device": {"device": "cpu"},
                            "load_average": [1.0, 1.0, 1.0], "seconds": {"wall": 1.0}, "demo_dir": "d",
                            "pool": {"n_scans": 8, "n_candidates": 16, "n_hits": 8}, "results": {"pool": res}})
    assert "| second look |" in md and "SYNTHETIC" in md
    assert model_folder("features + LightGBM") == "features___LightGBM"


def test_models_key_changes_with_the_checkpoint(tmp_path: Path) -> None:
    from benchmarks.second_look import models_key

    ck = tmp_path / "best.pt"
    ck.write_bytes(b"a")

    class D:
        checkpoint = ck

    k1 = models_key(D(), None)
    assert k1 == models_key(D(), None)
    ck.write_bytes(b"ab")
    assert models_key(D(), None) != k1
