"""DDP training path: two CPU processes with the gloo backend (slow: process start-up)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import torch
import torch.distributed as dist  # noqa: E402

from stage1_detect.config import DetectorConfig  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo needed"),
]

CFG = DetectorConfig(
    channels=(8, 8, 16, 16), fpn_channels=8, patch_size=(32, 32, 32), batch_size=1, epochs=2, steps_per_epoch=2,
    checkpoint_every=2, warmup_steps=1, window_zyx=(64, 64, 64), use_body_mask=False,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from stage1_detect.toydata import random_sphere_cases
    from stage1_detect.train import train_detector

    cases = random_sphere_cases(3, shape_zyx=(48, 48, 48), spheres_per_case=1, seed=3)
    res = train_detector(CFG, cases[:2], cases[2:], Path(out) / "ddp", device="cpu", progress=False)  # inits gloo
    torch.save({"steps": res.steps, "world": dist.get_world_size()}, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_gloo_training(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from stage1_detect.train import load_checkpoint

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0 == r1 == {"steps": CFG.total_steps, "world": 2}
    state = load_checkpoint(tmp_path / "ddp" / "last.pt")  # written by rank 0 only
    assert state["step"] == CFG.total_steps and len(state["history"]) == 2
    assert all(h["val_metric"] is not None for h in state["history"])
    # the per-step log holds the loss averaged over both ranks, one row per global step
    assert [r["step"] for r in state["step_log"]] == list(range(1, CFG.total_steps + 1))
    assert all(0.0 < r["loss"] < 100.0 for r in state["step_log"])
