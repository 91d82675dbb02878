"""Exceptions raised on bad input. Each names the file or folder and the reason."""

from __future__ import annotations

from pathlib import Path


class LidcDetError(Exception):
    """Base class of lidc-det's own errors."""


class InvalidSeriesError(LidcDetError):
    """A DICOM folder or series cannot be read as one CT volume.

    ``str(err)`` is ``"<path>: <reason>"``; ``err.path`` and ``err.reason`` hold the parts.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # keeps the error picklable (it crosses process boundaries in parallel workers)
        return (type(self), (self.path, self.reason))


class EmptySeriesError(InvalidSeriesError):
    """The folder does not exist or holds no DICOM files."""


class MultipleSeriesError(InvalidSeriesError):
    """Several series were found and none was chosen (the reason lists UIDs and slice counts)."""


class SeriesNotFoundError(InvalidSeriesError):
    """The requested SeriesInstanceUID is not in the folder."""


class NotCTError(InvalidSeriesError):
    """A slice's Modality is not ``CT``."""


class TooFewSlicesError(InvalidSeriesError):
    """The series has fewer than 2 slices, so it is not a volume."""


class InconsistentSeriesError(InvalidSeriesError):
    """Slices disagree on ImageOrientationPatient, Rows/Columns or PixelSpacing."""


class InvalidOrientationError(InvalidSeriesError):
    """ImageOrientationPatient is malformed (not two orthogonal unit vectors)."""


class InvalidSpacingError(InvalidSeriesError):
    """PixelSpacing is missing, zero or negative, or slices have zero spacing."""


class DuplicateSliceError(InvalidSeriesError):
    """Two slices sit at the same position (or share an InstanceNumber)."""


class MissingSlicesError(InvalidSeriesError):
    """A gap between consecutive slices is larger than 1.5 x the median spacing."""


class UnsupportedDicomError(InvalidSeriesError):
    """Valid DICOM this reader does not handle (multi-frame, colour, ...)."""


class PixelDataError(InvalidSeriesError):
    """Pixel data is missing or cannot be decoded."""


class TruncatedPixelDataError(PixelDataError):
    """Pixel data is shorter than Rows * Columns * BitsAllocated / 8 bytes."""


class InvalidRescaleError(InvalidSeriesError):
    """RescaleSlope / RescaleIntercept is missing, zero, negative or not a number.

    Both are required for CT: reading a missing intercept as 0 shifts every HU by the
    scanner's offset (typically +1024), so the reader refuses instead of guessing.
    """


class MissingTagError(InvalidSeriesError):
    """A DICOM attribute the volume needs is missing (SOPInstanceUID, ImagePositionPatient
    on some slices, or positions / orientation where the caller requires them)."""


class DuplicateInstanceError(InvalidSeriesError):
    """Two files of the series share a SOPInstanceUID (annotations keyed by it would be ambiguous)."""


class DamagedFileError(InvalidSeriesError):
    """A file among the series' slices cannot be read or parsed (unreadable, empty,
    truncated header, no SeriesInstanceUID): the series may be missing that slice."""


class AnnotationError(LidcDetError):
    """LIDC annotations are missing or inconsistent with the images."""


class DatasetError(LidcDetError):
    """A prepared data set folder is missing files or was made by another version."""


class ConfigError(LidcDetError, ValueError):
    """A config file or mapping is invalid: missing file, not YAML, unknown / missing /
    mistyped key or a bad value. The message starts with the file (and key) at fault."""


class CheckpointError(LidcDetError):
    """A checkpoint file is missing, unreadable, or not of the expected kind.

    ``str(err)`` is ``"<path>: <reason>"``; ``err.path`` and ``err.reason`` hold the parts.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        return (type(self), (self.path, self.reason))


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled Python objects other than tensors and plain types, whose
    loading could run arbitrary code; it is refused, not unpickled."""
