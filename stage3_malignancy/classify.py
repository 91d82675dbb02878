"""Classify the nodules of one scan: image (DICOM series or NIfTI) + nodule masks + a saved model.

Used by ``lidc-det classify``. Masks are NIfTI files on the image's voxel grid
(same shape; e.g. written by :func:`lidc_det.io.nifti.write_nifti` or stage 2):
every distinct non-zero value of a file is one nodule, so a binary mask holds
one nodule and a label map several.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import LidcDetError
from lidc_det.results import MalignancyScore

__all__ = ["ClassifyError", "classify_scan", "load_image", "read_masks"]


class ClassifyError(LidcDetError):
    """Bad input to ``classify`` (names the file and the reason)."""


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def load_image(path: str | Path) -> tuple[np.ndarray, Any, str, str]:
    """``(hu [z, y, x], VolumeGeometry, series_uid, patient_id)`` of a DICOM folder or a NIfTI file.

    For NIfTI the file name (without ``.nii[.gz]``) serves as series uid and patient id.
    """
    path = Path(path)
    if path.is_dir():
        from lidc_det.io.dicom import read_series

        vol = read_series(path)
        return vol.hu, vol.geometry, vol.series_uid, vol.patient_id
    if path.is_file() and _is_nifti(path):
        from lidc_det.io.nifti import read_nifti

        arr, geom = read_nifti(path)
        stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
        return np.asarray(arr, dtype=np.float32), geom, stem, stem
    raise ClassifyError(f"{path}: neither a DICOM series folder nor a .nii / .nii.gz file")


def read_masks(paths: Sequence[str | Path], shape_zyx: tuple[int, ...]) -> tuple[list[np.ndarray], list[str]]:
    """Nodule masks from NIfTI files: one bool ``[z, y, x]`` mask per distinct non-zero value.

    Returns:
        ``(masks, names)``; ``names[i]`` = ``"<file stem>:<value>"``.

    Raises:
        ClassifyError: unreadable file, other shape than the image, or no nodule in a file.
    """
    from lidc_det.io.nifti import read_nifti

    masks: list[np.ndarray] = []
    names: list[str] = []
    for p in map(Path, paths):
        if not p.is_file() or not _is_nifti(p):
            raise ClassifyError(f"{p}: mask must be an existing .nii / .nii.gz file")
        try:
            arr, _ = read_nifti(p)
        except RuntimeError as err:  # SimpleITK
            raise ClassifyError(f"{p}: cannot read the mask ({err})") from err
        if tuple(arr.shape) != tuple(shape_zyx):
            raise ClassifyError(f"{p}: mask shape {tuple(arr.shape)} != image shape {tuple(shape_zyx)} "
                                "(masks must be on the image's voxel grid)")
        values = [v for v in np.unique(arr) if v != 0]
        if not values:
            raise ClassifyError(f"{p}: the mask is empty")
        stem = p.name.split(".nii")[0]
        for v in values:
            masks.append(arr == v)
            names.append(f"{stem}:{int(v) if float(v).is_integer() else v}")
    return masks, names


def classify_scan(
    image: str | Path, masks: Sequence[str | Path], model: str | Path | Any
) -> list[MalignancyScore]:
    """Malignancy probability of every nodule mask on one scan.

    Args:
        image: DICOM series folder or NIfTI file (HU).
        masks: NIfTI mask files on the image grid (see module docstring).
        model: a saved model folder (:meth:`MalignancyModel.save`) or a fitted
            :class:`~stage3_malignancy.model.MalignancyModel`.

    Returns:
        One :class:`lidc_det.results.MalignancyScore` per nodule, ``nodule_id`` = ``"<mask file>:<value>"``.
    """
    from stage3_malignancy.model import MalignancyModel
    from stage3_malignancy.samples import samples_from_volume

    m = model if isinstance(model, MalignancyModel) else MalignancyModel.load(model)
    hu, geom, series_uid, patient_id = load_image(image)
    nodule_masks, names = read_masks(masks, hu.shape)
    samples = samples_from_volume(hu, geom, nodule_masks, series_uid=series_uid, patient_id=patient_id,
                                  nodule_ids=names)
    return m.predict(samples)
