"""Patient-grouped cross-validation of a LightGBM malignancy classifier.

One code path for every feature set (shape, radiomics, embeddings, their
concatenation, diameter alone), so that all of them are scored on the *same*
folds:

1. :func:`patient_folds` assigns every nodule a fold with scikit-learn's
   ``StratifiedGroupKFold`` (shuffled, seeded): a patient's nodules share one
   fold, and the malignant fraction is about equal across folds.
2. For each test fold, the remaining folds are split again by patient
   (``StratifiedGroupKFold`` with ``round(1 / inner_val_fraction)`` splits, its
   first split; seed ``seed + 1 + fold``) into an inner training and an inner
   validation part. LightGBM trains on the inner training part with early
   stopping on the inner validation part; the calibrator (isotonic regression
   or Platt scaling) is fitted on the inner validation predictions.
3. The test fold gets the raw LightGBM probability, the calibrated
   probability, and LightGBM's ``pred_contrib`` (SHAP) values.

No row of a test fold is ever seen by its model, its early stopping or its
calibrator. LightGBM runs deterministically (``deterministic=True``,
``force_row_wise=True``, fixed seeds, a fixed number of threads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["CVConfig", "CVResult", "Calibrator", "cross_validate_lgbm", "inner_split", "patient_folds"]

Calibration = Literal["isotonic", "platt", "none"]

DEFAULT_LGBM_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.03,
    "num_leaves": 15,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "num_threads": 1,  # tiny tables: threads only add OpenMP overhead
}


@dataclass(frozen=True)
class CVConfig:
    """Cross-validation and LightGBM settings.

    Attributes:
        n_folds: outer folds (grouped by patient, stratified by label).
        seed: seed of the fold assignment, the inner splits and LightGBM.
        inner_val_fraction: share of the training patients held out for early
            stopping and calibration (the inner split has ``round(1 / f)`` folds).
        calibration: ``"isotonic"``, ``"platt"`` (logistic on the raw log-odds) or ``"none"``.
        num_boost_round: maximum boosting rounds.
        early_stopping_rounds: stop when the inner validation log-loss has not
            improved for this many rounds.
        lgbm_params: LightGBM parameters (merged over :data:`DEFAULT_LGBM_PARAMS`;
            ``seed``, ``deterministic``, ``verbosity`` are set by the code).
    """

    n_folds: int = 5
    seed: int = 0
    inner_val_fraction: float = 0.2
    calibration: Calibration = "isotonic"
    num_boost_round: int = 2000
    early_stopping_rounds: int = 100
    lgbm_params: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.n_folds < 2:
            raise ValueError(f"CVConfig.n_folds must be >= 2, got {self.n_folds}")
        if not 0.0 < self.inner_val_fraction < 0.5:
            raise ValueError(f"CVConfig.inner_val_fraction must be in (0, 0.5), got {self.inner_val_fraction}")
        if self.calibration not in ("isotonic", "platt", "none"):
            raise ValueError(f"CVConfig.calibration must be isotonic, platt or none, got {self.calibration!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "CVConfig") -> CVConfig:
        """Build from a config mapping (:func:`lidc_det.config.from_mapping`); unknown keys and bad
        values raise :class:`~lidc_det.errors.ConfigError` (a ValueError) naming ``where``."""
        from lidc_det.config import from_mapping

        return from_mapping(cls, dict(d or {}), where)

    def params(self) -> dict[str, Any]:
        """The LightGBM parameter dict actually used."""
        p = dict(DEFAULT_LGBM_PARAMS)
        p.update(self.lgbm_params)
        p.update({"seed": self.seed, "deterministic": True, "force_row_wise": True, "verbosity": -1})
        return p


@dataclass(frozen=True, eq=False)
class CVResult:
    """Out-of-fold predictions of one feature set.

    Attributes:
        name: feature-set name.
        feature_names: the model's columns, in order.
        folds: ``(N,)`` outer fold of each row.
        prob_raw: ``(N,)`` out-of-fold LightGBM probability.
        prob_calibrated: ``(N,)`` out-of-fold calibrated probability (= raw when calibration is "none").
        contrib: ``(N, F + 1)`` out-of-fold ``pred_contrib`` (log-odds; last column the bias).
        gain_importance: ``(F,)`` total split gain per feature, mean over folds.
        best_iterations: boosting rounds kept in each fold (early stopping).
    """

    name: str
    feature_names: tuple[str, ...]
    folds: np.ndarray
    prob_raw: np.ndarray
    prob_calibrated: np.ndarray
    contrib: np.ndarray
    gain_importance: np.ndarray
    best_iterations: tuple[int, ...]

    @property
    def mean_abs_contrib(self) -> np.ndarray:
        """``(F,)`` mean |SHAP value| per feature over all out-of-fold rows (log-odds)."""
        return np.abs(self.contrib[:, :-1]).mean(axis=0)


def patient_folds(y: Sequence[int] | np.ndarray, groups: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """Fold index ``(N,)`` in ``0 .. n_folds - 1`` for every row; a patient's rows share one fold.

    Uses ``StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)``.

    Raises:
        ValueError: fewer patients than folds, or a patient split across folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y).astype(int)
    g = np.asarray(list(groups), dtype=object)
    if len(y) != len(g):
        raise ValueError(f"patient_folds: {len(y)} labels but {len(g)} groups")
    n_groups = len(set(g.tolist()))
    if n_groups < n_folds:
        raise ValueError(f"patient_folds: {n_groups} patients, fewer than {n_folds} folds")
    folds = np.full(len(y), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, g)):
        folds[test] = k
    for p in set(g.tolist()):  # defensive: the splitter guarantees it
        if len(set(folds[g == p].tolist())) != 1:
            raise ValueError(f"patient_folds: patient {p} falls in several folds")
    return folds


def inner_split(y: np.ndarray, g: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions of a patient-grouped, stratified hold-out of about ``fraction``.

    The first split of ``StratifiedGroupKFold(round(1 / fraction), shuffle=True,
    random_state=seed)`` (at least 2 splits, at most one per patient): the
    inner split of :func:`cross_validate_lgbm`, shared with the final model of
    :mod:`stage3_malignancy.model` so both early-stop and calibrate alike.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    k = max(2, int(round(1.0 / fraction)))
    k = min(k, len(set(g.tolist())))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    tr, va = next(iter(splitter.split(np.zeros(len(y)), y, g)))
    return tr, va


class Calibrator:
    """Isotonic / Platt / identity map from raw probability to calibrated probability.

    ``Calibrator(kind).fit(p, y)`` on validation probabilities, then
    ``calibrator(p)``; :meth:`to_dict` / :meth:`from_dict` store the fitted map
    as JSON (used by :mod:`stage3_malignancy.model` to save a classifier).
    A ``fit`` on one class only falls back to ``"none"`` (identity).
    """

    def __init__(self, kind: Calibration) -> None:
        self.kind = kind
        self.model: Any = None

    @staticmethod
    def _logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p)).reshape(-1, 1)

    def fit(self, p: np.ndarray, y: np.ndarray) -> Calibrator:
        if self.kind == "none" or len(set(y.tolist())) < 2:
            self.kind = "none"
            return self
        if self.kind == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            self.model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        else:
            from sklearn.linear_model import LogisticRegression

            self.model = LogisticRegression(C=1.0).fit(self._logit(p), y)  # mild L2: tiny or separable validation sets
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (isotonic: its breakpoints; Platt: coefficient and intercept)."""
        if self.kind == "isotonic":
            return {"kind": "isotonic", "x": self.model.X_thresholds_.tolist(), "y": self.model.y_thresholds_.tolist()}
        if self.kind == "platt":
            return {"kind": "platt", "coef": float(self.model.coef_[0, 0]), "intercept": float(self.model.intercept_[0])}
        return {"kind": "none"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        """Inverse of :meth:`to_dict` (the fitted map, without scikit-learn objects)."""
        c = cls(d["kind"])
        c.model = d
        c._state = True
        return c

    _state = False

    def __call__(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        if self._state and self.kind == "isotonic":
            return np.interp(p, self.model["x"], self.model["y"])
        if self._state and self.kind == "platt":
            z = self.model["coef"] * self._logit(p).ravel() + self.model["intercept"]
            return 1.0 / (1.0 + np.exp(-z))
        if self.kind == "none":
            return p
        if self.kind == "isotonic":
            return np.asarray(self.model.predict(p), dtype=np.float64)
        return self.model.predict_proba(self._logit(p))[:, 1]


def cross_validate_lgbm(
    X: Any,
    y: Sequence[int] | np.ndarray,
    groups: Sequence[str],
    folds: np.ndarray,
    cfg: CVConfig = CVConfig(),
    *,
    name: str = "features",
) -> CVResult:
    """Out-of-fold LightGBM probabilities on given folds.

    Args:
        X: ``(N, F)`` features: a pandas DataFrame (its column names are kept) or
            an array. NaN is allowed (LightGBM's missing-value handling).
        y: ``(N,)`` labels in {0, 1}.
        groups: ``(N,)`` patient id of each row (for the inner split).
        folds: ``(N,)`` outer fold of each row (from :func:`patient_folds`).
        cfg: settings.
        name: feature-set name stored in the result.

    Returns:
        :class:`CVResult`.
    """
    import lightgbm as lgb

    names = tuple(str(c) for c in X.columns) if hasattr(X, "columns") else tuple(
        f"f{i}" for i in range(np.asarray(X).shape[1])
    )
    Xa = np.asarray(X, dtype=np.float64)
    y = np.asarray(y).astype(int)
    g = np.asarray(list(groups), dtype=object)
    folds = np.asarray(folds).astype(int)
    n, f = Xa.shape
    if not (len(y) == len(g) == len(folds) == n):
        raise ValueError(f"cross_validate_lgbm: X has {n} rows, y {len(y)}, groups {len(g)}, folds {len(folds)}")
    prob_raw = np.full(n, np.nan)
    prob_cal = np.full(n, np.nan)
    contrib = np.full((n, f + 1), np.nan)
    gains = []
    best: list[int] = []
    params = cfg.params()
    for k in sorted(set(folds.tolist())):
        test = np.flatnonzero(folds == k)
        train = np.flatnonzero(folds != k)
        tr_pos, va_pos = inner_split(y[train], g[train], cfg.inner_val_fraction, cfg.seed + 1 + k)
        tr, va = train[tr_pos], train[va_pos]
        dtrain = lgb.Dataset(Xa[tr], label=y[tr], feature_name=list(names), free_raw_data=False)
        dval = lgb.Dataset(Xa[va], label=y[va], reference=dtrain)
        booster = lgb.train(
            params,
            dtrain,
            num_boost_round=cfg.num_boost_round,
            valid_sets=[dval],
            callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)],
        )
        it = booster.best_iteration or booster.current_iteration()
        best.append(int(it))
        calib = Calibrator(cfg.calibration).fit(booster.predict(Xa[va], num_iteration=it), y[va])
        p = booster.predict(Xa[test], num_iteration=it)
        prob_raw[test] = p
        prob_cal[test] = calib(p)
        contrib[test] = booster.predict(Xa[test], num_iteration=it, pred_contrib=True)
        gains.append(booster.feature_importance("gain", iteration=it))
    return CVResult(
        name=name,
        feature_names=names,
        folds=folds,
        prob_raw=prob_raw,
        prob_calibrated=prob_cal,
        contrib=contrib,
        gain_importance=np.mean(gains, axis=0),
        best_iterations=tuple(best),
    )
