"""3-plane (axial, coronal, sagittal) PNG views of a CT volume with mask contours and markers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lidc_det.atomic import write_with
from lidc_det.geometry import VolumeGeometry

LUNG_WINDOW = (-1350.0, 150.0)  # HU (level -600, width 1500)


def three_plane_png(
    hu: np.ndarray,
    geometry: VolumeGeometry,
    center_xyz_mm: Sequence[float],
    path: Path,
    *,
    masks: Sequence[tuple[np.ndarray, str]] = (),
    title: str = "",
    half_width_mm: float | None = 40.0,
    window: tuple[float, float] = LUNG_WINDOW,
) -> Path:
    """Write axial / coronal / sagittal slices through ``center_xyz_mm`` as one PNG.

    Args:
        hu: ``[z, y, x]`` HU volume on ``geometry`` (axis-aligned; LIDC is).
        center_xyz_mm: world LPS point the three planes pass through.
        masks: ``(bool [z, y, x] mask, matplotlib colour)`` pairs drawn as contours.
        half_width_mm: crop half-width around the point (None = whole slice).
        window: display window in HU (default lung window).

    Pixels are shown with their physical aspect ratio (``spacing``), so
    thick-slice scans do not look squashed in the coronal and sagittal views.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.rint(geometry.world_to_voxel(np.asarray(center_xyz_mm, dtype=float))).astype(int)
    c = np.clip(c, 0, np.asarray(geometry.shape_zyx) - 1)
    sz, sy, sx = geometry.spacing_zyx
    planes = [  # (name, slicer, (row spacing, col spacing), (row centre, col centre))
        ("axial", (c[0], slice(None), slice(None)), (sy, sx), (c[1], c[2])),
        ("coronal", (slice(None), c[1], slice(None)), (sz, sx), (c[0], c[2])),
        ("sagittal", (slice(None), slice(None), c[2]), (sz, sy), (c[0], c[1])),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, sl, (rs, cs), (rc, cc)) in zip(axes, planes):
        img = np.asarray(hu[sl], dtype=np.float32)
        rows, cols = img.shape
        extent = (-0.5 * cs, (cols - 0.5) * cs, (rows - 0.5) * rs, -0.5 * rs)  # mm
        ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], extent=extent, interpolation="nearest")
        for mask, colour in masks:
            m = np.asarray(mask[sl], dtype=float)
            if m.any():
                yy = (np.arange(rows)) * rs
                xx = (np.arange(cols)) * cs
                ax.contour(xx, yy, m, levels=[0.5], colors=[colour], linewidths=1.0)
        if name != "axial":
            ax.invert_yaxis()  # superior up (z index grows superior in LIDC)
        if half_width_mm is not None:
            ax.set_xlim(cc * cs - half_width_mm, cc * cs + half_width_mm)
            lo, hi = rc * rs - half_width_mm, rc * rs + half_width_mm
            ax.set_ylim((hi, lo) if name == "axial" else (lo, hi))
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_with(Path(path), lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)
    return Path(path)
