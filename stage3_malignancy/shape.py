"""3D shape features of one nodule mask (bool ``[z, y, x]`` + voxel spacing in mm).

Used on the readers' consensus masks of the real benchmark
(:mod:`stage3_malignancy.lidc_shape`) and, unchanged, on predicted masks.

Conventions (all lengths in mm, volumes in mm^3, areas in mm^2):

* ``volume_mm3``: voxel count x voxel volume (the mask as drawn).
* The surface is the marching-cubes mesh (scikit-image, level 0.5) of the mask
  padded by one empty voxel, in physical coordinates (``spacing``). Its
  staircase makes the area of a digitised sphere ~8 % too large, so a digitised
  sphere has sphericity ~0.90-0.92, not 1 (the IBSI / pyradiomics convention;
  no smoothing, which would shrink nodules of a few voxels).
* ``mesh_volume_mm3``: volume enclosed by that mesh (divergence theorem).
  Sphericity, compactness, solidity use the mesh volume with the mesh area so
  both come from the same surface.
* Convex hull (scipy ``ConvexHull``) of the mesh vertices: ``solidity`` =
  mesh volume / hull volume, ``convexity`` = hull area / mesh area (both <= 1).
* Principal axes: second moments of the *solid* (the union of voxel boxes):
  covariance of the voxel centres in mm + ``diag(spacing^2) / 12`` (the
  within-voxel variance), so a one-slice mask is not flat to zero thickness.
  Eigenvalues ``l1 >= l2 >= l3``; ``elongation = sqrt(l2 / l1)``,
  ``flatness = sqrt(l3 / l1)``; axis lengths ``2 sqrt(5 l)`` (the full axes of
  the solid ellipsoid with these moments, exact for an ellipsoid).
* ``max_3d_diameter_mm``: largest distance between two mesh vertices.
* ``max_axial_diameter_mm``: :func:`lidc_det.measure.max_axial_diameter_mm`
  (the one definition, shared with stage 2): largest in-slice distance between
  the centres of two mask pixels on one z slice, plus one pixel width (LIDC
  readers measure diameter in-plane, on the contour, outside the pixel centres).
* ``extent``: voxel count / voxel count of the axis-aligned bounding box.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from lidc_det.boxes import box_slices, mask_to_box
from lidc_det.measure import max_axial_diameter_mm

__all__ = ["SHAPE_FEATURE_NAMES", "ShapeFeatures", "shape_features"]


@dataclass(frozen=True)
class ShapeFeatures:
    """Shape descriptors of one binary mask (see the module docstring for definitions).

    Attributes:
        volume_mm3: voxel count * voxel volume.
        mesh_volume_mm3: volume inside the marching-cubes surface.
        surface_area_mm2: marching-cubes surface area.
        surface_to_volume_per_mm: ``surface_area_mm2 / mesh_volume_mm3``.
        sphericity: ``pi^(1/3) (6 V)^(2/3) / A`` (1 for a perfect sphere).
        compactness: ``36 pi V^2 / A^3`` (IBSI compactness 2, = sphericity^3).
        elongation: ``sqrt(l2 / l1)`` of the principal second moments (1 = round).
        flatness: ``sqrt(l3 / l1)``.
        major_axis_mm, minor_axis_mm, least_axis_mm: ``2 sqrt(5 l_i)``.
        solidity: mesh volume / convex hull volume.
        convexity: convex hull area / mesh area.
        extent: voxel count / bounding-box voxel count.
        max_3d_diameter_mm: largest distance between two surface vertices.
        max_axial_diameter_mm: largest in-slice pixel-centre distance + one pixel width (lidc_det.measure).
        equivalent_diameter_mm: diameter of the sphere of volume ``volume_mm3``.
        n_components: 26-connected components of the mask.
    """

    volume_mm3: float
    mesh_volume_mm3: float
    surface_area_mm2: float
    surface_to_volume_per_mm: float
    sphericity: float
    compactness: float
    elongation: float
    flatness: float
    major_axis_mm: float
    minor_axis_mm: float
    least_axis_mm: float
    solidity: float
    convexity: float
    extent: float
    max_3d_diameter_mm: float
    max_axial_diameter_mm: float
    equivalent_diameter_mm: float
    n_components: int

    def to_dict(self) -> dict[str, float]:
        """``{feature name: value}`` in :data:`SHAPE_FEATURE_NAMES` order."""
        return {k: float(v) for k, v in asdict(self).items()}


#: Column names of :class:`ShapeFeatures`, in order.
SHAPE_FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ShapeFeatures))


def _mesh(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes mesh ``(verts (V, 3) mm, faces (F, 3))`` of the padded mask."""
    from skimage.measure import marching_cubes

    padded = np.pad(mask, 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(padded, level=0.5, spacing=spacing_zyx)
    return verts, faces


def _mesh_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    """Enclosed volume of a closed triangle mesh (sum of signed tetrahedra), mm^3."""
    tri = verts[faces]
    signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    return float(abs(signed))


def shape_features(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> ShapeFeatures:
    """Shape features of one nodule.

    Args:
        mask: bool ``[z, y, x]`` nodule mask (a crop is enough; any number of
            components, but not empty).
        spacing_zyx: voxel size in mm along z, y, x (all > 0).

    Returns:
        :class:`ShapeFeatures`.

    Raises:
        ValueError: empty or non-3D mask, or non-positive spacing.
    """
    from scipy.ndimage import label
    from scipy.spatial import ConvexHull
    from scipy.spatial.distance import pdist

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"shape_features: mask must be 3D [z, y, x], got shape {mask.shape}")
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or min(spacing) <= 0 or not all(math.isfinite(s) for s in spacing):
        raise ValueError(f"shape_features: spacing_zyx must be 3 positive mm values, got {spacing_zyx}")
    n_vox = int(mask.sum())
    if n_vox == 0:
        raise ValueError("shape_features: empty mask")

    # crop to the bounding box (speed; features are translation invariant)
    mask = mask[box_slices(mask_to_box(mask), mask.shape)]
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    volume = n_vox * voxel_mm3

    verts, faces = _mesh(mask, spacing)  # type: ignore[arg-type]
    verts = verts.astype(np.float64)
    from skimage.measure import mesh_surface_area

    area = float(mesh_surface_area(verts, faces))
    mesh_vol = _mesh_volume(verts, faces)
    hull = ConvexHull(verts)
    hull_pts = verts[hull.vertices]
    max_3d = float(pdist(hull_pts).max()) if len(hull_pts) >= 2 else 0.0

    coords = np.argwhere(mask) * np.asarray(spacing)  # the cropped mask
    cov = np.cov(coords.T) if n_vox >= 2 else np.zeros((3, 3))
    cov = cov + np.diag(np.square(spacing)) / 12.0
    eig = np.sort(np.clip(np.linalg.eigvalsh(cov), 0.0, None))[::-1]
    l1, l2, l3 = (float(v) for v in eig)

    _, n_comp = label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return ShapeFeatures(
        volume_mm3=volume,
        mesh_volume_mm3=mesh_vol,
        surface_area_mm2=area,
        surface_to_volume_per_mm=area / mesh_vol,
        sphericity=float(np.pi ** (1 / 3) * (6 * mesh_vol) ** (2 / 3) / area),
        compactness=float(36 * np.pi * mesh_vol**2 / area**3),
        elongation=math.sqrt(l2 / l1),
        flatness=math.sqrt(l3 / l1),
        major_axis_mm=2 * math.sqrt(5 * l1),
        minor_axis_mm=2 * math.sqrt(5 * l2),
        least_axis_mm=2 * math.sqrt(5 * l3),
        solidity=min(1.0, mesh_vol / float(hull.volume)),
        convexity=min(1.0, float(hull.area) / area),
        extent=n_vox / float(mask.size),
        max_3d_diameter_mm=max_3d,
        max_axial_diameter_mm=max_axial_diameter_mm(mask, spacing),
        equivalent_diameter_mm=float((6 * volume / np.pi) ** (1 / 3)),
        n_components=int(n_comp),
    )
