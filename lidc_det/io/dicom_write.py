"""Write a HU volume as a CT DICOM series (one file per z slice).

The files are CT Image Storage instances in explicit VR little endian, int16
pixels with RescaleSlope/RescaleIntercept, and the geometry tags
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing, ...) set from a
:class:`~lidc_det.geometry.VolumeGeometry` so that
:func:`lidc_det.io.dicom.read_series`, SimpleITK (GDCM) and pylidc read back
the same array and geometry:

* ImageOrientationPatient = (x index axis, y index axis) = direction columns 0 and 1;
* PixelSpacing = (spacing y, spacing x) (DICOM: row spacing, then column spacing);
* ImagePositionPatient of slice k = origin + k * spacing_z * (direction column 2);
* InstanceNumber = k + 1; SliceLocation = ImagePositionPatient . slice normal.

DICOM readers stack slices along ``row x column``, so the direction must be
right-handed (column 2 = column 0 x column 1); flip the z axis of a
left-handed volume before writing it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.geometry import GeometryError, VolumeGeometry

__all__ = ["write_ct_series"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_INT16_MIN, _INT16_MAX = -32768, 32767
_DEFAULT_INTERCEPT = -1024.0


def _check_uid(name: str, uid: str) -> str:
    uid = str(uid)
    if len(uid) > 64 or not _UID_RE.match(uid):
        raise ValueError(f"{name} is not a valid DICOM UID (digits and dots, <= 64 chars): {uid!r}")
    return uid


def _ds(value: float) -> Any:
    """A DS (decimal string) value that fits the 16-character limit."""
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def _rescale(lo: float, hi: float) -> tuple[float, float]:
    """(slope, intercept) so that ``round((hu - intercept) / slope)`` fits int16 for HU in [lo, hi].

    Slope 1 and intercept -1024 whenever the HU range allows (the usual CT
    encoding); otherwise an intercept centred on the range, and a slope > 1
    only when the range exceeds 65535 HU.
    """
    if round(lo) - _DEFAULT_INTERCEPT >= _INT16_MIN and round(hi) - _DEFAULT_INTERCEPT <= _INT16_MAX:
        return 1.0, _DEFAULT_INTERCEPT
    intercept = float(round((lo + hi) / 2))
    slope = max(1.0, (hi - lo) / (_INT16_MAX - _INT16_MIN - 2))
    return slope, intercept


def write_ct_series(
    hu: np.ndarray,
    geometry: VolumeGeometry,
    out_dir: Path,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    slice_thickness_mm: float | None = None,
    sop_uid_prefix: str | None = None,
    file_name: Callable[[int], str] = lambda i: f"{i + 1:06d}.dcm",
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``hu`` as one CT DICOM file per z slice into ``out_dir``.

    Args:
        hu: ``[z, y, x]`` Hounsfield units (any real dtype, finite); stored as
            int16 with RescaleSlope 1 / RescaleIntercept -1024 when the range
            allows (so values are rounded to whole HU).
        geometry: geometry of ``hu`` (shape must match; direction right-handed).
        out_dir: created if needed; existing files with the same names are replaced.
        patient_id: PatientID (also used as PatientName).
        study_uid, series_uid: StudyInstanceUID and SeriesInstanceUID.
        slice_thickness_mm: SliceThickness; default the z spacing.
        sop_uid_prefix: SOPInstanceUID of slice k is ``f"{prefix}.{k + 1}"``; by
            default a UID derived deterministically from ``series_uid`` and k.
        file_name: file name of slice k (a plain name, no folders).
        extra: more attributes set on every slice by DICOM keyword (e.g.
            ``{"Manufacturer": "x", "StudyDate": "20000101"}``); applied last,
            so they override the defaults.

    Returns:
        The written files, in z order (slice 0 first).

    Raises:
        ValueError: bad shape, non-finite values, invalid UID, file name or keyword.
        GeometryError: left-handed direction.
    """
    from pydicom.datadict import tag_for_keyword
    from pydicom.uid import generate_uid

    hu = np.asarray(hu)
    if hu.ndim != 3 or hu.shape != geometry.shape_zyx:
        raise ValueError(f"hu shape {hu.shape} does not match geometry shape {geometry.shape_zyx}")
    if not (np.issubdtype(hu.dtype, np.integer) or np.issubdtype(hu.dtype, np.floating)):
        raise ValueError(f"hu must be real numbers, got dtype {hu.dtype}")
    lo, hi = float(np.min(hu)), float(np.max(hu))  # NaN or inf anywhere shows up here
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("hu must be finite real numbers")
    m = geometry.direction_matrix
    if float(np.cross(m[:, 0], m[:, 1]) @ m[:, 2]) <= 0:
        raise GeometryError(
            "direction is left-handed (z axis = -(x axis x y axis)); DICOM readers would stack the "
            "slices the other way: flip the z axis of the volume (and the direction column 2) first"
        )
    study_uid = _check_uid("study_uid", study_uid)
    series_uid = _check_uid("series_uid", series_uid)
    nz, ny, nx = geometry.shape_zyx
    if sop_uid_prefix is not None:
        prefix = str(sop_uid_prefix).rstrip(".")
        sop_uids = [_check_uid("sop_uid_prefix + slice number", f"{prefix}.{k + 1}") for k in range(nz)]
    else:
        sop_uids = [str(generate_uid(entropy_srcs=[series_uid, "slice", str(k)])) for k in range(nz)]
    names = [file_name(k) for k in range(nz)]
    for name in names:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"file_name must give a plain, non-hidden file name, got {name!r}")
    if len(set(names)) != nz:
        raise ValueError("file_name gives the same name to two slices")
    extra = dict(extra or {})
    for keyword in extra:
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"extra: {keyword!r} is not a DICOM keyword")

    slope, intercept = _rescale(lo, hi)

    row, col, normal = m[:, 0], m[:, 1], m[:, 2]
    dz = geometry.spacing_zyx[0]
    origin = np.asarray(geometry.origin_xyz)
    frame_uid = str(generate_uid(entropy_srcs=[study_uid, series_uid, "frame-of-reference"]))
    thickness = float(slice_thickness_mm) if slice_thickness_mm is not None else dz
    common = {
        "slope": slope,
        "intercept": intercept,
        "row": row,
        "col": col,
        "patient_id": str(patient_id),
        "study_uid": study_uid,
        "series_uid": series_uid,
        "frame_uid": frame_uid,
        "thickness": thickness,
        "spacing_yx": geometry.spacing_zyx[1:],
        "shape_yx": (ny, nx),
    }

    from lidc_det.atomic import write_with

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(nz):
        position = origin + k * dz * normal
        stored = np.rint((hu[k].astype(np.float64) - intercept) / slope)
        stored = np.clip(stored, _INT16_MIN, _INT16_MAX).astype("<i2")
        ds = _slice_dataset(stored, k, position, float(position @ normal), sop_uids[k], common)
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        path = out_dir / names[k]
        write_with(path, partial(_save, ds))
        paths.append(path)
    return paths


def _save(ds: Any, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def _slice_dataset(
    pixels: np.ndarray, k: int, position: np.ndarray, location: float, sop_uid: str, c: dict[str, Any]
) -> Any:
    """The pydicom Dataset of slice ``k`` (``pixels``: ``[y, x]`` int16 stored values)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

    from lidc_det import __version__

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = f"LIDC_DET_{__version__}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "lidc-det"
    ds.ReferringPhysicianName = ""
    ds.PatientName = c["patient_id"]
    ds.PatientID = c["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.KVP = ""
    ds.SliceThickness = _ds(c["thickness"])
    ds.StudyInstanceUID = c["study_uid"]
    ds.SeriesInstanceUID = c["series_uid"]
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*c["row"], *c["col"])]
    ds.FrameOfReferenceUID = c["frame_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(location)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = c["shape_yx"]
    ds.PixelSpacing = [_ds(v) for v in c["spacing_yx"]]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = _ds(-600)
    ds.WindowWidth = _ds(1500)
    ds.RescaleIntercept = _ds(c["intercept"])
    ds.RescaleSlope = _ds(c["slope"])
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds
