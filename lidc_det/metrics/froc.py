"""LUNA16 FROC analysis and CPM, with bootstrap confidence intervals over scans.

This module reimplements the rules of the official LUNA16 evaluation script
(``noduleCADEvaluationLUNA16.py``, Setio et al. 2017) so that its numbers match:

1. **Evaluated scans.** Only scans in ``series_uids`` count. Annotations and
   excluded findings of other scans are ignored (as in the reference, which
   evaluates a fold with the full ``annotations.csv``); a *candidate* of a scan
   outside the set is an error (:class:`FrocInputError`). Without an explicit
   list the set is the sorted union of the series in the annotations and the
   candidates: a scan with neither a nodule nor a candidate is then missing from
   the FP/scan denominator, so pass the list (LUNA16's ``seriesuids.csv``) for
   published numbers.
2. **At most 100 candidates per scan** (``max_candidates_per_scan``). Like the
   reference, a scan with more than ``k`` candidates keeps those whose
   probability is *strictly greater* than the ``(k+1)``-th highest probability.
   Candidates tied at the cut are therefore all dropped, so fewer than ``k`` may
   remain (no arbitrary tie-breaking by file order).
3. **Hit.** A candidate hits a finding when its squared world distance to the
   finding's centre is strictly below the squared radius (``diameter / 2``); a
   candidate exactly on the sphere misses. A finding with a negative diameter
   (LUNA16's ``-1`` = unknown, used in ``annotations_excluded.csv``) gets the
   reference's default diameter of 10 mm (:data:`UNKNOWN_DIAMETER_MM`).
4. **True positives.** A target nodule hit by one or more candidates is
   detected once, with the highest probability among them; every candidate that
   hits some target nodule is a TP candidate and never a false positive (extra
   hits on the same nodule are simply not counted). A candidate that hits two
   nodules lends its probability to both.
5. **Irrelevant findings.** A candidate that hits no target nodule but lies
   inside an excluded finding is ignored: neither TP nor FP.
6. **All other candidates are false positives.**
7. **FROC curve.** Over thresholds ``t`` (every distinct probability, highest
   first, plus ``+inf``): sensitivity(t) = detected nodules with score >= t /
   all target nodules (missed ones included); FP/scan(t) = FP candidates with
   probability >= t / number of evaluated scans (scans without candidates
   count). Tied probabilities enter together, as in ``sklearn.metrics.roc_curve``,
   which the reference uses; values are computed in the same floating-point
   order as the reference, so ties with the operating points resolve the same way.
8. **Operating points and CPM.** Sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan
   by ``np.interp`` on the curve (beyond the last point the curve stays at its
   final sensitivity); the CPM is their mean.
9. **95% CI.** Scans are resampled with replacement ``n_bootstrap`` times
   (``numpy.random.default_rng(seed)``); each replicate recomputes the whole
   curve, the 7 sensitivities and the CPM, and the interval is the reference's
   order-statistic percentile: sorted values at ``floor(a * B)`` and
   ``floor((1 - a) * B)`` with ``a = (1 - confidence) / 2``. Replicates that
   draw no target nodule are dropped (``n_bootstrap_used``). The reference
   computes its CI on a grid of FP rates only; here the CI is taken at the
   operating points directly and for the CPM, plus a band on a log grid for plots.

Two degenerate cases the reference does not handle: with no FP candidates
the curve is vertical at 0 FP/scan (the reference's own rule), and with no
detected nodule the sensitivity is 0 everywhere (the reference returns NaN).
With no target nodule at all the sensitivity is undefined and an error is raised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.data.luna import LunaCandidate, LunaFinding, candidates_from_detections
from lidc_det.errors import LidcDetError
from lidc_det.results import Detections

__all__ = [
    "DEFAULT_MAX_CANDIDATES",
    "OPERATING_FPS",
    "UNKNOWN_DIAMETER_MM",
    "FrocInputError",
    "FrocMatches",
    "FrocResult",
    "PairedCpmDifference",
    "evaluate_detections",
    "evaluate_froc",
    "evaluate_luna_csv",
    "froc_from_matches",
    "match_candidates",
    "paired_cpm_difference",
    "write_froc_report",
]

OPERATING_FPS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per scan at which LUNA16 reads the sensitivity (CPM = their mean)."""

UNKNOWN_DIAMETER_MM = 10.0
"""Diameter the reference script gives a finding whose diameter is negative (unknown)."""

DEFAULT_MAX_CANDIDATES = 100
"""LUNA16's cap on candidates per scan."""

_BAND_FPS = 2.0 ** np.linspace(-3.0, 3.0, 49)  # 1/8 .. 8 FP/scan, 8 points per octave


class FrocInputError(LidcDetError):
    """Inputs to the FROC analysis are inconsistent (unknown scans, no nodules, ...)."""


# ====================================================================== matching
@dataclass(frozen=True, eq=False)
class FrocMatches:
    """Which candidate hit what, for the scans of one evaluation (after the per-scan cap).

    Attributes:
        series_uids: the evaluated scans; ``*_scan`` arrays index into it.
        candidate_index: ``(C,)`` int, index of each kept candidate in the
            sequence given to :func:`match_candidates` (scan by scan, input order
            within a scan).
        candidate_scan: ``(C,)`` int, scan of each kept candidate.
        candidate_probability: ``(C,)`` float.
        candidate_label: ``(C,)`` int8: 1 = hits a target nodule (TP),
            0 = false positive, -1 = ignored (inside an excluded finding only).
        nodule_index: ``(N,)`` int, index of each target nodule of the evaluated
            scans in the annotations given.
        nodule_scan: ``(N,)`` int.
        nodule_score: ``(N,)`` float, highest probability among the candidates
            hitting the nodule; NaN when no candidate hits it.
        n_dropped: candidates removed by the per-scan cap.
        max_candidates_per_scan: the cap used (None = no cap).
    """

    series_uids: tuple[str, ...]
    candidate_index: np.ndarray
    candidate_scan: np.ndarray
    candidate_probability: np.ndarray
    candidate_label: np.ndarray
    nodule_index: np.ndarray
    nodule_scan: np.ndarray
    nodule_score: np.ndarray
    n_dropped: int
    max_candidates_per_scan: int | None

    @property
    def n_scans(self) -> int:
        return len(self.series_uids)

    @property
    def n_nodules(self) -> int:
        return int(self.nodule_score.shape[0])

    @property
    def n_tp_nodules(self) -> int:
        """Target nodules hit by at least one kept candidate (sensitivity at the lowest threshold)."""
        return int(np.count_nonzero(~np.isnan(self.nodule_score)))

    @property
    def n_candidates(self) -> int:
        return int(self.candidate_label.shape[0])

    @property
    def n_tp_candidates(self) -> int:
        return int(np.count_nonzero(self.candidate_label == 1))

    @property
    def n_fp(self) -> int:
        return int(np.count_nonzero(self.candidate_label == 0))

    @property
    def n_ignored(self) -> int:
        return int(np.count_nonzero(self.candidate_label == -1))


def _finding_arrays(findings: Sequence[LunaFinding]) -> tuple[np.ndarray, np.ndarray]:
    """(centres ``(N, 3)`` mm, squared radii ``(N,)`` mm^2) with the unknown-diameter rule."""
    centers = np.array([f.center_xyz_mm for f in findings], dtype=np.float64).reshape(-1, 3)
    d = np.array([f.diameter_mm for f in findings], dtype=np.float64)
    d = np.where(d < 0.0, UNKNOWN_DIAMETER_MM, d)
    r = d / 2.0
    return centers, r * r


def _squared_distances(cands: np.ndarray, findings: np.ndarray) -> np.ndarray:
    """``(C, 3)`` and ``(N, 3)`` world points -> ``(C, N)`` squared distances (mm^2),
    summed as dx^2 + dy^2 + dz^2 like the reference."""
    d = findings[None, :, :] - cands[:, None, :]
    return d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]


def _indices_by_series(records: Sequence[LunaFinding] | Sequence[LunaCandidate]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        out.setdefault(r.series_uid, []).append(i)
    return out


def _resolve_series(
    annotations: Sequence[LunaFinding],
    candidates: Sequence[LunaCandidate],
    series_uids: Sequence[str] | None,
) -> tuple[str, ...]:
    if series_uids is None:
        uids = tuple(sorted({a.series_uid for a in annotations} | {c.series_uid for c in candidates}))
    else:
        if isinstance(series_uids, str):
            raise TypeError("series_uids must be a sequence of UIDs, not one string")
        uids = tuple(str(u) for u in series_uids)
        seen: set[str] = set()
        dup = [u for u in uids if u in seen or seen.add(u)]  # type: ignore[func-returns-value]
        if dup:
            raise FrocInputError(f"series_uids lists {len(dup)} scan(s) twice, e.g. {dup[0]}")
    if not uids:
        raise FrocInputError("no scans to evaluate (empty series list, annotations and candidates)")
    known = set(uids)
    unknown = sorted({c.series_uid for c in candidates} - known)
    if unknown:
        n = sum(1 for c in candidates if c.series_uid not in known)
        raise FrocInputError(
            f"{n} candidate(s) belong to {len(unknown)} scan(s) outside the evaluated set of "
            f"{len(uids)} scans, e.g. {unknown[0]}; pass a series list that includes them, or "
            f"drop those candidates"
        )
    return uids


def match_candidates(
    annotations: Sequence[LunaFinding],
    candidates: Sequence[LunaCandidate],
    *,
    excluded: Sequence[LunaFinding] = (),
    series_uids: Sequence[str] | None = None,
    max_candidates_per_scan: int | None = DEFAULT_MAX_CANDIDATES,
) -> FrocMatches:
    """Apply the LUNA16 cap and hit rules (module docstring, rules 1-6) scan by scan.

    Args:
        annotations: target nodules (world mm).
        candidates: CAD marks (world mm, probability).
        excluded: irrelevant findings; candidates inside them (and hitting no
            target) are ignored.
        series_uids: evaluated scans; default: the sorted union of the
            annotation and candidate series.
        max_candidates_per_scan: per-scan cap (None: no cap).

    Raises:
        FrocInputError: a candidate of a scan outside ``series_uids``, a scan
            listed twice, no scan at all, or a cap below 1.
    """
    if max_candidates_per_scan is not None and max_candidates_per_scan < 1:
        raise FrocInputError(f"max_candidates_per_scan must be >= 1 or None, got {max_candidates_per_scan}")
    uids = _resolve_series(annotations, candidates, series_uids)

    cand_xyz = np.array([c.center_xyz_mm for c in candidates], dtype=np.float64).reshape(-1, 3)
    cand_p = np.array([c.probability for c in candidates], dtype=np.float64)
    if not np.all(np.isfinite(cand_p)):
        raise FrocInputError("candidate probabilities must be finite")
    ann_xyz, ann_r2 = _finding_arrays(annotations)
    exc_xyz, exc_r2 = _finding_arrays(excluded)
    cand_by = _indices_by_series(candidates)
    ann_by = _indices_by_series(annotations)
    exc_by = _indices_by_series(excluded)

    c_idx: list[np.ndarray] = []
    c_lab: list[np.ndarray] = []
    c_scan: list[np.ndarray] = []
    n_idx: list[np.ndarray] = []
    n_score: list[np.ndarray] = []
    n_scan: list[np.ndarray] = []
    dropped = 0
    for s, uid in enumerate(uids):
        ci = np.asarray(cand_by.get(uid, []), dtype=np.int64)
        probs = cand_p[ci]
        if max_candidates_per_scan is not None and ci.size > max_candidates_per_scan:
            cut = np.sort(probs)[::-1][max_candidates_per_scan]  # the (k+1)-th highest
            keep = probs > cut
            dropped += int(ci.size - np.count_nonzero(keep))
            ci, probs = ci[keep], probs[keep]
        xyz = cand_xyz[ci]

        ni = np.asarray(ann_by.get(uid, []), dtype=np.int64)
        hit = _squared_distances(xyz, ann_xyz[ni]) < ann_r2[ni][None, :]  # (C_s, N_s)
        is_tp = hit.any(axis=1)
        if ci.size:
            score = np.where(hit, probs[:, None], -np.inf).max(axis=0)
            score[~hit.any(axis=0)] = np.nan
        else:
            score = np.full(ni.size, np.nan)

        ei = np.asarray(exc_by.get(uid, []), dtype=np.int64)
        in_excluded = (_squared_distances(xyz, exc_xyz[ei]) < exc_r2[ei][None, :]).any(axis=1)
        label = np.where(is_tp, 1, np.where(in_excluded, -1, 0)).astype(np.int8)

        c_idx.append(ci)
        c_lab.append(label)
        c_scan.append(np.full(ci.size, s, dtype=np.int64))
        n_idx.append(ni)
        n_score.append(score)
        n_scan.append(np.full(ni.size, s, dtype=np.int64))

    ci_all = np.concatenate(c_idx)
    return FrocMatches(
        series_uids=uids,
        candidate_index=ci_all,
        candidate_scan=np.concatenate(c_scan),
        candidate_probability=cand_p[ci_all],
        candidate_label=np.concatenate(c_lab).astype(np.int8),
        nodule_index=np.concatenate(n_idx),
        nodule_scan=np.concatenate(n_scan),
        nodule_score=np.concatenate(n_score).astype(np.float64),
        n_dropped=dropped,
        max_candidates_per_scan=max_candidates_per_scan,
    )


# ========================================================================= curve
@dataclass(frozen=True)
class _Entries:
    """FROC entries (detected nodules and FP candidates) sorted by descending score.

    ``ends`` are the indices of the last entry of each group of equal scores,
    i.e. the thresholds of the curve (after the initial ``+inf``).
    """

    scan: np.ndarray  # (E,) int
    is_tp: np.ndarray  # (E,) bool
    score: np.ndarray  # (E,) float, descending
    ends: np.ndarray  # (K,) int
    nodules_per_scan: np.ndarray  # (S,) float (all target nodules, detected or not)
    n_scans: int


def _entries(m: FrocMatches) -> _Entries:
    det = ~np.isnan(m.nodule_score)
    fp = m.candidate_label == 0
    score = np.concatenate([m.nodule_score[det], m.candidate_probability[fp]])
    scan = np.concatenate([m.nodule_scan[det], m.candidate_scan[fp]])
    is_tp = np.concatenate([np.ones(int(det.sum()), bool), np.zeros(int(fp.sum()), bool)])
    order = np.argsort(-score, kind="stable")
    score, scan, is_tp = score[order], scan[order], is_tp[order]
    ends = np.flatnonzero(np.r_[score[1:] != score[:-1], True]) if score.size else np.zeros(0, np.int64)
    per_scan = np.bincount(m.nodule_scan, minlength=m.n_scans).astype(np.float64)
    return _Entries(scan, is_tp, score, ends, per_scan, m.n_scans)


def _curve_from_counts(
    cum_tp: np.ndarray, cum_fp: np.ndarray, n_nodules: np.ndarray, n_scans: int
) -> tuple[np.ndarray, np.ndarray]:
    """FROC points from cumulative counts, in the reference's floating-point order.

    Args:
        cum_tp: ``(B, J)`` detected nodules with score >= each threshold (the
            last column must be the total, i.e. the lowest threshold).
        cum_fp: ``(B, J)`` FP candidates likewise.
        n_nodules: ``(B,)`` all target nodules (> 0).
        n_scans: FP/scan denominator.

    Returns:
        ``(fps, sens)``, each ``(B, J)``.
    """
    n_det = cum_tp[:, -1:]
    n_fp = cum_fp[:, -1:]
    # reference: fps = (fpr * n_fp) / n_scans with fpr = cum_fp / n_fp; zeros when n_fp == 0
    fpr = np.divide(cum_fp, n_fp, out=np.zeros(cum_fp.shape), where=n_fp > 0)
    fps = fpr * n_fp / n_scans
    # reference: sens = (tpr * n_det) / n_nodules with tpr = cum_tp / n_det; zeros when n_det == 0
    tpr = np.divide(cum_tp, n_det, out=np.zeros(cum_tp.shape), where=n_det > 0)
    sens = tpr * n_det / n_nodules[:, None]
    return fps, sens


def _full_curve(e: _Entries, n_nodules: int) -> tuple[np.ndarray, np.ndarray]:
    """The point-estimate curve: ``(K + 1,)`` FP/scan and sensitivity at ``+inf`` and every threshold."""
    cum_tp = np.concatenate([[0.0], np.cumsum(e.is_tp, dtype=np.float64)[e.ends]])
    cum_fp = np.concatenate([[0.0], np.cumsum(~e.is_tp, dtype=np.float64)[e.ends]])
    fps, sens = _curve_from_counts(cum_tp[None], cum_fp[None], np.array([float(n_nodules)]), e.n_scans)
    return fps[0], sens[0]


def _prefix_counts(e: _Entries) -> tuple[np.ndarray, np.ndarray]:
    """Per-scan TP and FP counts among the top ``q`` entries, for the few cuts ``q``
    that shape the curve: ``(S, J)`` each.

    Between groups of tied scores that hold a detected nodule the curve is
    horizontal, so for ``np.interp`` it is exactly given by the points just
    before and just after each such group, plus ``(0, 0)`` and the final point.
    A bootstrap replicate that draws scan ``s`` ``c_s`` times then has
    cumulative counts ``c @ counts``, with no pass over all candidates.
    """
    n = e.score.size
    starts = np.r_[0, e.ends[:-1] + 1] if n else np.zeros(0, np.int64)
    group_has_tp = np.add.reduceat(e.is_tp.astype(np.int64), starts) > 0 if n else np.zeros(0, bool)
    cuts = np.unique(np.r_[0, starts[group_has_tp], e.ends[group_has_tp] + 1, n])  # prefix lengths
    col = np.searchsorted(cuts, np.arange(n), side="right")  # first cut that counts each entry
    s = e.nodules_per_scan.size
    out = []
    for mask in (e.is_tp, ~e.is_tp):
        d = np.zeros((s, cuts.size))
        np.add.at(d, (e.scan[mask], col[mask]), 1.0)
        out.append(np.cumsum(d, axis=1))
    return out[0], out[1]


def _interp_rows(x: np.ndarray, fps: np.ndarray, sens: np.ndarray) -> np.ndarray:
    """``np.interp(x, fps[i], sens[i])`` for each row: ``(B, len(x))``."""
    return np.stack([np.interp(x, f, s) for f, s in zip(fps, sens, strict=True)])


def _order_statistic_ci(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``(B, P)``: sorted values at ``floor(a*B)`` and ``floor((1-a)*B)``
    with ``a = (1 - confidence) / 2`` (the reference's rule); NaN when ``B == 0``."""
    n = values.shape[0]
    if n == 0:
        nan = np.full(values.shape[1], np.nan)
        return nan, nan.copy()
    v = np.sort(values, axis=0)
    a = (1.0 - confidence) / 2.0
    lo = min(int(math.floor(a * n)), n - 1)
    hi = min(int(math.floor((1.0 - a) * n)), n - 1)
    return v[lo], v[hi]


def _bootstrap_draws(rng: np.random.Generator, n_scans: int, n_bootstrap: int) -> np.ndarray:
    """``(B, S)`` scan indices drawn with replacement."""
    return rng.integers(0, n_scans, size=(n_bootstrap, n_scans))


def _bootstrap(
    e: _Entries, draws: np.ndarray, points: np.ndarray, *, max_cells: int = 4_000_000
) -> np.ndarray:
    """Sensitivity at ``points`` FP/scan for each bootstrap replicate.

    Args:
        e: the sorted entries of the evaluation.
        draws: ``(B, S)`` scan indices of each replicate.
        points: ``(P,)`` FP/scan values.
        max_cells: bound on ``chunk * J`` to cap memory.

    Returns:
        ``(B, P)``; rows of replicates without a target nodule are NaN.
    """
    n_b, n_s = draws.shape
    counts = np.bincount(
        (draws + (np.arange(n_b) * n_s)[:, None]).ravel(), minlength=n_b * n_s
    ).reshape(n_b, n_s).astype(np.float64)
    n_nod = counts @ e.nodules_per_scan
    tp_prefix, fp_prefix = _prefix_counts(e)
    out = np.full((n_b, points.size), np.nan)
    chunk = max(1, max_cells // max(1, tp_prefix.shape[1]))
    for start in range(0, n_b, chunk):
        rows = np.arange(start, min(n_b, start + chunk))
        rows = rows[n_nod[rows] > 0]
        if rows.size == 0:
            continue
        c = counts[rows]
        fps, sens = _curve_from_counts(c @ tp_prefix, c @ fp_prefix, n_nod[rows], e.n_scans)
        out[rows] = _interp_rows(points, fps, sens)
    return out


# ======================================================================== result
def _corner_indices(sens: np.ndarray) -> np.ndarray:
    """Indices of a curve's points that are not inside a run of equal sensitivity."""
    n = sens.size
    if n <= 2:
        return np.arange(n)
    inner = (sens[1:-1] != sens[:-2]) | (sens[1:-1] != sens[2:])
    return np.flatnonzero(np.r_[True, inner, True])


@dataclass(frozen=True, eq=False)
class FrocResult:
    """A LUNA16 FROC analysis.

    Attributes:
        fps_per_scan: ``(K,)`` curve abscissa, average FP candidates per scan,
            non-decreasing, starting at 0 (threshold ``+inf``).
        sensitivity: ``(K,)`` fraction of target nodules detected at each point.
        thresholds: ``(K,)`` probability threshold of each point (``inf`` first).
        operating_fps: the 7 FP/scan rates (1/8 .. 8).
        operating_sensitivity: sensitivity at each, by ``np.interp``.
        cpm: competition performance metric, mean of ``operating_sensitivity``.
        ci_low, ci_high: bootstrap CI of each operating sensitivity (NaN without bootstrap).
        cpm_ci_low, cpm_ci_high: bootstrap CI of the CPM.
        band_fps: ``(G,)`` log grid 1/8 .. 8 FP/scan for plotting the CI band.
        band_low, band_high: ``(G,)`` CI of the sensitivity on ``band_fps``.
        confidence: CI level (0.95).
        n_bootstrap: replicates requested; n_bootstrap_used: those with >= 1 nodule.
        seed: seed of the bootstrap generator.
        n_scans: evaluated scans (FP/scan denominator).
        n_nodules: target nodules in them.
        n_candidates: candidates kept after the cap
            (= n_tp_candidates + n_fp + n_ignored).
        n_tp_nodules: nodules hit by a kept candidate (at any threshold).
        n_tp_candidates: candidates hitting a target nodule.
        n_fp: false-positive candidates.
        n_ignored: candidates inside an excluded finding only.
        n_dropped: candidates removed by the per-scan cap.
        max_candidates_per_scan: the cap (None = no cap).
    """

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    operating_fps: tuple[float, ...]
    operating_sensitivity: tuple[float, ...]
    cpm: float
    ci_low: tuple[float, ...]
    ci_high: tuple[float, ...]
    cpm_ci_low: float
    cpm_ci_high: float
    band_fps: np.ndarray
    band_low: np.ndarray
    band_high: np.ndarray
    confidence: float
    n_bootstrap: int
    n_bootstrap_used: int
    seed: int
    n_scans: int
    n_nodules: int
    n_candidates: int
    n_tp_nodules: int
    n_tp_candidates: int
    n_fp: int
    n_ignored: int
    n_dropped: int
    max_candidates_per_scan: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: arrays as lists; NaN and infinities as None.

        The curve is stored by its corners only: inside a horizontal run (FP
        candidates and no new nodule) the points are dropped, which leaves
        ``np.interp`` on the curve unchanged and keeps the file small.
        """
        keep = _corner_indices(self.sensitivity)

        def num(v: float) -> float | None:
            v = float(v)
            return v if math.isfinite(v) else None

        def seq(a: Iterable[float]) -> list[float | None]:
            return [num(v) for v in a]

        return {
            "protocol": "LUNA16 FROC",
            "operating_fps": list(self.operating_fps),
            "operating_sensitivity": seq(self.operating_sensitivity),
            "ci_low": seq(self.ci_low),
            "ci_high": seq(self.ci_high),
            "cpm": num(self.cpm),
            "cpm_ci_low": num(self.cpm_ci_low),
            "cpm_ci_high": num(self.cpm_ci_high),
            "confidence": self.confidence,
            "n_bootstrap": self.n_bootstrap,
            "n_bootstrap_used": self.n_bootstrap_used,
            "seed": self.seed,
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "n_candidates": self.n_candidates,
            "n_tp_nodules": self.n_tp_nodules,
            "n_tp_candidates": self.n_tp_candidates,
            "n_fp": self.n_fp,
            "n_ignored": self.n_ignored,
            "n_dropped": self.n_dropped,
            "max_candidates_per_scan": self.max_candidates_per_scan,
            "curve": {
                "points": "corners",
                "fps_per_scan": seq(self.fps_per_scan[keep]),
                "sensitivity": seq(self.sensitivity[keep]),
                "thresholds": seq(self.thresholds[keep]),
            },
            "band": {
                "fps_per_scan": seq(self.band_fps),
                "low": seq(self.band_low),
                "high": seq(self.band_high),
            },
        }

    def table(self) -> str:
        """A plain-text table: the 7 sensitivities and the CPM with CIs, then the counts."""
        pct = f"{self.confidence * 100:g}% CI"
        lines = [
            f"LUNA16 FROC: {self.n_scans} scans, {self.n_nodules} nodules, "
            f"{self.n_candidates} candidates",
            f"{'FP/scan':>8}  {'sensitivity':>11}  {pct}",
        ]

        def ci(lo: float, hi: float) -> str:
            return "-" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.3f}, {hi:.3f}]"

        for f, s, lo, hi in zip(self.operating_fps, self.operating_sensitivity, self.ci_low, self.ci_high, strict=True):
            lines.append(f"{f:>8g}  {s:>11.3f}  {ci(lo, hi)}")
        lines.append(f"{'CPM':>8}  {self.cpm:>11.3f}  {ci(self.cpm_ci_low, self.cpm_ci_high)}")
        frac = self.n_tp_nodules / self.n_nodules if self.n_nodules else float("nan")
        cap = "no cap" if self.max_candidates_per_scan is None else f"cap {self.max_candidates_per_scan}/scan"
        lines += [
            f"nodules hit at any threshold: {self.n_tp_nodules}/{self.n_nodules} ({frac:.3f})",
            f"candidates: {self.n_tp_candidates} TP, {self.n_fp} FP, {self.n_ignored} ignored "
            f"(excluded findings), {self.n_dropped} dropped ({cap})",
            f"bootstrap: {self.n_bootstrap_used}/{self.n_bootstrap} replicates, seed {self.seed}",
        ]
        return "\n".join(lines)


def froc_from_matches(
    matches: FrocMatches, *, n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95
) -> FrocResult:
    """FROC curve, the 7 operating sensitivities, CPM and bootstrap CIs (module rules 7-9).

    Raises:
        FrocInputError: no target nodule in the evaluated scans, or bad
            ``n_bootstrap`` / ``confidence``.
    """
    if matches.n_nodules == 0:
        raise FrocInputError(
            f"no target nodule in the {matches.n_scans} evaluated scans: sensitivity is undefined"
        )
    if n_bootstrap < 0:
        raise FrocInputError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise FrocInputError(f"confidence must be in (0, 1), got {confidence}")
    e = _entries(matches)
    fps, sens = _full_curve(e, matches.n_nodules)
    thresholds = np.concatenate([[np.inf], e.score[e.ends]])
    ops = np.asarray(OPERATING_FPS)
    op_sens = np.interp(ops, fps, sens)

    points = np.concatenate([ops, _BAND_FPS])
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        boot = _bootstrap(e, _bootstrap_draws(rng, matches.n_scans, n_bootstrap), points)
        boot = boot[~np.isnan(boot[:, 0])]
    else:
        boot = np.zeros((0, points.size))
    with_cpm = np.concatenate([boot, boot[:, : ops.size].mean(axis=1, keepdims=True)], axis=1)
    lo, hi = _order_statistic_ci(with_cpm, confidence)
    n_ops = ops.size
    return FrocResult(
        fps_per_scan=fps,
        sensitivity=sens,
        thresholds=thresholds,
        operating_fps=OPERATING_FPS,
        operating_sensitivity=tuple(float(v) for v in op_sens),
        cpm=float(np.mean(op_sens)),
        ci_low=tuple(float(v) for v in lo[:n_ops]),
        ci_high=tuple(float(v) for v in hi[:n_ops]),
        cpm_ci_low=float(lo[-1]),
        cpm_ci_high=float(hi[-1]),
        band_fps=_BAND_FPS.copy(),
        band_low=lo[n_ops:-1].copy(),
        band_high=hi[n_ops:-1].copy(),
        confidence=float(confidence),
        n_bootstrap=int(n_bootstrap),
        n_bootstrap_used=int(boot.shape[0]),
        seed=int(seed),
        n_scans=matches.n_scans,
        n_nodules=matches.n_nodules,
        n_candidates=matches.n_candidates,
        n_tp_nodules=matches.n_tp_nodules,
        n_tp_candidates=matches.n_tp_candidates,
        n_fp=matches.n_fp,
        n_ignored=matches.n_ignored,
        n_dropped=matches.n_dropped,
        max_candidates_per_scan=matches.max_candidates_per_scan,
    )


def evaluate_froc(
    annotations: Sequence[LunaFinding],
    candidates: Sequence[LunaCandidate],
    *,
    excluded: Sequence[LunaFinding] = (),
    series_uids: Sequence[str] | None = None,
    max_candidates_per_scan: int | None = DEFAULT_MAX_CANDIDATES,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> FrocResult:
    """LUNA16 FROC / CPM of ``candidates`` against ``annotations`` (see the module docstring).

    Args:
        annotations: target nodules, world mm.
        candidates: CAD marks of the evaluated scans, world mm.
        excluded: irrelevant findings (LUNA16 ``annotations_excluded.csv``).
        series_uids: evaluated scans (LUNA16 ``seriesuids.csv`` or a fold);
            default: sorted union of annotation and candidate series.
        max_candidates_per_scan: LUNA16 cap (100); None for no cap.
        n_bootstrap: bootstrap replicates over scans (0: no CI).
        seed: seed of ``numpy.random.default_rng`` for the bootstrap.
        confidence: CI level.

    Raises:
        FrocInputError: candidates of scans outside the set, no target nodule, ...
    """
    m = match_candidates(
        annotations,
        candidates,
        excluded=excluded,
        series_uids=series_uids,
        max_candidates_per_scan=max_candidates_per_scan,
    )
    return froc_from_matches(m, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)


def evaluate_detections(
    annotations: Sequence[LunaFinding],
    detections: Sequence[Detections],
    *,
    excluded: Sequence[LunaFinding] = (),
    series_uids: Sequence[str] | None = None,
    max_candidates_per_scan: int | None = DEFAULT_MAX_CANDIDATES,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> FrocResult:
    """:func:`evaluate_froc` for per-scan :class:`~lidc_det.results.Detections`.

    Each Detections is one processed scan (even when empty), so by default the
    evaluated set is exactly the scans of ``detections``, and annotations of
    other scans are ignored. Pass ``series_uids`` to evaluate a larger set
    (scans without Detections then count as scans with no candidates).

    Raises:
        FrocInputError: two Detections for one scan, and as :func:`evaluate_froc`.
    """
    seen: set[str] = set()
    for d in detections:
        if d.series_uid in seen:
            raise FrocInputError(f"two Detections for scan {d.series_uid}")
        seen.add(d.series_uid)
    uids = [d.series_uid for d in detections] if series_uids is None else series_uids
    cands = [c for d in detections for c in candidates_from_detections(d)]
    return evaluate_froc(
        annotations,
        cands,
        excluded=excluded,
        series_uids=uids,
        max_candidates_per_scan=max_candidates_per_scan,
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
    )


# ======================================================================== files
def write_froc_report(
    result: FrocResult,
    out_dir: str | Path,
    *,
    label: str = "CAD",
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Atomically write ``froc.json`` (``result.to_dict()`` + ``extra`` + lidc-det
    version and git revision) and ``froc.png`` into ``out_dir``; returns both paths."""
    from lidc_det import __version__, atomic
    from lidc_det.plots import plot_froc
    from lidc_det.provenance import git_revision

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = result.to_dict()
    record.update({"label": label, "lidc_det_version": __version__, "git_revision": git_revision()})
    if extra:
        record.update(extra)
    json_path, png_path = out / "froc.json", out / "froc.png"
    atomic.write_json(json_path, record)
    plot_froc(result, png_path, label=label, title=f"LUNA16 FROC - {label}")
    return json_path, png_path


def evaluate_luna_csv(
    annotations_csv: str | Path,
    candidates_csv: str | Path,
    *,
    excluded_csv: str | Path | None = None,
    series_uids_csv: str | Path | None = None,
    out_dir: str | Path | None = None,
    max_candidates_per_scan: int | None = DEFAULT_MAX_CANDIDATES,
    n_bootstrap: int = 1000,
    seed: int = 0,
    label: str | None = None,
) -> FrocResult:
    """Read LUNA16 CSVs, run :func:`evaluate_froc`, and (with ``out_dir``) write the
    report of :func:`write_froc_report` with the input paths and the wall time.

    ``label`` (for the plot) defaults to the candidates file's stem.
    """
    from lidc_det.data.luna import read_annotations, read_candidates, read_excluded, read_series_uids

    t0 = time.perf_counter()
    annotations = read_annotations(annotations_csv)
    candidates = read_candidates(candidates_csv)
    excluded = read_excluded(excluded_csv) if excluded_csv is not None else []
    uids = read_series_uids(series_uids_csv) if series_uids_csv is not None else None
    result = evaluate_froc(
        annotations,
        candidates,
        excluded=excluded,
        series_uids=uids,
        max_candidates_per_scan=max_candidates_per_scan,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    if out_dir is not None:

        def p(x: str | Path | None) -> str | None:
            return None if x is None else str(Path(x).resolve())

        extra = {
            "inputs": {
                "annotations": p(annotations_csv),
                "candidates": p(candidates_csv),
                "excluded": p(excluded_csv),
                "series_uids": p(series_uids_csv),
            },
            "wall_time_s": round(time.perf_counter() - t0, 3),
        }
        write_froc_report(result, out_dir, label=label or Path(candidates_csv).stem, extra=extra)
    return result


# ================================================================ paired comparison
@dataclass(frozen=True)
class PairedCpmDifference:
    """CPM of two scorings of the same scans and nodules, and the bootstrap of their difference.

    Attributes:
        cpm_a, cpm_b: the two CPMs; difference: ``cpm_b - cpm_a``.
        ci_low, ci_high: percentile CI of the difference (the same scans drawn for both
            in each replicate, the reference's order-statistic rule as for the CPM CI).
        p_not_better: share of replicates with ``difference <= 0`` (one-sided).
        n_bootstrap, n_bootstrap_used (replicates with >= 1 nodule), seed, confidence, n_scans.
    """

    cpm_a: float
    cpm_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_not_better: float
    n_bootstrap: int
    n_bootstrap_used: int
    seed: int
    confidence: float
    n_scans: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def paired_cpm_difference(
    a: FrocMatches, b: FrocMatches, *, n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95
) -> PairedCpmDifference:
    """Paired bootstrap over scans of ``CPM(b) - CPM(a)``: each replicate draws one set of
    scans (with replacement) and recomputes both FROC curves on it (module rules 7-9).

    ``a`` and ``b`` must be matches of the same scans (same order) and the same target
    nodules, e.g. :func:`match_candidates` of two scorings of one candidate list.

    Raises:
        FrocInputError: other scans or nodules, no target nodule, or ``n_bootstrap < 1``.
    """
    if a.series_uids != b.series_uids:
        raise FrocInputError("paired CPM difference: the two evaluations cover different scans")
    if not (np.array_equal(a.nodule_index, b.nodule_index) and np.array_equal(a.nodule_scan, b.nodule_scan)):
        raise FrocInputError("paired CPM difference: the two evaluations have different target nodules")
    if a.n_nodules == 0:
        raise FrocInputError("no target nodule in the evaluated scans: sensitivity is undefined")
    if n_bootstrap < 1:
        raise FrocInputError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise FrocInputError(f"confidence must be in (0, 1), got {confidence}")
    ops = np.asarray(OPERATING_FPS)
    cpm = []
    boots = []
    draws = _bootstrap_draws(np.random.default_rng(seed), a.n_scans, n_bootstrap)
    for m in (a, b):
        e = _entries(m)
        fps, sens = _full_curve(e, m.n_nodules)
        cpm.append(float(np.mean(np.interp(ops, fps, sens))))
        boots.append(_bootstrap(e, draws, ops).mean(axis=1))
    diff = boots[1] - boots[0]
    diff = diff[~np.isnan(diff)]
    lo, hi = _order_statistic_ci(diff[:, None], confidence)
    return PairedCpmDifference(
        cpm_a=cpm[0], cpm_b=cpm[1], difference=cpm[1] - cpm[0], ci_low=float(lo[0]), ci_high=float(hi[0]),
        p_not_better=float(np.mean(diff <= 0)) if diff.size else float("nan"), n_bootstrap=int(n_bootstrap),
        n_bootstrap_used=int(diff.size), seed=int(seed), confidence=float(confidence), n_scans=a.n_scans,
    )
