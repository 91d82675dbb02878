"""Resampling of CT volumes and binary masks onto new voxel grids (SimpleITK).

Images use linear interpolation. Binary masks are resampled as float with
linear interpolation and thresholded at 0.5 (what nnU-Net does with one-hot
segmentations); this keeps thin-slice masks smooth where nearest neighbour
would make them blocky, and is equivalent to nearest for grids that align.
"""

from __future__ import annotations

import numpy as np

from lidc_det.geometry import VolumeGeometry

AIR_HU = -1024.0


def resample_to_geometry(
    array_zyx: np.ndarray,
    geometry: VolumeGeometry,
    target: VolumeGeometry,
    *,
    interpolator: str = "linear",
    default_value: float = AIR_HU,
) -> np.ndarray:
    """Resample ``array_zyx`` (on ``geometry``) onto the grid of ``target``.

    Args:
        array_zyx: ``[z, y, x]`` array, shape ``geometry.shape_zyx``.
        interpolator: "linear", "bspline" or "nearest".
        default_value: value for target voxels outside the source volume.

    Returns:
        float32 ``[z, y, x]`` array of shape ``target.shape_zyx``
        (the source dtype for "nearest").
    """
    import SimpleITK as sitk

    interp = {
        "linear": sitk.sitkLinear,
        "bspline": sitk.sitkBSpline,
        "nearest": sitk.sitkNearestNeighbor,
    }.get(interpolator)
    if interp is None:
        raise ValueError(f"interpolator must be linear, bspline or nearest; got {interpolator!r}")
    src = np.asarray(array_zyx)
    if interpolator != "nearest":
        src = src.astype(np.float32, copy=False)
    image = geometry.to_sitk(src)
    ref = target.to_sitk(np.zeros(target.shape_zyx, dtype=np.uint8))
    out = sitk.Resample(image, ref, sitk.Transform(), interp, float(default_value), image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def resample_image(
    hu: np.ndarray, geometry: VolumeGeometry, spacing_zyx: tuple[float, float, float]
) -> tuple[np.ndarray, VolumeGeometry]:
    """Linear resampling of a HU volume to ``spacing_zyx`` mm, same field of view.

    Returns the float32 ``[z, y, x]`` HU array and its geometry
    (:meth:`VolumeGeometry.with_spacing`).
    """
    target = geometry.with_spacing(spacing_zyx)
    return resample_to_geometry(hu, geometry, target, interpolator="linear"), target


def resample_mask(
    mask: np.ndarray, geometry: VolumeGeometry, target: VolumeGeometry, *, margin_vox: int = 2
) -> np.ndarray:
    """Resample a binary ``[z, y, x]`` mask onto ``target`` (linear on float, >= 0.5).

    Only the bounding box of the mask (plus ``margin_vox``) is resampled, so a
    small nodule in a large volume costs little. Returns a bool array of shape
    ``target.shape_zyx``.
    """
    from lidc_det.boxes import mask_to_box

    out = np.zeros(target.shape_zyx, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return out
    box = mask_to_box(mask).astype(int)
    lo = np.maximum(box[:3] - margin_vox, 0)
    hi = np.minimum(box[3:] + margin_vox, np.asarray(geometry.shape_zyx))
    crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32)
    crop_geom = VolumeGeometry(
        crop.shape, geometry.spacing_zyx, tuple(geometry.voxel_to_world(lo.astype(float))), geometry.direction  # type: ignore[arg-type]
    )
    # the target sub-grid covering the crop's corners
    corners = np.array(
        [[z, y, x] for z in (lo[0] - 0.5, hi[0] - 0.5) for y in (lo[1] - 0.5, hi[1] - 0.5) for x in (lo[2] - 0.5, hi[2] - 0.5)]
    )
    tvox = target.world_to_voxel(geometry.voxel_to_world(corners))
    tlo = np.clip(np.floor(tvox.min(axis=0)).astype(int), 0, np.asarray(target.shape_zyx))
    thi = np.clip(np.ceil(tvox.max(axis=0)).astype(int) + 1, 0, np.asarray(target.shape_zyx))
    if np.any(thi <= tlo):
        return out
    sub_geom = VolumeGeometry(
        tuple(thi - tlo), target.spacing_zyx, tuple(target.voxel_to_world(tlo.astype(float))), target.direction  # type: ignore[arg-type]
    )
    sub = resample_to_geometry(crop, crop_geom, sub_geom, interpolator="linear", default_value=0.0)
    out[tlo[0] : thi[0], tlo[1] : thi[1], tlo[2] : thi[2]] = sub >= 0.5
    return out
