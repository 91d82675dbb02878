"""`lidc-det prepare` on the real LIDC-IDRI-0001 scan: files, resumability, kill-safety, NIfTI export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lidc_det.data.prepare import PrepareConfig, prepare_dataset
from lidc_det.data.prepared import PreparedDataset
from lidc_det.errors import DatasetError

from conftest import REAL_ROOT, REAL_SERIES_UID, requires_real

pytestmark = requires_real


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    report = prepare_dataset(PrepareConfig(dicom_root=REAL_ROOT, out_dir=out), progress=False)
    assert report.done == (REAL_SERIES_UID,), report.summary()
    assert not report.failed
    return out


def test_prepared_files_and_nodule(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    assert ds.series_uids == [REAL_SERIES_UID]
    info = json.loads((prepared / "dataset.json").read_text())
    assert info["provenance"]["lidc_det_version"]
    assert info["config"]["spacing_zyx"] == [1.0, 1.0, 1.0]
    case = ds.load_case(ds.resolve_scan("LIDC-IDRI-0001"))
    assert case.geometry.spacing_zyx == (1.0, 1.0, 1.0)
    # 133 slices x 2.5 mm and 512 x 0.703 mm at 1 mm
    assert case.geometry.shape_zyx == (round(133 * 2.5), 360, 360)
    assert case.image_hu.dtype == np.int16 and -1100 < np.median(case.image_hu) < 100
    assert len(case.nodules) == 1
    nodule = case.nodules[0]
    assert nodule.n_readers == 4
    assert abs(nodule.diameter_mm - 23.4) < 0.5  # LUNA16 lists this nodule at 23.4 mm
    mask = case.nodule_mask(nodule)
    assert np.array_equal(mask, case.labels == nodule.label)
    vol_mm3 = mask.sum()  # 1 mm^3 voxels
    assert abs(vol_mm3 - nodule.volume_mm3) / nodule.volume_mm3 < 0.1
    # the mask sits on dense tissue, and its centre is the nodule's world centre
    assert np.median(case.image_hu[mask]) > -300
    centre = case.geometry.voxel_to_world(np.argwhere(mask).mean(axis=0))
    np.testing.assert_allclose(centre, nodule.center_xyz_mm, atol=1.5)
    table = (prepared / "nodules.csv").read_text().splitlines()
    assert table[0].startswith("nodule_id,seriesuid,patient_id,fold,target")
    annotations = (prepared / "annotations.csv").read_text().splitlines()
    assert annotations[0] == "seriesuid,coordX,coordY,coordZ,diameter_mm" and len(annotations) == 2
    # the readers' 9 nodule < 3 mm and 13 non-nodule marks of the XML are irrelevant findings (diameter -1, LUNA16)
    marks = [n for n in case.irrelevant if ":xml:" in n.nodule_id]
    assert len(marks) == 22 and all(n.diameter_mm == -1.0 for n in marks)
    assert sum(":small_nodule:" in n.nodule_id for n in marks) == 9
    excluded = (prepared / "excluded.csv").read_text().splitlines()
    assert len(excluded) == 1 + len(case.irrelevant) and sum(line.endswith(",-1.0") for line in excluded) == 22


def test_rerun_skips_finished_scans(prepared: Path) -> None:
    before = (prepared / "scans" / REAL_SERIES_UID / "image.npy").stat().st_mtime_ns
    report = prepare_dataset(PrepareConfig(dicom_root=REAL_ROOT, out_dir=prepared), progress=False)
    assert report.skipped == (REAL_SERIES_UID,) and report.done == ()
    assert (prepared / "scans" / REAL_SERIES_UID / "image.npy").stat().st_mtime_ns == before


def test_half_written_scan_is_redone(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    scan = out / "scans" / REAL_SERIES_UID
    scan.mkdir(parents=True)
    # what a kill leaves: a temp file and no meta.json
    (scan / ".image.npy.tmp-abc.npy").write_bytes(b"\x93NUMPY half")
    (scan / "labels.npy").write_bytes(b"garbage")
    (out / ".dataset.json.tmp-xyz.json").write_text("{")
    report = prepare_dataset(PrepareConfig(dicom_root=REAL_ROOT, out_dir=out), progress=False)
    assert report.done == (REAL_SERIES_UID,)
    case = PreparedDataset(out).load_case(REAL_SERIES_UID)
    assert case.labels.max() == 1
    assert not list(out.rglob("*.tmp-*"))  # the leftovers are removed


def test_killed_run_completes_on_rerun(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lidc_det.cli", "prepare", "--dicom-root", str(REAL_ROOT), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(4.0)  # mid-way: reading or resampling
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    case = PreparedDataset(out).load_case(REAL_SERIES_UID)
    assert case.labels.max() == 1 and case.image_hu.shape == case.geometry.shape_zyx
    assert not list(out.rglob("*.tmp-*")), "the resumed run removes the killed run's temporary files"


def test_settings_change_redoes_scan(prepared: Path, tmp_path: Path) -> None:
    cfg = PrepareConfig(dicom_root=REAL_ROOT, out_dir=tmp_path / "coarse", spacing_zyx=(2.5, 2.0, 2.0))
    report = prepare_dataset(cfg, progress=False)
    assert report.done == (REAL_SERIES_UID,)
    case = PreparedDataset(tmp_path / "coarse").load_case(REAL_SERIES_UID)
    assert case.geometry.shape_zyx == (133, 180, 180)


def test_nifti_export_round_trip(prepared: Path, tmp_path: Path) -> None:
    from lidc_det.cli import main
    from lidc_det.io.nifti import read_nifti

    assert main(["export-nifti", str(prepared), "LIDC-IDRI-0001", "--out", str(tmp_path)]) == 0
    case = PreparedDataset(prepared).load_case(REAL_SERIES_UID)
    image, geom = read_nifti(tmp_path / f"{REAL_SERIES_UID}_image.nii.gz")
    labels, _ = read_nifti(tmp_path / f"{REAL_SERIES_UID}_labels.nii.gz")
    # NIfTI stores the origin as float32: equal to ~1e-5 mm
    assert geom.shape_zyx == case.geometry.shape_zyx and geom.direction == case.geometry.direction
    np.testing.assert_allclose(geom.spacing_zyx, case.geometry.spacing_zyx, atol=1e-5)
    np.testing.assert_allclose(geom.origin_xyz, case.geometry.origin_xyz, atol=1e-4)
    assert np.array_equal(image, case.image_hu) and np.array_equal(labels, case.labels)
    # NIfTI stores RAS: the qform maps voxel (0,0,0) to (-x, -y, z) of our LPS origin
    import nibabel as nib

    affine = nib.load(str(tmp_path / f"{REAL_SERIES_UID}_image.nii.gz")).affine
    x, y, z = case.geometry.origin_xyz
    np.testing.assert_allclose(affine[:3, 3], [-x, -y, z], atol=1e-3)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        prepare_dataset(PrepareConfig(dicom_root=tmp_path / "nope", out_dir=tmp_path / "o"), progress=False)
    with pytest.raises(DatasetError, match="no CT series for LIDC-IDRI-9999"):
        prepare_dataset(
            PrepareConfig(dicom_root=REAL_ROOT, out_dir=tmp_path / "o", scans=("LIDC-IDRI-9999",)), progress=False
        )
    with pytest.raises(DatasetError, match="no dataset.json"):
        PreparedDataset(tmp_path)
