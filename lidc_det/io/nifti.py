"""NIfTI export of prepared scans (opens in ITK-SNAP and 3D Slicer).

SimpleITK writes the LPS geometry as a correct NIfTI (RAS) sform/qform.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lidc_det.atomic import write_with
from lidc_det.geometry import VolumeGeometry

if TYPE_CHECKING:
    from lidc_det.data.prepared import PreparedCase


def write_nifti(array_zyx: np.ndarray, geometry: VolumeGeometry, path: Path) -> Path:
    """Write a ``[z, y, x]`` array with its geometry to ``path`` (``.nii`` or ``.nii.gz``), atomically."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: NIfTI file names end with .nii or .nii.gz")
    image = geometry.to_sitk(np.ascontiguousarray(array_zyx))
    write_with(path, lambda p: sitk.WriteImage(image, str(p), useCompression=True))
    return path


def read_nifti(path: Path) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a NIfTI file into a ``[z, y, x]`` array and its LPS geometry."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), VolumeGeometry.from_sitk(image)


def export_case_nifti(case: PreparedCase, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<uid>_image.nii.gz`` (int16 HU) and ``<uid>_labels.nii.gz`` (uint8 label map)."""
    out_dir = Path(out_dir)
    image = write_nifti(np.asarray(case.image_hu), case.geometry, out_dir / f"{case.series_uid}_image.nii.gz")
    labels = write_nifti(np.asarray(case.labels), case.geometry, out_dir / f"{case.series_uid}_labels.nii.gz")
    return image, labels
