"""Stage 2 end to end with real nnU-Net: plan, train a few iterations on CPU, predict (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lidc_det.data.prepared import PreparedCase, PreparedNodule
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections

pytestmark = pytest.mark.slow


def _case(uid: str, rng: np.random.Generator) -> PreparedCase:
    geom = VolumeGeometry((48, 48, 48), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    hu = rng.normal(-850, 30, geom.shape_zyx).astype(np.int16)
    hu[:, :, 36:40] = 40
    labels = np.zeros(geom.shape_zyx, dtype=np.uint8)
    nodules = []
    for label, c in enumerate(([16, 16, 16], [32, 30, 18]), start=1):
        zz, yy, xx = np.ogrid[:48, :48, :48]
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 16
        labels[ball] = label
        hu[ball] = 20
        box = tuple(float(v) for v in [c[0] - 4, c[1] - 4, c[2] - 4, c[0] + 5, c[1] + 5, c[2] + 5])
        nodules.append(PreparedNodule(f"{uid}:{label}", label, tuple(geom.voxel_to_world(np.array(c, float))),
                                      8.0, 268.0, 4, 3.0, {}, box))
    return PreparedCase(uid, f"P{uid}", 0, geom, hu, labels, tuple(nodules), (), Path("."))


def test_fit_and_segment_on_cpu(tmp_path: Path) -> None:
    from stage2_segment.config import SegmenterConfig
    from stage2_segment.segmenter import NnUnetSegmenter

    rng = np.random.default_rng(0)
    cases = [_case(f"1.2.{i}", rng) for i in range(3)]
    cfg = SegmenterConfig.from_dict({
        "dataset_id": 990, "dataset_name": "Test", "plan_base_features": 4,
        "crop": {"size_mm": 16, "jitter_mm": 2, "negatives_per_scan": 1},
        "train": {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
                  "optimizer": "adamw", "initial_lr": 1e-3},
    })
    import matplotlib

    style = {k: matplotlib.rcParams[k] for k in ("font.size", "axes.facecolor", "axes.grid")}
    seg = NnUnetSegmenter(tmp_path / "s2", cfg)
    info = seg.fit(cases[:2], cases[2:], progress=False)
    # nnU-Net's progress plot restyles matplotlib (seaborn font_scale 2.5); training must not leak it
    assert {k: matplotlib.rcParams[k] for k in style} == style
    assert info["n_nodule_crops"] == 6 and seg.is_fitted
    assert (tmp_path / "s2" / "segmenter.json").is_file()
    case = cases[2]
    det = Detections(case.series_uid, np.array([n.center_xyz_mm for n in case.nodules]), np.zeros(2), np.ones(2))
    masks = seg.segment(np.asarray(case.image_hu), case.geometry, det)
    assert len(masks) == 2
    for m in masks:
        assert m.series_uid == case.series_uid and m.source == "detection"
        assert m.mask.shape == tuple(m.box_voxel[3:] - m.box_voxel[:3])
        assert np.all(m.box_voxel[:3] >= 0) and np.all(m.box_voxel[3:] <= 48)
    # the narrow network and AdamW were used; the checkpoint nnU-Net wrote passes the safe loader
    from stage2_segment.predict import load_nnunet_checkpoint

    ck = load_nnunet_checkpoint(seg.model_dir / "fold_0" / "checkpoint_final.pth")
    assert ck["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"].shape[0] == 4
    assert "amsgrad" in ck["optimizer_state"]["param_groups"][0]
    # a second fit finds the finished model and does not train again
    again = seg.fit(cases[:2], cases[2:], progress=False)
    assert again["times"]["train_reused"] == 1.0 and again["times"]["train_s"] == info["times"]["train_s"]
    # other plan settings in the same work folder: refused, not silently mixed with the old model
    from stage2_segment.nnunet_dataset import NnUnetDatasetError

    wider = SegmenterConfig.from_dict({**cfg.to_dict(), "plan_base_features": 8})
    with pytest.raises(NnUnetDatasetError, match=r"other settings \(changed: \['base_features'\]\)"):
        NnUnetSegmenter(tmp_path / "s2", wider).fit(cases[:2], cases[2:], progress=False)
    sgd = SegmenterConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "optimizer": "sgd"}})
    with pytest.raises(NnUnetDatasetError, match="optimizer"):
        NnUnetSegmenter(tmp_path / "s2", sgd).fit(cases[:2], cases[2:], progress=False)


def test_full_volume_peer_trains_on_whole_scans_and_scores_like_the_crop_segmenter(tmp_path: Path) -> None:
    from stage2_segment.config import SegmenterConfig
    from stage2_segment.fullvolume import FullVolumeSegmenter

    rng = np.random.default_rng(1)
    cases = [_case(f"1.3.{i}", rng) for i in range(3)]
    cfg = SegmenterConfig.from_dict({
        "dataset_id": 991, "dataset_name": "TestScans", "plan_base_features": 4,
        "crop": {"size_mm": 16},
        "train": {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
                  "optimizer": "adamw", "initial_lr": 1e-3},
    })
    seg = FullVolumeSegmenter(tmp_path / "fv", cfg)
    info = seg.fit(cases[:2], cases[2:], progress=False)
    assert info["n_crops"] == 3 and seg.is_fitted  # one training case per scan
    case = cases[2]
    hu = np.asarray(case.image_hu)
    prob = seg.probability(hu, case.geometry, case.series_uid)
    assert prob.shape == case.geometry.shape_zyx and 0.0 <= prob.min() and prob.max() <= 1.0
    masks = seg.segment_nodules(case)
    assert len(masks) == 2 and all(m.source == "ground_truth" for m in masks)
    det = seg.detect(hu, case.geometry, case.series_uid)
    assert det.series_uid == case.series_uid and len(det.scores) == len(det.centers_xyz_mm)
