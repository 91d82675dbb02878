"""AUC with patient-bootstrap intervals (stage3_malignancy.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stage3_malignancy.metrics import bootstrap_auc, paired_auc_difference, weighted_aucs


def test_hand_example() -> None:
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    one_patient = bootstrap_auc(y, s, ["A"] * 4, n_boot=200, seed=0)
    assert one_patient.auc == pytest.approx(0.75)
    # every resample draws the one patient: the interval collapses onto the AUC
    assert one_patient.ci_low == pytest.approx(0.75) and one_patient.ci_high == pytest.approx(0.75)
    assert one_patient.n_patients == 1 and one_patient.n_positive == 2

    many = bootstrap_auc(y * 10, s * 10, [f"p{i}" for i in range(40)], n_boot=2000, seed=0)
    assert many.auc == pytest.approx(0.75)
    assert many.ci_low < 0.75 < many.ci_high
    assert 0.5 < many.ci_low and many.ci_high < 0.95


def test_ties_and_weights_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    s = rng.integers(0, 5, 50).astype(float)  # many ties
    w = rng.integers(0, 3, (7, 50)).astype(float)
    ours = weighted_aucs(y, s, w)
    for b in range(7):
        assert ours[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]))


def test_paired_difference() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    good = y + rng.normal(0, 0.5, 200)
    bad = rng.normal(0, 1, 200)
    d = paired_auc_difference(y, good, bad, [f"p{i // 2}" for i in range(200)], n_boot=500, seed=0)
    assert d.delta > 0.3 and d.ci_low > 0 and d.p_le_zero == 0.0
    same = paired_auc_difference(y, good, good, [f"p{i}" for i in range(200)], n_boot=200, seed=0)
    assert same.delta == 0.0 and same.ci_low == 0.0 and same.ci_high == 0.0


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_auc([0, 1], [0.1, float("nan")], ["a", "b"])
    with pytest.raises(ValueError, match="0/1"):
        bootstrap_auc([0, 2], [0.1, 0.2], ["a", "b"])
    single = bootstrap_auc([1, 1], [0.1, 0.2], ["a", "b"])
    assert np.isnan(single.auc)
