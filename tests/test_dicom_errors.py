"""Each kind of bad DICOM input gets its own exception, and the message names the file or folder."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from lidc_det.cli import main
from lidc_det.errors import (
    DuplicateSliceError,
    EmptySeriesError,
    InconsistentSeriesError,
    InvalidOrientationError,
    InvalidSeriesError,
    InvalidSpacingError,
    MissingSlicesError,
    MultipleSeriesError,
    NotCTError,
    SeriesNotFoundError,
    TooFewSlicesError,
    TruncatedPixelDataError,
    UnsupportedDicomError,
)
from lidc_det.geometry import VolumeGeometry
from lidc_det.io.dicom import SeriesGeometryWarning, SkippedFileWarning, find_series, read_series
from lidc_det.io.dicom_write import write_ct_series

LIDC_SERIES_DIR = (
    Path(__file__).parents[1].parent
    / "shared/data/lidc-idri/LIDC-IDRI-0001/1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
    / "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
)

STUDY = "1.2.826.0.1.7"
SERIES = "1.2.826.0.1.7.1"
Z0, DZ = -130.0, 2.5


def write_tiny(
    folder: Path,
    nz: int = 6,
    *,
    series_uid: str = SERIES,
    shape_yx: tuple[int, int] = (8, 8),
    z0: float = Z0,
    **kw: Any,
) -> list[Path]:
    """A tiny axial CT series: slice k at z = z0 + 2.5 k, voxel value 10 k - 1000 HU."""
    geom = VolumeGeometry((nz, *shape_yx), (DZ, 0.7, 0.7), (-50.0, -60.0, z0))
    hu = np.broadcast_to((np.arange(nz) * 10.0 - 1000.0)[:, None, None], geom.shape_zyx)
    return write_ct_series(hu, geom, folder, patient_id="P-1", study_uid=STUDY, series_uid=series_uid, **kw)


def edit(path: Path, **changes: Any) -> None:
    """Set (or delete, with value None) attributes of one DICOM file in place."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def raises(exc: type[InvalidSeriesError], folder: Path) -> InvalidSeriesError:
    with pytest.raises(exc) as info:
        read_series(folder)
    err = info.value
    assert str(err).startswith(f"{err.path}: ")
    return err


# ----------------------------------------------------------- empty / missing
def test_missing_folder(tmp_path: Path) -> None:
    err = raises(EmptySeriesError, tmp_path / "nope")
    assert err.path == tmp_path / "nope" and "does not exist" in err.reason
    with pytest.raises(EmptySeriesError, match="nope"):
        find_series(tmp_path / "nope")


def test_empty_folder_and_folder_without_dicom(tmp_path: Path) -> None:
    err = raises(EmptySeriesError, tmp_path)
    assert err.path == tmp_path and "no files" in err.reason
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.warns(SkippedFileWarning, match="notes.txt"):
        err = raises(EmptySeriesError, tmp_path)
    assert err.path == tmp_path and "no DICOM files" in err.reason
    with pytest.warns(SkippedFileWarning, match="notes.txt"):
        assert find_series(tmp_path) == []


def test_non_dicom_and_hidden_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    (tmp_path / "069.xml").write_text("<LidcReadMessage/>")  # skipped silently
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "broken.dcm").write_bytes(b"\0" * 10)
    with pytest.warns(SkippedFileWarning) as record:
        v = read_series(tmp_path)
    assert v.geometry.shape_zyx == (6, 8, 8)
    skipped = sorted(Path(str(w.message).split(":")[0]) for w in record)
    assert skipped == sorted([tmp_path / "notes.txt", tmp_path / ".DS_Store", tmp_path / "sub" / "broken.dcm"])


# ----------------------------------------------------------- several series
def test_multiple_series(tmp_path: Path) -> None:
    write_tiny(tmp_path / "a", 6, series_uid="1.2.826.0.1.7.1")
    write_tiny(tmp_path / "b", 4, series_uid="1.2.826.0.1.7.2")
    err = raises(MultipleSeriesError, tmp_path)
    assert err.path == tmp_path
    assert "1.2.826.0.1.7.1 (6 slices)" in err.reason and "1.2.826.0.1.7.2 (4 slices)" in err.reason

    v = read_series(tmp_path, series_uid="1.2.826.0.1.7.2")
    assert v.geometry.shape_zyx == (4, 8, 8) and v.series_uid == "1.2.826.0.1.7.2"
    assert all(f.parent == tmp_path / "b" for f in v.slice_files)

    with pytest.raises(SeriesNotFoundError) as info:
        read_series(tmp_path, series_uid="1.2.3.999")
    assert info.value.path == tmp_path and "1.2.3.999" in str(info.value)
    assert "1.2.826.0.1.7.1 (6 slices)" in str(info.value)


# ------------------------------------------------------------ slice layout
def test_missing_slices(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 10)
    for k in (4, 5, 6):
        paths[k].unlink()
    err = raises(MissingSlicesError, tmp_path)
    assert err.path == tmp_path
    # slices 3 (z=-122.5) and 7 (z=-112.5) are now neighbours
    assert "3 slices missing between z=-122.5 and z=-112.5" in err.reason
    assert paths[3].name in err.reason and paths[7].name in err.reason


def test_one_missing_slice(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 6)
    paths[2].unlink()
    err = raises(MissingSlicesError, tmp_path)
    assert "1 slice missing between z=-127.5 and z=-122.5" in err.reason


def test_duplicate_slice(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 5)
    copy = tmp_path / "copy_of_3.dcm"
    shutil.copy(paths[2], copy)
    edit(copy, SOPInstanceUID="1.2.826.0.1.7.1.99")
    err = raises(DuplicateSliceError, tmp_path)
    assert err.path in (paths[2], copy)
    assert paths[2].name in str(err) and copy.name in str(err)
    assert "z=-125.0" in err.reason


def test_all_slices_at_one_position_is_zero_spacing(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 4)
    for p in paths:
        edit(p, ImagePositionPatient=[-50.0, -60.0, -130.0])
    err = raises(InvalidSpacingError, tmp_path)
    assert err.path == tmp_path and "zero spacing" in err.reason


def test_single_slice(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 1)
    err = raises(TooFewSlicesError, tmp_path)
    assert err.path == tmp_path and paths[0].name in err.reason and "at least 2" in err.reason


# ------------------------------------------------------- header consistency
@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("ImageOrientationPatient", [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]),
        ("PixelSpacing", [0.8, 0.8]),
    ],
)
def test_inconsistent_header(tmp_path: Path, keyword: str, value: list[float]) -> None:
    paths = write_tiny(tmp_path, 5)
    edit(paths[3], **{keyword: value})
    err = raises(InconsistentSeriesError, tmp_path)
    assert err.path == paths[3] and keyword in err.reason


def test_inconsistent_rows_columns(tmp_path: Path) -> None:
    write_tiny(tmp_path, 4, shape_yx=(8, 8))
    # two more slices of the same series, stacked on top but 8 x 6 pixels
    extra = write_tiny(
        tmp_path, 2, shape_yx=(8, 6), z0=Z0 + 4 * DZ, file_name=lambda i: f"b{i}.dcm", sop_uid_prefix="1.2.826.0.1.7.9"
    )
    err = raises(InconsistentSeriesError, tmp_path)
    assert err.path in extra and "Rows x Columns 8 x 6" in err.reason


def test_not_ct(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 4)
    edit(paths[1], Modality="MR")
    err = raises(NotCTError, tmp_path)
    assert err.path == paths[1] and "'MR'" in err.reason


@pytest.mark.parametrize("spacing", [[0.0, 0.7], [0.7, -0.7], None])
def test_invalid_pixel_spacing(tmp_path: Path, spacing: list[float] | None) -> None:
    paths = write_tiny(tmp_path, 4)
    edit(paths[2], PixelSpacing=spacing)
    err = raises(InvalidSpacingError, tmp_path)
    assert err.path == paths[2] and "PixelSpacing" in err.reason


def test_invalid_orientation(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 4)
    for p in paths:
        edit(p, ImageOrientationPatient=[1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    err = raises(InvalidOrientationError, tmp_path)
    assert err.path in paths and "orthogonal" in err.reason


def test_multiframe_is_unsupported(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 3)
    edit(paths[0], NumberOfFrames=2)
    err = raises(UnsupportedDicomError, tmp_path)
    assert err.path == paths[0]


# ---------------------------------------------------------------- pixels
def test_truncated_file(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 4)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-40])
    err = raises(TruncatedPixelDataError, tmp_path)
    assert err.path == paths[2] and "88 bytes, expected 128" in err.reason


def test_short_pixel_data_element(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 4)
    ds = pydicom.dcmread(paths[1])
    edit(paths[1], PixelData=ds.PixelData[:64])
    err = raises(TruncatedPixelDataError, tmp_path)
    assert err.path == paths[1] and "64 bytes" in err.reason


def test_no_pixel_data(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 3)
    edit(paths[0], PixelData=None)
    err = raises(TruncatedPixelDataError, tmp_path)
    assert err.path == paths[0]


# ------------------------------------------------- fallbacks (not errors)
def test_missing_positions_fall_back_to_instance_number(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 5, file_name=lambda i: f"{4 - i}.dcm")  # names in reverse z order
    for p in paths:
        edit(p, ImagePositionPatient=None)
    with pytest.warns(SeriesGeometryWarning, match="InstanceNumber"):
        v = read_series(tmp_path)
    assert v.slice_files == tuple(paths)
    assert v.hu[:, 0, 0].tolist() == [-1000.0, -990.0, -980.0, -970.0, -960.0]
    assert v.geometry.spacing_zyx == pytest.approx((DZ, 0.7, 0.7))


def test_irregular_spacing_warns(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 6)
    edit(paths[5], ImagePositionPatient=[-50.0, -60.0, Z0 + 4 * DZ + 3.5])  # 3.5 mm step, < 1.5 x 2.5
    with pytest.warns(SeriesGeometryWarning, match="irregular slice spacing"):
        v = read_series(tmp_path)
    assert v.geometry.spacing_zyx[0] == pytest.approx(DZ)


def test_rescale_is_applied_per_slice(tmp_path: Path) -> None:
    paths = write_tiny(tmp_path, 3)
    ds = pydicom.dcmread(paths[1])
    raw = ds.pixel_array.copy()
    edit(paths[1], RescaleSlope=2, RescaleIntercept=-3000)
    v = read_series(tmp_path)
    np.testing.assert_array_equal(v.hu[1], raw * 2.0 - 3000.0)
    assert v.hu[0, 0, 0] == -1000.0


# -------------------------------------------------------- real slices
@pytest.fixture
def real_slices(tmp_path: Path) -> list[Path]:
    """Six consecutive real LIDC slices (in z order) copied into tmp_path."""
    if not LIDC_SERIES_DIR.is_dir():
        pytest.skip(f"real LIDC-IDRI scan not found at {LIDC_SERIES_DIR}")
    files = sorted(LIDC_SERIES_DIR.glob("*.dcm"))
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    chosen = [files[i] for i in np.argsort(z)[60:66]]
    out = []
    for f in chosen:
        shutil.copy(f, tmp_path / f.name)
        out.append(tmp_path / f.name)
    return out


def test_real_slices_read_and_gap(real_slices: list[Path], tmp_path: Path) -> None:
    v = read_series(tmp_path)
    assert v.geometry.shape_zyx == (6, 512, 512)
    assert v.geometry.spacing_zyx == pytest.approx((2.5, 0.703125, 0.703125))
    assert v.slice_files == tuple(real_slices)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in real_slices]
    real_slices[2].unlink()
    real_slices[3].unlink()
    err = raises(MissingSlicesError, tmp_path)
    assert err.path == tmp_path
    assert f"2 slices missing between z={z[1]:.1f} and z={z[4]:.1f}" in err.reason


def test_real_slice_broken_modality_and_truncation(real_slices: list[Path], tmp_path: Path) -> None:
    data = real_slices[4].read_bytes()
    real_slices[4].write_bytes(data[: len(data) - 5000])
    err = raises(TruncatedPixelDataError, tmp_path)
    assert err.path == real_slices[4]
    edit(real_slices[0], Modality="PT")
    err = raises(NotCTError, tmp_path)
    assert err.path == real_slices[0]


# ------------------------------------------------------------- plumbing
def test_errors_pickle_and_cli_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_tiny(tmp_path, 6)
    paths[3].unlink()
    with pytest.raises(MissingSlicesError) as info:
        read_series(tmp_path)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is MissingSlicesError and str(again) == str(info.value) and again.path == tmp_path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in this folder should warn
        assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"lidc-det info: error: {tmp_path}: 1 slice missing between z=-125.0 and z=-120.0" in err


def test_json_sidecars_are_skipped_silently(tmp_path: Path) -> None:
    import warnings

    write_tiny(tmp_path)
    (tmp_path / "series.twin.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFileWarning)
        series = find_series(tmp_path)
    assert len(series) == 1
