"""The one box format of lidc-det, and converters to the others.

**Internal format** ("voxel box"): float array ``(N, 6)`` =
``z0, y0, x0, z1, y1, x1`` in voxel units, **ends exclusive**, so that for
integer values the box covers ``array[z0:z1, y0:y1, x0:x1]``. In the voxel
coordinates of :mod:`lidc_det.geometry` (voxel centres at integers) the box's
physical extent along z is ``[z0 - 0.5, z1 - 0.5]`` and its centre is
``(z0 + z1 - 1) / 2``.

Masks: :func:`mask_to_box` (one mask), :func:`label_boxes` (every label of a
label array), :func:`box_slices` (a box, with a margin, as index slices).

Converters:

* :func:`boxes_to_center_size` / :func:`center_size_to_boxes`: voxel centre
  (z, y, x, voxel coordinates) + size (voxels).
* :func:`boxes_to_world` / :func:`world_to_boxes`: world LPS centre (x, y, z mm)
  + size (x, y, z mm), for axis-aligned geometries.
* :func:`to_monai_boxes` / :func:`from_monai_boxes`: MONAI ``apps.detection``
  boxes for an image whose spatial axes are ordered like our arrays
  (z, y, x), in MONAI's continuous coordinates (voxel centres at integers,
  so a box's MONAI corners are ours minus 0.5).
"""

from __future__ import annotations

import numpy as np

from lidc_det.geometry import VolumeGeometry


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim == 1:
        b = b[None, :]
    if b.ndim != 2 or b.shape[1] != 6:
        raise ValueError(f"boxes must have shape (N, 6) = z0,y0,x0,z1,y1,x1; got {b.shape}")
    if np.any(b[:, 3:] < b[:, :3]):
        raise ValueError("boxes must satisfy z1 >= z0, y1 >= y0, x1 >= x0")
    return b


def boxes_to_center_size(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel boxes ``(N, 6)`` -> (centres ``(N, 3)`` voxel z,y,x; sizes ``(N, 3)`` voxels)."""
    b = _as_boxes(boxes)
    return (b[:, :3] + b[:, 3:] - 1.0) / 2.0, b[:, 3:] - b[:, :3]


def center_size_to_boxes(centers_zyx: np.ndarray, sizes_zyx: np.ndarray) -> np.ndarray:
    """Inverse of :func:`boxes_to_center_size`; returns ``(N, 6)`` voxel boxes."""
    c = np.atleast_2d(np.asarray(centers_zyx, dtype=np.float64))
    s = np.atleast_2d(np.asarray(sizes_zyx, dtype=np.float64))
    if np.any(s < 0):
        raise ValueError("box sizes must be >= 0")
    lo = c - (s - 1.0) / 2.0
    return np.concatenate([lo, lo + s], axis=1)


def _require_axis_aligned(geometry: VolumeGeometry) -> np.ndarray:
    if not geometry.is_axis_aligned:
        raise ValueError("world boxes need an axis-aligned geometry (oblique direction given)")
    return np.abs(geometry.direction_matrix)


def boxes_to_world(boxes: np.ndarray, geometry: VolumeGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Voxel boxes -> (world centres ``(N, 3)`` x,y,z mm; world sizes ``(N, 3)`` x,y,z mm)."""
    perm = _require_axis_aligned(geometry)
    centers, sizes = boxes_to_center_size(boxes)
    size_index_mm_xyz = sizes[:, ::-1] * np.asarray(geometry.spacing_xyz)
    return geometry.voxel_to_world(centers).reshape(-1, 3), size_index_mm_xyz @ perm.T


def world_to_boxes(
    centers_xyz: np.ndarray, sizes_xyz_mm: np.ndarray, geometry: VolumeGeometry
) -> np.ndarray:
    """World centres (x,y,z mm) and sizes (x,y,z mm, or ``(N,)`` diameters for cubes) -> voxel boxes."""
    perm = _require_axis_aligned(geometry)
    centers = np.atleast_2d(np.asarray(centers_xyz, dtype=np.float64))
    sizes = np.asarray(sizes_xyz_mm, dtype=np.float64)
    if sizes.ndim == 2 and sizes.shape == (centers.shape[0], 3):
        pass
    elif sizes.ndim <= 1 and sizes.size in (1, centers.shape[0]):
        sizes = np.repeat(np.broadcast_to(sizes.reshape(-1), (centers.shape[0],))[:, None], 3, axis=1)
    else:
        raise ValueError(
            f"sizes must be (N, 3) mm or (N,) diameters for N={centers.shape[0]} centres, got {sizes.shape}"
        )
    size_index_xyz = (sizes @ perm) / np.asarray(geometry.spacing_xyz)
    return center_size_to_boxes(geometry.world_to_voxel(centers).reshape(-1, 3), size_index_xyz[:, ::-1])


def clip_boxes(boxes: np.ndarray, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """Clip voxel boxes to ``[0, shape)`` along each axis."""
    b = _as_boxes(boxes).copy()
    hi = np.asarray(shape_zyx, dtype=np.float64)
    b[:, :3] = np.clip(b[:, :3], 0.0, hi)
    b[:, 3:] = np.clip(b[:, 3:], 0.0, hi)
    return b


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight voxel box ``(6,)`` (float, ends exclusive) around the non-zero voxels of a ``[z, y, x]`` mask.

    The one mask-to-box of lidc-det; ``array[box_slices(box, array.shape)]`` is the
    tight crop. (Any number of axes works alike: ``(2 * ndim,)`` for an n-d mask.)

    Raises:
        ValueError: the mask has no non-zero voxel.
    """
    m = np.asarray(mask)
    lo, hi = [], []
    for ax in range(m.ndim):
        nz = np.flatnonzero(m.any(axis=tuple(j for j in range(m.ndim) if j != ax)))
        if nz.size == 0:
            raise ValueError("mask is empty: no box")
        lo.append(int(nz[0]))
        hi.append(int(nz[-1]) + 1)
    return np.array(lo + hi, dtype=np.float64)


def label_boxes(labels: np.ndarray, n_labels: int | None = None) -> np.ndarray:
    """Tight voxel boxes ``(N, 6)`` of the labels ``1 .. N`` of an integer ``[z, y, x]`` label array.

    Row ``i`` is the box of label ``i + 1`` (scipy's ``ndimage.find_objects``, one pass
    for all labels); a label without voxels gets the empty box of zeros. ``N`` is
    ``n_labels`` or the largest label.
    """
    from scipy import ndimage as ndi

    lab = np.asarray(labels)
    objs = ndi.find_objects(lab, max_label=int(n_labels or 0))
    n = len(objs) if not n_labels else int(n_labels)
    out = np.zeros((n, 2 * lab.ndim), dtype=np.float64)
    for i, o in enumerate(objs):
        if o is not None:
            out[i] = [s.start for s in o] + [s.stop for s in o]
    return out


def box_slices(box: np.ndarray, shape: tuple[int, ...], margin: int | tuple[int, ...] = 0) -> tuple[slice, ...]:
    """Index slices of one voxel box grown by ``margin`` voxels on each side, clipped to ``[0, shape)``.

    ``margin``: an int, or one per axis (z, y, x). Fractional box corners are
    widened to whole voxels (floor of the start, ceiling of the end).
    """
    b = np.asarray(box, dtype=np.float64).ravel()
    nd = len(b) // 2
    if len(b) != 2 * nd or nd != len(shape):
        raise ValueError(f"box_slices: box {b.tolist()} does not fit an array of shape {tuple(shape)}")
    mg = np.broadcast_to(np.asarray(margin, dtype=int), (nd,))
    lo = np.floor(b[:nd]).astype(int) - mg
    hi = np.ceil(b[nd:]).astype(int) + mg
    return tuple(slice(max(0, int(a)), min(int(n), int(c))) for a, c, n in zip(lo, hi, shape))


def box_volume(boxes: np.ndarray) -> np.ndarray:
    """Volume of each voxel box in voxels, ``(N,)``."""
    b = _as_boxes(boxes)
    return np.prod(b[:, 3:] - b[:, :3], axis=1)


def to_monai_boxes(boxes: np.ndarray, mode: str = "xyzxyz") -> np.ndarray:
    """Voxel boxes -> MONAI boxes in ``mode`` ("xyzxyz", "xxyyzz" or "cccwhd").

    MONAI names the spatial axes x, y, z in the order of the image's spatial
    dimensions; for our ``[z, y, x]`` arrays MONAI's "x" is our z.
    """
    from monai.data.box_utils import convert_box_mode

    b = _as_boxes(boxes) - np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    return np.asarray(convert_box_mode(b, src_mode="xyzxyz", dst_mode=mode))


def from_monai_boxes(boxes: np.ndarray, mode: str = "xyzxyz") -> np.ndarray:
    """Inverse of :func:`to_monai_boxes`."""
    from monai.data.box_utils import convert_box_mode

    b = np.asarray(convert_box_mode(np.asarray(boxes, dtype=np.float64), src_mode=mode, dst_mode="xyzxyz"))
    return _as_boxes(b + 0.5)
