"""ROC AUC with a 95 % bootstrap confidence interval over patients.

Nodules of one patient are not independent, so the bootstrap resamples
*patients* with replacement (all nodules of a drawn patient come along) and
recomputes scikit-learn's ``roc_auc_score``; the interval is the percentile
interval. :func:`paired_auc_difference` draws the same patients for two scores,
which gives the interval of their difference (e.g. model minus diameter).
Resamples are row weights (how often each row's patient was drawn), scored
all at once by :func:`weighted_aucs` (the Mann-Whitney form of the AUC, equal
to scikit-learn's ``roc_auc_score`` with ``sample_weight``). The same ``seed``
draws the same patients for every score of a data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["AucCI", "AucDifference", "bootstrap_auc", "paired_auc_difference", "weighted_aucs"]


@dataclass(frozen=True)
class AucCI:
    """AUC of one score with its bootstrap interval.

    Attributes:
        auc: ROC AUC on all rows (NaN when only one class is present).
        ci_low, ci_high: percentile bootstrap interval (NaN without enough resamples).
        confidence: e.g. 0.95.
        n: rows; n_positive: malignant rows; n_patients: distinct patients.
        n_boot: resamples drawn (resamples with a single class are skipped and not counted).
    """

    auc: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int
    n_positive: int
    n_patients: int
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.auc:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


@dataclass(frozen=True)
class AucDifference:
    """``AUC(a) - AUC(b)`` on the same rows with its paired patient-bootstrap interval.

    ``p_le_zero`` is the share of resamples where the difference is <= 0
    (a one-sided bootstrap p-value for "a beats b").
    """

    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    p_le_zero: float
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(y) == 0 or y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, s))


def _bootstrap_weights(groups: Sequence[str], n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, N)`` row multiplicities of ``n_boot`` patient-bootstrap resamples.

    Each resample draws the patients with replacement (``numpy.random.default_rng(seed)``);
    a row counts as often as its patient was drawn.
    """
    g = np.asarray([str(v) for v in groups], dtype=object)
    _, patient_of_row = np.unique(g, return_inverse=True)
    n_pat = int(patient_of_row.max()) + 1 if len(g) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, max(n_pat, 1), size=(n_boot, n_pat))
    flat = (draws + np.arange(n_boot)[:, None] * n_pat).ravel()
    counts = np.bincount(flat, minlength=n_boot * n_pat).reshape(n_boot, n_pat).astype(np.float64)
    return counts[:, patient_of_row]


def weighted_aucs(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under each row-weight vector, vectorised: ``(B,)`` for ``weights`` ``(B, N)``.

    Equals ``roc_auc_score(y, score, sample_weight=w)`` (ties count 1/2);
    NaN where a weight vector leaves one class empty.
    """
    y = np.asarray(y).astype(bool)
    order = np.argsort(score, kind="stable")
    s_sorted = np.asarray(score, dtype=np.float64)[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
    w = np.asarray(weights, dtype=np.float64)[:, order]
    pos = np.add.reduceat(w * y[order], starts, axis=1)
    neg = np.add.reduceat(w * ~y[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _check(y: Any, groups: Sequence[str], *scores: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    y = np.asarray(y).astype(int).reshape(-1)
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
    if any(len(a) != len(y) for a in arrays) or len(groups) != len(y):
        raise ValueError(f"AUC: {len(y)} labels; groups and scores must have the same length")
    if any(not np.isfinite(a).all() for a in arrays):
        raise ValueError("AUC: scores contain NaN or inf")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"AUC: labels must be 0/1, got {sorted(set(np.unique(y).tolist()))}")
    return y, arrays


def bootstrap_auc(
    y: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    groups: Sequence[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> AucCI:
    """ROC AUC of ``score`` for labels ``y`` with a patient-bootstrap interval.

    Args:
        y: ``(N,)`` labels in {0, 1}.
        score: ``(N,)`` higher = more likely malignant.
        groups: ``(N,)`` patient id of each row (the resampling unit).
        n_boot: bootstrap resamples.
        seed: seed of the resampling (``numpy.random.default_rng``).
        confidence: interval level.
    """
    groups = list(groups)
    y, (s,) = _check(y, groups, score)
    auc = _auc(y, s)
    lo = hi = float("nan")
    boots = np.empty(0)
    if np.isfinite(auc) and n_boot > 0:
        boots = weighted_aucs(y, s, _bootstrap_weights(groups, n_boot, seed))
        boots = boots[np.isfinite(boots)]
        if len(boots) >= 20:
            a = (1 - confidence) / 2
            lo, hi = (float(v) for v in np.quantile(boots, [a, 1 - a]))
    return AucCI(
        auc=auc,
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
        n=int(len(y)),
        n_positive=int(y.sum()),
        n_patients=len(set(map(str, groups))),
        n_boot=len(boots),
    )


def paired_auc_difference(
    y: Sequence[int] | np.ndarray,
    score_a: Sequence[float] | np.ndarray,
    score_b: Sequence[float] | np.ndarray,
    groups: Sequence[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> AucDifference:
    """``AUC(score_a) - AUC(score_b)`` with a paired patient-bootstrap interval."""
    groups = list(groups)
    y, (a, b) = _check(y, groups, score_a, score_b)
    delta = _auc(y, a) - _auc(y, b)
    w = _bootstrap_weights(groups, n_boot, seed)
    diffs = weighted_aucs(y, a, w) - weighted_aucs(y, b, w)
    diffs = diffs[np.isfinite(diffs)]
    lo = hi = p = float("nan")
    if len(diffs) >= 20:
        al = (1 - confidence) / 2
        lo, hi = (float(v) for v in np.quantile(diffs, [al, 1 - al]))
        p = float((diffs <= 0).mean())
    return AucDifference(
        delta=float(delta), ci_low=lo, ci_high=hi, confidence=confidence, p_le_zero=p, n_boot=len(diffs)
    )
