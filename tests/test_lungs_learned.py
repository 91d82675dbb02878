"""Learned lung fields (lidc_det.lungs_learned): training, exact resume, fine-tuning, inference, threshold tuning.

Tiny synthetic volumes (two dark ellipsoids in a bright body) and tiny networks, so it runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lidc_det.errors import CheckpointError, LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.lungs_learned.data import LungScan, load_scan, normalize, save_scan, to_work_grid
from lidc_det.lungs_learned.infer import Inferencer, labels_from_probabilities, tune_threshold
from lidc_det.lungs_learned.train import LungNetConfig, Trainer, load_state


def _phantom(seed: int, shape: tuple[int, int, int] = (12, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """HU volume and 0/1/2 labels: body 40 HU, right lung (low x) and left lung (high x) at -850 HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    body = ((y - 16) / 14) ** 2 + ((x - 16) / 15) ** 2 < 1
    hu[body] = 40.0
    lab = np.zeros(shape, dtype=np.uint8)
    for v, cx in ((1, 9.0 + rng.uniform(-1, 1)), (2, 23.0 + rng.uniform(-1, 1))):
        m = ((z - 6) / 7) ** 2 + ((y - 16) / 9) ** 2 + ((x - cx) / 5) ** 2 < 1
        lab[m] = v
        hu[m] = -850.0
    return (hu + rng.normal(0, 20, shape)).astype(np.float32), lab


def _scans(n: int) -> list[LungScan]:
    g = VolumeGeometry((12, 32, 32), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    out = []
    for i in range(n):
        hu, lab = _phantom(i)
        out.append(LungScan(f"p{i}", normalize(hu), lab, g))
    return out


CFG = LungNetConfig(kind="2d", channels=(4, 8), strides=(2,), num_res_units=0, patch=(32, 32), batch_size=2,
                    steps=6, warmup_steps=2, val_every=3, checkpoint_every=3, n_val_patches=2, lr=5e-3)


def _weights(path: Path) -> dict:
    return load_state(path)["model"]


def test_resume_continues_exactly(tmp_path: Path) -> None:
    train, val = _scans(2), _scans(3)[2:]
    full = Trainer(CFG, progress=False).fit(train, val, tmp_path / "full")
    Trainer(CFG, progress=False).fit(train, val, tmp_path / "part", stop_after=3)  # killed after step 3
    import torch

    res = Trainer(CFG, progress=False).fit(train, val, tmp_path / "part")
    assert res.resumed_from_step == 3 and res.steps == 6 and full.steps == 6
    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("history.csv", "loss_curve.png", "best.pt", "data.json"):
        assert (tmp_path / "full" / name).is_file(), name
    assert len((tmp_path / "full" / "history.csv").read_text().strip().splitlines()) == 1 + 6


def test_other_config_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    train, val = _scans(2), _scans(3)[2:]
    Trainer(CFG.replace(steps=3), progress=False).fit(train, val, tmp_path)
    with pytest.raises(LidcDetError, match="another config"):
        Trainer(CFG.replace(steps=3, lr=1e-4), progress=False).fit(train, val, tmp_path)


def test_fine_tune_starts_from_the_checkpoint(tmp_path: Path) -> None:
    import torch

    train, val = _scans(2), _scans(3)[2:]
    Trainer(CFG, progress=False).fit(train, val, tmp_path / "base")
    ft = CFG.replace(steps=1, lr=1e-12, warmup_steps=1)  # a step this small changes nothing measurable
    Trainer(ft, progress=False).fit(train, val, tmp_path / "ft", init_from=tmp_path / "base" / "last.pt")
    a, b = _weights(tmp_path / "base" / "last.pt"), _weights(tmp_path / "ft" / "last.pt")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    Trainer(ft, progress=False).fit(train, val, tmp_path / "scratch")
    c = _weights(tmp_path / "scratch" / "last.pt")
    assert not all(torch.allclose(a[k].float(), c[k].float(), atol=1e-6) for k in a)
    with pytest.raises(CheckpointError):
        Trainer(ft, progress=False).fit(train, val, tmp_path / "bad", init_from=tmp_path / "missing.pt")


def test_inference_threshold_and_lung_fields(tmp_path: Path) -> None:
    train, val = _scans(2), _scans(3)[2:]
    Trainer(CFG.replace(steps=12, val_every=6, checkpoint_every=6), progress=False).fit(train, val, tmp_path)
    inf = Inferencer(tmp_path / "best.pt")
    p = inf.probabilities(val[0])
    assert p.shape == (3, *val[0].image.shape) and np.allclose(p.sum(axis=0), 1.0, atol=1e-4)
    rec = tune_threshold(inf, val, thresholds=(0.3, 0.5, 0.7))
    assert rec["threshold"] in (0.3, 0.5, 0.7) and (tmp_path / "threshold.json").is_file()
    assert Inferencer(tmp_path / "best.pt").threshold == rec["threshold"]
    hu, lab = _phantom(7, (12, 32, 32))
    g = VolumeGeometry((24, 64, 64), (1.5, 1.5, 1.5), (-1.0, -1.0, -1.0))  # finer grid than the work grid
    hu2 = np.repeat(np.repeat(np.repeat(hu, 2, 0), 2, 1), 2, 2)
    lf = inf.lung_fields(hu2, g)
    assert lf.labels.shape == g.shape_zyx and lf.labels.dtype == np.uint8
    assert set(np.unique(lf.labels)) <= {0, 1, 2}


def test_labels_from_probabilities_keeps_the_largest_piece_per_side() -> None:
    p = np.zeros((3, 4, 10, 10), dtype=np.float32)
    p[0] = 1.0
    p[:, :, 2:5, 1:4] = np.array([0.0, 0.9, 0.1])[:, None, None, None]  # right lung
    p[:, 0, 8, 8] = (0.0, 0.9, 0.1)  # a right-lung island: dropped
    p[:, :, 2:5, 6:9] = np.array([0.0, 0.2, 0.8])[:, None, None, None]  # left lung
    lab = labels_from_probabilities(p, 0.5)
    assert (lab == 1).sum() == 4 * 9 and (lab == 2).sum() == 4 * 9 and lab[0, 8, 8] == 0


def test_work_grid_and_npz_round_trip(tmp_path: Path) -> None:
    hu, lab = _phantom(1, (12, 32, 32))
    g = VolumeGeometry((12, 32, 32), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0))
    s = to_work_grid("x", hu, g, lab, (3.0, 3.0, 3.0))
    assert s.image.shape == (6, 16, 16) and s.labels is not None and set(np.unique(s.labels)) == {0, 1, 2}
    save_scan(s, tmp_path / "s.npz")
    t = load_scan(tmp_path / "s.npz")
    assert t.geometry == s.geometry and np.array_equal(t.labels, s.labels)
    assert np.allclose(t.image, s.image, atol=2e-3)  # stored as float16


def test_bad_configs_are_named_errors() -> None:
    with pytest.raises(LidcDetError, match="multiples"):
        LungNetConfig(kind="2d", patch=(30, 32), strides=(2, 2))
    with pytest.raises(LidcDetError, match="patch needs 3"):
        LungNetConfig(kind="3d", patch=(64, 64))
