"""Stage-1 config: defaults equal the shipped configs, the model / training / inference parts,
anchors sized in mm at any training spacing, and a trained model's fields frozen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from lidc_det.boxes import boxes_to_world
from lidc_det.errors import CheckpointError
from lidc_det.geometry import VolumeGeometry
from stage1_detect.config import (
    INFERENCE_FIELDS,
    LEVEL_STRIDES,
    MODEL_FIELDS,
    DetectorConfig,
    ModelOverrideError,
    load_config,
)

SMALL = DetectorConfig(
    channels=(8, 8, 16, 16), fpn_channels=8, patch_size=(32, 32, 32), batch_size=1, epochs=1, steps_per_epoch=1,
    checkpoint_every=1, warmup_steps=0, window_zyx=(64, 64, 64), use_body_mask=False,
)


def test_defaults_equal_what_the_shipped_configs_agree_on() -> None:
    tiny, default, plain = load_config("tiny"), load_config("default"), DetectorConfig()
    agreed = [f.name for f in dataclasses.fields(DetectorConfig) if getattr(tiny, f.name) == getattr(default, f.name)]
    assert "box_loss" in agreed and plain.box_loss == "smooth_l1"
    assert {k: getattr(plain, k) for k in agreed} == {k: getattr(tiny, k) for k in agreed}


def test_fields_split_into_model_training_and_inference_parts() -> None:
    cfg = load_config("tiny")
    names = [f.name for f in dataclasses.fields(DetectorConfig)]
    assert set(MODEL_FIELDS) <= set(names) and set(INFERENCE_FIELDS) <= set(names)
    assert not set(MODEL_FIELDS) & set(INFERENCE_FIELDS)
    parts = {**cfg.model_part(), **cfg.training_part(), **cfg.inference_part()}
    assert parts == cfg.to_dict() and len(parts) == len(names)
    assert "anchor_sizes_mm" in cfg.model_part() and "lr" in cfg.training_part() and "nms_iou" in cfg.inference_part()


def test_anchor_sizes_are_millimetres_at_any_spacing() -> None:
    from stage1_detect.model import Retina3D

    cfg = SMALL.replace(spacing_mm=(2.0, 0.5, 1.0))
    assert cfg.anchor_sizes_vox[0][0] == (2.0, 8.0, 4.0)  # 4 mm on a 2 x 0.5 x 1 mm grid
    net = Retina3D(cfg, generator=torch.Generator().manual_seed(0))
    anchors, _ = net.anchors((32, 32, 32))
    sizes_vox = (anchors[:, 3:] - anchors[:, :3]).numpy()
    sizes_mm = sizes_vox * np.array(cfg.spacing_mm)
    expected = sorted(a for level in cfg.anchor_sizes_mm for a in level)
    for axis in range(3):
        assert sorted(set(np.round(sizes_mm[:, axis], 4))) == expected  # cubic in mm on every axis


class _AnchorEcho(torch.nn.Module):
    """Scores the first (smallest) anchor of one P2 position high, all else low; box codes 0,
    so every kept detection is exactly its anchor."""

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        b, _, d, h, w = x.shape
        cls, box = [], []
        for level, s in enumerate(LEVEL_STRIDES):
            c = torch.full((b, 2, d // s, h // s, w // s), -10.0)
            if level == 0:
                c[:, 0, 3, 5, 4] = 10.0
            cls.append(c)
            box.append(torch.zeros((b, 12, d // s, h // s, w // s)))
        return cls, box


def test_inference_decodes_anchors_in_mm_on_an_anisotropic_grid() -> None:
    from stage1_detect.inference import predict_scan

    cfg = SMALL.replace(spacing_mm=(2.0, 0.5, 1.0), window_margin=0, score_thresh=0.5)
    geom = VolumeGeometry((32, 64, 64), cfg.spacing_mm, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    dets = predict_scan(_AnchorEcho(), np.zeros(geom.shape_zyx, np.float32), geom, cfg, series_uid="s", progress=False)
    assert len(dets) >= 1
    _, sizes = boxes_to_world(dets.boxes_voxel, geom)
    np.testing.assert_allclose(np.abs(sizes), 4.0, atol=1e-5)  # the 4 mm anchor, 4 mm on x, y and z
    np.testing.assert_allclose(dets.diameters_mm, 4.0, atol=1e-5)


def test_a_trained_model_refuses_changes_to_its_model_fields(tmp_path: Path) -> None:
    from stage1_detect.detector import Retina3DDetector
    from stage1_detect.model import Retina3D
    from stage1_detect.toydata import random_sphere_cases
    from stage1_detect.train import CHECKPOINT_FORMAT, load_checkpoint, train_detector

    cases = random_sphere_cases(1, shape_zyx=(32, 32, 32), spheres_per_case=1, seed=0)
    # the entries of a training checkpoint that a detector reads (test_checkpoint_safety trains one)
    ckpt = tmp_path / "best.pt"
    net = Retina3D(SMALL, generator=torch.Generator().manual_seed(0))
    torch.save({"format": CHECKPOINT_FORMAT, "config": SMALL.to_dict(), "model_config": SMALL.model_part(),
                "model": net.state_dict()}, ckpt)
    for change in ({"hu_window": [-1200.0, 600.0]}, {"spacing_mm": [2.0, 1.0, 1.0]},
                   {"anchor_sizes_mm": [[5.0, 7.0], [9.0, 13.0], [19.0, 28.0]]}, {"channels": [8, 8, 16, 32]}):
        with pytest.raises(ModelOverrideError, match=f"{next(iter(change))}.*define the trained model") as err:
            Retina3DDetector(checkpoint=ckpt, device="cpu", **change)
        assert str(ckpt) in str(err.value)
    # inference and training fields may change; a model field given at its trained value is fine
    det = Retina3DDetector(checkpoint=ckpt, device="cpu", score_thresh=0.3, window_zyx=[96, 96, 96], lr=1e-4,
                           hu_window=list(SMALL.hu_window))
    assert det.config.score_thresh == 0.3 and det.config.model_part() == SMALL.model_part()
    # the same weights with other inference options: a second detector, the first one unchanged
    off = det.with_inference_options(lung_restrict=True, lung_margin_mm=5.0)
    assert off.config.lung_restrict and off.config.lung_margin_mm == 5.0 and not det.config.lung_restrict
    assert off._inference_model is det._inference_model
    with pytest.raises(ModelOverrideError, match="channels"):
        det.with_inference_options(channels=[8, 8, 16, 32])
    # fine-tuning from a checkpoint with other model fields is refused, not silently mixed
    with pytest.raises(ModelOverrideError, match="hu_window"):
        train_detector(SMALL.replace(hu_window=(-1100.0, 400.0)), cases, [], tmp_path / "ft", device="cpu",
                       progress=False, init_checkpoint=ckpt)
    # a checkpoint whose config disagrees with its frozen model part is refused
    state = load_checkpoint(ckpt)
    state["config"]["hu_window"] = [-900.0, 400.0]
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="frozen model config.*hu_window"):
        Retina3DDetector(checkpoint=tmp_path / "edited.pt", device="cpu")
    # a checkpoint from before the frozen part (config only) still loads
    del state["model_config"]
    state["config"]["hu_window"] = list(SMALL.hu_window)
    torch.save(state, tmp_path / "old.pt")
    assert Retina3DDetector(checkpoint=tmp_path / "old.pt", device="cpu").config == SMALL


def test_a_checkpoint_from_before_norm_and_head_norm_loads_with_their_old_networks(tmp_path: Path) -> None:
    from stage1_detect.detector import Retina3DDetector
    from stage1_detect.model import Retina3D
    from stage1_detect.train import CHECKPOINT_FORMAT

    plain = SMALL.replace(head_norm="none")
    net = Retina3D(plain, generator=torch.Generator().manual_seed(0))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.cls_tower.modules())
    old_config = {k: v for k, v in plain.to_dict().items() if k not in ("head_norm", "norm")}
    old_frozen = {k: v for k, v in plain.model_part().items() if k not in ("head_norm", "norm")}
    ckpt = tmp_path / "old.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": old_config, "model_config": old_frozen,
                "model": net.state_dict()}, ckpt)
    det = Retina3DDetector(checkpoint=ckpt, device="cpu")
    assert det.config.head_norm == "none" and det.config == plain
    # the new default has a BatchNorm in every head-tower layer, which the old weights do not fit
    assert SMALL.head_norm == "batch"
    new = Retina3D(SMALL, generator=torch.Generator().manual_seed(0))
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in new.cls_tower.modules()) == SMALL.head_convs
