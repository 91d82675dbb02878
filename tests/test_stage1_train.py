"""Stage-1 training: exact resume after a kill, fine-tuning, outputs, validation metrics,
and (slow) that a short training finds a bright sphere."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import torch

from lidc_det.results import Detections  # noqa: E402
from stage1_detect.config import DetectorConfig, load_config  # noqa: E402
from stage1_detect.toydata import random_sphere_cases, sphere_case  # noqa: E402
from stage1_detect.train import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    recall_at_k,
    train_detector,
    validation_metric,
)

FAST = DetectorConfig(
    channels=(8, 8, 16, 16),
    fpn_channels=8,
    patch_size=(32, 32, 32),
    batch_size=2,
    epochs=2,
    steps_per_epoch=3,
    checkpoint_every=2,
    warmup_steps=2,
    window_zyx=(64, 64, 64),
    use_body_mask=False,
)


@pytest.fixture(scope="module")
def cases():
    return random_sphere_cases(3, shape_zyx=(48, 48, 48), spheres_per_case=1, diameter_range=(6.0, 10.0), seed=3)


class Killed(Exception):
    pass


def _kill_at(step_to_kill: int):
    def cb(step: int, loss: float) -> None:
        if step == step_to_kill:
            raise Killed

    return cb


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path: Path, cases) -> None:
    full = train_detector(FAST, cases[:2], cases[2:], tmp_path / "full", device="cpu", progress=False)
    assert full.steps == 6
    # killed after step 5's update: last.pt holds step 4 (checkpoint_every=2), step 5 is redone
    with pytest.raises(Killed):
        train_detector(FAST, cases[:2], cases[2:], tmp_path / "cut", device="cpu", progress=False, step_callback=_kill_at(5))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 4
    resumed = train_detector(FAST, cases[:2], cases[2:], tmp_path / "cut", device="cpu", progress=False)
    assert resumed.steps == 6
    a = load_checkpoint(full.last_checkpoint)
    b = load_checkpoint(resumed.last_checkpoint)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert torch.equal(va["exp_avg"], vb["exp_avg"]) and torch.equal(va["exp_avg_sq"], vb["exp_avg_sq"])
    assert a["scheduler"] == b["scheduler"]
    assert [r["loss"] for r in a["step_log"]] == [r["loss"] for r in b["step_log"]]
    assert [h["val_metric"] for h in a["history"]] == [h["val_metric"] for h in b["history"]]
    assert full.best_epoch == resumed.best_epoch and full.best_metric == resumed.best_metric
    # a finished run resumed again does nothing more
    again = train_detector(FAST, cases[:2], cases[2:], tmp_path / "full", device="cpu", progress=False)
    assert again.steps == 6 and np.isnan(again.seconds_per_step)


def test_outputs_logs_and_config_mismatch(tmp_path: Path, cases) -> None:
    res = train_detector(FAST, cases[:2], cases[2:], tmp_path, device="cpu", progress=False)
    for name in ("last.pt", "best.pt", "config.yaml", "config.provenance.json", "train_log.csv", "history.csv", "loss_curve.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(tmp_path / "config.yaml") == FAST
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    hist = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(h["epoch"]) for h in hist] == [1, 2] and len(res.history) == 2
    assert all(h["val_metric"] is not None for h in res.history)
    best = load_checkpoint(res.best_checkpoint)
    assert best["best_metric"] == max(h["val_metric"] for h in res.history)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # no tensorboard: CSV logs only
        pass
    else:
        assert list((tmp_path / "tb").glob("events.*")), "tensorboard is installed but wrote no event file"
    assert not list(tmp_path.glob(".*.tmp-*"))  # no half-written files left behind
    with pytest.raises(CheckpointError, match="different config"):
        train_detector(FAST.replace(lr=0.5), cases[:2], [], tmp_path, device="cpu", progress=False)


def test_fine_tuning_starts_from_the_checkpoint_weights(tmp_path: Path, cases) -> None:
    src = train_detector(FAST.replace(epochs=1), cases[:2], [], tmp_path / "src", device="cpu", progress=False)
    assert src.best_checkpoint is None  # no validation cases: no best.pt
    ft_cfg = FAST.replace(epochs=1, steps_per_epoch=1, lr=0.0, weight_decay=0.0)
    ft = train_detector(ft_cfg, cases[2:], [], tmp_path / "ft", device="cpu", progress=False, init_checkpoint=src.last_checkpoint)
    a = load_checkpoint(src.last_checkpoint)["model"]
    b = load_checkpoint(ft.last_checkpoint)["model"]
    weights = [k for k in a if k.endswith("weight") and "bn" not in k]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)  # lr 0: still the source weights
    fresh = train_detector(ft_cfg, cases[2:], [], tmp_path / "fresh", device="cpu", progress=False)
    c = load_checkpoint(fresh.last_checkpoint)["model"]
    assert not all(torch.equal(a[k], c[k]) for k in weights)


def test_validation_metrics_by_hand() -> None:
    case = sphere_case("v", (40, 40, 40), [(20, 20, 20), (10, 30, 12)], [8.0, 6.0], rng=np.random.default_rng(0), origin_xyz=(1.0, 2.0, 3.0))
    truth = case.geometry.voxel_to_world(np.array([[20, 20, 20], [10, 30, 12]], dtype=float))
    far = truth[0] + np.array([0.0, 0.0, 30.0])
    # nodule 0 hit (2 mm off, radius 4); nodule 1 missed (3.5 mm off, radius 3)
    dets = Detections("v", np.array([truth[0] + [2.0, 0, 0], far, truth[1] + [0, 3.5, 0]]), np.zeros(3), np.array([0.9, 0.8, 0.7]))
    assert recall_at_k([case], k=10)([dets]) == 0.5
    assert recall_at_k([case], k=1)([dets]) == 0.5
    assert recall_at_k([case], k=10)([Detections("v", far[None], [0.0], [0.9])]) == 0.0
    perfect = Detections("v", truth, np.zeros(2), np.array([0.9, 0.8]))
    assert validation_metric([case])([perfect]) == pytest.approx(1.0)
    assert validation_metric([case])([dets]) == pytest.approx(0.5)


def test_config_files_load_and_reject_unknown_keys(tmp_path: Path) -> None:
    from stage1_detect.config import ConfigError

    tiny, default = load_config("tiny"), load_config("default")
    assert tiny.channels == (8, 16, 32, 64) and default.channels == (16, 32, 64, 128)
    assert tiny.anchor_sizes_mm == ((4.0, 6.0), (9.0, 13.0), (19.0, 28.0))
    bad = tmp_path / "bad.yaml"
    bad.write_text("channels: [8, 16, 32, 64]\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(bad)
    bad.write_text("patch_size: [30, 32, 32]\n")
    with pytest.raises(ConfigError, match="multiples of 16"):
        load_config(bad)
    bad.write_text("batch_size: two\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(bad)
    with pytest.raises(ConfigError, match="built-in configs"):
        load_config("no-such-config")


@pytest.mark.parametrize(
    ("head_norm", "centre_tol", "size_hi"),
    [
        # the plain towers this test was written for: a quarter-diameter margin, size within 40 %
        ("none", 0.25, 1.4),
        # BatchNorm towers (the default since the dead-tower fix). Measured at these 80 steps:
        # centre off by 0.05-0.31 diameters, size 1.22-1.28x (plain: 0.02-0.14, 0.92-1.05x), so
        # they are held to a LUNA16 hit (half a diameter) and a size within 50 %
        ("batch", 0.5, 1.5),
    ],
)
def test_tiny_model_overfits_spheres_and_finds_them(
    tmp_path: Path, head_norm: str, centre_tol: float, size_hi: float
) -> None:
    """80 CPU steps on three sphere scans; then each scan's top detection is its sphere, with
    the right size. Fails if the matcher, the loss, the box code or the world mapping is wrong
    (an untrained model scores ~0.01 everywhere; a wrong decoder misplaces or misses the size)."""
    from stage1_detect.data import case_findings
    from stage1_detect.detector import Retina3DDetector

    cfg = DetectorConfig(
        channels=(8, 16, 16, 32), fpn_channels=16, patch_size=(32, 32, 32), batch_size=2, epochs=1,
        steps_per_epoch=80, checkpoint_every=80, warmup_steps=5, lr=3e-3, pos_fraction=0.8,
        # GIoU, as when this test was written: the default became smooth-L1 (the shipped configs'),
        # which needs more than 80 steps to push the top score over 0.5 on these spheres
        window_zyx=(64, 64, 64), use_body_mask=False, box_loss="giou", head_norm=head_norm,
    )
    cases = random_sphere_cases(3, shape_zyx=(48, 48, 48), spheres_per_case=1, diameter_range=(7.0, 11.0), seed=3)
    res = train_detector(cfg, cases, [], tmp_path, device="cpu", progress=False)
    det = Retina3DDetector(checkpoint=res.last_checkpoint, device="cpu", progress=False)
    for case in cases:
        dets = det.predict(case.image_hu, case.geometry, series_uid=case.series_uid)
        assert 1 <= len(dets) <= cfg.max_detections
        (centre, diameter), = case_findings(case)[0]
        dist = np.linalg.norm(dets.centers_xyz_mm - np.asarray(centre), axis=1)
        order = np.argsort(-dets.scores)
        top = order[0]
        assert dist[top] < centre_tol * diameter, (case.series_uid, dist[top], diameter)
        assert 0.7 * diameter < dets.diameters_mm[top] < size_hi * diameter, (case.series_uid, dets.diameters_mm[top])
        assert dets.scores[top] > 0.5
        off = dets.scores[dist >= diameter / 2]
        assert off.size == 0 or off.max() < 0.6 * dets.scores[top]


@pytest.mark.slow
def test_short_training_finds_a_bright_sphere(tmp_path: Path) -> None:
    """~120 CPU steps on spheres-in-noise; then the top detection in a new scan is the sphere."""
    from stage1_detect.detector import Retina3DDetector

    cfg = load_config("tiny").replace(
        patch_size=(32, 32, 32), epochs=1, steps_per_epoch=120, checkpoint_every=60, pos_fraction=0.7,
        window_zyx=(64, 64, 64), use_body_mask=False,
    )
    train = random_sphere_cases(6, seed=1, diameter_range=(6.0, 12.0))
    det = Retina3DDetector(cfg, device="cpu", progress=False)
    det.fit(train, [], tmp_path)
    test = sphere_case("t", (64, 64, 64), [(30, 25, 40)], [9.0], rng=np.random.default_rng(5), origin_xyz=(-10.0, 20.0, -300.0))
    dets = det.predict(test.image_hu, test.geometry, series_uid="t")
    truth = test.geometry.voxel_to_world(np.array([30.0, 25.0, 40.0]))
    top = dets.top_k(1)
    assert np.linalg.norm(top.centers_xyz_mm[0] - truth) < 4.5  # inside the 9 mm sphere
    assert top.scores[0] > 0.5
    assert 4.5 < top.diameters_mm[0] < 18.0


_KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
import json
from stage1_detect.config import config_from_dict
from stage1_detect.toydata import random_sphere_cases
from stage1_detect.train import train_detector
cfg = config_from_dict(json.loads(sys.argv[2]))
cases = random_sphere_cases(3, shape_zyx=(48, 48, 48), spheres_per_case=1, diameter_range=(6.0, 10.0), seed=3)
train_detector(cfg, cases[:2], cases[2:], sys.argv[1], device="cpu", progress=False)
"""


@pytest.mark.slow
def test_resume_after_sigkill_of_the_training_process(tmp_path: Path, cases) -> None:
    """A real SIGKILL (no Python clean-up) once the first checkpoint exists; the rerun resumes and
    ends in the same weights as an uninterrupted run."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = FAST.replace(epochs=3, steps_per_epoch=6, checkpoint_every=2)
    run = tmp_path / "killed"
    args = [sys.executable, "-c", _KILL_SCRIPT, str(run), json.dumps(cfg.to_dict())]
    proc = subprocess.Popen(args)
    deadline = time.time() + 300
    while not (run / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run / "last.pt")["step"]  # a complete, loadable checkpoint
    assert 0 < killed_at < cfg.total_steps, killed_at
    resumed = train_detector(cfg, cases[:2], cases[2:], run, device="cpu", progress=False)
    full = train_detector(cfg, cases[:2], cases[2:], tmp_path / "full", device="cpu", progress=False)
    a, b = load_checkpoint(full.last_checkpoint)["model"], load_checkpoint(resumed.last_checkpoint)["model"]
    assert resumed.steps == full.steps == cfg.total_steps
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    # what the kill may leave is a temp file, never a truncated checkpoint under a final name
    for p in run.glob("*.pt"):
        load_checkpoint(p)


def test_command_line_trains_on_train_folds_and_validates_on_the_val_fold(tmp_path: Path, cases, monkeypatch) -> None:
    """``python -m stage1_detect.train``: folds of a prepared data set; the test fold is never loaded."""
    import lidc_det.data.prepared as prepared
    from stage1_detect import train as train_mod

    by_uid = {c.series_uid: c for c in cases}
    fold_of = {c.series_uid: i for i, c in enumerate(cases)}  # one scan per fold: 0 test, 1 val, 2 train
    loaded: list[str] = []

    class FakeDataset:
        def __init__(self, root) -> None:
            assert Path(root) == tmp_path / "data"

        @property
        def folds(self) -> dict[str, int]:
            return {f"P{i}": i for i in fold_of.values()}

        def scans_in_folds(self, folds) -> list[str]:
            return [u for u, f in fold_of.items() if f in set(folds)]

        def load_case(self, uid: str):
            loaded.append(uid)
            return by_uid[uid]

    monkeypatch.setattr(prepared, "PreparedDataset", FakeDataset)
    sets = [f"{k}={v}" for k, v in {
        "channels": "[8, 8, 16, 16]", "fpn_channels": 8, "patch_size": "[32, 32, 32]", "epochs": 1, "steps_per_epoch": 2,
        "checkpoint_every": 2, "warmup_steps": 1, "window_zyx": "[64, 64, 64]", "use_body_mask": "false", "batch_size": 1,
    }.items()]
    rc = train_mod.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--config", "tiny",
                         "--device", "cpu", "--test-fold", "0", "--set", *sets])
    assert rc == 0
    assert sorted(loaded) == sorted([cases[1].series_uid, cases[2].series_uid])  # never the test fold
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 2 and state["history"][0]["val_metric"] is not None
    assert load_config(tmp_path / "run" / "config.yaml").channels == (8, 8, 16, 16)
