"""SIGKILL ``prepare`` and ``twin`` at chosen points, resume, and get the same output with no leftovers.

A child process runs the command with a hook that kills it (SIGKILL, no clean-up) at the
k-th call of ``os.replace`` (every atomic rename: scan files, data-set files, the twin's
folder and sidecar), just before or just after the rename, or at the k-th DICOM file
written (mid-way through a twin's series). The run is then resumed in this process and its
output compared with an uninterrupted run: same arrays, tables and DICOM bytes, the same
JSON apart from timings and provenance, and no ``*.tmp-*`` file or temporary folder left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from lidc_det.data.prepare import PrepareConfig, prepare_dataset

from conftest import REAL_SERIES_DIR, REAL_SERIES_UID, REPO, requires_real

pytestmark = [requires_real, pytest.mark.slow]

SPACING = (2.5, 2.0, 2.0)

KILLER = r"""
import json, os, signal, sys
kill_at, hook, when, job = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
count = 0

def tick():
    global count
    count += 1
    return count == kill_at

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if hook == "replace":
    real_replace = os.replace
    def replace(src, dst, **kw):
        hit = tick()
        if hit and when == "before":
            die()
        real_replace(src, dst, **kw)
        if hit and when == "after":
            die()
    os.replace = replace
else:  # "dcmwrite": the k-th DICOM file written
    import pydicom, pydicom.filewriter
    real_write = pydicom.filewriter.dcmwrite
    def dcmwrite(*a, **kw):
        if tick():
            die()
        return real_write(*a, **kw)
    pydicom.dcmwrite = pydicom.filewriter.dcmwrite = dcmwrite

if job["kind"] == "prepare":
    from lidc_det.data.prepare import PrepareConfig, prepare_dataset
    prepare_dataset(PrepareConfig(dicom_root=job["root"], out_dir=job["out"], spacing_zyx=tuple(job["spacing"])),
                    progress=False)
else:
    import dataclasses
    from lidc_det.synthetic.twin import generate_twins, scan_spec
    spec = scan_spec(job["patient"])
    k = spec.n_slices // 2
    spec = dataclasses.replace(spec, z_positions_mm=spec.z_positions_mm[k : k + job["n"]], nodules=())
    generate_twins([spec], job["out"], seed=job["seed"], progress=False)
print("FINISHED")
"""


def run_killed(kill_at: int, hook: str, when: str, job: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", KILLER, str(kill_at), hook, when, json.dumps(job)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or p.name == ".twin-tmp")


def _json_without(path: Path, drop: set[str]) -> Any:
    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if k not in drop}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return clean(json.loads(path.read_text()))


def assert_same_tree(a: Path, b: Path) -> None:
    """Same files; arrays, DICOM and tables equal; JSON equal apart from timings, paths and provenance."""
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    volatile = {"seconds", "provenance", "out_dir", "created", "time", "wall_s"}
    for rel in files_a:
        pa, pb = a / rel, b / rel
        if rel.endswith(".json"):
            assert _json_without(pa, volatile) == _json_without(pb, volatile), rel
        elif rel.endswith(".npz"):
            with np.load(pa) as za, np.load(pb) as zb:
                assert za.files == zb.files and all(np.array_equal(za[k], zb[k]) for k in za.files), rel
        else:
            assert pa.read_bytes() == pb.read_bytes(), rel


# ------------------------------------------------------------------- prepare
@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 11 real slices around the nodule, in a TCIA-like tree."""
    root = tmp_path_factory.mktemp("dicom")
    folder = root / "LIDC-IDRI-0001" / "study" / "series"
    folder.mkdir(parents=True)
    for f in sorted(REAL_SERIES_DIR.glob("*.dcm")):
        z = float(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["ImagePositionPatient"]).ImagePositionPatient[2])
        if -127.6 < z < -102.4:
            (folder / f.name).write_bytes(f.read_bytes())
    return root


@pytest.fixture(scope="module")
def prepared_reference(dicom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    report = prepare_dataset(PrepareConfig(dicom_root=dicom_root, out_dir=out, spacing_zyx=SPACING), progress=False)
    assert report.done == (REAL_SERIES_UID,), report.summary()
    return out


# os.replace calls of one prepare: 1 image.npy, 2 labels.npy, 3 masks.npz, 4 meta.json,
# 5 nodules.csv, 6 annotations.csv, 7 excluded.csv, 8 dataset.json
@pytest.mark.parametrize(
    ("kill_at", "when", "left"),
    [(1, "before", ".image.npy.tmp-"), (3, "before", ".masks.npz.tmp-"), (4, "before", ".meta.json.tmp-"),
     (4, "after", None), (8, "before", ".dataset.json.tmp-")],
)
def test_prepare_killed_then_resumed(
    kill_at: int, when: str, left: str | None, dicom_root: Path, prepared_reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job = {"kind": "prepare", "root": str(dicom_root), "out": str(out), "spacing": list(SPACING)}
    killed = run_killed(kill_at, "replace", when, job)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    if left is not None:  # the kill hit the write it was aimed at
        assert [Path(p).name.startswith(left) for p in leftovers(out)] == [True], leftovers(out)
    report = prepare_dataset(PrepareConfig(dicom_root=dicom_root, out_dir=out, spacing_zyx=SPACING), progress=False)
    assert not report.failed, report.summary()
    finished_before = kill_at > 4 or (kill_at == 4 and when == "after")  # meta.json was in place
    assert report.skipped == ((REAL_SERIES_UID,) if finished_before else ())
    assert report.done == (() if finished_before else (REAL_SERIES_UID,))
    assert leftovers(out) == []
    assert_same_tree(out, prepared_reference)


# ---------------------------------------------------------------------- twin
TWIN_JOB = {"kind": "twin", "patient": "LIDC-IDRI-0078", "n": 6, "seed": 3}


@pytest.fixture(scope="module")
def twin_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("twin-reference") / "out"
    done = run_killed(0, "replace", "before", {**TWIN_JOB, "out": str(out)})  # kill_at 0: never killed
    assert done.returncode == 0 and "FINISHED" in done.stdout, done.stderr[-2000:]
    return out


# dcmwrite 3: mid-way through the series (in the temporary folder); replace 1..6: the six
# slice files (atomic too), 7: the folder rename, 8: the sidecar rename
@pytest.mark.parametrize(
    ("kill_at", "hook", "when", "left"),
    [(3, "dcmwrite", "-", ".twin-tmp"), (7, "replace", "before", ".twin-tmp"), (7, "replace", "after", None),
     (8, "replace", "before", ".twin.json.tmp-")],
)
def test_twin_killed_then_resumed(
    kill_at: int, hook: str, when: str, left: str | None, twin_reference: Path, tmp_path: Path
) -> None:
    from lidc_det.synthetic.twin import generate_twins, scan_spec

    out = tmp_path / "out"
    killed = run_killed(kill_at, hook, when, {**TWIN_JOB, "out": str(out)})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    if left is not None:
        assert leftovers(out) and all(left in p for p in leftovers(out)), leftovers(out)
    spec = scan_spec(TWIN_JOB["patient"])
    k = spec.n_slices // 2
    spec = dataclasses.replace(spec, z_positions_mm=spec.z_positions_mm[k : k + TWIN_JOB["n"]], nodules=())
    batch = generate_twins([spec], out, seed=TWIN_JOB["seed"], progress=False)
    assert batch.failed == () and len(batch.scans) == 1 and not batch.scans[0].skipped, batch.summary()
    assert leftovers(out) == []
    assert_same_tree(out, twin_reference)
