"""One NIfTI label map with the lungs and the nodules, plus colour tables for ITK-SNAP and 3D Slicer.

Label values (the only place they are defined):

* 0 background;
* 1 right lung, 2 left lung (:mod:`lidc_det.lungs`);
* ``NODULE_OFFSET + k`` (11, 12, ...) for nodule ``k`` of a nodule label map
  whose values are ``1..N`` (stage 2's :func:`stage2_segment.exports.merged_label_map`,
  ``findings.csv``'s ``mask_label``, a twin's ``nodule_label``); nodules are
  drawn over the lungs.

:func:`write_label_map` writes ``NAME.nii.gz`` (SimpleITK, LPS geometry kept)
and beside it ``NAME.itksnap.txt`` (ITK-SNAP: Segmentation > Import Label
Descriptions) and ``NAME.ctbl`` (3D Slicer colour table: load it, then pick it
as the label map's colour node).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lidc_det.atomic import write_text
from lidc_det.geometry import VolumeGeometry
from lidc_det.io.nifti import write_nifti

NODULE_OFFSET = 10
"""Nodule ``k`` (1-based) has label ``NODULE_OFFSET + k``."""
LUNG_NAMES = {1: "right lung", 2: "left lung"}
_COLOURS = {1: (70, 130, 220), 2: (80, 200, 120)}
_NODULE_COLOURS = ((230, 40, 40), (250, 160, 20), (200, 60, 200), (240, 230, 40), (40, 220, 230), (150, 90, 40))


def lung_nodule_label_map(lung_labels: np.ndarray, nodule_labels: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Combine lung labels (0/1/2) and a nodule label map (0, 1..N) into one ``uint16`` map.

    Returns:
        ``(labels [z, y, x] uint16, names)`` with ``names[value]`` for every value present but 0.
    """
    lungs = np.asarray(lung_labels)
    if lungs.size and int(lungs.max()) > 2:
        raise ValueError(f"lung labels must be 0, 1 or 2, got a maximum of {int(lungs.max())}")
    out = lungs.astype(np.uint16)
    names = {v: n for v, n in LUNG_NAMES.items() if np.any(lungs == v)}
    if nodule_labels is not None:
        nod = np.asarray(nodule_labels)
        if nod.shape != lungs.shape:
            raise ValueError(f"nodule labels {nod.shape} and lung labels {lungs.shape} differ in shape")
        if nod.size and int(nod.max()) + NODULE_OFFSET > np.iinfo(np.uint16).max:
            raise ValueError(f"{int(nod.max())} nodules do not fit a uint16 label map")
        m = nod > 0
        out[m] = nod[m].astype(np.uint16) + NODULE_OFFSET
        for k in np.unique(nod[m]):
            names[int(k) + NODULE_OFFSET] = f"nodule {int(k)}"
    return out, names


def _colour(value: int) -> tuple[int, int, int]:
    if value in _COLOURS:
        return _COLOURS[value]
    return _NODULE_COLOURS[(value - NODULE_OFFSET - 1) % len(_NODULE_COLOURS)]


def write_label_map(labels: np.ndarray, geometry: VolumeGeometry, path: Path, names: Mapping[int, str]) -> Path:
    """Write ``labels`` as NIfTI at ``path`` (``.nii.gz``) with its ITK-SNAP and Slicer colour tables.

    Returns the NIfTI path; the tables are ``path`` with ``.itksnap.txt`` and ``.ctbl``
    in place of ``.nii.gz``.
    """
    path = Path(path)
    write_nifti(labels, geometry, path)
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    itk = [
        "################################################",
        "# ITK-SnAP Label Description File (lidc-det)",
        "# Fields: IDX -R- -G- -B- -A-- VIS MSH LABEL",
        "################################################",
        '    0     0    0    0        0  0  0    "Clear Label"',
    ]
    slicer = ["# 3D Slicer colour table (lidc-det): value name R G B A", "0 background 0 0 0 0"]
    for v in sorted(names):
        r, g, b = _colour(int(v))
        alpha = 0.4 if v in LUNG_NAMES else 1.0
        itk.append(f'{v:5d} {r:5d} {g:4d} {b:4d} {alpha:8g}  1  1    "{names[v]}"')
        slicer.append(f"{v} {names[v].replace(' ', '_')} {r} {g} {b} {int(round(alpha * 255))}")
    write_text(path.with_name(stem + ".itksnap.txt"), "\n".join(itk) + "\n")
    write_text(path.with_name(stem + ".ctbl"), "\n".join(slicer) + "\n")
    return path
