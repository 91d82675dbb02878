"""The GPU check's --smoke mode on the CPU: every step runs, the JSON is complete, and none of
the packages absent on the bare GPU machine was imported (they are blocked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rec["smoke"] is True and rec["device"]
    whats = [r["what"] for r in rec["speed"]]
    assert any("LUNA16" in w for w in whats) and any("training s/step" in w for w in whats)
    for row in rec["speed"]:
        assert row["ours"] > 0 and row["monai"] > 0 and row["ratio"] > 0
    tr = rec["training"]
    assert tr["synthetic"] is True and tr["steps"] >= 1
    for label in ("retina3d", "monai_retinanet"):
        assert 0.0 <= tr[label]["cpm"] <= 1.0
    assert rec["parity"]["fp32"]["top_k"] >= 0
    from benchmarks.gpu_check import ABSENT_ON_GPU_MACHINE

    assert not set(ABSENT_ON_GPU_MACHINE) & set(rec["imported_top_level_modules"])
    assert "monai" in rec["imported_top_level_modules"]


def test_blocked_packages_fail_to_import() -> None:
    code = ("from benchmarks.gpu_check import block_absent_packages; block_absent_packages()\n"
            "try:\n    import SimpleITK\nexcept ImportError:\n    print('blocked')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "blocked"
