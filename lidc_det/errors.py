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


class AnnotationError(LidcDetError):
    """LIDC annotations are missing or inconsistent with the images."""


class DatasetError(LidcDetError):
    """A prepared data set folder is missing files or was made by another version."""
