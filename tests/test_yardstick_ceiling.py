"""The folds of the yardstick-ceiling diagnostic (benchmarks/yardstick_ceiling.py)."""

from __future__ import annotations

import pytest

from benchmarks.yardstick_ceiling import copy_folds, shared_sources
from lidc_det.config import ConfigFileError


def test_copy_folds_hold_out_every_copy_once() -> None:
    uids = [f"semireal-x-{i:03d}" for i in range(8)][::-1]
    folds = copy_folds(uids, 4)
    assert len(folds) == 4
    assert all(len(f) == 2 for f in folds)
    assert sorted(u for f in folds for u in f) == sorted(uids)
    assert folds == copy_folds(list(reversed(uids)), 4)  # order of the input does not matter


@pytest.mark.parametrize("n", [1, 9])
def test_copy_folds_refuse_impossible_counts(n: int) -> None:
    with pytest.raises(ConfigFileError, match="--folds"):
        copy_folds([f"c{i}" for i in range(8)], n)


def test_shared_sources_counts_held_out_nodules_seen_in_training() -> None:
    sources = {"a": {1, 2}, "b": {2, 3}, "c": {4}, "d": {5}}
    assert shared_sources(sources, [["a"], ["b"], ["c"], ["d"]]) == 2  # nodule 2: in a and b, each held out once
    assert shared_sources(sources, [["a", "b"], ["c", "d"]]) == 0  # both copies of nodule 2 held out together
