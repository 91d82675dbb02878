"""Stage-1 training killed with SIGKILL (between checkpoints, and in the middle of writing one)
resumes to the same weights as an uninterrupted run and leaves no temp file behind."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHILD = r'''
import os, signal, sys
from pathlib import Path
from lidc_det import atomic
from stage1_detect.config import DetectorConfig
from stage1_detect.toydata import random_sphere_cases
from stage1_detect.train import train_detector

out, where, at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = DetectorConfig(channels=(8, 8, 16, 16), fpn_channels=8, patch_size=(32, 32, 32), batch_size=1, epochs=1,
                     steps_per_epoch=6, checkpoint_every=2, warmup_steps=1, window_zyx=(64, 64, 64), use_body_mask=False)
cases = random_sphere_cases(2, shape_zyx=(32, 32, 32), spheres_per_case=1, seed=0)
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "step":
    cb = lambda step, loss: kill() if step == at else None
else:  # inside the at-th checkpoint write: its temp file is complete, the rename has not happened
    cb = None
    real_replace, seen = os.replace, [0]
    def replace(src, dst):
        if str(dst).endswith("last.pt"):
            seen[0] += 1
            if seen[0] == at:
                kill()
        real_replace(src, dst)
    atomic.os.replace = replace
train_detector(cfg, cases, [], out, device="cpu", progress=False, step_callback=cb)
'''


def _run(out: Path, where: str, at: int) -> int:
    return subprocess.run([sys.executable, "-c", CHILD, str(out), where, str(at)], capture_output=True, timeout=600).returncode


@pytest.mark.slow
def test_sigkilled_training_resumes_identically_without_temp_files(tmp_path: Path) -> None:
    from stage1_detect.train import load_checkpoint

    assert _run(tmp_path / "full", "step", -1) == 0
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    for where, at in (("step", 3), ("step", 5), ("checkpoint", 2)):
        out = tmp_path / f"{where}{at}"
        assert _run(out, where, at) == -signal.SIGKILL
        if where == "checkpoint":
            assert list(out.glob(".last.pt.tmp-*")), "the kill should leave a half-finished temp file"
        assert _run(out, "step", -1) == 0  # resume to the end
        assert not [p.name for p in out.rglob("*.tmp-*")]
        got = load_checkpoint(out / "last.pt")
        assert got["step"] == full["step"] == 6
        for k, v in full["model"].items():
            assert torch.equal(v, got["model"][k]), (where, at, k)
        assert [r["loss"] for r in got["step_log"]] == [r["loss"] for r in full["step_log"]]
