"""DICOM series reading on the real LIDC-IDRI scan, writer round trips, and the series/info CLI."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lidc_det.cli import main
from lidc_det.geometry import GeometryError, VolumeGeometry
from lidc_det.io.dicom import CTVolume, SkippedFileWarning, find_series, read_series
from lidc_det.io.dicom_write import write_ct_series

LIDC_ROOT = Path(__file__).parents[1].parent / "shared/data/lidc-idri"
PATIENT_DIR = LIDC_ROOT / "LIDC-IDRI-0001"
SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
STUDY_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
SERIES_DIR = PATIENT_DIR / STUDY_UID / SERIES_UID

needs_real = pytest.mark.skipif(
    not SERIES_DIR.is_dir(), reason=f"real LIDC-IDRI scan not found at {SERIES_DIR}"
)


@pytest.fixture(scope="module")
def real_volume() -> CTVolume:
    if not SERIES_DIR.is_dir():
        pytest.skip(f"real LIDC-IDRI scan not found at {SERIES_DIR}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)  # 069.xml
        return read_series(SERIES_DIR)


# ------------------------------------------------------------- real scan
@needs_real
def test_real_scan_header_facts(real_volume: CTVolume) -> None:
    v = real_volume
    g = v.geometry
    assert g.shape_zyx == (133, 512, 512)
    assert v.hu.shape == (133, 512, 512) and v.hu.dtype == np.float32
    assert g.spacing_zyx == pytest.approx((2.5, 0.703125, 0.703125), abs=1e-6)
    assert g.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert v.series_uid == SERIES_UID
    assert v.study_uid == STUDY_UID
    assert v.patient_id == "LIDC-IDRI-0001"
    assert v.slice_thickness_mm == pytest.approx(2.5)
    assert len(set(v.sop_uids)) == 133 and all(v.sop_uids)
    assert len(set(v.slice_files)) == 133
    assert v.source == SERIES_DIR


@needs_real
def test_real_scan_hu_is_plausible(real_volume: CTVolume) -> None:
    hu = real_volume.hu
    assert hu.min() >= -3024 and hu.max() <= 4000
    inside = hu[hu > -1500]  # drop the outside-of-field padding
    hist, edges = np.histogram(inside, bins=np.arange(-1200, 1200, 20))
    assert -1060 <= edges[np.argmax(hist)] <= -960, "the commonest in-field value should be air (~ -1000 HU)"
    assert np.mean((hu > -200) & (hu < 300)) > 0.1, "a chest CT has plenty of soft tissue"


@needs_real
def test_real_scan_slices_sorted_by_position(real_volume: CTVolume) -> None:
    """Independent check: each z index's file has ImagePositionPatient = voxel_to_world(k, 0, 0)."""
    g = real_volume.geometry
    for k in (0, 1, 66, 132):
        ds = pydicom.dcmread(real_volume.slice_files[k], stop_before_pixels=True)
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], g.voxel_to_world([k, 0, 0]), atol=1e-4)
        assert str(ds.SOPInstanceUID) == real_volume.sop_uids[k]
        raw = pydicom.dcmread(real_volume.slice_files[k]).pixel_array
        np.testing.assert_array_equal(real_volume.hu[k], raw.astype(np.float32) - 1024)
    z = [g.voxel_to_world([k, 0, 0])[2] for k in range(133)]
    assert np.all(np.diff(z) > 0), "z index 0 must be the lowest slice"


@needs_real
def test_real_scan_matches_simpleitk(real_volume: CTVolume) -> None:
    import SimpleITK as sitk
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(SERIES_DIR), SERIES_UID)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    image = reader.Execute()
    ref = VolumeGeometry.from_sitk(image)
    g = real_volume.geometry
    assert g.shape_zyx == ref.shape_zyx
    np.testing.assert_allclose(g.spacing_zyx, ref.spacing_zyx, atol=1e-6)
    np.testing.assert_allclose(g.origin_xyz, ref.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(g.direction, ref.direction, atol=1e-6)
    np.testing.assert_array_equal(real_volume.hu, sitk.GetArrayFromImage(image).astype(np.float32))


@needs_real
def test_real_scan_reads_from_patient_folder_with_uid_and_fast() -> None:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFileWarning)  # the LIDC 069.xml beside the slices is skipped silently
        v = read_series(PATIENT_DIR)
    seconds = time.perf_counter() - t0
    assert v.series_uid == SERIES_UID and v.geometry.shape_zyx == (133, 512, 512)
    # ~0.5 s on an idle 2-core CPU; the bound only catches gross regressions on a busy machine
    assert seconds < 15.0, f"reading the 133-slice scan took {seconds:.1f} s"
    with pytest.warns(SkippedFileWarning) as record:  # ATTRIBUTION.txt (069.xml is silent)
        v2 = read_series(LIDC_ROOT, series_uid=SERIES_UID)
    assert {Path(str(w.message).split(":")[0]).name for w in record} == {"ATTRIBUTION.txt"}
    assert v2.geometry == v.geometry
    np.testing.assert_array_equal(v2.hu, v.hu)


@needs_real
def test_find_series_on_shared_root() -> None:
    with pytest.warns(SkippedFileWarning) as record:
        found = find_series(LIDC_ROOT)
    assert not any("069.xml" in str(w.message) for w in record)
    assert len(found) == 1
    s = found[0]
    assert s.series_uid == SERIES_UID
    assert s.modality == "CT"
    assert s.patient_id == "LIDC-IDRI-0001"
    assert s.study_uid == STUDY_UID
    assert s.folder == SERIES_DIR
    assert len(s.files) == 133 and all(f.suffix == ".dcm" for f in s.files)


# ----------------------------------------------------------------- CLI
@needs_real
def test_cli_series_and_info_on_real_scan(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        assert main(["series", str(LIDC_ROOT)]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1
        assert out[0].split("\t")[:3] == [SERIES_UID, "CT", "133 files"]
        assert main(["info", str(PATIENT_DIR)]) == 0
    out = capsys.readouterr().out
    assert SERIES_UID in out and "LIDC-IDRI-0001" in out
    assert "(133, 512, 512)" in out
    assert "(2.5, 0.7031, 0.7031)" in out
    assert "-2048 .. 3071" in out


def test_cli_info_on_bad_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "lidc-det info: error:" in err and str(missing) in err and "does not exist" in err
    assert main(["series", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["series", str(tmp_path / "empty")]) == 1
    assert "no DICOM series" in capsys.readouterr().err


def test_cli_info_on_written_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    geom = VolumeGeometry((4, 8, 6), (3.0, 0.5, 0.5), (1.0, 2.0, 3.0))
    hu = np.full(geom.shape_zyx, -1000.0)
    hu[2, 3, 4] = 250.0
    write_ct_series(hu, geom, tmp_path / "s", patient_id="P1", study_uid="1.2.3", series_uid="1.2.3.4")
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(4, 8, 6)" in out and "(3.0, 0.5, 0.5)" in out and "-1000 .. 250" in out and "P1" in out


# ------------------------------------------------------- writer round trip
def _rotation(seed: int) -> np.ndarray:
    """A random proper rotation (det +1)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped_xz": np.diag([-1.0, 1.0, -1.0]),
    # x index axis -> world +y, y index axis -> world -z, z index axis -> world -x (sagittal-like)
    "permuted": np.column_stack([[0, 1, 0], [0, 0, -1], [-1, 0, 0]]).astype(float),
    "oblique": _rotation(3),
}


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_write_read_round_trip(tmp_path: Path, name: str) -> None:
    direction = DIRECTIONS[name]
    assert np.linalg.det(direction) > 0
    geom = VolumeGeometry((8, 32, 24), (2.5, 0.7, 0.9), (-120.5, 33.25, -300.0), direction.ravel())
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1024, 2500, size=geom.shape_zyx).astype(np.float32)
    # name files so that name order is not z order: the reader must sort by position
    paths = write_ct_series(
        hu, geom, tmp_path / "ser", patient_id="TWIN-0001", study_uid="1.2.826.0.1.1",
        series_uid="1.2.826.0.1.1.2", file_name=lambda i: f"{(5 * i) % 8:03d}.dcm",
    )
    assert [p.name for p in paths] == [f"{(5 * i) % 8:03d}.dcm" for i in range(8)]
    v = read_series(tmp_path / "ser")
    assert v.geometry.shape_zyx == geom.shape_zyx
    np.testing.assert_allclose(v.geometry.spacing_zyx, geom.spacing_zyx, atol=1e-6)
    np.testing.assert_allclose(v.geometry.origin_xyz, geom.origin_xyz, atol=1e-5)
    np.testing.assert_allclose(v.geometry.direction, geom.direction, atol=1e-6)
    assert np.max(np.abs(v.hu - hu)) <= 0.5 + 1e-3
    assert v.slice_files == tuple(paths)
    assert v.patient_id == "TWIN-0001" and v.series_uid == "1.2.826.0.1.1.2" and v.study_uid == "1.2.826.0.1.1"
    assert v.slice_thickness_mm == pytest.approx(2.5)
    assert not list((tmp_path / "ser").glob(".*")), "no temporary files may be left behind"


@pytest.mark.parametrize("name", ["flipped_xz", "oblique"])
def test_written_series_matches_simpleitk(tmp_path: Path, name: str) -> None:
    """An independent reader (GDCM) sees the same geometry and values in the written files."""
    import SimpleITK as sitk
    geom = VolumeGeometry((6, 16, 20), (1.25, 0.6, 0.8), (10.0, -20.0, 30.0), DIRECTIONS[name].ravel())
    hu = np.random.default_rng(1).integers(-1000, 1500, size=geom.shape_zyx).astype(np.float32)
    write_ct_series(hu, geom, tmp_path, patient_id="P", study_uid="1.2.3", series_uid="1.2.3.4")
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path), "1.2.3.4")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    image = reader.Execute()
    ref = VolumeGeometry.from_sitk(image)
    np.testing.assert_allclose(ref.spacing_zyx, geom.spacing_zyx, atol=1e-5)
    np.testing.assert_allclose(ref.origin_xyz, geom.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(ref.direction, geom.direction, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)


def test_written_file_tags(tmp_path: Path) -> None:
    geom = VolumeGeometry((3, 4, 5), (2.0, 0.5, 0.75), (0.0, 0.0, -10.0))
    hu = np.arange(60, dtype=np.float32).reshape(3, 4, 5) * 10 - 1000
    paths = write_ct_series(
        hu, geom, tmp_path, patient_id="LIDC-IDRI-9999", study_uid="1.2.3", series_uid="1.2.3.4",
        slice_thickness_mm=1.0, sop_uid_prefix="1.2.3.4.5", extra={"Manufacturer": "twin", "StudyDate": "20000101"},
    )
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == f"1.2.3.4.5.{k + 1}" == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "CT" and ds.PatientID == "LIDC-IDRI-9999"
        assert ds.StudyInstanceUID == "1.2.3" and ds.SeriesInstanceUID == "1.2.3.4"
        assert ds.InstanceNumber == k + 1
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([0.0, 0.0, -10.0 + 2.0 * k])
        assert float(ds.SliceLocation) == pytest.approx(-10.0 + 2.0 * k)
        assert [float(v) for v in ds.ImageOrientationPatient] == pytest.approx([1, 0, 0, 0, 1, 0])
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.5, 0.75])  # row (y), column (x)
        assert float(ds.SliceThickness) == 1.0
        assert (ds.Rows, ds.Columns) == (4, 5)
        assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 1)
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == -1024.0
        assert ds.pixel_array.dtype == np.int16
        np.testing.assert_array_equal(ds.pixel_array.astype(np.float32) - 1024, hu[k])
        assert ds.Manufacturer == "twin" and ds.StudyDate == "20000101"
        assert ds.FrameOfReferenceUID


def test_default_sop_uids_are_valid_unique_and_deterministic(tmp_path: Path) -> None:
    geom = VolumeGeometry((4, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    hu = np.zeros(geom.shape_zyx)
    uids = []
    for run in ("a", "b"):
        paths = write_ct_series(hu, geom, tmp_path / run, patient_id="P", study_uid="1.2.3", series_uid="1.2.3.4")
        uids.append([str(pydicom.dcmread(p).SOPInstanceUID) for p in paths])
    assert uids[0] == uids[1]
    assert len(set(uids[0])) == 4
    assert all(pydicom.uid.UID(u).is_valid for u in uids[0])


def test_wide_hu_range_changes_rescale(tmp_path: Path) -> None:
    geom = VolumeGeometry((2, 2, 3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    hu = np.array([-40000.0, -1000.0, 0.0, 100.0, 30000.0, 40000.0] * 2).reshape(2, 2, 3)
    paths = write_ct_series(hu, geom, tmp_path, patient_id="P", study_uid="1.2.3", series_uid="1.2.3.4")
    ds = pydicom.dcmread(paths[0])
    slope = float(ds.RescaleSlope)
    assert slope > 1.0 and float(ds.RescaleIntercept) != -1024.0
    v = read_series(tmp_path)
    assert np.max(np.abs(v.hu - hu)) <= slope / 2 + 1e-3


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    geom = VolumeGeometry((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    kw = {"patient_id": "P", "study_uid": "1.2.3", "series_uid": "1.2.3.4"}
    with pytest.raises(ValueError, match="shape"):
        write_ct_series(np.zeros((3, 2, 2)), geom, tmp_path, **kw)
    with pytest.raises(ValueError, match="finite"):
        write_ct_series(np.full((2, 2, 2), np.nan), geom, tmp_path, **kw)
    with pytest.raises(ValueError, match="series_uid"):
        write_ct_series(np.zeros((2, 2, 2)), geom, tmp_path, **{**kw, "series_uid": "1.2.abc"})
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        write_ct_series(np.zeros((2, 2, 2)), geom, tmp_path, **kw, extra={"NoSuchKeyword": 1})
    with pytest.raises(ValueError, match="same name"):
        write_ct_series(np.zeros((2, 2, 2)), geom, tmp_path, **kw, file_name=lambda i: "x.dcm")
    left = VolumeGeometry((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.diag([1.0, 1.0, -1.0]).ravel())
    with pytest.raises(GeometryError, match="left-handed"):
        write_ct_series(np.zeros((2, 2, 2)), left, tmp_path, **kw)
    assert not any(tmp_path.iterdir()), "nothing may be written when the input is rejected"
