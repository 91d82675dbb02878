"""The stage-1 head probe: tower activity, patch AUC and hits measured on a short run."""

from __future__ import annotations

from benchmarks.head_probe import HeadProbeConfig, probe_one
from stage1_detect.toydata import random_sphere_cases


def test_probe_measures_live_batchnorm_towers_and_bright_spheres(tmp_path) -> None:  # noqa: ANN001
    cases = random_sphere_cases(3, shape_zyx=(64, 64, 64), spheres_per_case=2, seed=0)
    cfg = HeadProbeConfig(
        overrides={"patch_size": (32, 32, 32), "lr": 3e-3, "warmup_steps": 5}, steps=60, probe_patches=24, threads=1
    )
    row = probe_one(cases, cfg, "batch", 0, tmp_path / "run")
    # BatchNorm before each tower ReLU centres it: about half the outputs are active, never none
    assert 0.2 < row["active_cls_tower"] < 0.8 and 0.2 < row["active_box_tower"] < 0.8
    # bright spheres on flat noise: even 60 steps rank nodule patches above background patches
    assert row["patch_auc"] is not None and row["patch_auc"] > 0.7
    assert 0.0 <= row["top_anchor_hit"] <= 1.0
    assert row["head_norm"] == "batch" and row["seed"] == 0 and row["final_cls"] > 0
    assert (tmp_path / "run" / "last.pt").exists()  # trained by the training code itself
