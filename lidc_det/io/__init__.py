"""Reading and writing images: DICOM series (:mod:`lidc_det.io.dicom`,
:mod:`lidc_det.io.dicom_write`).

The names below are loaded on first use, so ``import lidc_det.io`` does not import pydicom.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "CTVolume": "lidc_det.io.dicom",
    "SeriesInfo": "lidc_det.io.dicom",
    "find_series": "lidc_det.io.dicom",
    "read_series": "lidc_det.io.dicom",
    "write_ct_series": "lidc_det.io.dicom_write",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lidc_det.io' has no attribute {name!r}")
