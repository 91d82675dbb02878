"""blob-lgbm-cnn: blob-lgbm with a patch CNN behind it (stage1_detect/blob_cnn.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lidc_det.errors import ConfigError
from stage1_detect.blob import BlobDetector, BlobModelError
from stage1_detect.blob_cnn import MANIFEST_FILE, BlobCNNDetector, cnn_config, cnn_key, ensemble_probabilities
from stage1_detect.registry import build_detector, list_detectors
from tests.test_stage1_blob import CFG, _cases, _hits

CNN = {"patch_vox": 12, "spacings_mm": [1.0, 2.0], "channels": [4, 8], "epochs": 3, "batch_size": 16,
       "hard_negatives": 5, "random_negatives": 3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[BlobCNNDetector, Path]:
    out = tmp_path_factory.mktemp("blob_cnn")
    det = BlobCNNDetector(progress=False, patch_cnn=[CNN, {**CNN, "seed": 1}], **CFG)
    summary = det.fit(_cases(6, 21), [], out)
    assert len(summary["patch_cnns"]) == 2 and all(s["n_positive"] > 0 for s in summary["patch_cnns"])
    return det, out


def test_scores_are_lightgbm_times_the_ensembles_flipped_probability(trained: tuple[BlobCNNDetector, Path]) -> None:
    det, _ = trained
    assert "blob-lgbm-cnn" in list_detectors() and det.trained and det.flips
    case = _cases(1, 22)[0]
    got = det.predict(case.image_hu, case.geometry, series_uid="x")
    base = det.blob.predict(case.image_hu, case.geometry, series_uid="x")
    (prob,) = ensemble_probabilities(det.rescorers, case.image_hu, case.geometry, base.centers_xyz_mm, flips=(True,))
    want = base.scores * prob
    order = np.argsort(-want, kind="stable")
    np.testing.assert_allclose(got.scores, want[order], rtol=1e-6)
    np.testing.assert_allclose(got.centers_xyz_mm, base.centers_xyz_mm[order])
    assert np.all(np.diff(got.scores) <= 0) and not np.allclose(got.scores, base.scores)
    assert _hits(got.centers_xyz_mm[0], case), "the sphere stays first"
    # candidates read from blob-lgbm's cache score the same (what the transfer benchmark does)
    from benchmarks.transfer import _cached_predict, _candidate_cache

    cache = _candidate_cache(det, Path(trained[1]))
    assert cache is not None
    again = _cached_predict(det, case, cache)
    np.testing.assert_allclose(again.scores, got.scores, rtol=1e-6)


def test_manifest_round_trip_resume_and_loaders(trained: tuple[BlobCNNDetector, Path], tmp_path: Path) -> None:
    from lidc_det.pipeline import Pipeline, write_manifest
    from stage1_detect.cli import checkpoint_format, load_detector

    det, out = trained
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["blob_model"] == "blob_model.txt" and manifest["flips"] is True
    assert manifest["cnns"] == [f"patch_cnn/{cnn_key(det.blob, cnn_config(c))}/patch_cnn.pt" for c in (CNN, {**CNN, "seed": 1})]
    case = _cases(1, 23)[0]
    want = det.predict(case.image_hu, case.geometry, series_uid="x")
    assert checkpoint_format(out / MANIFEST_FILE) == "blob-lgbm-cnn"
    for loaded in (load_detector(out / MANIFEST_FILE, progress=False),
                   build_detector({"name": "blob-lgbm-cnn", "checkpoint": str(out), "progress": False})):
        assert isinstance(loaded, BlobCNNDetector) and loaded.trained
        got = loaded.predict(case.image_hu, case.geometry, series_uid="x")
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    # without flips the loaded detector scores otherwise
    plain = BlobCNNDetector(checkpoint=out, flips=False, progress=False).predict(case.image_hu, case.geometry, series_uid="x")
    assert not np.allclose(np.sort(plain.scores), np.sort(want.scores))
    # a second fit with the same settings and scans reuses every file; another CNN config trains one more
    stamps = {p: (out / p).stat().st_mtime_ns for p in manifest["cnns"]}
    BlobCNNDetector(progress=False, patch_cnn=[CNN, {**CNN, "seed": 1}], **CFG).fit(_cases(6, 21), [], out)
    assert {p: (out / p).stat().st_mtime_ns for p in manifest["cnns"]} == stamps
    other = BlobCNNDetector(progress=False, patch_cnn={**CNN, "epochs": 2}, **CFG)
    other.fit(_cases(6, 21), [], out)
    assert len(list((out / "patch_cnn").iterdir())) == 3
    # the pipeline takes the manifest as its detector
    write_manifest(tmp_path, detector=out / MANIFEST_FILE, segmenter=None, malignancy=None)
    pipe = Pipeline.from_dir(tmp_path)
    result = pipe.run_volume(case.image_hu, case.geometry, series_uid=case.series_uid)
    assert _hits(np.asarray(max(result.candidates, key=lambda c: c.score).center_xyz_mm), case)


def test_errors(trained: tuple[BlobCNNDetector, Path], tmp_path: Path) -> None:
    _, out = trained
    case = _cases(1, 24)[0]
    with pytest.raises(BlobModelError, match="not trained"):
        BlobCNNDetector(progress=False).predict(case.image_hu, case.geometry, series_uid="x")
    with pytest.raises(ConfigError, match="unknown fields"):
        BlobCNNDetector(patch_cnn={"epochz": 3})
    with pytest.raises(ConfigError, match="cannot change"):
        BlobCNNDetector(checkpoint=out, patch_cnn=CNN)
    with pytest.raises(ConfigError, match="cannot change"):  # blob-lgbm's own rule holds through it
        BlobCNNDetector(checkpoint=out, min_response=10.0)
    with pytest.raises(BlobModelError, match="no such"):
        BlobCNNDetector(checkpoint=tmp_path / MANIFEST_FILE)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"kind": "something else", "cnns": []}))
    with pytest.raises(BlobModelError, match="not a blob-lgbm-cnn manifest"):
        BlobCNNDetector(checkpoint=tmp_path)
    with pytest.raises(BlobModelError, match="trained model"):
        cnn_key(BlobDetector(progress=False), cnn_config(None))


def test_negative_pool_draws_negatives_beyond_the_scored_candidates(trained: tuple[BlobCNNDetector, Path],
                                                                   tmp_path: Path) -> None:
    from stage1_detect.blob_cnn import train_cnn

    det, out = trained
    blob3 = BlobDetector(checkpoint=out / "blob_model.txt", progress=False, max_detections=3)
    cases = _cases(6, 21)
    cand = blob3.cached_candidates(cases[0], out / "features")
    assert len(blob3.score_candidates(cand, series_uid="x")) == 3
    wide = blob3.score_candidates(cand, series_uid="x", top=50)
    np.testing.assert_allclose(wide.scores[:3], blob3.score_candidates(cand, series_uid="x").scores)
    few = train_cnn(blob3, cases, out / "features", cnn_config({**CNN, "epochs": 1}), tmp_path / "a.pt", progress=False)
    many = train_cnn(blob3, cases, out / "features", cnn_config({**CNN, "epochs": 1, "negative_pool": 50}),
                     tmp_path / "b.pt", progress=False)
    # 5 hard + 3 random negatives per scan from the pool; from the 3 scored candidates at most 2 are false positives
    assert few.meta["n_negative"] <= 2 * len(cases) and many.meta["n_negative"] == 8 * len(cases)
    assert cnn_key(blob3, cnn_config(CNN)) != cnn_key(blob3, cnn_config({**CNN, "negative_pool": 50}))
