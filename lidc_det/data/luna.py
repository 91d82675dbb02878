"""LUNA16 CSV files: typed records, readers, atomic writers, and conversion to/from Detections.

Three kinds of file, all in world LPS millimetres (x, y, z), one row per finding:

* annotations (``annotations.csv``, the targets) and excluded findings
  (``annotations_excluded.csv``, the "irrelevant" findings):
  ``seriesuid,coordX,coordY,coordZ,diameter_mm``
* candidates (a CAD system's output, or LUNA16's ``candidates.csv``):
  ``seriesuid,coordX,coordY,coordZ,probability``. LUNA16's ``candidates_V2.csv``
  has a ``class`` column (0/1) instead of ``probability``; it is read as the
  probability when ``probability`` is absent.
* series lists (``seriesuids.csv``): one SeriesInstanceUID per line, no header.

Columns are found by name (any order, extra columns ignored, surrounding spaces
stripped). Bad input raises :class:`CsvFormatError` naming the file, the line
and the problem. In ``annotations_excluded.csv`` a diameter of ``-1`` means
"unknown" (LUNA16 lists non-nodules that way), so negative diameters are
accepted there and kept as read; the FROC evaluator gives such a finding the
reference script's default diameter of 10 mm (see :mod:`lidc_det.metrics.froc`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from lidc_det import atomic
from lidc_det.errors import LidcDetError
from lidc_det.results import Detections

__all__ = [
    "ANNOTATION_COLUMNS",
    "CANDIDATE_COLUMNS",
    "CsvFormatError",
    "LunaCandidate",
    "LunaFinding",
    "by_series",
    "candidates_from_detections",
    "detections_from_candidates",
    "read_annotations",
    "read_candidates",
    "read_excluded",
    "read_series_uids",
    "write_annotations",
    "write_candidates",
    "write_series_uids",
]

ANNOTATION_COLUMNS: tuple[str, ...] = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS: tuple[str, ...] = ("seriesuid", "coordX", "coordY", "coordZ", "probability")


class CsvFormatError(LidcDetError):
    """A LUNA16 CSV file cannot be read.

    ``str(err)`` is ``"<path>:<line>: <reason>"`` (``"<path>: <reason>"`` when no
    line applies); ``err.path``, ``err.line`` (1-based, or None) and
    ``err.reason`` hold the parts.
    """

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, int | None, str]]:
        return (type(self), (self.path, self.line, self.reason))


def _xyz(values: Iterable[float], what: str) -> tuple[float, float, float]:
    t = tuple(float(v) for v in values)
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise ValueError(f"{what}: center_xyz_mm must be 3 finite numbers, got {t}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class LunaFinding:
    """One annotated finding (a target nodule, or an excluded/irrelevant finding).

    Attributes:
        series_uid: SeriesInstanceUID of the scan.
        center_xyz_mm: world LPS centre (x, y, z) in mm.
        diameter_mm: diameter in mm; negative (LUNA16 writes ``-1``) means
            unknown, which only excluded findings use.
    """

    series_uid: str
    center_xyz_mm: tuple[float, float, float]
    diameter_mm: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "series_uid", str(self.series_uid))
        object.__setattr__(self, "center_xyz_mm", _xyz(self.center_xyz_mm, "LunaFinding"))
        object.__setattr__(self, "diameter_mm", float(self.diameter_mm))
        if not math.isfinite(self.diameter_mm):
            raise ValueError(f"LunaFinding: diameter_mm must be finite, got {self.diameter_mm}")


@dataclass(frozen=True)
class LunaCandidate:
    """One CAD mark: a world position and a probability (higher = more likely a nodule).

    Attributes:
        series_uid: SeriesInstanceUID of the scan.
        center_xyz_mm: world LPS centre (x, y, z) in mm.
        probability: score; any finite float (only its order matters for FROC).
    """

    series_uid: str
    center_xyz_mm: tuple[float, float, float]
    probability: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "series_uid", str(self.series_uid))
        object.__setattr__(self, "center_xyz_mm", _xyz(self.center_xyz_mm, "LunaCandidate"))
        object.__setattr__(self, "probability", float(self.probability))
        if not math.isfinite(self.probability):
            raise ValueError(f"LunaCandidate: probability must be finite, got {self.probability}")


R = TypeVar("R", LunaFinding, LunaCandidate)


def by_series(records: Iterable[R]) -> dict[str, list[R]]:
    """Group records by ``series_uid`` (insertion order of first appearance, file order within)."""
    out: dict[str, list[R]] = {}
    for r in records:
        out.setdefault(r.series_uid, []).append(r)
    return out


# ------------------------------------------------------------------ reading
def _new(cls: type[R], **fields: object) -> R:
    """Build a record from values the reader has already checked (skips
    ``__post_init__``, which dominates the time to read 10^5-10^6 rows)."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


def _diagnose(path: Path, line: int, row: list[str], names: Sequence[str], idx: Sequence[int]) -> None:
    """Raise the precise :class:`CsvFormatError` for a row the fast path rejected."""
    width = max(idx) + 1
    if len(row) < width:
        raise CsvFormatError(path, line, f"expected at least {width} fields, got {len(row)}")
    if not row[idx[0]].strip():
        raise CsvFormatError(path, line, f"{names[0]} is empty")
    for name, i in zip(names[1:], idx[1:], strict=True):
        text = row[i].strip()
        try:
            value = float(text)
        except ValueError:
            raise CsvFormatError(path, line, f"{name} is not a number: {text!r}") from None
        if math.isnan(value):
            raise CsvFormatError(path, line, f"{name} is NaN")
        if math.isinf(value):
            raise CsvFormatError(path, line, f"{name} is infinite: {text!r}")
    raise CsvFormatError(path, line, "unreadable row")  # not reached: the fast path had a reason


def _rows(
    path: Path, required: Sequence[str], alternatives: dict[str, str] | None = None
) -> Iterator[tuple[int, str, float, float, float, float]]:
    """Yield ``(line, uid, x, y, z, value)`` for each data row of a 5-column LUNA16 CSV.

    ``required`` names the uid column, the three coordinates and the value
    column, in that order; ``alternatives`` maps a required column to a column
    accepted in its place (``probability`` -> ``class``). Blank lines are
    skipped; numbers must be finite and the uid non-empty.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CsvFormatError(path, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CsvFormatError(path, None, f"cannot read: {err}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise CsvFormatError(path, 1, "empty file (no header line)") from None
    except csv.Error as err:
        raise CsvFormatError(path, 1, f"not CSV: {err}") from None
    names = [h.strip() for h in header]
    idx: list[int] = []
    for col in required:
        if col in names:
            idx.append(names.index(col))
        elif alternatives and col in alternatives and alternatives[col] in names:
            idx.append(names.index(alternatives[col]))
        else:
            alt = f" (or {alternatives[col]!r})" if alternatives and col in alternatives else ""
            raise CsvFormatError(path, 1, f"missing column {col!r}{alt}; header is {','.join(names)!r}")
    iu, ix, iy, iz, iv = idx
    finite = math.isfinite
    try:
        for row in reader:
            try:
                uid = row[iu].strip()
                x, y, z, v = float(row[ix]), float(row[iy]), float(row[iz]), float(row[iv])
                ok = bool(uid) and finite(x) and finite(y) and finite(z) and finite(v)
            except (ValueError, IndexError):
                ok = False
            if not ok:
                if all(not c.strip() for c in row):
                    continue  # blank line
                _diagnose(path, reader.line_num, row, [names[i] for i in idx], idx)
            yield reader.line_num, uid, x, y, z, v
    except csv.Error as err:
        raise CsvFormatError(path, reader.line_num, f"not CSV: {err}") from None


def _read_findings(path: str | Path, *, allow_unknown_diameter: bool) -> list[LunaFinding]:
    path = Path(path)
    out: list[LunaFinding] = []
    for line, uid, x, y, z, d in _rows(path, ANNOTATION_COLUMNS):
        if d < 0 and not allow_unknown_diameter:
            raise CsvFormatError(path, line, f"diameter_mm is negative: {d!r}")
        out.append(_new(LunaFinding, series_uid=uid, center_xyz_mm=(x, y, z), diameter_mm=d))
    return out


def read_annotations(path: str | Path) -> list[LunaFinding]:
    """Read an ``annotations.csv`` (target nodules), in file order.

    Raises:
        CsvFormatError: missing file or column, empty uid, non-numeric / NaN /
            infinite value, or a negative diameter.
    """
    return _read_findings(path, allow_unknown_diameter=False)


def read_excluded(path: str | Path) -> list[LunaFinding]:
    """Read an ``annotations_excluded.csv`` (irrelevant findings), in file order.

    Like :func:`read_annotations`, except that a negative diameter (LUNA16's
    ``-1`` = unknown size) is accepted and kept as read.
    """
    return _read_findings(path, allow_unknown_diameter=True)


def read_candidates(path: str | Path) -> list[LunaCandidate]:
    """Read a candidates CSV (``probability`` column, or ``class`` when it has none), in file order.

    Raises:
        CsvFormatError: missing file or column, empty uid, non-numeric / NaN /
            infinite value.
    """
    return [
        _new(LunaCandidate, series_uid=uid, center_xyz_mm=(x, y, z), probability=p)
        for _, uid, x, y, z, p in _rows(Path(path), CANDIDATE_COLUMNS, {"probability": "class"})
    ]


def read_series_uids(path: str | Path) -> list[str]:
    """Read a series list: the first field of each non-blank line (LUNA16 ``seriesuids.csv``).

    A first line reading ``seriesuid`` is taken as a header and skipped.

    Raises:
        CsvFormatError: missing file, or a UID listed twice.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise CsvFormatError(path, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CsvFormatError(path, None, f"cannot read: {err}") from None
    uids: list[str] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(lines, start=1):
        uid = raw.split(",")[0].strip()
        if not uid or (i == 1 and uid == "seriesuid"):
            continue
        if uid in seen:
            raise CsvFormatError(path, i, f"series {uid} is listed twice (first on line {seen[uid]})")
        seen[uid] = i
        uids.append(uid)
    return uids


# ------------------------------------------------------------------ writing
def _checked_uid(uid: str, seen: set[str]) -> str:
    if uid not in seen:
        if not uid or any(ch in uid for ch in ',"\r\n'):
            raise ValueError(f"series uid {uid!r} cannot be written to a LUNA16 CSV (empty, comma, quote or newline)")
        seen.add(uid)
    return uid


def _write_rows(
    path: str | Path, header: Sequence[str], rows: Iterable[tuple[str, float, float, float, float]]
) -> None:
    """Atomic write; floats as ``repr`` (the shortest text that reads back to the same float)."""
    seen: set[str] = set()
    lines = [",".join(header) + "\n"]
    lines += [f"{_checked_uid(u, seen)},{x!r},{y!r},{z!r},{v!r}\n" for u, x, y, z, v in rows]
    atomic.write_text(Path(path), "".join(lines))


def write_annotations(path: str | Path, findings: Iterable[LunaFinding]) -> None:
    """Atomically write findings as ``seriesuid,coordX,coordY,coordZ,diameter_mm``
    (for annotations and excluded findings alike; floats at full precision)."""
    _write_rows(path, ANNOTATION_COLUMNS, ((f.series_uid, *f.center_xyz_mm, f.diameter_mm) for f in findings))


def write_candidates(path: str | Path, candidates: Iterable[LunaCandidate]) -> None:
    """Atomically write candidates as ``seriesuid,coordX,coordY,coordZ,probability``."""
    _write_rows(path, CANDIDATE_COLUMNS, ((c.series_uid, *c.center_xyz_mm, c.probability) for c in candidates))


def write_series_uids(path: str | Path, series_uids: Iterable[str]) -> None:
    """Atomically write a series list, one UID per line, no header (LUNA16 ``seriesuids.csv``)."""
    atomic.write_text(Path(path), "".join(f"{u}\n" for u in series_uids))


# --------------------------------------------------------- Detections bridge
def candidates_from_detections(detections: Detections) -> list[LunaCandidate]:
    """One scan's :class:`~lidc_det.results.Detections` -> LUNA16 candidates (centres and
    scores; diameters and boxes are not part of the LUNA16 candidate format)."""
    return [
        LunaCandidate(detections.series_uid, tuple(c), float(s))  # type: ignore[arg-type]
        for c, s in zip(detections.centers_xyz_mm, detections.scores, strict=True)
    ]


def detections_from_candidates(candidates: Iterable[LunaCandidate], series_uid: str) -> Detections:
    """The candidates of scan ``series_uid`` as :class:`~lidc_det.results.Detections`
    (file order kept; diameters 0 = unknown; no voxel boxes). Other scans' candidates
    are skipped; a scan without candidates gives empty Detections."""
    mine = [c for c in candidates if c.series_uid == series_uid]
    centers = np.array([c.center_xyz_mm for c in mine], dtype=np.float64).reshape(-1, 3)
    scores = np.array([c.probability for c in mine], dtype=np.float64)
    return Detections(series_uid, centers, np.zeros(len(mine)), scores)
