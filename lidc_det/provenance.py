"""Provenance recorded next to every result: git revision, versions, device, time."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path
from typing import Any

from lidc_det import __version__


def git_revision(repo: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of ``repo`` (default: this package's checkout), with
    ``-dirty`` appended when tracked files differ; None outside a git checkout."""
    cwd = repo or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def provenance(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-friendly record: lidc-det version, git revision, Python, platform, UTC time."""
    record: dict[str, Any] = {
        "lidc_det_version": __version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        record.update(extra)
    return record


def device_info(device: str | None = None) -> dict[str, Any]:
    """torch version, CUDA version and the device name (GPU name or CPU model)."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info["device"] = dev
    if dev.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(dev))
    else:
        info["device_name"] = cpu_name()
        info["cpu_threads"] = torch.get_num_threads()
    return info


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux) with the number of logical CPUs."""
    import os

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"
