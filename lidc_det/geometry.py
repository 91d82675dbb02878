"""Volume geometry and every voxel <-> world conversion in lidc-det.

Conventions (the only place they are defined):

* Arrays are indexed ``[z, y, x]`` (slice, row, column).
* Voxel coordinates are ``(z, y, x)`` floats where integer values are voxel
  *centres*: voxel ``(k, j, i)`` is centred at voxel coordinate ``(k, j, i)``.
* World coordinates are ``(x, y, z)`` in millimetres in the DICOM patient
  system (LPS: +x towards the patient's left, +y posterior, +z superior).
  LUNA16 CSVs use the same order and system.
* ``origin_xyz`` is the world position of the centre of voxel ``(0, 0, 0)``.
* ``direction`` is the 3x3 matrix whose *columns* are the world unit vectors of
  the x (column), y (row) and z (slice) index axes, exactly as SimpleITK's
  ``GetDirection()`` (row-major) and DICOM ``ImageOrientationPatient`` +
  slice normal define it.

    world_xyz = origin_xyz + direction @ (spacing_xyz * index_xyz)

Boxes are handled in :mod:`lidc_det.boxes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # SimpleITK is imported lazily at run time
    import SimpleITK as sitk

Triple = tuple[float, float, float]
IDENTITY: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class GeometryError(ValueError):
    """A geometry is not usable (bad spacing, singular direction, ...)."""


@dataclass(frozen=True)
class VolumeGeometry:
    """Where a ``[z, y, x]`` voxel array sits in the patient (LPS, mm).

    Attributes:
        shape_zyx: array shape ``(nz, ny, nx)`` in voxels.
        spacing_zyx: voxel size in mm along z, y, x (all > 0).
        origin_xyz: world LPS position (mm) of the centre of voxel (0, 0, 0).
        direction: 9 floats, row-major 3x3; column ``c`` is the world unit
            vector of index axis ``c`` with axes ordered (x, y, z).
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx: Triple
    origin_xyz: Triple
    direction: tuple[float, ...] = field(default=IDENTITY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape_zyx", tuple(int(v) for v in self.shape_zyx))
        object.__setattr__(self, "spacing_zyx", tuple(float(v) for v in self.spacing_zyx))
        object.__setattr__(self, "origin_xyz", tuple(float(v) for v in self.origin_xyz))
        object.__setattr__(self, "direction", tuple(float(v) for v in np.ravel(self.direction)))
        if len(self.shape_zyx) != 3 or min(self.shape_zyx) < 1:
            raise GeometryError(f"shape_zyx must be 3 positive ints, got {self.shape_zyx}")
        if len(self.spacing_zyx) != 3 or not all(
            math.isfinite(s) and s > 0 for s in self.spacing_zyx
        ):
            raise GeometryError(f"spacing_zyx must be 3 positive finite mm, got {self.spacing_zyx}")
        if len(self.origin_xyz) != 3 or not all(math.isfinite(o) for o in self.origin_xyz):
            raise GeometryError(f"origin_xyz must be 3 finite mm, got {self.origin_xyz}")
        if len(self.direction) != 9:
            raise GeometryError(f"direction must have 9 entries, got {len(self.direction)}")
        det = float(np.linalg.det(self.direction_matrix))
        if not math.isclose(abs(det), 1.0, abs_tol=1e-3):
            raise GeometryError(f"direction must be orthonormal (|det| = 1), got det = {det:.4f}")

    # ------------------------------------------------------------------ views
    @property
    def direction_matrix(self) -> np.ndarray:
        """(3, 3) float64; column c = world unit vector of index axis c (x, y, z)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def spacing_xyz(self) -> Triple:
        """Voxel size in mm in (x, y, z) index-axis order."""
        z, y, x = self.spacing_zyx
        return (x, y, z)

    @property
    def extent_mm_zyx(self) -> Triple:
        """Physical size of the volume along z, y, x in mm (shape * spacing)."""
        return tuple(n * s for n, s in zip(self.shape_zyx, self.spacing_zyx))  # type: ignore[return-value]

    @property
    def is_axis_aligned(self) -> bool:
        """True when every index axis is parallel to a world axis (a signed permutation)."""
        m = np.abs(self.direction_matrix)
        return bool(np.allclose(np.sort(m, axis=0)[:-1], 0.0, atol=1e-6))

    # ------------------------------------------------------------ conversions
    def voxel_to_world(self, points_zyx: np.ndarray) -> np.ndarray:
        """Voxel coordinates ``(N, 3)`` (z, y, x) -> world LPS mm ``(N, 3)`` (x, y, z).

        A single point of shape ``(3,)`` gives a ``(3,)`` result.
        """
        pts = np.asarray(points_zyx, dtype=np.float64)
        single = pts.ndim == 1
        pts = np.atleast_2d(pts)
        if pts.shape[-1] != 3:
            raise ValueError(f"points must have 3 coordinates (z, y, x), got shape {pts.shape}")
        index_xyz = pts[:, ::-1] * np.asarray(self.spacing_xyz)
        world = index_xyz @ self.direction_matrix.T + np.asarray(self.origin_xyz)
        return world[0] if single else world

    def world_to_voxel(self, points_xyz: np.ndarray) -> np.ndarray:
        """World LPS mm ``(N, 3)`` (x, y, z) -> voxel coordinates ``(N, 3)`` (z, y, x), float."""
        pts = np.asarray(points_xyz, dtype=np.float64)
        single = pts.ndim == 1
        pts = np.atleast_2d(pts)
        if pts.shape[-1] != 3:
            raise ValueError(f"points must have 3 coordinates (x, y, z), got shape {pts.shape}")
        # direction is orthonormal, so its inverse is its transpose
        index_xyz = (pts - np.asarray(self.origin_xyz)) @ self.direction_matrix
        index_xyz = index_xyz / np.asarray(self.spacing_xyz)
        vox = index_xyz[:, ::-1]
        return vox[0] if single else vox

    def contains_voxel(self, points_zyx: np.ndarray) -> np.ndarray:
        """Boolean ``(N,)``: the voxel coordinate rounds to a voxel inside the array."""
        pts = np.atleast_2d(np.asarray(points_zyx, dtype=np.float64))
        idx = np.rint(pts)
        return np.all((idx >= 0) & (idx < np.asarray(self.shape_zyx)), axis=1)

    def with_spacing(self, spacing_zyx: Triple) -> VolumeGeometry:
        """Geometry covering the same physical extent on a new voxel grid.

        The origin is kept (centre of the first voxel); the new shape is
        ``round(extent / new_spacing)`` so the field of view is preserved to
        within half a voxel. This is what :func:`lidc_det.resample.resample_image`
        produces.
        """
        new_spacing = tuple(float(s) for s in spacing_zyx)
        shape = tuple(
            max(1, int(round(n * s / ns)))
            for n, s, ns in zip(self.shape_zyx, self.spacing_zyx, new_spacing)
        )
        return VolumeGeometry(shape, new_spacing, self.origin_xyz, self.direction)  # type: ignore[arg-type]

    # ------------------------------------------------------------ interop
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists of floats) that :meth:`from_dict` reads back."""
        return {
            "shape_zyx": list(self.shape_zyx),
            "spacing_zyx": list(self.spacing_zyx),
            "origin_xyz": list(self.origin_xyz),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeGeometry:
        return cls(
            tuple(d["shape_zyx"]),  # type: ignore[arg-type]
            tuple(d["spacing_zyx"]),  # type: ignore[arg-type]
            tuple(d["origin_xyz"]),  # type: ignore[arg-type]
            tuple(d.get("direction", IDENTITY)),
        )

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> VolumeGeometry:
        """Geometry of a 3D SimpleITK image (SimpleITK sizes are x, y, z)."""
        if image.GetDimension() != 3:
            raise GeometryError(f"expected a 3D image, got {image.GetDimension()}D")
        sx, sy, sz = image.GetSize()
        spx, spy, spz = image.GetSpacing()
        return cls((sz, sy, sx), (spz, spy, spx), image.GetOrigin(), image.GetDirection())

    def apply_to_sitk(self, image: sitk.Image) -> sitk.Image:
        """Set spacing, origin and direction of ``image`` (in place) and return it."""
        size = image.GetSize()
        if tuple(size[::-1]) != self.shape_zyx:
            raise GeometryError(f"image size (x,y,z) {size} does not match shape_zyx {self.shape_zyx}")
        image.SetSpacing(self.spacing_xyz)
        image.SetOrigin(self.origin_xyz)
        image.SetDirection(self.direction)
        return image

    def to_sitk(self, array_zyx: np.ndarray) -> sitk.Image:
        """Wrap a ``[z, y, x]`` array as a SimpleITK image with this geometry."""
        import SimpleITK as sitk

        arr = np.asarray(array_zyx)
        if arr.shape != self.shape_zyx:
            raise GeometryError(f"array shape {arr.shape} does not match geometry {self.shape_zyx}")
        return self.apply_to_sitk(sitk.GetImageFromArray(arr))
