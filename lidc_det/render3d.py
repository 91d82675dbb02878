"""Off-screen 3D surface renders: translucent lungs, nodules and detections as coloured surfaces.

Surfaces are marching-cubes meshes (scikit-image) in world LPS millimetres,
drawn with matplotlib's ``mplot3d`` on the Agg canvas, so a render needs no
display, no OpenGL and no GPU (it works on a headless server). Two views are
drawn: anterior (the patient faces the viewer: the patient's right on the
left of the picture) and from the patient's left.

Lungs are meshed on a copy reduced to about ``lung_step_mm`` voxels (block
mean of the mask, level 0.5) to keep the mesh to some ten thousand triangles;
nodule masks are meshed at full resolution in their bounding boxes;
detections are drawn as spheres of their diameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lidc_det.boxes import box_slices, mask_to_box
from lidc_det.geometry import VolumeGeometry

LUNG_COLOURS = {1: "#4682dc", 2: "#50c878"}  # right, left


@dataclass(frozen=True)
class Surface:
    """One mesh to draw: ``mask`` (``[z, y, x]`` bool on the render's geometry) with a colour and legend label."""

    mask: np.ndarray
    colour: str
    label: str
    alpha: float = 1.0


@dataclass(frozen=True)
class Sphere:
    """A detection: world LPS centre (mm), diameter (mm), colour and legend label."""

    center_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    colour: str
    label: str


def _mesh(mask: np.ndarray, geometry: VolumeGeometry, step: tuple[int, int, int] = (1, 1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes mesh of ``mask`` (block mean over ``step``, level 0.5): world vertices ``(V, 3)`` xyz, faces ``(F, 3)``."""
    from skimage.measure import marching_cubes

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=int)
    box = box_slices(mask_to_box(m), m.shape, step)
    lo = [s.start for s in box]
    sub = m[box].astype(np.float32)
    if step != (1, 1, 1):
        shp = [(n // s) * s for n, s in zip(sub.shape, step)]
        sub = sub[: shp[0], : shp[1], : shp[2]]
        sub = sub.reshape(shp[0] // step[0], step[0], shp[1] // step[1], step[1], shp[2] // step[2], step[2]).mean(axis=(1, 3, 5))
    sub = np.pad(sub, 1)  # closed surfaces at the box edges
    if sub.max() < 0.5:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=int)
    verts, faces, _, _ = marching_cubes(sub, level=0.5)
    # verts in padded block-voxel units -> voxel coordinates of the full grid (block centres)
    st = np.asarray(step, dtype=float)
    vox = (verts - 1.0) * st + (st - 1.0) / 2.0 + np.asarray(lo, dtype=float)
    return geometry.voxel_to_world(vox), faces


def _sphere(c: Sequence[float], r: float, n: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, n), np.linspace(0, np.pi, n // 2 + 1))
    return c[0] + r * np.cos(u) * np.sin(v), c[1] + r * np.sin(u) * np.sin(v), c[2] + r * np.cos(v)


def render_surfaces(
    path: Path,
    geometry: VolumeGeometry,
    *,
    lung_labels: np.ndarray | None = None,
    surfaces: Sequence[Surface] = (),
    spheres: Sequence[Sphere] = (),
    title: str = "",
    lung_step_mm: float = 4.0,
    lung_alpha: float = 0.12,
) -> Path:
    """Write a two-view (anterior, left lateral) surface render as PNG, atomically.

    Args:
        path: output ``.png``.
        geometry: grid of ``lung_labels`` and of every ``Surface.mask``.
        lung_labels: ``[z, y, x]`` 0 / 1 right / 2 left (:class:`lidc_det.lungs.LungFields` ``.labels``), drawn translucent.
        surfaces: further meshes (nodule masks), opaque unless their alpha says otherwise.
        spheres: detections.
        title: figure title (say SYNTHETIC for twin images).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    from lidc_det.plots import save_figure

    meshes: list[tuple[np.ndarray, np.ndarray, str, float, str]] = []
    if lung_labels is not None:
        step = tuple(max(1, int(round(lung_step_mm / s))) for s in geometry.spacing_zyx)
        for v, name in ((1, "right lung"), (2, "left lung")):
            verts, faces = _mesh(np.asarray(lung_labels) == v, geometry, step)  # type: ignore[arg-type]
            if len(faces):
                meshes.append((verts, faces, LUNG_COLOURS[v], lung_alpha, name))
    for s in surfaces:
        verts, faces = _mesh(s.mask, geometry)
        if len(faces):
            meshes.append((verts, faces, s.colour, s.alpha, s.label))
    pts = [m[0] for m in meshes] + [np.asarray([sp.center_xyz_mm]) for sp in spheres]
    if not pts:
        raise ValueError("nothing to render: no lung, surface or sphere")
    allp = np.vstack(pts)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    centre, half = (lo + hi) / 2.0, float(np.max(hi - lo)) / 2.0 + 5.0

    fig = Figure(figsize=(12, 6.2))
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.06, top=0.9, wspace=0.0)
    FigureCanvasAgg(fig)
    views = (("anterior (patient's right on the left)", 5.0, -90.0), ("from the patient's left (anterior on the left)", 5.0, 0.0))
    for i, (name, elev, azim) in enumerate(views):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        for verts, faces, colour, alpha, _ in meshes:
            pc = Poly3DCollection(verts[faces], facecolors=colour, shade=True, lightsource=None)
            pc.set_edgecolor("none")
            pc.set_alpha(alpha)
            ax.add_collection3d(pc)
        for sp in spheres:
            ax.plot_surface(*_sphere(sp.center_xyz_mm, max(sp.diameter_mm, 3.0) / 2.0), color=sp.colour, shade=True, linewidth=0)
        for k, lim in enumerate((ax.set_xlim, ax.set_ylim, ax.set_zlim)):
            lim(centre[k] - half, centre[k] + half)
        ax.set_box_aspect((1, 1, 1), zoom=1.35)
        ax.view_init(elev=elev, azim=azim)
        ax.set_axis_off()
        ax.set_title(name, fontsize=10)
    handles, seen = [], set()
    for _, _, colour, alpha, label in meshes:
        if label not in seen:
            seen.add(label)
            handles.append(Line2D([0], [0], color=colour, lw=6, alpha=max(alpha, 0.4), label=label))
    for sp in spheres:
        if sp.label not in seen:
            seen.add(sp.label)
            handles.append(Line2D([0], [0], marker="o", color="none", markerfacecolor=sp.colour, markersize=9, label=sp.label))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, dpi=90)
