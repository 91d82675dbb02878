"""Library calls leave torch's process-wide state as they found it: the global RNG (no global
seeding; torch.random.fork_rng where a library initialises from it) and the thread count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def test_small_cnn_training_keeps_the_global_rng_and_threads_and_stays_seeded() -> None:
    from stage3_malignancy.config import EmbeddingConfig
    from stage3_malignancy.embeddings import train_small_cnn

    rng = np.random.default_rng(0)
    cubes = rng.random((6, 2, 16, 16, 16), dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    cfg = EmbeddingConfig(cube_voxels=16, width=4, epochs=2, batch_size=3, device="cpu", torch_threads=1)
    threads = max(2, torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(1234)  # the caller's own stream
    state = torch.get_rng_state()
    a, _ = train_small_cnn(cubes, labels, cfg, seed=5, progress=False)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    b, _ = train_small_cnn(cubes, labels, cfg, seed=5, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k  # still a function of the seed (weights, dropout, batches)


def test_resuming_stage1_training_does_not_set_the_global_rng(tmp_path: Path) -> None:
    from stage1_detect.config import DetectorConfig
    from stage1_detect.toydata import random_sphere_cases
    from stage1_detect.train import train_detector

    cfg = DetectorConfig(channels=(8, 8, 16, 16), fpn_channels=8, patch_size=(32, 32, 32), batch_size=1, epochs=1,
                         steps_per_epoch=1, checkpoint_every=1, warmup_steps=0, window_zyx=(64, 64, 64), use_body_mask=False)
    cases = random_sphere_cases(1, shape_zyx=(32, 32, 32), spheres_per_case=1, seed=0)
    train_detector(cfg, cases, [], tmp_path, device="cpu", progress=False)
    draws = []
    for caller_seed in (1, 2):  # building modules advances the global stream; resuming must not reset it
        torch.manual_seed(caller_seed)
        threads = torch.get_num_threads()
        assert train_detector(cfg, cases, [], tmp_path, device="cpu", progress=False).steps == 1  # resumed, finished
        assert torch.get_num_threads() == threads
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])  # the caller's streams stayed the caller's


def test_lung_network_training_keeps_the_global_rng_and_threads_and_stays_seeded(tmp_path: Path) -> None:
    from lidc_det.geometry import VolumeGeometry
    from lidc_det.lungs_learned.data import LungScan, normalize
    from lidc_det.lungs_learned.train import LungNetConfig, Trainer, build_model, load_state

    g = VolumeGeometry((6, 32, 32), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    rng = np.random.default_rng(0)
    scans = []
    for i in range(2):
        lab = np.zeros(g.shape_zyx, dtype=np.uint8)
        lab[1:5, 8:24, 4:14], lab[1:5, 8:24, 18:28] = 1, 2
        hu = np.where(lab > 0, -850.0, 40.0) + rng.normal(0, 20, g.shape_zyx)
        scans.append(LungScan(f"p{i}", normalize(hu.astype(np.float32)), lab, g))
    cfg = LungNetConfig(kind="2d", channels=(4, 8), strides=(2,), num_res_units=0, patch=(32, 32), batch_size=2,
                        steps=2, warmup_steps=1, val_every=2, checkpoint_every=2, n_val_patches=2)
    threads = max(2, torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(1234)  # the caller's own streams
    np.random.seed(99)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    a = build_model(cfg).state_dict()
    Trainer(cfg, progress=False, threads=1).fit(scans[:1], scans[1:], tmp_path / "a")
    Trainer(cfg, progress=False, threads=1).fit(scans[:1], scans[1:], tmp_path / "b")
    assert torch.equal(torch.get_rng_state(), torch_state) and torch.get_num_threads() == threads
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    b = build_model(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the weights are still a function of the seed
    wa, wb = load_state(tmp_path / "a" / "last.pt")["model"], load_state(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_torch_state_helpers_restore_on_error() -> None:
    from lidc_det.torch_state import seeded_torch_rng, torch_threads

    threads = max(2, torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    try:
        with torch_threads(1), seeded_torch_rng(3):
            assert torch.get_num_threads() == 1
            first = torch.rand(3)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), state)
    with seeded_torch_rng(3):
        assert torch.equal(torch.rand(3), first)  # seeded alike each time
    with torch_threads(None):
        assert torch.get_num_threads() == threads
