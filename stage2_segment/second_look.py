"""The second look: a learned score for each stage-1 candidate (false-positive reduction).

A LightGBM classifier on :mod:`stage2_segment.candidate_features` (the candidate's
stage-2 mask, the image around it and, optionally, the detector's score and rank)
gives each candidate a probability of being a nodule. The rescored candidates keep
their order and number (no hard drop): the FROC decides the operating point.

>>> table = CandidateTable.concat([table_of_scan(...), ...])       # doctest: +SKIP
>>> look = SecondLook(SecondLookConfig()).fit(table)                # doctest: +SKIP
>>> oof = SecondLook(SecondLookConfig()).out_of_fold(table)         # patient-grouped CV  # doctest: +SKIP
>>> rescored = look.rescore(hu, geometry, detections, masks)        # Detections, same order  # doctest: +SKIP

Labels follow the LUNA16 hit rules (:func:`lidc_det.metrics.froc.match_candidates`):
1 = the candidate hits a target nodule, 0 = false positive; candidates inside an
irrelevant finding only (-1) are left out of training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lidc_det.atomic import write_json, write_text
from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections, NoduleMask
from stage2_segment.candidate_features import (
    DETECTOR_FEATURES,
    FEATURE_NAMES,
    CandidateFeatures,
    FeatureConfig,
    LungField,
    candidate_features,
)

if TYPE_CHECKING:
    from lidc_det.data.luna import LunaFinding

COMBINE_MODES = ("replace", "geometric")


class SecondLookError(LidcDetError):
    """The second look cannot be trained or applied (no model, too few labelled candidates, ...)."""


@dataclass(frozen=True)
class SecondLookConfig:
    """Settings of the second look.

    Attributes:
        features: :class:`~stage2_segment.candidate_features.FeatureConfig`.
        use_detector: give the classifier the detector's score, rank and diameter too.
        combine: ``"replace"``: the new score is the classifier's probability ``p``;
            ``"geometric"``: ``p ** w * s ** (1 - w)`` with the detector score ``s``
            (clipped to [1e-6, 1]) and ``w = weight``.
        weight: ``w`` of ``"geometric"``.
        n_folds: patient-grouped folds of :meth:`SecondLook.out_of_fold`.
        num_boost_round, learning_rate, num_leaves, min_data_in_leaf, feature_fraction,
        bagging_fraction, lambda_l2: LightGBM settings (small trees: a few hundred
            to a few thousand candidates).
        seed: LightGBM's seed and the fold assignment.
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    use_detector: bool = True
    combine: str = "replace"
    weight: float = 0.5
    n_folds: int = 5
    num_boost_round: int = 200
    learning_rate: float = 0.05
    num_leaves: int = 7
    min_data_in_leaf: int = 10
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"SecondLookConfig.combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"SecondLookConfig.weight must be in [0, 1], got {self.weight}")
        if self.n_folds < 2:
            raise ValueError(f"SecondLookConfig.n_folds must be >= 2, got {self.n_folds}")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The columns the classifier sees."""
        return FEATURE_NAMES if self.use_detector else tuple(n for n in FEATURE_NAMES if n not in DETECTOR_FEATURES)

    def lgbm_params(self) -> dict[str, Any]:
        return {
            "objective": "binary", "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf, "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction, "bagging_freq": 1, "lambda_l2": self.lambda_l2,
            "num_threads": 1, "seed": self.seed, "deterministic": True, "verbose": -1,
        }

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True, eq=False)
class CandidateTable:
    """Labelled candidates of several scans (the second look's training data).

    Attributes:
        features: ``float64 (N, F)`` rows in :data:`FEATURE_NAMES` order.
        labels: ``int8 (N,)``: 1 hits a target nodule, 0 false positive, -1 ignored.
        groups: ``(N,)`` patient id of each row (folds never split a patient).
        series_uids: ``(N,)`` scan of each row.
        index: ``(N,)`` position of the candidate in its scan's Detections.
        det_scores: ``(N,)`` the detector's score.
    """

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    series_uids: np.ndarray
    index: np.ndarray
    det_scores: np.ndarray

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        for name in ("labels", "groups", "series_uids", "index", "det_scores"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"CandidateTable: {n} feature rows but {len(getattr(self, name))} {name}")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def of_scan(cls, feats: CandidateFeatures, labels: np.ndarray, patient_id: str, det_scores: np.ndarray) -> CandidateTable:
        n = len(feats)
        return cls(feats.values, np.asarray(labels, dtype=np.int8).reshape(n), np.full(n, patient_id, dtype=object),
                   np.full(n, feats.series_uid, dtype=object), np.arange(n), np.asarray(det_scores, np.float64).reshape(n))

    @classmethod
    def concat(cls, tables: Sequence[CandidateTable]) -> CandidateTable:
        if not tables:
            return cls(np.zeros((0, len(FEATURE_NAMES))), np.zeros(0, np.int8), np.zeros(0, object),
                       np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0))
        return cls(*(np.concatenate([getattr(t, k) for t in tables]) for k in
                     ("features", "labels", "groups", "series_uids", "index", "det_scores")))

    def save(self, path: Path) -> None:
        """Atomic ``.npz`` (arrays only; strings as unicode)."""
        from lidc_det.atomic import write_with

        def w(p: Path) -> None:
            with open(p, "wb") as fh:
                np.savez_compressed(fh, features=self.features, labels=self.labels, groups=self.groups.astype(str),
                                    series_uids=self.series_uids.astype(str), index=self.index,
                                    det_scores=self.det_scores, names=np.asarray(FEATURE_NAMES))

        write_with(Path(path), w)

    @classmethod
    def load(cls, path: Path) -> CandidateTable:
        with np.load(path) as z:
            if tuple(z["names"].tolist()) != FEATURE_NAMES:
                raise SecondLookError(f"{path}: written with other feature columns; recompute it")
            return cls(z["features"], z["labels"], z["groups"].astype(object), z["series_uids"].astype(object),
                       z["index"], z["det_scores"])


def candidate_labels(detections: Detections, targets: Sequence[LunaFinding],
                     excluded: Sequence[LunaFinding] = ()) -> np.ndarray:
    """``int8 (N,)`` LUNA16 label of each candidate: 1 hit, 0 false positive, -1 ignored."""
    from lidc_det.data.luna import candidates_from_detections
    from lidc_det.metrics.froc import match_candidates

    cands = candidates_from_detections(detections)
    m = match_candidates(targets, cands, excluded=excluded, series_uids=[detections.series_uid],
                         max_candidates_per_scan=None)
    out = np.zeros(len(detections), dtype=np.int8)
    out[m.candidate_index] = m.candidate_label
    return out


def _empty_mask(series_uid: str, geometry: VolumeGeometry) -> NoduleMask:
    return NoduleMask(series_uid, np.zeros(6, np.int64), np.zeros((0, 0, 0), bool), geometry.spacing_zyx,
                      (0.0, 0.0, 0.0), 0.0, 0.0, float("nan"))


def patient_folds(groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """``(N,)`` fold of each row: patients shuffled with ``seed`` and dealt round-robin."""
    patients = np.array(sorted(set(groups.tolist())), dtype=object)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    fold_of = {p: i % n_folds for i, p in zip(range(len(patients)), patients[order])}
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


class SecondLook:
    """LightGBM candidate classifier.

    Attributes:
        config: :class:`SecondLookConfig`.
        booster: the trained ``lightgbm.Booster`` (None before :meth:`fit` / :meth:`load`).
        info: what :meth:`fit` saw (rows, positives, scans, feature importances).
    """

    #: no hard drop: the pipeline keeps every rescored candidate (the FROC picks the operating point)
    min_score: float | None = None

    def __init__(self, config: SecondLookConfig = SecondLookConfig()) -> None:
        self.config = config
        self.booster: Any = None
        self.info: dict[str, Any] = {}

    @property
    def name(self) -> str:
        """``second look (LightGBM, features + detector score)`` etc."""
        what = "features + detector score" if self.config.use_detector else "features"
        how = "" if self.config.combine == "replace" else f", geometric mean with the detector score (w={self.config.weight:g})"
        return f"second look (LightGBM, {what}{how})"

    # ------------------------------------------------------------------ training
    def _columns(self, features: np.ndarray) -> np.ndarray:
        cols = [FEATURE_NAMES.index(n) for n in self.config.feature_names]
        return np.asarray(features, dtype=np.float64)[:, cols]

    def _train(self, X: np.ndarray, y: np.ndarray) -> Any:
        import lightgbm as lgb

        if y.sum() < 2 or (y == 0).sum() < 2:
            raise SecondLookError(f"second look needs >= 2 hits and >= 2 false positives, got {int(y.sum())} "
                                  f"hits of {len(y)} labelled candidates")
        ds = lgb.Dataset(X, label=y, feature_name=list(self.config.feature_names), free_raw_data=False)
        return lgb.train(self.config.lgbm_params(), ds, num_boost_round=self.config.num_boost_round)

    def fit(self, table: CandidateTable) -> SecondLook:
        """Train on every labelled row (label 0 or 1) of ``table``; returns ``self``."""
        use = table.labels >= 0
        X, y = self._columns(table.features[use]), table.labels[use].astype(int)
        self.booster = self._train(X, y)
        gain = self.booster.feature_importance(importance_type="gain")
        self.info = {
            "n_candidates": int(use.sum()), "n_hits": int(y.sum()), "n_scans": len(set(table.series_uids.tolist())),
            "n_patients": len(set(table.groups.tolist())),
            "importance_gain": {n: round(float(g), 3) for n, g in
                                sorted(zip(self.config.feature_names, gain), key=lambda t: -t[1])},
        }
        return self

    def out_of_fold(self, table: CandidateTable) -> np.ndarray:
        """Out-of-fold scores ``(N,)`` of every row (ignored rows too): patient-grouped
        ``config.n_folds``-fold CV, each fold scored by a model trained on the others,
        combined with the detector score as :meth:`combine` does."""
        folds = patient_folds(table.groups, self.config.n_folds, self.config.seed)
        prob = np.full(len(table), np.nan)
        for k in range(self.config.n_folds):
            test = folds == k
            if not test.any():
                continue
            train = (~test) & (table.labels >= 0)
            booster = self._train(self._columns(table.features[train]), table.labels[train].astype(int))
            prob[test] = booster.predict(self._columns(table.features[test]))
        return self.combine(prob, table.det_scores)

    # ------------------------------------------------------------------ inference
    def combine(self, prob: np.ndarray, det_scores: np.ndarray) -> np.ndarray:
        """New scores from the classifier's probabilities and the detector's scores."""
        prob = np.asarray(prob, dtype=np.float64)
        if self.config.combine == "replace":
            return prob
        w = self.config.weight
        s = np.clip(np.asarray(det_scores, dtype=np.float64), 1e-6, 1.0)
        return np.clip(prob, 1e-6, 1.0) ** w * s ** (1.0 - w)

    def score_features(self, feats: CandidateFeatures, det_scores: np.ndarray) -> np.ndarray:
        """New scores ``(N,)`` of one scan's candidate features."""
        if self.booster is None:
            raise SecondLookError("second look not trained: call fit() or load()")
        if feats.names != FEATURE_NAMES:
            raise SecondLookError("feature columns differ from this version's FEATURE_NAMES")
        if len(feats) == 0:
            return np.zeros(0)
        return self.combine(self.booster.predict(self._columns(feats.values)), det_scores)

    def rescore(
        self,
        hu: np.ndarray,
        geometry: VolumeGeometry,
        detections: Detections,
        masks: Sequence[NoduleMask] | None,
        *,
        lung: LungField | None = None,
    ) -> Detections:
        """The pipeline hook: ``detections`` with each score replaced by the second look's
        (same candidates, same order; nothing is dropped).

        Args:
            hu: ``[z, y, x]`` HU of the scan on ``geometry`` (the grid stage 2 ran on).
            detections: the scan's stage-1 candidates.
            masks: their stage-2 masks, ``masks[i]`` for candidate ``i`` (None without
                stage 2: every mask counts as empty, which the model was not trained on).
            lung: the scan's lung field, when already computed.
        """
        if masks is None:
            masks = [_empty_mask(detections.series_uid, geometry) for _ in range(len(detections))]
        feats = candidate_features(hu, geometry, detections, masks, config=self.config.features, lung=lung)
        scores = self.score_features(feats, detections.scores)
        return Detections(detections.series_uid, detections.centers_xyz_mm, detections.diameters_mm, scores,
                          detections.boxes_voxel)

    # ------------------------------------------------------------------ files
    def save(self, folder: Path) -> Path:
        """``second_look.txt`` (LightGBM model) + ``second_look.json`` (config, info) in ``folder``."""
        from lidc_det.provenance import provenance

        if self.booster is None:
            raise SecondLookError("nothing to save: the second look is not trained")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "second_look.txt", self.booster.model_to_string())
        write_json(folder / "second_look.json", {"config": self.config.to_dict(), "feature_names": list(FEATURE_NAMES),
                                                 "info": self.info, "provenance": provenance()})
        return folder

    @classmethod
    def load(cls, folder: Path) -> SecondLook:
        """A model written by :meth:`save`."""
        import lightgbm as lgb

        from lidc_det.config import from_mapping

        folder = Path(folder)
        meta_path, model_path = folder / "second_look.json", folder / "second_look.txt"
        if not (meta_path.is_file() and model_path.is_file()):
            raise SecondLookError(f"{folder}: no second-look model (second_look.json + second_look.txt)")
        meta = json.loads(meta_path.read_text())
        if tuple(meta.get("feature_names", ())) != FEATURE_NAMES:
            raise SecondLookError(f"{folder}: trained on other feature columns; retrain it")
        look = cls(from_mapping(SecondLookConfig, meta["config"], where=str(meta_path)))
        look.booster = lgb.Booster(model_str=model_path.read_text())
        look.info = meta.get("info", {})
        return look
