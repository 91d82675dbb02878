"""Patient-grouped cross-validation (stage3_malignancy.cv)."""

from __future__ import annotations

import numpy as np
import pytest

from stage3_malignancy.cv import Calibrator, CVConfig, cross_validate_lgbm, inner_split, patient_folds


def _data(n_patients: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n_patients)
    groups = np.repeat([f"P{i:03d}" for i in range(n_patients)], per)
    x = rng.normal(size=(len(groups), 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=len(groups)) > 0).astype(int)
    return x, y, groups


def test_patients_never_split_across_folds() -> None:
    _, y, g = _data()
    folds = patient_folds(y, g, 5, seed=3)
    assert set(folds.tolist()) == set(range(5))
    for p in set(g.tolist()):
        assert len(set(folds[g == p].tolist())) == 1, p
    # stratified: every fold holds both classes
    for k in range(5):
        assert 0 < y[folds == k].sum() < (folds == k).sum()
    # seeded: same seed same folds, other seed other folds
    assert np.array_equal(folds, patient_folds(y, g, 5, seed=3))
    assert not np.array_equal(folds, patient_folds(y, g, 5, seed=4))


def test_inner_split_is_grouped_and_disjoint() -> None:
    _, y, g = _data()
    tr, va = inner_split(y, g, 0.2, seed=1)
    assert not set(g[tr].tolist()) & set(g[va].tolist())
    assert len(tr) + len(va) == len(y)
    assert 0.1 < len(va) / len(y) < 0.35


def test_too_few_patients() -> None:
    with pytest.raises(ValueError, match="fewer than"):
        patient_folds([0, 1, 0], ["a", "a", "b"], 5, seed=0)


def test_cross_validate_learns_signal_out_of_fold() -> None:
    from sklearn.metrics import roc_auc_score

    x, y, g = _data(80)
    folds = patient_folds(y, g, 4, seed=0)
    cfg = CVConfig(n_folds=4, num_boost_round=200, early_stopping_rounds=20,
                   lgbm_params={"min_data_in_leaf": 5, "num_leaves": 4})
    r = cross_validate_lgbm(x, y, g, folds, cfg, name="t")
    assert np.isfinite(r.prob_raw).all() and np.isfinite(r.prob_calibrated).all()
    assert roc_auc_score(y, r.prob_raw) > 0.8  # x[:, 0] carries the label
    assert r.contrib.shape == (len(y), 4)
    assert int(np.argmax(r.mean_abs_contrib)) == 0
    # pred_contrib rows sum to the raw log-odds
    logit = np.log(r.prob_raw / (1 - r.prob_raw))
    assert np.allclose(r.contrib.sum(axis=1), logit, atol=1e-6)


@pytest.mark.parametrize("kind", ["isotonic", "platt", "none"])
def test_calibrator_round_trip(kind: str) -> None:
    rng = np.random.default_rng(0)
    p = rng.random(300)
    y = (rng.random(300) < p**2).astype(int)
    c = Calibrator(kind).fit(p, y)
    c2 = Calibrator.from_dict(c.to_dict())
    q = rng.random(40)
    assert np.allclose(c(q), c2(q))
    assert ((c2(q) >= 0) & (c2(q) <= 1)).all()
