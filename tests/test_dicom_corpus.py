"""A corpus of broken copies of the real LIDC-IDRI-0001 series, built at test time.

Each case copies the 11 real slices that hold the scan's nodule (z = -127.5 .. -102.5 mm;
unbroken, ``prepare`` finishes them, see ``test_unbroken_copy_is_prepared``), breaks them
one way, and checks that

* :func:`read_series` raises the named error (or gives the named warning), with a
  message ``"<file or folder>: <reason>"`` that contains the expected words, and
* ``prepare`` on the copy reports nothing done: the scan is listed as failed with that
  error, no ``meta.json`` is written, ``dataset.json`` lists no scan (or, where no CT
  series is left, ``prepare`` stops with a DatasetError).

Warning-only cases (the volume is right or its approximation is stated) are checked
separately: the warning is given, and ``prepare`` finishes the scan with the warning
in its report. Skipped with the reason when ../shared/data is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import JPEGLSLossless, RLELossless

from lidc_det.data.prepare import PrepareConfig, PrepareReport, prepare_dataset
from lidc_det.errors import (
    DamagedFileError,
    DatasetError,
    DuplicateInstanceError,
    DuplicateSliceError,
    EmptySeriesError,
    InconsistentSeriesError,
    InvalidOrientationError,
    InvalidRescaleError,
    InvalidSeriesError,
    InvalidSpacingError,
    MissingSlicesError,
    MissingTagError,
    MultipleSeriesError,
    NotCTError,
    PixelDataError,
    TooFewSlicesError,
    TruncatedPixelDataError,
    UnsupportedDicomError,
)
from lidc_det.io.dicom import SeriesGeometryWarning, SkippedFileWarning, read_series

from conftest import REAL_SERIES_DIR, REAL_SERIES_UID, requires_real

pytestmark = requires_real

SPACING = (2.5, 2.0, 2.0)  # coarse prepare grid: fast
Z_RANGE = (-127.6, -102.4)  # the slices that hold the nodule's contours (-125 .. -105) and one more each side


@pytest.fixture(scope="module")
def slice_bytes() -> list[tuple[str, bytes]]:
    """(file name, bytes) of the 11 real slices in z order."""
    chosen = []
    for f in sorted(REAL_SERIES_DIR.glob("*.dcm")):
        z = float(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["ImagePositionPatient"]).ImagePositionPatient[2])
        if Z_RANGE[0] < z < Z_RANGE[1]:
            chosen.append((z, f.name, f.read_bytes()))
    assert len(chosen) == 11
    return [(name, data) for _, name, data in sorted(chosen)]


def copy_series(root: Path, slice_bytes: list[tuple[str, bytes]]) -> list[Path]:
    """The slices under ``root/LIDC-IDRI-0001/study/series/`` (TCIA-like); returns them in z order."""
    folder = root / "LIDC-IDRI-0001" / "study" / "series"
    folder.mkdir(parents=True)
    paths = []
    for name, data in slice_bytes:
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def edit(path: Path, **changes: object) -> None:
    """Set (or delete, with None) attributes of one file."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def edit_all(paths: list[Path], **changes: object) -> None:
    for p in paths:
        edit(p, **changes)


def raw_value(path: Path, tag: int, vr: str, value: bytes) -> None:
    """Write a raw (unvalidated) value, e.g. a DS that is not a number."""
    ds = pydicom.dcmread(path)
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    ds.save_as(path)


def truncate(path: Path, n_bytes: int) -> None:
    path.write_bytes(path.read_bytes()[:n_bytes])


def crop(path: Path, size: int) -> None:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array[:size, :size].copy()
    ds.Rows, ds.Columns = size, size
    ds.PixelData = arr.tobytes()
    ds.save_as(path)


def retag_compressed(path: Path, transfer_syntax: str) -> None:
    """RLE-compress the slice, then label the stream with another transfer syntax."""
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path)


def replace_with_text(paths: list[Path]) -> None:
    for p in paths:
        p.unlink()
        p.with_suffix(".txt").write_text("not dicom")


def z_of(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def duplicate_position(paths: list[Path]) -> None:
    copy = paths[0].parent / "copy_of_5.dcm"
    shutil.copy(paths[5], copy)
    edit(copy, SOPInstanceUID="1.2.826.0.1.3680043.99.2")


def shift_in_plane(paths: list[Path], mm_per_slice: float) -> None:
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + mm_per_slice * k, z]
        ds.save_as(p)


@dataclass(frozen=True)
class Case:
    """One kind of broken input: how to break the copy and what the reader must say."""

    name: str
    breaks: Callable[[list[Path]], object]
    error: type[InvalidSeriesError]
    words: str  # must appear in the message
    prepare_error: type[Exception] | None = None  # when prepare fails otherwise than read_series
    warns: type[Warning] | None = None  # read_series warns (and succeeds); prepare must still fail


CASES = [
    # --- rescale: HU would be silently wrong
    Case("rescale intercept missing", lambda p: edit_all(p, RescaleIntercept=None), InvalidRescaleError,
         "RescaleIntercept is missing"),
    Case("rescale intercept missing on one slice", lambda p: edit(p[4], RescaleIntercept=None), InvalidRescaleError,
         "RescaleIntercept is missing"),
    Case("rescale slope 0", lambda p: edit_all(p, RescaleSlope=0), InvalidRescaleError, "RescaleSlope is 0.0"),
    Case("rescale slope negative", lambda p: edit(p[3], RescaleSlope=-1), InvalidRescaleError, "must be > 0"),
    Case("rescale slope missing", lambda p: edit_all(p, RescaleSlope=None), InvalidRescaleError,
         "RescaleSlope is missing"),
    Case("rescale intercept not a number", lambda p: raw_value(p[2], 0x00281052, "DS", b"abc "), InvalidRescaleError,
         "not a number: 'abc'"),
    # --- damaged, unreadable or vanished files (first / last slice: not visible from the positions)
    Case("first slice truncated to 1 KB", lambda p: truncate(p[0], 1024), DamagedFileError,
         "1024 bytes without SeriesInstanceUID"),
    Case("last slice truncated to 1 KB", lambda p: truncate(p[-1], 1024), DamagedFileError,
         "1024 bytes without SeriesInstanceUID"),
    Case("last slice empty (0 bytes)", lambda p: p[-1].write_bytes(b""), DamagedFileError, "empty file (0 bytes)"),
    Case("first slice a dangling symlink", lambda p: (p[0].unlink(), p[0].symlink_to("/nonexistent/x.dcm")),
         DamagedFileError, "cannot read the file (No such file or directory)"),
    Case("last slice a symlink to itself", lambda p: (p[-1].unlink(), os.symlink(p[-1].name, p[-1])),
         DamagedFileError, "Too many levels of symbolic links"),
    Case("first slice without SeriesInstanceUID", lambda p: edit(p[0], SeriesInstanceUID=None), DamagedFileError,
         "without SeriesInstanceUID"),
    Case("middle slice pixel data cut short", lambda p: truncate(p[5], len(p[5].read_bytes()) - 5000),
         TruncatedPixelDataError, "expected 524288"),
    Case("last slice cut before its pixel data", lambda p: truncate(p[-1], 2100), TruncatedPixelDataError,
         "no Pixel Data element"),
    # --- slice layout
    Case("middle slice missing", lambda p: p[5].unlink(), MissingSlicesError, "1 slice missing between"),
    Case("duplicate slice position", duplicate_position, DuplicateSliceError, "same position"),
    Case("duplicate SOPInstanceUID", lambda p: edit(p[6], SOPInstanceUID=str(pydicom.dcmread(p[2]).SOPInstanceUID)),
         DuplicateInstanceError, "same SOPInstanceUID"),
    Case("SOPInstanceUID missing", lambda p: edit(p[6], SOPInstanceUID=None), MissingTagError,
         "SOPInstanceUID is missing"),
    Case("second series mixed into the folder", lambda p: edit(p[5], SeriesInstanceUID="1.2.826.0.1.3680043.99.1"),
         MultipleSeriesError, "--series-uid", prepare_error=MissingSlicesError),
    Case("all slices at one position", lambda p: [edit(x, ImagePositionPatient=[-166.0, -171.7, -115.0]) for x in p],
         InvalidSpacingError, "zero spacing"),
    Case("one slice left", lambda p: [x.unlink() for x in p[1:]], TooFewSlicesError, "at least 2"),
    # --- geometry headers
    Case("ImagePositionPatient missing on one slice", lambda p: edit(p[5], ImagePositionPatient=None), MissingTagError,
         "missing on 1 of 11 slices"),
    Case("ImagePositionPatient missing on all slices", lambda p: edit_all(p, ImagePositionPatient=None),
         MissingTagError, "missing on all 11 slices", warns=SeriesGeometryWarning),
    Case("ImagePositionPatient not finite", lambda p: edit(p[5], ImagePositionPatient=[0.0, 0.0, float("nan")]),
         InvalidSeriesError, "3 finite numbers"),
    Case("ImageOrientationPatient missing on all slices", lambda p: edit_all(p, ImageOrientationPatient=None),
         MissingTagError, "ImageOrientationPatient is missing", warns=SeriesGeometryWarning),
    Case("ImageOrientationPatient missing on one slice", lambda p: edit(p[3], ImageOrientationPatient=None),
         InconsistentSeriesError, "ImageOrientationPatient missing differs"),
    Case("oblique orientation on one slice", lambda p: edit(p[3], ImageOrientationPatient=[1, 0, 0, 0, 0.8660254, -0.5]),
         InconsistentSeriesError, "ImageOrientationPatient [1.0, 0.0, 0.0, 0.0, 0.866, -0.5] differs"),
    Case("orientation not orthogonal", lambda p: edit_all(p, ImageOrientationPatient=[1, 0, 0, 1, 0, 0]),
         InvalidOrientationError, "orthogonal"),
    Case("PixelSpacing differs on one slice", lambda p: edit(p[4], PixelSpacing=[0.8, 0.8]), InconsistentSeriesError,
         "PixelSpacing [0.8, 0.8] differs from [0.703, 0.703]"),
    Case("PixelSpacing missing", lambda p: edit(p[4], PixelSpacing=None), InvalidSpacingError, "PixelSpacing is missing"),
    Case("PixelSpacing zero", lambda p: edit(p[4], PixelSpacing=[0.0, 0.703125]), InvalidSpacingError, "> 0 mm"),
    Case("Rows/Columns differ on one slice", lambda p: crop(p[4], 256), InconsistentSeriesError,
         "Rows x Columns 256 x 256 differs from 512 x 512"),
    Case("Rows missing", lambda p: edit(p[4], Rows=None), PixelDataError, "Rows/Columns missing"),
    # --- pixel encoding
    Case("BitsAllocated 32 on 16-bit data", lambda p: edit(p[2], BitsAllocated=32), TruncatedPixelDataError,
         "expected 1048576"),
    Case("BitsAllocated 8 on 16-bit data", lambda p: edit(p[2], BitsAllocated=8, BitsStored=8, HighBit=7),
         PixelDataError, "BitsAllocated, Rows or Columns disagree"),
    Case("BitsStored 12 on 16-bit values", lambda p: edit_all(p, BitsStored=12, HighBit=11), PixelDataError,
         "do not fit BitsStored 12"),
    Case("signed data labelled unsigned", lambda p: edit_all(p, PixelRepresentation=0), PixelDataError,
         "PixelRepresentation is 0"),
    Case("PhotometricInterpretation RGB", lambda p: edit(p[1], PhotometricInterpretation="RGB"),
         UnsupportedDicomError, "'RGB'"),
    Case("SamplesPerPixel 3", lambda p: edit(p[1], SamplesPerPixel=3), UnsupportedDicomError, "SamplesPerPixel is 3"),
    Case("multi-frame", lambda p: edit(p[0], NumberOfFrames=2), UnsupportedDicomError, "multi-frame"),
    Case("no decoder for the transfer syntax", lambda p: retag_compressed(p[3], "1.2.840.10008.1.2.4.100"),
         PixelDataError, "MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100): no decoder"),
    Case("damaged JPEG-LS stream", lambda p: retag_compressed(p[3], JPEGLSLossless), PixelDataError,
         "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80) with pylibjpeg and pylibjpeg-libjpeg: "
         "the compressed data is damaged"),
    # --- not CT / not DICOM
    Case("one slice MR", lambda p: edit(p[2], Modality="MR"), NotCTError, "Modality is 'MR'"),
    Case("Modality missing", lambda p: edit(p[2], Modality=None), NotCTError, "Modality is ''"),
    Case("a PET series, no CT", lambda p: edit_all(p, Modality="PT"), NotCTError, "Modality is 'PT'",
         prepare_error=DatasetError),
    Case("folder without DICOM", replace_with_text, EmptySeriesError, "no DICOM files", prepare_error=DatasetError),
]


def test_corpus_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


def _prepare(root: Path, out: Path) -> PrepareReport:
    return prepare_dataset(PrepareConfig(dicom_root=root, out_dir=out, spacing_zyx=SPACING), progress=False)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_input(case: Case, slice_bytes: list[tuple[str, bytes]], tmp_path: Path) -> None:
    root = tmp_path / "dicom"
    paths = copy_series(root, slice_bytes)
    case.breaks(paths)
    series = paths[0].parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case.warns is None:
            with pytest.raises(case.error) as info:
                read_series(series)
            err = info.value
            assert type(err) is case.error, f"{type(err).__name__}: {err}"
            assert str(err) == f"{err.path}: {err.reason}"
            assert case.words in err.reason, err.reason
            assert "np.float" not in err.reason and "Traceback" not in err.reason
        else:  # the reader falls back with a warning; prepare, which needs the real geometry, must refuse
            read_series(series)
            assert any(issubclass(w.category, case.warns) for w in caught), [str(w.message) for w in caught]
            with pytest.raises(case.error, match=case.words.replace("(", r"\(").replace(")", r"\)")):
                read_series(series, require_geometry=True)

    out = tmp_path / "out"
    expected = case.prepare_error or case.error
    if expected is DatasetError:
        with pytest.raises(DatasetError, match="no CT series"):
            _prepare(root, out)
    else:
        report = _prepare(root, out)
        assert report.done == () and report.skipped == (), report.summary()
        assert REAL_SERIES_UID in report.failed, report.summary()
        assert report.failed[REAL_SERIES_UID].startswith(f"{expected.__name__}: "), report.failed
        assert json.loads((out / "dataset.json").read_text())["scans"] == []
    assert not list(out.rglob("meta.json")), "a broken scan must not be marked finished"


def test_unbroken_copy_is_prepared(slice_bytes: list[tuple[str, bytes]], tmp_path: Path) -> None:
    """The corpus' baseline: the same 11 slices unbroken are read without a warning and prepared."""
    root = tmp_path / "dicom"
    paths = copy_series(root, slice_bytes)
    (paths[0].parent / "069.xml").write_text("<?xml version='1.0'?><LidcReadMessage/>")  # read silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = read_series(paths[0].parent)
    assert v.geometry.shape_zyx == (11, 512, 512) and -1000 < float(np.median(v.hu)) < -800
    report = _prepare(root, tmp_path / "out")
    assert report.done == (REAL_SERIES_UID,) and not report.failed and not report.warnings, report.summary()


def test_unreadable_first_slice(slice_bytes: list[tuple[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice the user may not read (PermissionError; simulated, since root reads any file)."""
    root = tmp_path / "dicom"
    paths = copy_series(root, slice_bytes)
    if os.geteuid() != 0:
        paths[0].chmod(0)
    else:
        real = pydicom.dcmread

        def dcmread(fp: object, *a: object, **kw: object) -> object:
            if Path(str(fp)) == paths[0]:
                raise PermissionError(13, "Permission denied", str(fp))
            return real(fp, *a, **kw)

        monkeypatch.setattr(pydicom, "dcmread", dcmread)
    with pytest.raises(DamagedFileError, match=r"cannot read the file \(Permission denied\)") as info:
        read_series(paths[0].parent)
    assert info.value.path == paths[0]
    report = _prepare(root, tmp_path / "out")
    assert report.done == () and report.failed[REAL_SERIES_UID].startswith("DamagedFileError: ")


# ------------------------------------------------------- warnings, not errors
@dataclass(frozen=True)
class WarnCase:
    name: str
    breaks: Callable[[list[Path]], object]
    warning: type[Warning]
    words: str


WARN_CASES = [
    WarnCase("gantry tilt (positions drift in plane)", lambda p: shift_in_plane(p, 0.2), SeriesGeometryWarning,
             "drift up to 2.00 mm"),
    WarnCase("irregular slice spacing", lambda p: edit(p[-1], ImagePositionPatient=[-166.0, -171.7, z_of(p[-1]) + 0.8]),
             SeriesGeometryWarning, "irregular slice spacing"),
    WarnCase("symlink loop in the series folder", lambda p: (p[0].parent / "loop").symlink_to(p[0].parent),
             SkippedFileWarning, "already listed"),
    WarnCase("AppleDouble file beside the slices", lambda p: (p[0].parent / "._000001.dcm").write_bytes(b"\0" * 4096),
             SkippedFileWarning, "hidden file"),
    WarnCase("damaged file in another folder", lambda p: (p[0].parents[1] / "stray.dcm").write_bytes(b"\0" * 10),
             SkippedFileWarning, "damaged DICOM file of 10 bytes"),
]


@pytest.mark.parametrize("case", WARN_CASES, ids=[c.name for c in WARN_CASES])
def test_warning_input(case: WarnCase, slice_bytes: list[tuple[str, bytes]], tmp_path: Path) -> None:
    """The volume is right (or its approximation is stated): a warning, and prepare reports it beside 'done'."""
    root = tmp_path / "dicom"
    paths = copy_series(root, slice_bytes)
    case.breaks(paths)
    with pytest.warns(case.warning, match=case.words.replace("(", r"\(").replace(")", r"\)")):
        v = read_series(root / "LIDC-IDRI-0001")
    assert v.geometry.shape_zyx == (11, 512, 512)
    report = _prepare(root, tmp_path / "out")
    assert report.done == (REAL_SERIES_UID,), report.summary()
    if case.warning is SeriesGeometryWarning:  # read from the series folder: the scan's own warning
        assert any(case.words in m for m in report.warnings[REAL_SERIES_UID]), report.summary()
        assert "WARNING" in report.summary()


def test_monochrome1_gives_the_same_hu(slice_bytes: list[tuple[str, bytes]], tmp_path: Path) -> None:
    """MONOCHROME1 only inverts the display: the HU come from the rescale and are unchanged."""
    paths = copy_series(tmp_path / "a", slice_bytes[:3])
    ref = read_series(paths[0].parent).hu
    edit_all(paths, PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_array_equal(read_series(paths[0].parent).hu, ref)


# ------------------------------------------------------------ compressed DICOM
@pytest.mark.parametrize(
    ("syntax", "name"),
    [(RLELossless, "RLE Lossless (pydicom itself)"), ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless (pylibjpeg-openjpeg)")],
)
def test_compressed_series_reads_the_same_hu(
    syntax: str, name: str, slice_bytes: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    """A compressed copy of 3 real slices (made with Dataset.compress) gives the same HU as the original."""
    paths = copy_series(tmp_path / "a", slice_bytes[4:7])
    ref = read_series(paths[0].parent)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(syntax)
        ds.save_as(p)
    assert str(pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == str(syntax), name
    v = read_series(paths[0].parent)
    assert v.geometry == ref.geometry
    np.testing.assert_array_equal(v.hu, ref.hu)


def test_missing_decoder_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pylibjpeg-libjpeg the message says which package decodes JPEG Lossless, not pydicom internals."""
    import importlib.util

    from pydicom.uid import JPEGLosslessSV1

    from lidc_det.io import dicom

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libjpeg" else real(n, *a))
    err = dicom._decode_error(Path("x.dcm"), JPEGLosslessSV1, RuntimeError("Unable to decode: no plugins\n  details"))
    assert isinstance(err, PixelDataError)
    assert str(err) == (
        "x.dcm: cannot decode pixel data in transfer syntax JPEG Lossless, Non-Hierarchical, First-Order "
        "Prediction (Process 14 [Selection Value 1]) (1.2.840.10008.1.2.4.70): it is decoded by pylibjpeg and "
        "pylibjpeg-libjpeg, which is not installed (pip install pylibjpeg pylibjpeg-libjpeg)"
    )
