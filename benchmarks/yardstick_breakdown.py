"""Which kinds of inserted nodule a detector finds on a semi-real yardstick, and what scores above them.

A yardstick's CPM says how many of its inserted nodules are found; this says which: every inserted
nodule carries what the insertion recorded about it (diameter, the reader's texture rating, placement
parenchymal / juxtapleural / juxtavascular, core HU, in the scan's ``meta.json``), and the counts of
nodules found below 1 and 8 false positives per scan are given by placement, size (<= 6 mm, > 6 mm)
and texture (subsolid: rating <= 2). The false positives above them are grouped by place: a real
structure of the background is a false positive in every copy, at about the same place.

Detector-agnostic (any :class:`~lidc_det.results.Detections`): the transfer benchmark records it for
every yardstick (``by_kind`` in ``transfer.json``), and
``python -m benchmarks.transfer kinds RUN_DIR --data-dir DIR`` recomputes it from a finished run's
candidate CSVs. :mod:`benchmarks.blob_misses` uses the same rows for blob-lgbm's raw candidates.
SYNTHETIC nodules on a real background: a diagnostic, not a result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUBSOLID_MAX_TEXTURE = 2  # LIDC texture rating: 1-2 ground glass / part solid, 3-5 solid


@dataclass(frozen=True)
class NoduleRow:
    """One inserted nodule and the detector's answer to it.

    Attributes:
        series_uid: the yardstick copy.
        diameter_mm, texture, placement, core_hu: what the insertion recorded (None where it did not).
        proposed: a candidate (a detection, for :func:`detection_rows`) lies within the nodule's radius.
        score: the best score of those candidates (None when none).
        fp_per_scan_above: the yardstick's false positives scoring above it, per scan (the FROC abscissa
            from which it counts; None when not proposed).
        features: optional detector features of the best candidate (name -> value).
    """

    series_uid: str
    diameter_mm: float
    texture: int | None
    placement: str | None
    core_hu: float | None
    proposed: bool
    score: float | None
    fp_per_scan_above: float | None
    features: dict[str, float] = field(default_factory=dict)


Scan = tuple[str, list[dict[str, Any]]]  # (series uid, its inserted nodules as meta.json dicts)


def inserted_nodules(ds: Any, series_uid: str, region: str) -> list[dict[str, Any]]:
    """The inserted nodules of one prepared semi-real scan whose centre lies in ``region``, as recorded in
    its ``meta.json`` (``center_xyz_mm``, ``diameter_mm``, ``inserted``: placement, texture, core_hu)."""
    from lidc_det.data.prepare import scan_dir
    from lidc_det.synthetic.semireal import in_region

    meta = json.loads((scan_dir(ds.root, series_uid) / "meta.json").read_text())
    return [n for n in meta["nodules"] if ":inserted" in n["nodule_id"]
            and in_region(np.asarray([n["center_xyz_mm"]]), region)[0]]


def false_positives(dets: Sequence[Any], scans: Sequence[Scan], excluded: Sequence[Any]) -> list[tuple[float, str, np.ndarray]]:
    """``(score, series uid, world centre)`` of every detection that hits no inserted nodule and no excluded
    finding of its scan (LUNA16 hit rule: closer than the radius). ``dets`` follow ``scans``."""
    out: list[tuple[float, str, np.ndarray]] = []
    for (uid, nods), d in zip(scans, dets, strict=True):
        found = [(np.asarray(n["center_xyz_mm"]), n["diameter_mm"] / 2) for n in nods]
        found += [(np.asarray(f.center_xyz_mm), f.diameter_mm / 2) for f in excluded if f.series_uid == uid]
        for c, s in zip(d.centers_xyz_mm, d.scores):
            if not any(np.linalg.norm(c - p) < r for p, r in found):
                out.append((float(s), uid, c))
    return out


def fp_groups(dets: Sequence[Any], scans: Sequence[Scan], excluded: Sequence[Any],
              top: int = 40, reach_mm: float = 6.0) -> list[dict[str, Any]]:
    """The ``top`` best false positives of the set grouped by place (within ``reach_mm``, greedily, best
    first): world centre of the group's best, copies it appears in, best and lowest score."""
    items = sorted(false_positives(dets, scans, excluded), key=lambda t: -t[0])
    groups: list[dict[str, Any]] = []
    for s, uid, c in items[:top]:
        for g in groups:
            if np.linalg.norm(g["centre"] - c) <= reach_mm:
                g["scans"].add(uid)
                g["n"] += 1
                g["lowest"] = s
                break
        else:
            groups.append({"centre": c, "scans": {uid}, "n": 1, "best": s, "lowest": s})
    return [{"world_xyz_mm": [round(float(v), 1) for v in g["centre"]], "n_fp": g["n"], "n_scans": len(g["scans"]),
             "best_score": round(g["best"], 4), "lowest_score": round(g["lowest"], 4)} for g in groups]


def nodule_row(series_uid: str, nodule: dict[str, Any], score: float | None, fp_scores: np.ndarray, n_scans: int,
               features: dict[str, float] | None = None) -> NoduleRow:
    """The row of one inserted nodule whose best candidate scored ``score`` (None: not proposed), against the
    set's false-positive scores ``fp_scores`` over ``n_scans`` scans."""
    ins = nodule.get("inserted", {})
    return NoduleRow(
        series_uid, round(float(nodule["diameter_mm"]), 1), ins.get("texture"), ins.get("placement"), ins.get("core_hu"),
        score is not None, None if score is None else round(score, 4),
        None if score is None else float((fp_scores > score).sum()) / n_scans, features or {},
    )


def detection_rows(dets: Sequence[Any], scans: Sequence[Scan], excluded: Sequence[Any]) -> list[NoduleRow]:
    """:class:`NoduleRow` of every inserted nodule of ``scans`` from the final detections ``dets`` (one
    :class:`~lidc_det.results.Detections` per scan, in order): a nodule's score is the best detection within
    its radius."""
    fp = np.asarray([s for s, _, _ in false_positives(dets, scans, excluded)])
    rows: list[NoduleRow] = []
    for (uid, nods), d in zip(scans, dets, strict=True):
        for n in nods:
            hit = np.linalg.norm(d.centers_xyz_mm - np.asarray(n["center_xyz_mm"]), axis=1) < n["diameter_mm"] / 2 \
                if len(d) else np.zeros(0, bool)
            rows.append(nodule_row(uid, n, float(d.scores[hit].max()) if hit.any() else None, fp, len(scans)))
    return rows


def summary(rows: Sequence[NoduleRow]) -> dict[str, dict[str, int]]:
    """Counts of the table: nodules, never proposed, found below 1 and 8 FP/scan; for all, by size, texture
    (subsolid) and placement."""
    def part(rs: list[NoduleRow]) -> dict[str, int]:
        return {"n": len(rs), "not_proposed": sum(not r.proposed for r in rs),
                "below_1fp": sum(r.fp_per_scan_above is not None and r.fp_per_scan_above < 1 for r in rs),
                "below_8fp": sum(r.fp_per_scan_above is not None and r.fp_per_scan_above < 8 for r in rs)}

    rows = list(rows)
    out = {"all": part(rows), "<=6mm": part([r for r in rows if r.diameter_mm <= 6]),
           ">6mm": part([r for r in rows if r.diameter_mm > 6]),
           "subsolid (texture <= 2)": part([r for r in rows if r.texture is not None and r.texture <= SUBSOLID_MAX_TEXTURE])}
    for p in sorted({r.placement for r in rows if r.placement}):
        out[p] = part([r for r in rows if r.placement == p])
    return out


def breakdown(ds: Any, dets: Sequence[Any], region: str, excluded: Sequence[Any], n_groups: int = 10) -> dict[str, Any]:
    """The record of one yardstick (prepared semi-real data set ``ds``, detections restricted to ``region``, one
    per scan of ``ds.series_uids``): ``summary`` (:func:`summary`) and the top ``n_groups`` false-positive groups."""
    by_uid = {d.series_uid: d for d in dets}
    scans = [(uid, inserted_nodules(ds, uid, region)) for uid in ds.series_uids if uid in by_uid]
    ordered = [by_uid[uid] for uid, _ in scans]
    return {"synthetic_nodules": True, "summary": summary(detection_rows(ordered, scans, excluded)),
            "fp_groups": fp_groups(ordered, scans, excluded)[:n_groups]}


def summary_table(named: Sequence[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one table of several breakdowns (``(row name, breakdown)``, one row each): per kind
    of nodule, ``found below 1 FP/scan / below 8 / n``."""
    kinds: list[str] = []
    for _, b in named:
        kinds += [k for k in b["summary"] if k not in kinds]
    rows = []
    for name, b in named:
        cells = [name]
        for k in kinds:
            p = b["summary"].get(k)
            cells.append("-" if p is None else f"{p['below_1fp']} / {p['below_8fp']} / {p['n']}")
        rows.append(cells)
    return ["found below 1 / 8 FP/scan / n", *kinds], rows


def summary_markdown(named: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """:func:`summary_table` in Markdown."""
    header, rows = summary_table(named)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])
