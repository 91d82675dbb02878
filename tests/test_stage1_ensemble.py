"""The ``retina3d-ensemble`` detector: members trained with seeds ``seed + k``, outputs averaged
anchor by anchor before decoding (:class:`stage1_detect.inference.ModelMean`), loadable from
checkpoints and from ``lidc-det detect --model A B``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lidc_det.cli import main
from lidc_det.data.luna import read_candidates
from lidc_det.errors import ConfigError
from lidc_det.io.dicom import read_series
from lidc_det.io.dicom_write import write_ct_series
from stage1_detect.config import DetectorConfig
from stage1_detect.detector import Retina3DDetector
from stage1_detect.ensemble import Retina3DEnsemble
from stage1_detect.inference import FlipTTA, ModelMean
from stage1_detect.model import Retina3D
from stage1_detect.registry import build_detector
from stage1_detect.toydata import random_sphere_cases, sphere_case

CFG = DetectorConfig(
    channels=(8, 8, 16, 16), fpn_channels=8, patch_size=(32, 32, 32), batch_size=2, epochs=1, steps_per_epoch=2,
    checkpoint_every=2, warmup_steps=1, window_zyx=(64, 64, 64), use_body_mask=False, score_thresh=0.0,
)


def test_model_mean_averages_probabilities_and_codes_and_one_member_is_the_network() -> None:
    cfg = DetectorConfig(channels=(4, 8, 8, 8), fpn_channels=8)
    a = Retina3D(cfg, generator=torch.Generator().manual_seed(0)).eval()
    b = Retina3D(cfg, generator=torch.Generator().manual_seed(1)).eval()
    x = torch.randn(1, 1, 32, 32, 48)
    with torch.inference_mode():
        (ca, ba), (cb, bb) = a(x), b(x)
        cls1, box1 = ModelMean([a])(x)
        for got, want in zip(cls1 + box1, ca + ba):
            torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)
        cls, box = ModelMean([a, b])(x)
        for level in range(len(ca)):
            want_p = (torch.sigmoid(ca[level]) + torch.sigmoid(cb[level])) / 2
            torch.testing.assert_close(torch.sigmoid(cls[level]), want_p, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(box[level], (ba[level] + bb[level]) / 2, atol=1e-5, rtol=1e-4)
        # flips wrap the mean like any network (the mirror pass of the mean, not of one member)
        ft, _ = FlipTTA(ModelMean([a, b]), (2,))(x)
        assert ft[0].shape == cls[0].shape and not torch.allclose(ft[0], cls[0], atol=1e-3)
    with pytest.raises(ValueError):
        ModelMean([])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Retina3DEnsemble, Path]:
    out = tmp_path_factory.mktemp("ens")
    cases = random_sphere_cases(2, shape_zyx=(48, 48, 48), spheres_per_case=1, seed=0)
    det = build_detector({"name": "retina3d-ensemble", "config": CFG, "members": 2, "progress": False,
                          "device": "cpu"})
    results = det.fit(cases[:1], cases[1:], out)
    assert len(results) == 2
    return det, out


def test_fit_trains_each_member_with_its_own_seed_into_its_folder(trained) -> None:
    det, out = trained
    assert [m.config.seed for m in det.members] == [0, 1]
    assert all(c is not None and c.parent == out / f"member{k}" for k, c in enumerate(det.checkpoints))
    w0, w1 = (dict(m.model.state_dict()) for m in det.members)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())
    # a second fit resumes the finished members (same weights, no new training)
    again = Retina3DEnsemble(CFG, members=2, progress=False, device="cpu")
    cases = random_sphere_cases(2, shape_zyx=(48, 48, 48), spheres_per_case=1, seed=0)
    again.fit(cases[:1], cases[1:], out)
    for m, n in zip(det.members, again.members):
        for k, v in m.model.state_dict().items():
            assert torch.equal(v, n.model.state_dict()[k])


def test_ensemble_predicts_the_mean_and_an_ensemble_of_one_checkpoint_twice_is_that_detector(trained) -> None:
    det, _ = trained
    case = sphere_case("e", (48, 48, 48), [(24, 24, 20)], [7.0], rng=np.random.default_rng(3))
    uid = "1.2.826.0.1.3680043.8.498.151"
    got = det.predict(case.image_hu, case.geometry, series_uid=uid)
    singles = [m.predict(case.image_hu, case.geometry, series_uid=uid) for m in det.members]
    assert len(got) > 0 and not np.allclose(got.scores[:5], singles[0].scores[:5], atol=1e-6)
    # the top score of the mean cannot beat the best member's top score
    assert got.scores[0] <= max(s.scores[0] for s in singles) + 1e-6
    ck = det.checkpoints[0]
    twice = Retina3DEnsemble(checkpoints=[ck, ck], progress=False, device="cpu")
    one = Retina3DDetector(checkpoint=ck, progress=False, device="cpu")
    a = twice.predict(case.image_hu, case.geometry, series_uid=uid)
    b = one.predict(case.image_hu, case.geometry, series_uid=uid)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_allclose(a.centers_xyz_mm, b.centers_xyz_mm, atol=1e-3)
    # inference options reach every member
    flipped = twice.with_inference_options(tta_flip_axes=(2,))
    assert all(m.config.tta_flip_axes == (2,) for m in flipped.members) and twice.config.tta_flip_axes == ()


def test_members_of_different_models_and_too_few_members_are_refused(trained, tmp_path: Path) -> None:
    det, _ = trained
    from stage1_detect.train import train_detector

    other_cfg = CFG.replace(fpn_channels=16)
    cases = random_sphere_cases(1, shape_zyx=(48, 48, 48), spheres_per_case=1, seed=0)
    other = train_detector(other_cfg, cases, [], tmp_path / "o", device="cpu", progress=False).last_checkpoint
    with pytest.raises(ConfigError, match="fpn_channels"):
        Retina3DEnsemble(checkpoints=[det.checkpoints[0], other], progress=False, device="cpu")
    with pytest.raises(ConfigError, match="at least two"):
        Retina3DEnsemble(CFG, members=1)
    with pytest.raises(ConfigError, match="at least two"):
        Retina3DEnsemble(checkpoints=[det.checkpoints[0]])


def test_detect_cli_with_two_models_writes_the_ensemble_candidates(trained, tmp_path: Path) -> None:
    det, _ = trained
    case = sphere_case("c", (48, 48, 48), [(24, 24, 20)], [7.0], rng=np.random.default_rng(4))
    uid = "1.2.826.0.1.3680043.8.498.161"
    write_ct_series(case.image_hu, case.geometry, tmp_path / "dcm", patient_id="P5",
                    study_uid="1.2.826.0.1.3680043.8.498.160", series_uid=uid)
    out_csv = tmp_path / "ens.csv"
    args = ["detect", "--model", *map(str, det.checkpoints), "--dicom", str(tmp_path / "dcm"), "--out", str(out_csv),
            "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    vol = read_series(tmp_path / "dcm")
    want = det.predict(vol.hu, vol.geometry, series_uid=uid)
    rows = read_candidates(out_csv)
    np.testing.assert_allclose([r.probability for r in rows], want.scores, atol=1e-6)


def test_detect_cli_refuses_an_ensemble_member_that_is_not_a_retina3d_checkpoint(trained, tmp_path: Path) -> None:
    det, _ = trained
    other = tmp_path / "other.pt"
    torch.save({"format": "stage1_detect.monai_retinanet/1", "state_dict": {}}, other)
    from stage1_detect.cli import checkpoint_format, run_detect

    assert checkpoint_format(det.checkpoints[0]).startswith("stage1_detect.retina3d/")
    assert checkpoint_format(other) == "stage1_detect.monai_retinanet/1"
    with pytest.raises(ConfigError, match="other.pt: an ensemble"):
        run_detect([det.checkpoints[0], other], tmp_path / "no-dicom-needed", progress=False)
