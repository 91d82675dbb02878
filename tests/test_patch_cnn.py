"""The patch CNN rescorer (stage1_detect.patch_cnn) and its benchmark's pure parts."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from lidc_det.errors import CheckpointError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from stage1_detect.patch_cnn import PatchCNNConfig, PatchCNNError, PatchRescorer, extract_patches, training_patches

SMALL = PatchCNNConfig(patch_vox=12, spacings_mm=(1.0,), channels=(4, 8), epochs=6, batch_size=16,
                       learning_rate=5e-3, hard_negatives=2, random_negatives=1, centre_copies=3, jitter_mm=1.0)


def _scan(direction: tuple[float, ...] = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)) -> tuple[np.ndarray, VolumeGeometry]:
    """-900 HU with a 0 HU ball of radius 4 mm at world (0, 0, 0) and a 200 HU ball of radius 3 mm at (10, 0, 0)."""
    g = VolumeGeometry((40, 40, 40), (1.0, 1.0, 1.0), (-20.0 * direction[0], -20.0 * direction[4], -20.0 * direction[8]),
                       direction)
    hu = np.full(g.shape_zyx, -900.0, np.float32)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape_zyx], indexing="ij"), -1).reshape(-1, 3)
    w = g.voxel_to_world(idx)
    hu.reshape(-1)[np.linalg.norm(w, axis=1) < 4] = 0.0
    hu.reshape(-1)[np.linalg.norm(w - [10.0, 0, 0], axis=1) < 3] = 200.0
    return hu, g


@pytest.mark.parametrize("flip_x", [False, True])
def test_patches_are_centred_and_world_oriented(flip_x: bool) -> None:
    hu, g = _scan((-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0) if flip_x else (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    cfg = PatchCNNConfig(patch_vox=24, spacings_mm=(1.0, 2.0))
    p = extract_patches(hu, g, np.array([[0.0, 0.0, 0.0], [200.0, 0.0, 0.0]]), cfg).astype(np.float32)
    assert p.shape == (2, 2, 24, 24, 24) and p.dtype == np.float32
    lo, hi = cfg.window_hu
    ball = (0.0 - lo) / (hi - lo)
    # the ball at the centre of both scales; -900 HU around it
    assert p[0, 0, 11:13, 11:13, 11:13].mean() == pytest.approx(ball, abs=0.02)
    assert p[0, 0, 0, 0, 0] == pytest.approx((-900.0 - lo) / (hi - lo), abs=0.01)
    # the brighter ball 10 mm along world +x: cube axis 2 (x), towards its high end, whatever the array's direction
    assert p[0, 0, 12, 12, 21] > p[0, 0, 12, 12, 2] + 0.3
    assert p[0, 1, 11:13, 11:13, 16:18].mean() > ball  # 2 mm scale: 5 voxels off centre
    # outside the scan reads as air (-1000 HU -> 0)
    assert float(p[1].max()) == 0.0


def test_training_patches_choose_positives_and_negatives() -> None:
    hu, g = _scan()
    case = SimpleNamespace(image_hu=hu, geometry=g, series_uid="s",
                           nodules=[SimpleNamespace(center_xyz_mm=(0.0, 0.0, 0.0), diameter_mm=8.0)], irrelevant=[])
    centres = np.array([[0.5, 0, 0], [10.0, 0, 0], [-10, 0, 0], [0, 10, 0], [0, -10, 0], [0, 0, 10]], float)
    dets = Detections("s", centres, np.full(6, 4.0), np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.3]))
    x, y = training_patches(case, dets, SMALL, np.random.default_rng(0))
    # 1 hitting candidate + 3 centre copies; 2 hard negatives + 1 random one
    assert y.tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert x.shape == (7, 1, 12, 12, 12)
    # the hard negatives are the best-scored false positives: (10, 0, 0) at 0.8 and (0, 10, 0) at 0.7
    want = extract_patches(hu, g, centres[[1, 3]], SMALL)
    np.testing.assert_array_equal(x[4:6], want)


def _toy_set(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Balls (1) against tubes along a random axis (0), both bright on dark, with noise."""
    p = SMALL.patch_vox
    c = (p - 1) / 2
    zz, yy, xx = np.meshgrid(*[np.arange(p) - c] * 3, indexing="ij")
    xs, ys = [], []
    for k in range(n):
        r = rng.uniform(2.0, 3.5)
        if k % 2:
            m = zz**2 + yy**2 + xx**2 < r**2
        else:
            a, b = [(yy, xx), (zz, xx), (zz, yy)][k // 2 % 3]
            m = a**2 + b**2 < (r * 0.6) ** 2
        img = np.where(m, 0.7, 0.1) + rng.normal(0, 0.05, m.shape)
        xs.append(img[None].astype(np.float16))
        ys.append(k % 2)
    return np.stack(xs), np.array(ys, np.int8)


def test_fit_learns_balls_from_tubes_and_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x, y = _toy_set(96, rng)
    r = PatchRescorer(SMALL)
    meta = r.fit(x, y, progress=False)
    assert meta["n_positive"] == 48 and len(meta["epoch_loss"]) == SMALL.epochs
    xt, yt = _toy_set(40, np.random.default_rng(1))
    prob = r.predict(xt)
    assert prob[yt == 1].min() > prob[yt == 0].max()
    # flip test-time augmentation: the mean over the 8 flips of the cube, each computed by hand
    import itertools

    import torch

    with torch.no_grad():
        x0 = torch.from_numpy(xt[:5]).float()
        want = np.mean([torch.sigmoid(r.net(torch.flip(x0, dims=d) if d else x0)).squeeze(1).numpy()
                        for k in range(4) for d in itertools.combinations((2, 3, 4), k)], axis=0)
    flipped = r.predict(xt[:5], flips=True)
    np.testing.assert_allclose(flipped, want, rtol=1e-5)
    assert not np.allclose(flipped, prob[:5])
    r2 = PatchRescorer.load(r.save(tmp_path / "m.pt"))
    np.testing.assert_allclose(r2.predict(xt), prob, rtol=1e-6)
    assert r2.config == SMALL and r2.meta["n_patches"] == 96


def test_rescore_multiplies_and_sorts() -> None:
    hu, g = _scan()
    x, y = _toy_set(64, np.random.default_rng(2))
    r = PatchRescorer(SMALL)
    r.fit(x, y, progress=False)
    dets = Detections("s", np.array([[0.0, 0, 0], [0, 10, 0]]), np.array([8.0, 4.0]), np.array([0.5, 0.6]))
    out = r.rescore(dets, hu, g)
    prob = r.predict(extract_patches(hu, g, dets.centers_xyz_mm, SMALL))
    want = dets.scores * prob
    assert out.scores.tolist() == sorted(want.tolist(), reverse=True)
    assert len(out) == 2


def test_errors(tmp_path) -> None:
    with pytest.raises(PatchCNNError, match="too small"):
        PatchCNNConfig(patch_vox=4, channels=(4, 8, 16))
    with pytest.raises(PatchCNNError, match="not trained"):
        PatchRescorer(SMALL).predict(np.zeros((1, 1, 12, 12, 12), np.float16))
    with pytest.raises(PatchCNNError, match="positive and negative"):
        PatchRescorer(SMALL).fit(np.zeros((4, 1, 12, 12, 12), np.float16), np.zeros(4), progress=False)
    with pytest.raises(PatchCNNError, match="patches must be"):
        PatchRescorer(SMALL).fit(np.zeros((4, 2, 12, 12, 12), np.float16), np.array([0, 1, 0, 1]), progress=False)
    import torch

    torch.save({"format": "something/else", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError):
        PatchRescorer.load(tmp_path / "other.pt")


def test_benchmark_cnn_config_and_scorings(tmp_path) -> None:
    from benchmarks.patch_rescore import load_cnn_config, scorings
    from lidc_det.config import ConfigFileError

    (tmp_path / "c.yaml").write_text("epochs: 3\nspacings_mm: [1.0, 2.5]\n")
    cfg = load_cnn_config(tmp_path / "c.yaml")
    assert cfg.epochs == 3 and cfg.spacings_mm == (1.0, 2.5)
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(ConfigFileError, match="epochz"):
        load_cnn_config(tmp_path / "bad.yaml")
    dets = Detections("s", np.zeros((2, 3)), np.ones(2), np.array([0.5, 0.2]))
    s = scorings(dets, np.array([0.1, 1.0]), np.array([0.4, 0.5]))
    assert s["detector"].scores.tolist() == [0.5, 0.2]
    assert s["cnn"].scores.tolist() == [0.1, 1.0]
    assert s["product"].scores.tolist() == pytest.approx([0.05, 0.2])
    assert s["cnn+flips"].scores.tolist() == [0.4, 0.5]
    assert s["product+flips"].scores.tolist() == pytest.approx([0.2, 0.1])
    assert s["mean+flips"].scores.tolist() == pytest.approx([0.45, 0.35])


def test_zero_weight_patches_do_not_teach() -> None:
    """Half the training patches carry flipped labels: with weight 0 they are ignored and the CNN still learns."""
    x, y = _toy_set(96, np.random.default_rng(3))
    xc, yc = _toy_set(96, np.random.default_rng(4))
    xs, ys = np.concatenate([x, xc]), np.concatenate([y, 1 - yc])
    w = np.concatenate([np.ones(96), np.zeros(96)])
    r = PatchRescorer(SMALL)
    r.fit(xs, ys, weights=w, progress=False)
    xt, yt = _toy_set(40, np.random.default_rng(5))
    prob = r.predict(xt)
    assert prob[yt == 1].min() > prob[yt == 0].max()
    with pytest.raises(PatchCNNError, match="weights"):
        r.fit(xs, ys, weights=w[:10], progress=False)


def test_ensemble_averages_its_members() -> None:
    from stage1_detect.blob_cnn import ensemble_probabilities

    hu, g = _scan()
    x, y = _toy_set(64, np.random.default_rng(6))
    members = [PatchRescorer(replace(SMALL, seed=k)) for k in (0, 1)]
    for m in members:
        m.fit(x, y, progress=False)
    dets = Detections("s", np.array([[0.0, 0, 0], [0, 10, 0], [10, 0, 0]]), np.full(3, 4.0), np.array([0.5, 0.6, 0.7]))
    p = extract_patches(hu, g, dets.centers_xyz_mm, SMALL)
    plain, flipped = ensemble_probabilities(members, hu, g, dets.centers_xyz_mm, flips=(False, True))
    np.testing.assert_allclose(plain, (members[0].predict(p) + members[1].predict(p)) / 2, rtol=1e-6)
    np.testing.assert_allclose(flipped, (members[0].predict(p, flips=True) + members[1].predict(p, flips=True)) / 2,
                               rtol=1e-6)
    assert not np.allclose(members[0].predict(p), members[1].predict(p))


def test_nodule_table_gives_each_scoring_its_false_positives_above(tmp_path) -> None:
    import json

    from benchmarks.blob_ablation import _ScoredSet
    from benchmarks.patch_rescore import nodule_table

    scan = tmp_path / "scans" / "u1"
    scan.mkdir(parents=True)
    nodule = {"nodule_id": "u1:0:inserted", "center_xyz_mm": [10.0, 0.0, 0.0], "diameter_mm": 6.0,
              "inserted": {"placement": "juxtapleural", "texture": 5, "core_hu": -50.0}}
    (scan / "meta.json").write_text(json.dumps({"nodules": [nodule]}))
    s = _ScoredSet("yardstick", [("u1", None)], [], [], "whole", False, dataset=SimpleNamespace(root=tmp_path))
    centres = np.array([[10.5, 0, 0], [40.0, 0, 0], [0, 40.0, 0]])
    by = {"detector": [Detections("u1", centres, np.full(3, 4.0), np.array([0.2, 0.9, 0.5]))],
          "cnn": [Detections("u1", centres, np.full(3, 4.0), np.array([0.95, 0.3, 0.6]))]}
    (row,) = nodule_table(s, by)
    assert row["placement"] == "juxtapleural" and row["diameter_mm"] == 6.0
    assert row["score"] == {"detector": 0.2, "cnn": 0.95}
    assert row["fp_per_scan_above"] == {"detector": 2.0, "cnn": 0.0}
