"""LUNA16 CSV reading/writing (lidc_det.data.luna)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lidc_det.data.luna import (
    CsvFormatError,
    LunaCandidate,
    LunaFinding,
    by_series,
    candidates_from_detections,
    detections_from_candidates,
    read_annotations,
    read_candidates,
    read_excluded,
    read_series_uids,
    write_annotations,
    write_candidates,
    write_series_uids,
)
from lidc_det.errors import LidcDetError
from lidc_det.results import Detections

UID1 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
UID2 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ reading
def test_read_annotations_luna_format(tmp_path: Path) -> None:
    p = write(
        tmp_path / "annotations.csv",
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        f"{UID1},-128.6994211,-175.3192718,-298.3875064,5.651470635\n"
        f"{UID1},103.7836509,-211.9251487,-227.12125,4.224708481\n"
        f"{UID2},69.63901724,-140.9445859,876.3744957,5.786347814\n",
    )
    got = read_annotations(p)
    assert got == [
        LunaFinding(UID1, (-128.6994211, -175.3192718, -298.3875064), 5.651470635),
        LunaFinding(UID1, (103.7836509, -211.9251487, -227.12125), 4.224708481),
        LunaFinding(UID2, (69.63901724, -140.9445859, 876.3744957), 5.786347814),
    ]
    grouped = by_series(got)
    assert list(grouped) == [UID1, UID2]
    assert [len(v) for v in grouped.values()] == [2, 1]


def test_columns_by_name_any_order_extra_columns_spaces_bom(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_bytes(
        "\ufeffdiameter_mm, coordZ ,note,coordY,coordX,seriesuid\n"
        f"4.5, 3.0 ,hello,2.0,1.0,{UID1}\n"
        "\n".encode()
    )
    assert read_annotations(p) == [LunaFinding(UID1, (1.0, 2.0, 3.0), 4.5)]


def test_read_candidates_probability_and_class(tmp_path: Path) -> None:
    p = write(
        tmp_path / "c.csv",
        "seriesuid,coordX,coordY,coordZ,probability\n" f"{UID1},1,2,3,0.25\n" f"{UID2},-1,-2,-3,1e-3\n",
    )
    assert read_candidates(p) == [
        LunaCandidate(UID1, (1.0, 2.0, 3.0), 0.25),
        LunaCandidate(UID2, (-1.0, -2.0, -3.0), 0.001),
    ]
    # candidates_V2.csv has a 0/1 class column instead of a probability
    v2 = write(tmp_path / "v2.csv", "seriesuid,coordX,coordY,coordZ,class\n" f"{UID1},1,2,3,1\n{UID1},4,5,6,0\n")
    assert [c.probability for c in read_candidates(v2)] == [1.0, 0.0]
    # probability wins when both are present
    both = write(tmp_path / "b.csv", "seriesuid,coordX,coordY,coordZ,class,probability\n" f"{UID1},1,2,3,1,0.4\n")
    assert read_candidates(both)[0].probability == 0.4


def test_missing_column_names_file_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path / "bad.csv", "seriesuid,coordX,coordY,diameter_mm\n" f"{UID1},1,2,3\n")
    with pytest.raises(CsvFormatError) as ei:
        read_annotations(p)
    err = ei.value
    assert isinstance(err, LidcDetError)
    assert err.path == p and err.line == 1
    assert "coordZ" in str(err) and str(p) in str(err)
    c = write(tmp_path / "c.csv", "seriesuid,coordX,coordY,coordZ\n" f"{UID1},1,2,3\n")
    with pytest.raises(CsvFormatError, match=r"missing column 'probability' \(or 'class'\)"):
        read_candidates(c)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (f"{UID1},1,abc,3,5", r"coordY is not a number: 'abc'"),
        (f"{UID1},1,2,nan,5", r"coordZ is NaN"),
        (f"{UID1},1,2,3,NaN", r"diameter_mm is NaN"),
        (f"{UID1},1,2,3,inf", r"diameter_mm is infinite"),
        (f"{UID1},1,2,3,-1", r"diameter_mm is negative"),
        (f"{UID1},1,2,3,", r"diameter_mm is not a number: ''"),
        (",1,2,3,5", r"seriesuid is empty"),
        (f"{UID1},1,2", r"expected at least 5 fields, got 3"),
    ],
)
def test_bad_values_name_the_line(tmp_path: Path, row: str, message: str) -> None:
    p = write(tmp_path / "a.csv", f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID1},0,0,0,4\n\n{row}\n")
    with pytest.raises(CsvFormatError, match=message) as ei:
        read_annotations(p)
    assert ei.value.line == 4  # header, good row, blank line, bad row
    assert str(ei.value).startswith(f"{p}:4: ")


def test_candidate_nan_probability_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path / "c.csv", "seriesuid,coordX,coordY,coordZ,probability\n" f"{UID1},1,2,3,nan\n")
    with pytest.raises(CsvFormatError, match=r"c\.csv:2: probability is NaN"):
        read_candidates(p)


def test_excluded_accepts_unknown_diameter(tmp_path: Path) -> None:
    text = "seriesuid,coordX,coordY,coordZ,diameter_mm\n" f"{UID1},1,2,3,-1\n{UID1},4,5,6,2.5\n"
    p = write(tmp_path / "annotations_excluded.csv", text)
    assert [f.diameter_mm for f in read_excluded(p)] == [-1.0, 2.5]
    with pytest.raises(CsvFormatError, match="negative"):
        read_annotations(p)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(CsvFormatError, match="file not found"):
        read_annotations(tmp_path / "nope.csv")
    with pytest.raises(CsvFormatError, match="empty file"):
        read_candidates(write(tmp_path / "empty.csv", ""))
    # a header alone is a valid file with no rows
    assert read_candidates(write(tmp_path / "h.csv", "seriesuid,coordX,coordY,coordZ,probability\n")) == []


def test_series_uids(tmp_path: Path) -> None:
    p = write(tmp_path / "seriesuids.csv", f"{UID1}\n\n{UID2}\n")
    assert read_series_uids(p) == [UID1, UID2]
    with_header = write(tmp_path / "h.csv", f"seriesuid\n{UID2},extra\n")
    assert read_series_uids(with_header) == [UID2]
    dup = write(tmp_path / "d.csv", f"{UID1}\n{UID2}\n{UID1}\n")
    with pytest.raises(CsvFormatError, match=r"d\.csv:3: .*listed twice \(first on line 1\)"):
        read_series_uids(dup)
    out = tmp_path / "w.csv"
    write_series_uids(out, [UID2, UID1])
    assert out.read_text() == f"{UID2}\n{UID1}\n"
    assert read_series_uids(out) == [UID2, UID1]


# ------------------------------------------------------------------ writing
def test_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    findings = [
        LunaFinding(UID1 if i % 2 else UID2, tuple(rng.normal(0, 100, 3)), float(rng.uniform(3, 30)))
        for i in range(20)
    ]
    findings.append(LunaFinding(UID1, (0.1, -0.0, 1e-300), -1.0))
    cands = [LunaCandidate(UID2, tuple(rng.normal(0, 100, 3)), float(rng.random())) for _ in range(20)]
    write_annotations(tmp_path / "a.csv", findings)
    write_candidates(tmp_path / "c.csv", cands)
    assert read_excluded(tmp_path / "a.csv") == findings
    assert read_candidates(tmp_path / "c.csv") == cands
    assert (tmp_path / "a.csv").read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,diameter_mm"
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,probability"


def test_writes_are_atomic_and_replace(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "c.csv"
    write_candidates(out, [LunaCandidate(UID1, (1, 2, 3), 0.5)])
    write_candidates(out, [LunaCandidate(UID2, (4, 5, 6), 0.25)])
    assert read_candidates(out) == [LunaCandidate(UID2, (4.0, 5.0, 6.0), 0.25)]
    assert sorted(x.name for x in out.parent.iterdir()) == ["c.csv"]  # no temp file left


def test_records_validate() -> None:
    with pytest.raises(ValueError):
        LunaCandidate(UID1, (1.0, 2.0), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LunaCandidate(UID1, (1.0, 2.0, 3.0), float("nan"))
    with pytest.raises(ValueError):
        LunaFinding(UID1, (1.0, float("inf"), 3.0), 4.0)
    f = LunaFinding(UID1, np.array([1, 2, 3]), 4)  # type: ignore[arg-type]
    assert f.center_xyz_mm == (1.0, 2.0, 3.0) and isinstance(f.diameter_mm, float)


# ------------------------------------------------------- Detections bridge
def test_detections_round_trip() -> None:
    det = Detections(UID1, np.array([[1.0, 2.0, 3.0], [-4.0, 5.5, 6.25]]), np.array([8.0, 0.0]), np.array([0.9, 0.1]))
    cands = candidates_from_detections(det)
    assert cands == [LunaCandidate(UID1, (1.0, 2.0, 3.0), 0.9), LunaCandidate(UID1, (-4.0, 5.5, 6.25), 0.1)]
    other = LunaCandidate(UID2, (0.0, 0.0, 0.0), 0.7)
    back = detections_from_candidates([cands[0], other, cands[1]], UID1)
    assert back.series_uid == UID1
    np.testing.assert_array_equal(back.centers_xyz_mm, det.centers_xyz_mm)
    np.testing.assert_array_equal(back.scores, det.scores)
    np.testing.assert_array_equal(back.diameters_mm, [0.0, 0.0])  # unknown in LUNA16 candidates
    empty = detections_from_candidates([other], UID1)
    assert len(empty) == 0 and empty.centers_xyz_mm.shape == (0, 3)
