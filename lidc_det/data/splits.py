"""Patient-level cross-validation folds (no patient in two folds), reproducible from a seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def patient_folds(patient_ids: Sequence[str], n_folds: int = 10, seed: int = 0) -> dict[str, int]:
    """Assign every patient to one of ``n_folds`` folds.

    Uses scikit-learn's ``GroupKFold`` (shuffled with ``seed``) over the items,
    grouped by patient, so folds are balanced by number of scans and a
    patient's scans always share a fold. With fewer patients than folds, the
    number of folds shrinks to the number of patients.

    Args:
        patient_ids: one entry per scan (repeats allowed: a patient may have several scans).
        n_folds: wanted number of folds (LUNA16 uses 10).
        seed: random state for the shuffle.

    Returns:
        ``{patient_id: fold}`` with folds in ``0 .. min(n_folds, n_patients) - 1``.
    """
    from sklearn.model_selection import GroupKFold

    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    ids = np.asarray(list(patient_ids), dtype=object)
    unique = sorted(set(ids.tolist()))
    if not unique:
        return {}
    k = min(n_folds, len(unique))
    if k == 1:
        return {p: 0 for p in unique}
    folds: dict[str, int] = {}
    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test_idx) in enumerate(splitter.split(ids, groups=ids)):
        for p in ids[test_idx]:
            folds[str(p)] = fold
    return folds


def train_val_test(
    folds: dict[str, int], test_fold: int, val_fold: int | None = None
) -> tuple[list[str], list[str], list[str]]:
    """Split patients into (train, validation, test) lists from a fold map.

    ``val_fold`` defaults to ``(test_fold + 1) % n_folds``. Raises when the two
    folds coincide or do not exist.
    """
    n = max(folds.values()) + 1 if folds else 0
    if not 0 <= test_fold < n:
        raise ValueError(f"test_fold {test_fold} not in 0..{n - 1}")
    if val_fold is None:
        val_fold = (test_fold + 1) % n
    if val_fold == test_fold or not 0 <= val_fold < n:
        raise ValueError(f"val_fold {val_fold} must differ from test_fold {test_fold} and lie in 0..{n - 1}")
    train = sorted(p for p, f in folds.items() if f not in (test_fold, val_fold))
    val = sorted(p for p, f in folds.items() if f == val_fold)
    test = sorted(p for p, f in folds.items() if f == test_fold)
    return train, val, test
