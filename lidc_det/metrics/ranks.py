"""Where each real nodule falls in a detector's ranked list: first-hit rank, false positives above.

On a handful of real scans a FROC says little; the rank of each nodule's first hit
and the false positives scored above it say exactly what a reader of the candidate
list would see. The hit rule is LUNA16's: a candidate hits a nodule when its world
distance to the nodule centre is below the nodule radius; a candidate within the
radius of an irrelevant finding is neither hit nor false positive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lidc_det.data.luna import LunaFinding
from lidc_det.metrics.froc import _finding_arrays
from lidc_det.results import Detections

__all__ = ["NoduleRank", "candidate_kinds", "nodule_ranks", "score_at_sensitivity"]


@dataclass(frozen=True)
class NoduleRank:
    """One target nodule in one scan's ranked candidates.

    Attributes:
        series_uid: the scan.
        center_xyz_mm, diameter_mm: the nodule (world mm).
        rank: 1-based position of the first candidate that hits it (None: not hit).
        score: that candidate's score (None: not hit).
        fps_above: false-positive candidates scored strictly above the first hit
            (all false positives of the scan when it is not hit).
        distance_mm: world distance of the first hit to the nodule centre (None: not hit).
    """

    series_uid: str
    center_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    rank: int | None
    score: float | None
    fps_above: int
    distance_mm: float | None


def candidate_kinds(
    detections: Detections, targets: Sequence[LunaFinding], irrelevant: Sequence[LunaFinding] = ()
) -> np.ndarray:
    """Per candidate (in ``detections`` order): ``"tp"`` (hits a target), ``"ignored"``
    (hits only an irrelevant finding) or ``"fp"``. Only findings of the same scan count."""
    c = detections.centers_xyz_mm

    def hits(findings: Sequence[LunaFinding]) -> np.ndarray:
        mine = [f for f in findings if f.series_uid == detections.series_uid]
        if not mine or len(c) == 0:
            return np.zeros(len(c), dtype=bool)
        centres, r2 = _finding_arrays(mine)  # a negative (unknown) diameter counts as LUNA16's 10 mm
        d2 = ((c[:, None, :] - centres[None]) ** 2).sum(axis=2)
        return np.any(d2 < r2[None], axis=1)

    tp = hits(targets)
    ign = hits(irrelevant) & ~tp
    out = np.full(len(c), "fp", dtype=object)
    out[tp] = "tp"
    out[ign] = "ignored"
    return out


def nodule_ranks(
    detections: Detections, targets: Sequence[LunaFinding], irrelevant: Sequence[LunaFinding] = ()
) -> list[NoduleRank]:
    """:class:`NoduleRank` of every target of ``detections.series_uid`` (candidates ranked by
    descending score, ties in input order)."""
    order = np.argsort(-detections.scores, kind="stable")
    ranked = Detections(
        detections.series_uid, detections.centers_xyz_mm[order], detections.diameters_mm[order], detections.scores[order]
    )
    kinds = candidate_kinds(ranked, targets, irrelevant)
    fp_cum = np.cumsum(kinds == "fp")
    out: list[NoduleRank] = []
    for t in targets:
        if t.series_uid != detections.series_uid:
            continue
        d = np.linalg.norm(ranked.centers_xyz_mm - np.asarray(t.center_xyz_mm), axis=1) if len(ranked) else np.zeros(0)
        hit = np.flatnonzero(d < t.diameter_mm / 2.0)
        if len(hit) == 0:
            out.append(NoduleRank(t.series_uid, t.center_xyz_mm, t.diameter_mm, None, None, int(fp_cum[-1]) if len(fp_cum) else 0, None))
            continue
        i = int(hit[0])
        out.append(
            NoduleRank(
                t.series_uid,
                t.center_xyz_mm,
                t.diameter_mm,
                rank=i + 1,
                score=float(ranked.scores[i]),
                fps_above=int(fp_cum[i - 1]) if i > 0 else 0,
                distance_mm=round(float(d[i]), 2),
            )
        )
    return out


def score_at_sensitivity(
    detections: Sequence[Detections], targets: Sequence[LunaFinding], sensitivity: float
) -> tuple[float | None, float]:
    """The highest score threshold at which ``sensitivity`` of ``targets`` is hit.

    A target counts as found at threshold ``t`` when a candidate of its scan with score
    ``>= t`` lies within its radius. Returns ``(threshold, sensitivity reached)``; the
    threshold is None when even all candidates together miss the wanted sensitivity
    (then the second value is the best reachable sensitivity).
    """
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    if not targets:
        raise ValueError("no targets: sensitivity is undefined")
    by_uid = {d.series_uid: d for d in detections}
    best = np.full(len(targets), -np.inf)  # best score of a candidate hitting each target
    for i, t in enumerate(targets):
        d = by_uid.get(t.series_uid)
        if d is None or len(d) == 0:
            continue
        hit = np.linalg.norm(d.centers_xyz_mm - np.asarray(t.center_xyz_mm), axis=1) < t.diameter_mm / 2.0
        if hit.any():
            best[i] = float(d.scores[hit].max())
    found = np.sort(best[np.isfinite(best)])[::-1]
    need = int(np.ceil(sensitivity * len(targets) - 1e-9))
    if len(found) < need:
        return None, float(len(found) / len(targets))
    return float(found[need - 1]), float(need / len(targets))
