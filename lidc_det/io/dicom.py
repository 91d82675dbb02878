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
whose message is ``"<file or folder>: <reason>"``. Files that are not DICOM
(e.g. the LIDC ``*.xml`` annotation files next to the slices) and hidden files
are skipped with a :class:`SkippedFileWarning` naming the file.
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
    DuplicateSliceError,
    EmptySeriesError,
    InconsistentSeriesError,
    InvalidOrientationError,
    InvalidSeriesError,
    InvalidSpacingError,
    MissingSlicesError,
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

Members = list[tuple[Path, Any]]  # (file, pydicom Dataset) pairs


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
    """All regular files under ``root`` (recursive, sorted, symlinked folders not followed)."""

    def on_error(err: OSError) -> None:
        warnings.warn(f"{err.filename}: cannot list folder ({err.strerror}), skipped", SkippedFileWarning, stacklevel=4)

    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames.sort()
        out.extend(Path(dirpath) / name for name in sorted(filenames))
    return out


def _read_headers(files: Iterable[Path], **dcmread_kwargs: Any) -> Members:
    """``(path, pydicom Dataset)`` for every DICOM file with a SeriesInstanceUID.

    Other files (hidden, not DICOM, unreadable, no SeriesInstanceUID) are skipped
    with a :class:`SkippedFileWarning` naming the file, except JSON sidecars
    (``*.json``: lidc-det twin records, dcm2niix/BIDS sidecars), which are skipped silently.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from tqdm import tqdm

    files = list(files)
    out: Members = []
    for path in tqdm(files, desc="reading DICOM headers", unit="file", delay=2.0, leave=False):
        if path.name.startswith("."):
            warnings.warn(f"{path}: hidden file, skipped", SkippedFileWarning, stacklevel=3)
            continue
        if path.suffix.lower() == ".json":
            continue
        try:
            ds = pydicom.dcmread(path, **dcmread_kwargs)
        except InvalidDicomError:
            warnings.warn(f"{path}: not a DICOM file (no DICM header), skipped", SkippedFileWarning, stacklevel=3)
            continue
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, with its reason
            warnings.warn(
                f"{path}: not a DICOM file, skipped ({type(err).__name__}: {err})",
                SkippedFileWarning,
                stacklevel=3,
            )
            continue
        if not str(ds.get("SeriesInstanceUID", "") or "").strip():
            warnings.warn(f"{path}: DICOM file without SeriesInstanceUID, skipped", SkippedFileWarning, stacklevel=3)
            continue
        out.append((path, ds))
    return out


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

    Reads headers only (``stop_before_pixels``). Non-DICOM files are skipped with
    a :class:`SkippedFileWarning`. Sorted by (patient, study, folder, series UID).
    Returns ``[]`` when the folder holds no DICOM file.

    Raises:
        EmptySeriesError: ``root`` does not exist or is not a folder.
    """
    root = _check_folder(root)
    headers = _read_headers(_list_files(root), stop_before_pixels=True, specific_tags=_FIND_TAGS)
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
        raise error(path, f"{keyword} is not numeric: {value!r}") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise error(path, f"{keyword} must be {n} finite numbers, got {value!r}")
    return np.asarray(values, dtype=np.float64)


def _int(ds: Any, keyword: str) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fmt(v: float) -> str:
    """Position for messages: up to 3 decimals, at least one (``-120.0``, ``-120.625``)."""
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
            path, f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors"
        )
    return np.stack([row / nr, col / nc])


def _pixel_spacing(ds: Any, path: Path) -> np.ndarray:
    """(row spacing = y, column spacing = x) in mm, both > 0."""
    ps = _floats(ds, "PixelSpacing", 2, path, InvalidSpacingError)
    if ps is None:
        raise InvalidSpacingError(path, "PixelSpacing is missing")
    if np.any(ps <= 0):
        raise InvalidSpacingError(path, f"PixelSpacing must be > 0 mm, got {list(ps)}")
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
        raise MultipleSeriesError(folder, f"{len(groups)} series found, choose one with series_uid: {listing()}")
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
        if shape != ref_shape:
            raise InconsistentSeriesError(
                path,
                f"Rows x Columns {shape[0]} x {shape[1]} differs from "
                f"{ref_shape[0]} x {ref_shape[1]} in {ref_path.name}",
            )
        if (iop is None) != (ref_iop is None) or (
            iop is not None and ref_iop is not None and np.max(np.abs(iop - ref_iop)) > _ORIENTATION_TOL
        ):
            show = None if iop is None else [round(float(v), 6) for v in iop.ravel()]
            ref_show = None if ref_iop is None else [round(float(v), 6) for v in ref_iop.ravel()]
            raise InconsistentSeriesError(
                path, f"ImageOrientationPatient {show} differs from {ref_show} in {ref_path.name}"
            )
        if not np.allclose(ps, ref_ps, rtol=_SPACING_RTOL, atol=1e-6):
            raise InconsistentSeriesError(
                path, f"PixelSpacing {list(ps)} differs from {list(ref_ps)} in {ref_path.name}"
            )
    return ref_iop, ref_ps, ref_shape


def _order_by_position(
    members: Members, normal: np.ndarray, series_folder: Path
) -> tuple[list[int], np.ndarray | None, float]:
    """Sort slices along the normal; returns (order, sorted IPPs (N, 3) or None, z spacing mm)."""
    ipps = [_floats(ds, "ImagePositionPatient", 3, path, InvalidSeriesError) for path, ds in members]
    missing = [members[i][0] for i, p in enumerate(ipps) if p is None]
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


def _read_pixels(members: Sequence[tuple[Path, Any]], shape_yx: tuple[int, int]) -> np.ndarray:
    """Stack the slices' pixel data as float32 HU, ``[z, y, x]``."""
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
            raise PixelDataError(path, f"cannot read pixel data ({type(err).__name__}: {err})") from err
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        compressed = bool(tsyntax is not None and tsyntax.is_compressed)
        expected = rows * cols * bits // 8
        if not compressed and len(data) < expected:
            raise TruncatedPixelDataError(
                path, f"pixel data has {len(data)} bytes, expected {expected} (Rows*Columns*BitsAllocated/8)"
            )
        try:
            arr = ds.pixel_array
        except Exception as err:  # noqa: BLE001 - decoder errors (missing plugin, corrupt stream)
            raise PixelDataError(path, f"cannot decode pixel data ({type(err).__name__}: {err})") from err
        if arr.shape != (rows, cols):
            raise PixelDataError(path, f"pixel array shape {arr.shape}, expected {(rows, cols)}")
        if "RescaleSlope" not in ds and "ModalityLUTSequence" in ds:
            hu[k] = apply_modality_lut(arr, ds)
            continue
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        out = hu[k]
        out[...] = arr
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)
    return hu


def read_series(folder: Path, series_uid: str | None = None) -> CTVolume:
    """Read one CT series under ``folder`` (searched recursively) as a HU volume.

    Works on the series folder itself or on any folder above it (patient,
    study). Headers are read once; pixel data only for the chosen series.

    Args:
        folder: folder holding the DICOM files (at any depth).
        series_uid: SeriesInstanceUID to read; needed when the folder holds
            several series.

    Returns:
        :class:`CTVolume` with ``hu`` ``[z, y, x]`` float32 and its geometry
        (see the module docstring for the conventions).

    Raises (all subclasses of :class:`~lidc_det.errors.InvalidSeriesError`,
    message ``"<file or folder>: <reason>"``):
        EmptySeriesError: folder missing, or no DICOM file in it.
        MultipleSeriesError: several series and no ``series_uid``.
        SeriesNotFoundError: ``series_uid`` not found.
        NotCTError: a slice's Modality is not CT.
        UnsupportedDicomError: multi-frame or colour images.
        TooFewSlicesError: fewer than 2 slices.
        InvalidSpacingError: PixelSpacing missing or <= 0, or zero slice spacing.
        InvalidOrientationError: malformed ImageOrientationPatient.
        InconsistentSeriesError: slices disagree on orientation, size or pixel spacing.
        DuplicateSliceError: two slices at the same position.
        MissingSlicesError: a gap > 1.5 x the median slice spacing.
        TruncatedPixelDataError / PixelDataError: pixel data short, missing or undecodable.

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
    headers = _read_headers(files, defer_size="64 KB")
    if not headers:
        raise EmptySeriesError(folder, f"no DICOM files ({len(files)} other files skipped)")
    uid, members = _select_series(folder, _group(headers), series_uid)
    series_folder = _common_folder([p for p, _ in members])

    _check_slices(uid, members, series_folder)
    iop, pixel_spacing, shape_yx = _check_consistency(members)
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

    order, ipp_sorted, z_spacing = _order_by_position(members, normal, series_folder)
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
