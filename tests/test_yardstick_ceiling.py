"""The folds of the yardstick-ceiling diagnostic (benchmarks/yardstick_ceiling.py)."""

from __future__ import annotations

import pytest

from benchmarks.yardstick_ceiling import copy_folds, shared_sources, training_plan
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


def test_training_plan_never_trains_on_the_copy_it_scores() -> None:
    copies = {f"y{i}": f"case-y{i}" for i in range(4)}
    folds = copy_folds(list(copies), 2)
    twins, dense = ["t0", "t1"], ["d0", "d1", "d2"]
    for mode in ("background", "twins+background"):
        plan = training_plan(mode, copies, folds, twins, dense)
        assert [held for held, _ in plan] == folds
        for held, train in plan:
            assert not {copies[u] for u in held} & set(train)  # no held-out copy in its own model's training
            assert set(train) == {copies[u] for u in copies if u not in held} | (set(twins) if "twins" in mode else set())
    (held, train), = training_plan("dense", copies, folds, twins, dense)
    assert sorted(held) == sorted(copies) and train == dense
    (_, train), = training_plan("twins+dense", copies, folds, twins, dense)
    assert train == dense + twins
    with pytest.raises(ConfigFileError, match="mode"):
        training_plan("everything", copies, folds, twins, dense)
