"""``lidc-det detect``: DICOM series in, candidates table + LUNA16 CSV out (resampling to the
model's spacing), with a checkpoint trained for a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import torch

from lidc_det.cli import main  # noqa: E402
from lidc_det.data.luna import read_candidates  # noqa: E402
from lidc_det.io.dicom import read_series  # noqa: E402
from lidc_det.io.dicom_write import write_ct_series  # noqa: E402
from stage1_detect.cli import UnknownCheckpointError, load_detector  # noqa: E402
from stage1_detect.config import DetectorConfig  # noqa: E402
from stage1_detect.toydata import random_sphere_cases, sphere_case  # noqa: E402
from stage1_detect.train import train_detector  # noqa: E402

CFG = DetectorConfig(
    channels=(8, 8, 16, 16), fpn_channels=8, patch_size=(32, 32, 32), batch_size=2, epochs=1, steps_per_epoch=2,
    checkpoint_every=2, warmup_steps=1, window_zyx=(64, 64, 64), use_body_mask=False,
    score_thresh=0.0,  # an almost untrained model: keep every candidate so the table and CSV are full
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    cases = random_sphere_cases(1, shape_zyx=(48, 48, 48), spheres_per_case=1, seed=0)
    return train_detector(CFG, cases, [], out, device="cpu", progress=False).last_checkpoint


def test_detect_reads_dicom_resamples_prints_and_writes_luna_csv(tmp_path: Path, checkpoint: Path, capsys) -> None:
    # 2.5 mm slices, 0.8 mm pixels: the detector must resample to its 1 mm grid
    case = sphere_case("x", (20, 60, 56), [(10, 30, 28)], [6.0], rng=np.random.default_rng(1),
                       spacing_zyx=(2.5, 0.8, 0.8), origin_xyz=(-20.0, 10.0, -100.0))
    uid = "1.2.826.0.1.3680043.8.498.111"
    write_ct_series(case.image_hu, case.geometry, tmp_path / "dcm", patient_id="P1",
                    study_uid="1.2.826.0.1.3680043.8.498.110", series_uid=uid)
    out_csv = tmp_path / "cands.csv"
    rc = main(["detect", "--model", str(checkpoint), "--dicom", str(tmp_path / "dcm"), "--out", str(out_csv),
               "--device", "cpu", "--top", "5", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert uid in printed and "rank" in printed and "more" in printed
    rows = read_candidates(out_csv)
    assert 5 < len(rows) <= 100 and {r.series_uid for r in rows} == {uid}
    # the CSV holds exactly what the library predicts on the same series, in world mm
    vol = read_series(tmp_path / "dcm")
    dets = load_detector(checkpoint, device="cpu", progress=False).predict(vol.hu, vol.geometry, series_uid=uid)
    got = np.array([r.center_xyz_mm for r in rows])
    np.testing.assert_allclose(got, dets.centers_xyz_mm, atol=1e-3)
    np.testing.assert_allclose([r.probability for r in rows], dets.scores, atol=1e-6)
    # every centre lies inside the scan's world extent
    vox = vol.geometry.world_to_voxel(got)
    assert np.all(vox > -1) and np.all(vox < np.array(vol.geometry.shape_zyx))


def test_detect_with_test_time_flips_is_the_flip_averaged_detector(tmp_path: Path, checkpoint: Path) -> None:
    case = sphere_case("t", (48, 48, 48), [(24, 24, 20)], [7.0], rng=np.random.default_rng(3))
    uid = "1.2.826.0.1.3680043.8.498.131"
    write_ct_series(case.image_hu, case.geometry, tmp_path / "dcm", patient_id="P3",
                    study_uid="1.2.826.0.1.3680043.8.498.130", series_uid=uid)
    out_csv = tmp_path / "tta.csv"
    assert main(["detect", "--model", str(checkpoint), "--dicom", str(tmp_path / "dcm"), "--out", str(out_csv),
                 "--device", "cpu", "--tta-flip-axes", "2", "--no-progress"]) == 0
    vol = read_series(tmp_path / "dcm")
    plain = load_detector(checkpoint, device="cpu", progress=False)
    flipped = plain.with_inference_options(tta_flip_axes=(2,))
    want = flipped.predict(vol.hu, vol.geometry, series_uid=uid)
    rows = read_candidates(out_csv)
    np.testing.assert_allclose([r.probability for r in rows], want.scores, atol=1e-6)
    other = plain.predict(vol.hu, vol.geometry, series_uid=uid)
    assert not np.allclose(other.scores[:5], want.scores[:5], rtol=0.0, atol=1e-7)  # an untrained model: tiny but real differences


def test_detect_rejects_a_file_that_is_not_a_checkpoint(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(UnknownCheckpointError, match="not a stage-1 detector checkpoint"):
        load_detector(bad)
    assert main(["detect", "--model", str(bad), "--dicom", str(tmp_path)]) == 2
    assert "not a stage-1 detector checkpoint" in capsys.readouterr().err


def test_detect_runs_an_exported_onnx_model_like_the_checkpoint(tmp_path: Path, checkpoint: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from stage1_detect.detector import Retina3DDetector
    from stage1_detect.export import export_onnx

    onnx_path = tmp_path / "model.onnx"
    export_onnx(Retina3DDetector(checkpoint=checkpoint, device="cpu", progress=False), onnx_path)
    case = sphere_case("o", (40, 48, 48), [(20, 24, 24)], [8.0], rng=np.random.default_rng(2))
    uid = "1.2.826.0.1.3680043.8.498.121"
    write_ct_series(case.image_hu, case.geometry, tmp_path / "dcm", patient_id="P2",
                    study_uid="1.2.826.0.1.3680043.8.498.120", series_uid=uid)
    for model, csv in ((checkpoint, "pt.csv"), (onnx_path, "onnx.csv")):
        assert main(["detect", "--model", str(model), "--dicom", str(tmp_path / "dcm"), "--out", str(tmp_path / csv),
                     "--device", "cpu", "--no-progress"]) == 0
    a, b = read_candidates(tmp_path / "pt.csv"), read_candidates(tmp_path / "onnx.csv")
    assert len(a) == len(b) > 0
    np.testing.assert_allclose([r.center_xyz_mm for r in a], [r.center_xyz_mm for r in b], atol=1e-2)
    np.testing.assert_allclose([r.probability for r in a], [r.probability for r in b], atol=1e-4)
