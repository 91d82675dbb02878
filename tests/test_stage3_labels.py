"""Malignancy labels from reader ratings (stage3_malignancy.labels)."""

from __future__ import annotations

import pytest

from stage3_malignancy.labels import LabelProtocol, aggregate_ratings, label_from_ratings


def test_common_protocol_median() -> None:
    p = LabelProtocol()
    assert label_from_ratings([4, 4, 5], p) == 1
    assert label_from_ratings([1, 2, 2, 5], p) == 0  # median 2
    assert label_from_ratings([3, 3, 4], p) is None  # median 3: dropped
    assert label_from_ratings([3, 3, 4, 4], p) == 1  # median 3.5 > 3
    assert label_from_ratings([2, 2, 3, 3], p) == 0  # median 2.5 < 3
    assert label_from_ratings([5, 5], p) is None  # fewer than 3 readers


def test_protocol_options() -> None:
    assert label_from_ratings([3, 3, 3], LabelProtocol(indeterminate="malignant")) == 1
    assert label_from_ratings([3, 3, 3], LabelProtocol(indeterminate="benign")) == 0
    # mean 3.33 > 3 while the median is 3
    assert label_from_ratings([3, 3, 4], LabelProtocol(aggregate="mean")) == 1
    assert label_from_ratings([5], LabelProtocol(min_readers=1)) == 1
    assert aggregate_ratings([1, 2, 6], "mean") == pytest.approx(3.0)
    assert aggregate_ratings([], "median") != aggregate_ratings([], "median")  # NaN


def test_protocol_validation() -> None:
    with pytest.raises(ValueError, match="aggregate"):
        LabelProtocol(aggregate="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="benign_below"):
        LabelProtocol(benign_below=4, malignant_above=3)
    with pytest.raises(ValueError, match="unknown keys"):
        LabelProtocol.from_dict({"median": True})
