"""Find DICOM series under a folder and read one CT series as a HU volume.

The volume follows :mod:`lidc_det.geometry` exactly:

* ``hu`` is ``[z, y, x]`` float32 Hounsfield units (stored value * RescaleSlope
  + RescaleIntercept); ``y`` runs down the image rows, ``x`` along the columns.
* Slices are sorted by their position along the slice normal
  ``n = row_cosine x column_cosine`` (``ImagePositionPatient . n``), ascending:
  z index 0 is the lowest position along ``n``. This is what GDCM / SimpleITK's
  ``ImageSeriesReader`` does, so both give the same array and geometry.
* ``geometry.direction`` has columns (row cosine, column cosine, n): the world
  unit vectors of the x, y and z index axes. ``geometry.origin_xyz`` is the
  ImagePositionPatient of slice 0. ``geometry.spacing_zyx`` is
  ``(median distance between consecutive slice positions, PixelSpacing[0],
  PixelSpacing[1])`` in mm; SliceThickness is *not* the z spacing (it is kept in
  :attr:`CTVolume.slice_thickness_mm`).

In error messages ``z`` means the position along the slice normal in mm; for
axial scans (the usual case) that is the world z (ImagePositionPatient[2]).

Bad input raises a subclass of :class:`lidc_det.errors.InvalidSeriesError`
whose message is ``"<file or folder>: <reason>"`` (the kinds are listed in
``docs/data.md``, "Broken DICOM"). Which files count:

* ``*.xml`` (the LIDC reader annotations next to the slices) and ``*.json``
  sidecars are skipped silently;
* hidden files and other files that are plainly not DICOM (no ``DICM`` marker,
  no DICOM file name suffix) are skipped with a :class:`SkippedFileWarning`;
* a *damaged* file -- unreadable, empty, or DICOM that cannot be parsed or has
  no SeriesInstanceUID (a truncated header) -- that lies in a folder holding
  slices of the series being read raises :class:`~lidc_det.errors.DamagedFileError`:
  it may be one of the series' slices, and at the first or last position its loss
  could not be seen from the slice positions. Elsewhere it is skipped with a warning.

A slice file deleted outright at either end of the series cannot be detected
(CT headers do not carry the slice count); a gap in the middle raises
:class:`~lidc_det.errors.MissingSlicesError`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import (
    DamagedFileError,
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
    SeriesNotFoundError,
    TooFewSlicesError,
    TruncatedPixelDataError,
    UnsupportedDicomError,
)
from lidc_det.geometry import GeometryError, VolumeGeometry

__all__ = [
    "CTVolume",
    "SeriesGeometryWarning",
    "SeriesInfo",
    "SkippedFileWarning",
    "find_series",
    "read_series",
]

# Tolerances (mm for positions and spacings; unitless for direction cosines).
_SAME_POSITION_MM = 0.01  # two slices closer than this along the normal are duplicates
_GAP_FACTOR = 1.5  # a step > 1.5 x median spacing means slices are missing
_IRREGULAR_REL = 0.05  # steps off the median by > 5% (but not a gap) give a warning
_ORIENTATION_TOL = 1e-4  # IOP may differ by this much across slices
_ORTHONORMAL_TOL = 1e-3  # IOP vectors must be unit length and orthogonal to this
_SPACING_RTOL = 1e-4  # PixelSpacing may differ by this relative amount across slices
_SHEAR_WARN_MM = 0.05  # in-plane drift of slice positions (gantry tilt) that gives a warning

_FIND_TAGS = ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality"]
_SILENT_SUFFIXES = {".json", ".xml"}  # twin / BIDS sidecars, LIDC reader annotations
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}  # a file so named that fails to parse is damaged
_HU_MAX_UNSIGNED = 32767.0  # HU above this from unsigned stored values: signed data labelled unsigned

Members = list[tuple[Path, Any]]  # (file, pydicom Dataset) pairs


@dataclass(frozen=True)
class _Skipped:
    """A file that gave no usable header: ``damaged`` ones may be lost slices (see module doc)."""

    path: Path
    reason: str
    damaged: bool


class SkippedFileWarning(UserWarning):
    """A file under the folder was skipped (not DICOM, hidden, or without a SeriesInstanceUID)."""


class SeriesGeometryWarning(UserWarning):
    """The series was read, but its geometry is approximate (see the message)."""


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found by :func:`find_series` (headers only, no pixels read).

    Attributes:
        series_uid: SeriesInstanceUID.
        modality: Modality of the first file (e.g. ``"CT"``; ``""`` when absent).
        folder: deepest folder that holds all of the series' files.
        files: the series' DICOM files, sorted by path (not by position).
        patient_id: PatientID (``""`` when absent).
        study_uid: StudyInstanceUID (``""`` when absent).
    """

    series_uid: str
    modality: str
    folder: Path
    files: tuple[Path, ...] = field(repr=False)
    patient_id: str
    study_uid: str


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT series read into memory.

    Attributes:
        hu: ``[z, y, x]`` float32 Hounsfield units (after RescaleSlope/Intercept).
        geometry: where the array sits in the patient (LPS mm), see module docstring.
        series_uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID.
        patient_id: PatientID.
        slice_thickness_mm: the most common SliceThickness of the slices in mm
            (the z spacing when no slice has the tag).
        sop_uids: SOPInstanceUID of each z index (length ``nz``).
        slice_files: file of each z index (length ``nz``).
        source: the folder passed to :func:`read_series`.
    """

    hu: np.ndarray
    geometry: VolumeGeometry
    series_uid: str
    study_uid: str
    patient_id: str
    slice_thickness_mm: float
    sop_uids: tuple[str, ...]
    slice_files: tuple[Path, ...]
    source: Path

    def __post_init__(self) -> None:
        if self.hu.shape != self.geometry.shape_zyx:
            raise ValueError(f"hu shape {self.hu.shape} does not match geometry {self.geometry.shape_zyx}")
        nz = self.geometry.shape_zyx[0]
        if len(self.sop_uids) != nz or len(self.slice_files) != nz:
            raise ValueError(
                f"{nz} slices but {len(self.sop_uids)} SOP UIDs and {len(self.slice_files)} files"
            )


# ---------------------------------------------------------------- file walk
def _check_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise EmptySeriesError(folder, "folder does not exist")
    if not folder.is_dir():
        raise EmptySeriesError(folder, "not a folder")
    return folder


def _list_files(root: Path) -> list[Path]:
    """All files under ``root`` (recursive, sorted).

    Symlinked folders are followed, each real folder once: a symlink loop (or a
    second link to a folder already listed) is not entered again, with a
    :class:`SkippedFileWarning`.
    """

    def on_error(err: OSError) -> None:
        warnings.warn(f"{err.filename}: cannot list folder ({err.strerror}), skipped", SkippedFileWarning, stacklevel=4)

    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()
            warnings.warn(
                f"{dirpath}: folder already listed through another path (symlink loop?), not read again",
                SkippedFileWarning,
                stacklevel=3,
            )
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        out.extend(Path(dirpath) / name for name in sorted(filenames))
    return out


def _has_dicm_marker(path: Path) -> bool:
    """True when the file has the DICOM preamble marker (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read_headers(files: Iterable[Path], **dcmread_kwargs: Any) -> tuple[Members, list[_Skipped]]:
    """``(path, pydicom Dataset)`` for every DICOM file with a SeriesInstanceUID, and the
    files skipped (see the module docstring for which are silent, warned or damaged).

    Nothing is warned here: the caller decides (a damaged file may be an error).
    """
    import pydicom
    from tqdm import tqdm

    files = list(files)
    out: Members = []
    skipped: list[_Skipped] = []
    for path in tqdm(files, desc="reading DICOM headers", unit="file", delay=2.0, leave=False):
        if path.name.startswith("."):
            skipped.append(_Skipped(path, "hidden file, skipped", damaged=False))
            continue
        if path.suffix.lower() in _SILENT_SUFFIXES and not _has_dicm_marker(path):
            continue
        try:
            ds = pydicom.dcmread(path, **dcmread_kwargs)
        except OSError as err:  # unreadable: permissions, dangling symlink, symlink loop, I/O error
            skipped.append(_Skipped(path, f"cannot read the file ({err.strerror or type(err).__name__})", True))
            continue
        except Exception as err:  # noqa: BLE001 - not DICOM, or DICOM that does not parse
            looks_dicom = path.suffix.lower() in _DICOM_SUFFIXES or _has_dicm_marker(path)
            if not looks_dicom:
                skipped.append(_Skipped(path, "not a DICOM file (no DICM marker), skipped", damaged=False))
                continue
            size = path.stat().st_size
            why = "empty file (0 bytes)" if size == 0 else (
                f"damaged DICOM file of {size} bytes ({type(err).__name__}: {_first_line(err)})"
            )
            skipped.append(_Skipped(path, why, damaged=True))
            continue
        if not str(ds.get("SeriesInstanceUID", "") or "").strip():
            size = path.stat().st_size
            skipped.append(
                _Skipped(path, f"DICOM file of {size} bytes without SeriesInstanceUID (header truncated?)", True)
            )
            continue
        out.append((path, ds))
    return out, skipped


def _first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception message, at most ``limit`` characters."""
    text = (str(err).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _warn_skipped(skipped: Iterable[_Skipped], stacklevel: int = 3) -> None:
    for s in skipped:
        reason = s.reason if not s.damaged else f"{s.reason}, skipped"
        warnings.warn(f"{s.path}: {reason}", SkippedFileWarning, stacklevel=stacklevel)


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, None)
    return "" if value is None else str(value).strip()


def _common_folder(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def _group(headers: Sequence[tuple[Path, Any]]) -> dict[str, Members]:
    groups: dict[str, Members] = {}
    for path, ds in headers:
        groups.setdefault(_text(ds, "SeriesInstanceUID"), []).append((path, ds))
    return groups


def find_series(root: Path) -> list[SeriesInfo]:
    """Every DICOM series under ``root`` (recursive), grouped by SeriesInstanceUID.

    Reads headers only (``stop_before_pixels``). Non-DICOM and damaged files are
    skipped with a :class:`SkippedFileWarning` giving the reason (reading the
    series with :func:`read_series` then raises on a damaged file among its
    slices). Sorted by (patient, study, folder, series UID). Returns ``[]`` when
    the folder holds no DICOM file.

    Raises:
        EmptySeriesError: ``root`` does not exist or is not a folder.
    """
    root = _check_folder(root)
    headers, skipped = _read_headers(_list_files(root), stop_before_pixels=True, specific_tags=_FIND_TAGS)
    _warn_skipped(skipped)
    infos = []
    for uid, members in _group(headers).items():
        files = tuple(p for p, _ in members)
        first = members[0][1]
        infos.append(
            SeriesInfo(
                series_uid=uid,
                modality=_text(first, "Modality"),
                folder=_common_folder(files),
                files=files,
                patient_id=_text(first, "PatientID"),
                study_uid=_text(first, "StudyInstanceUID"),
            )
        )
    return sorted(infos, key=lambda s: (s.patient_id, s.study_uid, str(s.folder), s.series_uid))


# ------------------------------------------------------------ header values
def _floats(ds: Any, keyword: str, n: int, path: Path, error: type[InvalidSeriesError]) -> np.ndarray | None:
    """``keyword`` as ``n`` finite floats, ``None`` when absent or empty; ``error`` when malformed."""
    value = ds.get(keyword, None)
    if value is None or value == "" or (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 0):
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])]
    except (TypeError, ValueError):
        raise error(path, f"{keyword} is not numeric: {_show(value)}") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise error(path, f"{keyword} must be {n} finite numbers, got {_show(value)}")
    return np.asarray(values, dtype=np.float64)


def _show(value: Any) -> str:
    """A header value or array for messages: ``[1.0, 0.0]``, ``-1024``, ``'abc'`` (no NumPy reprs)."""
    if isinstance(value, np.ndarray | list | tuple) or (isinstance(value, Sequence) and not isinstance(value, str | bytes)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, float | np.floating) or type(value).__name__ in ("DSfloat", "DSdecimal"):
        return _fmt(float(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    return repr(str(value))


def _int(ds: Any, keyword: str) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fmt(v: float) -> str:
    """Number for messages: up to 3 decimals, at least one (``-120.0``, ``-120.625``); 6 significant
    digits when that would show 0 (``1e-05``)."""
    if not math.isfinite(v):
        return str(v)
    if v != 0 and abs(v) < 0.0005:
        return f"{v:.6g}"
    s = f"{v:.3f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _orientation(ds: Any, path: Path) -> np.ndarray | None:
    """(2, 3) row and column cosines, normalised; ``None`` when the tag is absent."""
    iop = _floats(ds, "ImageOrientationPatient", 6, path, InvalidOrientationError)
    if iop is None:
        return None
    row, col = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if abs(nr - 1) > _ORTHONORMAL_TOL or abs(nc - 1) > _ORTHONORMAL_TOL or abs(row @ col) > _ORTHONORMAL_TOL:
        raise InvalidOrientationError(
            path, f"ImageOrientationPatient {_show(iop)} is not two orthogonal unit vectors"
        )
    return np.stack([row / nr, col / nc])


def _pixel_spacing(ds: Any, path: Path) -> np.ndarray:
    """(row spacing = y, column spacing = x) in mm, both > 0."""
    ps = _floats(ds, "PixelSpacing", 2, path, InvalidSpacingError)
    if ps is None:
        raise InvalidSpacingError(path, "PixelSpacing is missing")
    if np.any(ps <= 0):
        raise InvalidSpacingError(path, f"PixelSpacing must be > 0 mm, got {_show(ps)}")
    return ps


# ------------------------------------------------------------- read_series
def _select_series(folder: Path, groups: dict[str, Members], series_uid: str | None) -> tuple[str, Members]:
    def listing() -> str:
        return ", ".join(f"{uid} ({len(m)} slices)" for uid, m in sorted(groups.items()))

    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesNotFoundError(folder, f"no series {series_uid}; found {len(groups)}: {listing()}")
        return series_uid, groups[series_uid]
    if len(groups) > 1:
        raise MultipleSeriesError(
            folder, f"{len(groups)} series found, choose one with --series-uid (series_uid= in Python): {listing()}"
        )
    uid = next(iter(groups))
    return uid, groups[uid]


def _check_slices(uid: str, members: Members, series_folder: Path) -> None:
    """Modality, frames, samples, slice count."""
    for path, ds in members:
        modality = _text(ds, "Modality")
        if modality != "CT":
            raise NotCTError(path, f"Modality is {modality!r}, expected 'CT' (series {uid})")
    for path, ds in members:
        frames = _int(ds, "NumberOfFrames")
        if frames is not None and frames > 1:
            raise UnsupportedDicomError(path, f"multi-frame image ({frames} frames) is not supported")
        samples = _int(ds, "SamplesPerPixel")
        if samples is not None and samples != 1:
            raise UnsupportedDicomError(path, f"SamplesPerPixel is {samples}; only greyscale (1) is supported")
        photometric = _text(ds, "PhotometricInterpretation")
        if photometric not in ("", "MONOCHROME1", "MONOCHROME2"):
            # MONOCHROME1 only inverts the display; HU come from the rescale either way
            raise UnsupportedDicomError(
                path, f"PhotometricInterpretation is {photometric!r}; a CT slice is MONOCHROME2 (or MONOCHROME1)"
            )
    seen: dict[str, Path] = {}
    for path, ds in members:
        sop = _text(ds, "SOPInstanceUID")
        if not sop:
            raise MissingTagError(path, f"SOPInstanceUID is missing (series {uid})")
        if sop in seen:
            raise DuplicateInstanceError(
                path, f"same SOPInstanceUID {sop} as {seen[sop]}; every slice needs its own (copied file?)"
            )
        seen[sop] = path
        _rescale(ds, path)  # validates RescaleSlope / RescaleIntercept before any pixel is read
    if len(members) < 2:
        raise TooFewSlicesError(
            series_folder,
            f"series {uid} has {len(members)} slice ({members[0][0].name}); a CT volume needs at least 2",
        )


def _check_consistency(members: Members) -> tuple[np.ndarray | None, np.ndarray, tuple[int, int]]:
    """Per-slice spacing/orientation validity, then agreement with the first slice.

    Returns (orientation (2, 3) or None, pixel spacing (2,), (rows, cols)).
    """
    ref_path, ref = members[0]
    ref_ps = _pixel_spacing(ref, ref_path)
    ref_iop = _orientation(ref, ref_path)
    ref_rows, ref_cols = _int(ref, "Rows"), _int(ref, "Columns")
    if ref_rows is None or ref_cols is None or ref_rows < 1 or ref_cols < 1:
        raise PixelDataError(ref_path, f"Rows/Columns missing or invalid: {ref_rows}, {ref_cols}")
    ref_shape = (ref_rows, ref_cols)
    for path, ds in members[1:]:
        ps = _pixel_spacing(ds, path)
        iop = _orientation(ds, path)
        shape = (_int(ds, "Rows"), _int(ds, "Columns"))
        if shape[0] is None or shape[1] is None or shape[0] < 1 or shape[1] < 1:
            raise PixelDataError(path, f"Rows/Columns missing or invalid: {shape[0]}, {shape[1]}")
        if shape != ref_shape:
            raise InconsistentSeriesError(
                path,
                f"Rows x Columns {shape[0]} x {shape[1]} differs from "
                f"{ref_shape[0]} x {ref_shape[1]} in {ref_path.name}",
            )
        if (iop is None) != (ref_iop is None) or (
            iop is not None and ref_iop is not None and np.max(np.abs(iop - ref_iop)) > _ORIENTATION_TOL
        ):
            show = "missing" if iop is None else _show(np.round(iop.ravel(), 6))
            ref_show = "missing" if ref_iop is None else _show(np.round(ref_iop.ravel(), 6))
            raise InconsistentSeriesError(
                path, f"ImageOrientationPatient {show} differs from {ref_show} in {ref_path.name}"
            )
        if not np.allclose(ps, ref_ps, rtol=_SPACING_RTOL, atol=1e-6):
            raise InconsistentSeriesError(
                path, f"PixelSpacing {_show(ps)} differs from {_show(ref_ps)} in {ref_path.name}"
            )
    return ref_iop, ref_ps, ref_shape


def _order_by_position(
    members: Members, normal: np.ndarray, series_folder: Path, require_positions: bool
) -> tuple[list[int], np.ndarray | None, float]:
    """Sort slices along the normal; returns (order, sorted IPPs (N, 3) or None, z spacing mm).

    ImagePositionPatient missing on some slices only is an error (a damaged or
    edited series); missing on all falls back to InstanceNumber order unless
    ``require_positions``.
    """
    ipps = [_floats(ds, "ImagePositionPatient", 3, path, InvalidSeriesError) for path, ds in members]
    missing = [members[i][0] for i, p in enumerate(ipps) if p is None]
    if missing and len(missing) < len(members):
        raise MissingTagError(
            missing[0],
            f"ImagePositionPatient is missing on {len(missing)} of {len(members)} slices; "
            "the others have it, so the slices cannot be placed consistently",
        )
    if missing and require_positions:
        raise MissingTagError(
            series_folder,
            f"ImagePositionPatient is missing on all {len(members)} slices; the volume's position "
            "in the patient (needed to place world-mm annotations) is unknown",
        )
    if missing:
        return _order_by_instance_number(members, missing, series_folder)

    ipp = np.stack(ipps)  # type: ignore[arg-type]
    pos = ipp @ normal
    inst = [_int(ds, "InstanceNumber") or 0 for _, ds in members]
    order = sorted(range(len(members)), key=lambda i: (pos[i], inst[i], str(members[i][0])))
    pos_sorted = pos[order]
    files = [members[i][0] for i in order]
    steps = np.diff(pos_sorted)

    if pos_sorted[-1] - pos_sorted[0] < _SAME_POSITION_MM:
        raise InvalidSpacingError(
            series_folder,
            f"zero spacing between slices: all {len(members)} slices are at z={_fmt(pos_sorted[0])}",
        )
    dup = np.flatnonzero(steps < _SAME_POSITION_MM)
    if dup.size:
        i = int(dup[0])
        raise DuplicateSliceError(
            files[i + 1],
            f"same position z={_fmt(pos_sorted[i + 1])} as {files[i]}"
            + (f" ({dup.size} duplicate positions in the series)" if dup.size > 1 else ""),
        )
    spacing = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP_FACTOR * spacing)
    if gaps.size:
        i = int(gaps[0])
        n_missing = max(1, int(round(steps[i] / spacing)) - 1)
        more = f"; {gaps.size - 1} more gap(s)" if gaps.size > 1 else ""
        raise MissingSlicesError(
            series_folder,
            f"{n_missing} slice{'s' if n_missing > 1 else ''} missing between "
            f"z={_fmt(pos_sorted[i])} and z={_fmt(pos_sorted[i + 1])} "
            f"({files[i].name} and {files[i + 1].name}; median spacing {_fmt(spacing)} mm){more}",
        )
    worst = float(np.max(np.abs(steps - spacing)))
    if worst > _IRREGULAR_REL * spacing:
        warnings.warn(
            f"{series_folder}: irregular slice spacing (median {_fmt(spacing)} mm, steps from "
            f"{_fmt(float(steps.min()))} to {_fmt(float(steps.max()))} mm); the volume uses the median",
            SeriesGeometryWarning,
            stacklevel=3,
        )
    # In-plane drift of the slice positions (gantry tilt) cannot be represented by the geometry.
    rel = ipp[order] - ipp[order][0]
    in_plane = rel - np.outer(rel @ normal, normal)
    drift = float(np.max(np.linalg.norm(in_plane, axis=1)))
    if drift > _SHEAR_WARN_MM:
        warnings.warn(
            f"{series_folder}: slice positions drift up to {drift:.2f} mm across the slice plane "
            "(gantry tilt?); the geometry assumes slices stacked along the normal",
            SeriesGeometryWarning,
            stacklevel=3,
        )
    return order, ipp[order], spacing


def _order_by_instance_number(
    members: Members, missing: list[Path], series_folder: Path
) -> tuple[list[int], np.ndarray | None, float]:
    warnings.warn(
        f"{missing[0]}: ImagePositionPatient missing ({len(missing)} of {len(members)} slices); "
        "ordering slices by InstanceNumber, z spacing from SpacingBetweenSlices/SliceThickness, "
        "origin (0, 0, 0)",
        SeriesGeometryWarning,
        stacklevel=4,
    )
    numbers = []
    for path, ds in members:
        n = _int(ds, "InstanceNumber")
        if n is None:
            raise InvalidSeriesError(path, "cannot order slices: ImagePositionPatient and InstanceNumber are missing")
        numbers.append(n)
    order = sorted(range(len(members)), key=lambda i: numbers[i])
    for a, b in zip(order[:-1], order[1:], strict=True):
        if numbers[a] == numbers[b]:
            raise DuplicateSliceError(members[b][0], f"same InstanceNumber {numbers[b]} as {members[a][0]}")
    path, ds = members[order[0]]
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _floats(ds, keyword, 1, path, InvalidSpacingError)
        if value is not None:
            if value[0] <= 0:
                raise InvalidSpacingError(path, f"{keyword} must be > 0 mm, got {value[0]}")
            return order, None, float(abs(value[0]))
    raise InvalidSpacingError(
        series_folder, "no slice positions and no SpacingBetweenSlices/SliceThickness: z spacing unknown"
    )


def _slice_thickness(members: Sequence[tuple[Path, Any]], default: float) -> float:
    values = []
    for _, ds in members:
        v = ds.get("SliceThickness", None)
        try:
            if v is not None and v != "" and float(v) > 0:
                values.append(round(float(v), 6))
        except (TypeError, ValueError):
            continue
    return Counter(values).most_common(1)[0][0] if values else default


def _rescale(ds: Any, path: Path) -> tuple[float, float] | None:
    """(RescaleSlope, RescaleIntercept) of a slice; ``None`` when a Modality LUT replaces them.

    Both are required for CT (Type 1): a missing one, a slope <= 0 or a value that
    is not a finite number raises :class:`InvalidRescaleError` instead of being guessed.
    """
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds and "ModalityLUTSequence" in ds:
        return None
    values = []
    for keyword, usual in (("RescaleSlope", "1"), ("RescaleIntercept", "-1024 or -1000")):
        value = ds.get(keyword, None)
        if value is None or value == "":
            raise InvalidRescaleError(
                path,
                f"{keyword} is missing; HU = stored value x RescaleSlope + RescaleIntercept, and CT slices "
                f"must carry both (a guess would shift or scale every HU; the usual value is {usual}). "
                "Restore the tag from the original export",
            )
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise InvalidRescaleError(path, f"{keyword} is not a number: {_show(value)}") from None
        if not math.isfinite(v):
            raise InvalidRescaleError(path, f"{keyword} is not a finite number: {_show(value)}")
        values.append(v)
    slope, intercept = values
    if slope <= 0:
        raise InvalidRescaleError(path, f"RescaleSlope is {_fmt(slope)}; it must be > 0 for CT")
    return slope, intercept


# transfer syntax UID prefix/UID -> the pip packages whose plugin decodes it for pydicom
_JPEG_PACKAGES = "pylibjpeg and pylibjpeg-libjpeg"
_J2K_PACKAGES = "pylibjpeg and pylibjpeg-openjpeg"
_DECODERS = {
    "1.2.840.10008.1.2.4.50": (_JPEG_PACKAGES, "libjpeg"),
    "1.2.840.10008.1.2.4.51": (_JPEG_PACKAGES, "libjpeg"),
    "1.2.840.10008.1.2.4.57": (_JPEG_PACKAGES, "libjpeg"),
    "1.2.840.10008.1.2.4.70": (_JPEG_PACKAGES, "libjpeg"),
    "1.2.840.10008.1.2.4.80": (_JPEG_PACKAGES, "libjpeg"),
    "1.2.840.10008.1.2.4.81": (_JPEG_PACKAGES, "libjpeg"),
    "1.2.840.10008.1.2.4.90": (_J2K_PACKAGES, "openjpeg"),
    "1.2.840.10008.1.2.4.91": (_J2K_PACKAGES, "openjpeg"),
    "1.2.840.10008.1.2.4.201": (_J2K_PACKAGES, "openjpeg"),
    "1.2.840.10008.1.2.4.202": (_J2K_PACKAGES, "openjpeg"),
    "1.2.840.10008.1.2.4.203": (_J2K_PACKAGES, "openjpeg"),
    "1.2.840.10008.1.2.5": ("pydicom itself (RLE Lossless)", ""),
    "1.2.840.10008.1.2.1.99": ("pydicom itself (Deflated)", ""),
}


def _decode_error(path: Path, tsyntax: Any, err: Exception) -> PixelDataError:
    """A :class:`PixelDataError` that names the transfer syntax and the package that decodes it."""
    from importlib.util import find_spec

    uid = str(tsyntax) if tsyntax is not None else ""
    name = getattr(tsyntax, "name", "") or "unknown"
    syntax = f"transfer syntax {name} ({uid})" if uid else "an unknown transfer syntax"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
    detail = detail if len(detail) <= 160 else detail[:157] + "..."
    if uid not in _DECODERS:
        return PixelDataError(
            path,
            f"cannot decode pixel data in {syntax}: no decoder for it is installed or known to pydicom; "
            "convert the series to uncompressed DICOM (e.g. `gdcmconv --raw`)",
        )
    packages, module = _DECODERS[uid]
    if module and find_spec(module) is None:
        return PixelDataError(
            path, f"cannot decode pixel data in {syntax}: it is decoded by {packages}, which is not installed "
            f"(pip install {packages.replace(' and ', ' ')})",
        )
    return PixelDataError(
        path, f"cannot decode pixel data in {syntax} with {packages}: the compressed data is damaged ({detail})"
    )


def _check_stored_bits(path: Path, ds: Any, data: bytes, n_pixels: int, bits: int, little_endian: bool) -> None:
    """Raise when uncompressed stored values use bits above BitsStored (pydicom would silently mask them)."""
    bits_stored = _int(ds, "BitsStored") or bits
    if bits_stored >= bits:
        return
    signed = (_int(ds, "PixelRepresentation") or 0) == 1
    dtype = np.dtype(f"{'<' if little_endian else '>'}{'i' if signed else 'u'}{bits // 8}")
    raw = np.frombuffer(data, dtype=dtype, count=n_pixels)
    high = raw >> (bits_stored - 1) if signed else raw >> bits_stored
    bad = (high != 0) & (high != -1) if signed else high != 0
    if bad.any():
        example = int(raw[np.flatnonzero(bad)[0]])
        raise PixelDataError(
            path,
            f"stored values do not fit BitsStored {bits_stored} (e.g. {example}, PixelRepresentation "
            f"{int(signed)}); masking them to {bits_stored} bits would change the HU: BitsStored or "
            "PixelRepresentation is wrong",
        )


def _read_pixels(members: Sequence[tuple[Path, Any]], shape_yx: tuple[int, int]) -> np.ndarray:
    """Stack the slices' pixel data as float32 HU, ``[z, y, x]``.

    Raises :class:`PixelDataError` (or :class:`TruncatedPixelDataError`) when pixel data is
    missing, shorter or longer than Rows x Columns x BitsAllocated / 8 bytes (plus one pad
    byte), uses bits above BitsStored, cannot be decoded, or gives HU above 32767
    from unsigned stored values (signed data labelled PixelRepresentation 0).
    """
    from pydicom.pixels import apply_modality_lut

    rows, cols = shape_yx
    hu = np.empty((len(members), rows, cols), dtype=np.float32)
    for k, (path, ds) in enumerate(members):
        if "PixelData" not in ds:
            raise TruncatedPixelDataError(path, "no Pixel Data element (file truncated?)")
        bits = _int(ds, "BitsAllocated")
        if bits is None or bits not in (8, 16, 32):
            raise PixelDataError(path, f"BitsAllocated {bits} is not supported (8, 16 or 32)")
        try:
            data = ds.PixelData  # reads deferred pixel data from the file
        except Exception as err:  # noqa: BLE001 - report any read failure with the file name
            raise PixelDataError(path, f"cannot read pixel data ({type(err).__name__}: {_first_line(err)})") from err
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        compressed = bool(tsyntax is not None and tsyntax.is_compressed)
        expected = rows * cols * bits // 8
        if not compressed:
            if len(data) < expected:
                raise TruncatedPixelDataError(
                    path, f"pixel data has {len(data)} bytes, expected {expected} (Rows*Columns*BitsAllocated/8)"
                )
            if len(data) > expected + 1:
                raise PixelDataError(
                    path,
                    f"pixel data has {len(data)} bytes, expected {expected} for {rows} x {cols} pixels of "
                    f"{bits} bits: BitsAllocated, Rows or Columns disagree with the data",
                )
            little = tsyntax is None or bool(tsyntax.is_little_endian)
            _check_stored_bits(path, ds, data, rows * cols, bits, little)
        try:
            arr = ds.pixel_array
        except Exception as err:  # noqa: BLE001 - decoder errors (missing plugin, corrupt stream)
            raise _decode_error(path, tsyntax, err) from err
        if arr.shape != (rows, cols):
            raise PixelDataError(path, f"pixel array shape {tuple(arr.shape)}, expected {(rows, cols)}")
        rescale = _rescale(ds, path)
        out = hu[k]
        if rescale is None:
            out[...] = apply_modality_lut(arr, ds)
        else:
            slope, intercept = rescale
            out[...] = arr
            if slope != 1.0:
                out *= np.float32(slope)
            if intercept != 0.0:
                out += np.float32(intercept)
        if (_int(ds, "PixelRepresentation") or 0) == 0 and arr.dtype.kind == "u":
            hi = float(out.max())
            if hi > _HU_MAX_UNSIGNED:
                raise PixelDataError(
                    path,
                    f"unsigned stored values give HU up to {hi:.0f}, beyond any CT value: the data are "
                    "probably signed (two's complement) but PixelRepresentation is 0",
                )
    return hu


def _raise_damaged(uid: str, members: Members, skipped: Sequence[_Skipped]) -> None:
    """Raise :class:`DamagedFileError` for a damaged file in a folder that holds slices of the series;
    warn about every other skipped file."""
    member_dirs = {p.parent for p, _ in members}
    among = [s for s in skipped if s.damaged and s.path.parent in member_dirs]
    _warn_skipped([s for s in skipped if s not in among], stacklevel=4)
    if among:
        more = f"; {len(among) - 1} more damaged file(s) there" if len(among) > 1 else ""
        raise DamagedFileError(
            among[0].path,
            f"{among[0].reason}; it lies among the {len(members)} slices of series {uid}, which may be "
            f"missing this slice: repair or re-download it, or remove it if it is not a slice{more}",
        )


def read_series(folder: Path, series_uid: str | None = None, *, require_geometry: bool = False) -> CTVolume:
    """Read one CT series under ``folder`` (searched recursively) as a HU volume.

    Works on the series folder itself or on any folder above it (patient,
    study). Headers are read once; pixel data only for the chosen series.

    Args:
        folder: folder holding the DICOM files (at any depth).
        series_uid: SeriesInstanceUID to read; needed when the folder holds
            several series.
        require_geometry: raise :class:`~lidc_det.errors.MissingTagError` instead
            of falling back when ImagePositionPatient or ImageOrientationPatient is
            missing on every slice (``prepare`` sets it: its annotations are in
            world mm, so an assumed origin would misplace them).

    Returns:
        :class:`CTVolume` with ``hu`` ``[z, y, x]`` float32 and its geometry
        (see the module docstring for the conventions).

    Raises (all subclasses of :class:`~lidc_det.errors.InvalidSeriesError`,
    message ``"<file or folder>: <reason>"``):
        EmptySeriesError: folder missing, or no DICOM file in it.
        MultipleSeriesError: several series and no ``series_uid``.
        SeriesNotFoundError: ``series_uid`` not found.
        DamagedFileError: an unreadable, empty or unparsable file (or one without
            SeriesInstanceUID) beside the series' slices.
        NotCTError: a slice's Modality is not CT.
        UnsupportedDicomError: multi-frame, colour or non-MONOCHROME images.
        MissingTagError: SOPInstanceUID missing, ImagePositionPatient missing on
            some slices (or on all, with ``require_geometry``).
        DuplicateInstanceError: two files with the same SOPInstanceUID.
        InvalidRescaleError: RescaleSlope / RescaleIntercept missing, slope <= 0, not a number.
        TooFewSlicesError: fewer than 2 slices.
        InvalidSpacingError: PixelSpacing missing or <= 0, or zero slice spacing.
        InvalidOrientationError: malformed ImageOrientationPatient.
        InconsistentSeriesError: slices disagree on orientation, size or pixel spacing.
        DuplicateSliceError: two slices at the same position.
        MissingSlicesError: a gap > 1.5 x the median slice spacing.
        TruncatedPixelDataError / PixelDataError: pixel data short, long, missing,
            undecodable (the message names the transfer syntax and the decoder
            package), above BitsStored, or HU outside the int16 range.

    Warns:
        SkippedFileWarning: for each non-DICOM file skipped.
        SeriesGeometryWarning: positions missing (InstanceNumber order used),
            irregular spacing, or gantry tilt.
    """
    folder = _check_folder(folder)
    files = _list_files(folder)
    if not files:
        raise EmptySeriesError(folder, "no files in folder")
    # defer_size: pixel data stays on disk until it is used, so other series cost only their headers
    headers, skipped = _read_headers(files, defer_size="64 KB")
    if not headers:
        _warn_skipped(skipped)
        n_damaged = sum(s.damaged for s in skipped)
        raise EmptySeriesError(
            folder,
            f"no DICOM files ({len(files)} other files skipped"
            + (f", {n_damaged} of them damaged, e.g. {next(s for s in skipped if s.damaged).path.name}" if n_damaged else "")
            + ")",
        )
    uid, members = _select_series(folder, _group(headers), series_uid)
    _raise_damaged(uid, members, skipped)
    series_folder = _common_folder([p for p, _ in members])

    _check_slices(uid, members, series_folder)
    iop, pixel_spacing, shape_yx = _check_consistency(members)
    if iop is None and require_geometry:
        raise MissingTagError(
            series_folder,
            f"ImageOrientationPatient is missing on all {len(members)} slices; the slice orientation is unknown",
        )
    if iop is None:
        warnings.warn(
            f"{series_folder}: ImageOrientationPatient missing; assuming axial (identity direction)",
            SeriesGeometryWarning,
            stacklevel=2,
        )
        iop = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    row, col = iop
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    order, ipp_sorted, z_spacing = _order_by_position(members, normal, series_folder, require_geometry)
    members = [members[i] for i in order]
    origin = ipp_sorted[0] if ipp_sorted is not None else np.zeros(3)

    try:
        geometry = VolumeGeometry(
            shape_zyx=(len(members), *shape_yx),
            spacing_zyx=(z_spacing, float(pixel_spacing[0]), float(pixel_spacing[1])),
            origin_xyz=(float(origin[0]), float(origin[1]), float(origin[2])),
            direction=tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()),
        )
    except GeometryError as err:
        raise InvalidSeriesError(series_folder, f"invalid geometry: {err}") from err

    hu = _read_pixels(members, shape_yx)
    first = members[0][1]
    return CTVolume(
        hu=hu,
        geometry=geometry,
        series_uid=uid,
        study_uid=_text(first, "StudyInstanceUID"),
        patient_id=_text(first, "PatientID"),
        slice_thickness_mm=_slice_thickness(members, z_spacing),
        sop_uids=tuple(_text(ds, "SOPInstanceUID") for _, ds in members),
        slice_files=tuple(p for p, _ in members),
        source=folder,
    )
