"""lidc-det core: geometry, boxes, DICOM/NIfTI I/O, LIDC annotations, data sets, metrics, CLI.

Importing this package is cheap: heavy dependencies (SimpleITK, pylidc, torch,
nnU-Net, MONAI) are imported inside the functions that need them.
"""

from lidc_det.geometry import GeometryError, VolumeGeometry

__version__ = "0.1.0"
__all__ = ["GeometryError", "VolumeGeometry", "__version__"]
