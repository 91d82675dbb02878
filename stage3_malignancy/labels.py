"""Malignancy labels from LIDC reader ratings (1 = highly unlikely ... 5 = highly suspicious).

LIDC-IDRI has no pathology for most nodules, so the label is the readers'
rating, aggregated over the readers of a nodule. The common protocol (the one
of most LIDC malignancy papers): nodules marked by >= 3 readers, median rating
> 3 malignant, < 3 benign, == 3 dropped. Every part of it is a field of
:class:`LabelProtocol`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["LabelProtocol", "aggregate_ratings", "label_from_ratings"]

Aggregate = Literal["median", "mean"]
Indeterminate = Literal["drop", "benign", "malignant"]


@dataclass(frozen=True)
class LabelProtocol:
    """How reader malignancy ratings become a binary label.

    Attributes:
        aggregate: ``"median"`` (numpy median: 4 readers rating 3, 3, 4, 4 give 3.5)
            or ``"mean"`` of the readers' ratings.
        malignant_above: aggregated rating ``> malignant_above`` -> malignant (1).
        benign_below: aggregated rating ``< benign_below`` -> benign (0).
        indeterminate: what to do with a rating in ``[benign_below, malignant_above]``
            (with the defaults: exactly 3): ``"drop"`` it (label None), or call it
            ``"benign"`` or ``"malignant"``.
        min_readers: nodules with fewer readers get no label (None).
    """

    aggregate: Aggregate = "median"
    malignant_above: float = 3.0
    benign_below: float = 3.0
    indeterminate: Indeterminate = "drop"
    min_readers: int = 3

    def __post_init__(self) -> None:
        if self.aggregate not in ("median", "mean"):
            raise ValueError(f"LabelProtocol.aggregate must be 'median' or 'mean', got {self.aggregate!r}")
        if self.indeterminate not in ("drop", "benign", "malignant"):
            raise ValueError(
                f"LabelProtocol.indeterminate must be 'drop', 'benign' or 'malignant', got {self.indeterminate!r}"
            )
        if self.benign_below > self.malignant_above:
            raise ValueError(
                f"LabelProtocol: benign_below ({self.benign_below}) > malignant_above ({self.malignant_above})"
            )
        if self.min_readers < 1:
            raise ValueError(f"LabelProtocol.min_readers must be >= 1, got {self.min_readers}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "LabelProtocol") -> LabelProtocol:
        """Build from a config mapping (:func:`lidc_det.config.from_mapping`); unknown keys and bad
        values raise :class:`~lidc_det.errors.ConfigError` (a ValueError) naming ``where``."""
        from lidc_det.config import from_mapping

        return from_mapping(cls, dict(d or {}), where)


def aggregate_ratings(ratings: Sequence[float], how: Aggregate = "median") -> float:
    """Median or mean of the readers' ratings (NaN for no ratings)."""
    r = np.asarray(list(ratings), dtype=np.float64)
    if r.size == 0:
        return float("nan")
    return float(np.median(r) if how == "median" else np.mean(r))


def label_from_ratings(ratings: Sequence[float], protocol: LabelProtocol = LabelProtocol()) -> int | None:
    """The binary label of one nodule: 1 malignant, 0 benign, None excluded.

    Args:
        ratings: one malignancy rating (1-5) per reader of the nodule.
        protocol: see :class:`LabelProtocol`.
    """
    if len(ratings) < protocol.min_readers:
        return None
    score = aggregate_ratings(ratings, protocol.aggregate)
    if not np.isfinite(score):
        return None
    if score > protocol.malignant_above:
        return 1
    if score < protocol.benign_below:
        return 0
    return {"drop": None, "benign": 0, "malignant": 1}[protocol.indeterminate]
