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
