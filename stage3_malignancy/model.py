"""The malignancy model: shape + pyradiomics + CNN-embedding features -> LightGBM -> calibrated P(malignant).

>>> from lidc_det.data.prepared import PreparedDataset                      # doctest: +SKIP
>>> from stage3_malignancy.samples import samples_from_prepared            # doctest: +SKIP
>>> samples = samples_from_prepared(PreparedDataset("prepared"))           # doctest: +SKIP
>>> model = MalignancyModel().fit(samples)                                 # doctest: +SKIP
>>> scores = model.predict(samples)   # list[lidc_det.results.MalignancyScore]  # doctest: +SKIP
>>> model.save("malignancy_model"); MalignancyModel.load("malignancy_model")   # doctest: +SKIP

Training (:meth:`MalignancyModel.fit`):

1. The samples' patients are split (stratified, grouped: a patient is on one
   side only) into an inner training part and an inner validation part of
   about ``inner_val_fraction``.
2. With the ``embeddings`` group, a :class:`~stage3_malignancy.embeddings.SmallCNN3D`
   is trained on the inner training part only (or a given ``torch.nn.Module``
   is used frozen), so the validation embeddings are honest.
3. LightGBM trains on the inner training part with early stopping on the
   inner validation part; the calibrator (isotonic / Platt) is fitted on the
   inner validation predictions. The final model is that booster (no refit),
   so calibration and early stopping never saw their own training rows.

Feature columns: ``diameter_mm`` (the sample's reference diameter, else the
mask's equivalent diameter), ``shape_*`` (:mod:`stage3_malignancy.shape`),
``rad_*`` (pyradiomics, :mod:`stage3_malignancy.radiomics_features`),
``emb_*`` (pooled CNN features). Importances are LightGBM ``pred_contrib``
(SHAP values, log-odds) via :meth:`MalignancyModel.contributions`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import LidcDetError
from lidc_det.results import MalignancyScore
from stage3_malignancy.config import MalignancyModelConfig
from stage3_malignancy.cv import Calibrator, CVConfig, inner_split, patient_folds
from stage3_malignancy.samples import MalignancySample

__all__ = [
    "MalignancyModel",
    "ModelError",
    "SampleCVResult",
    "cross_validate_samples",
    "diameter_table",
    "shape_table",
    "static_features",
]

MODEL_FORMAT = 1
#: File of an outside ``embedder``'s weights in a saved model folder (state dict + class name).
EMBEDDER_STATE_FILE = "embedder_state.pt"


class ModelError(LidcDetError):
    """A model cannot be fitted, used or loaded (names the reason / folder)."""


# ------------------------------------------------------------------ features
def diameter_table(samples: Sequence[MalignancySample]) -> Any:
    """``DataFrame`` with ``diameter_mm``: the sample's reference diameter, else the mask's
    equivalent-sphere diameter (mm)."""
    import pandas as pd

    vals = []
    for s in samples:
        if s.diameter_mm is not None and np.isfinite(s.diameter_mm):
            vals.append(float(s.diameter_mm))
        else:
            vol = float(s.mask.sum()) * float(np.prod(s.spacing_zyx_mm))
            vals.append(float((6 * vol / np.pi) ** (1 / 3)))
    return pd.DataFrame({"diameter_mm": vals})


def shape_table(samples: Sequence[MalignancySample]) -> Any:
    """``DataFrame`` of :func:`stage3_malignancy.shape.shape_features`, columns ``shape_<name>``."""
    import pandas as pd

    from stage3_malignancy.shape import SHAPE_FEATURE_NAMES, shape_features

    rows = [shape_features(s.mask, s.spacing_zyx_mm).to_dict() for s in samples]
    return pd.DataFrame(rows, columns=list(SHAPE_FEATURE_NAMES)).add_prefix("shape_")


def static_features(
    samples: Sequence[MalignancySample],
    cfg: MalignancyModelConfig,
    groups: Sequence[str] | None = None,
    *,
    progress: bool = True,
) -> tuple[Any, dict[str, float]]:
    """The fold-independent feature groups (diameter, shape, radiomics) of ``samples``.

    Returns:
        ``(table, seconds)``: the concatenated columns (input order of samples) and
        the wall seconds spent per group.
    """
    import pandas as pd

    from stage3_malignancy.radiomics_features import DEFAULT_PARAMS, extract_radiomics

    groups = tuple(cfg.features if groups is None else groups)
    parts = []
    secs: dict[str, float] = {}
    if "diameter" in groups:
        parts.append(diameter_table(samples))
    if "shape" in groups:
        t0 = time.perf_counter()
        parts.append(shape_table(samples))
        secs["shape"] = time.perf_counter() - t0
    if "radiomics" in groups:
        rt = extract_radiomics(
            samples, params=cfg.radiomics_params or DEFAULT_PARAMS, cache_dir=cfg.cache_dir,
            workers=cfg.workers, progress=progress,
        )
        secs["radiomics"] = rt.wall_seconds
        secs["radiomics_per_nodule_mean"] = float(np.mean(rt.seconds)) if len(rt.seconds) else float("nan")
        parts.append(rt.table.add_prefix("rad_"))
    if not parts:
        return pd.DataFrame(index=range(len(samples))), secs
    return pd.concat([p.reset_index(drop=True) for p in parts], axis=1), secs


def _labels(samples: Sequence[MalignancySample]) -> tuple[np.ndarray, np.ndarray]:
    missing = [s.nodule_id or s.series_uid for s in samples if s.label is None]
    if missing:
        raise ModelError(f"fit needs labelled samples; {len(missing)} have none (first: {missing[0]})")
    y = np.array([int(s.label) for s in samples], dtype=int)  # type: ignore[arg-type]
    g = np.array([str(s.patient_id) for s in samples], dtype=object)
    if len(set(y.tolist())) < 2:
        raise ModelError(f"fit needs both classes; all {len(y)} samples have label {y[0] if len(y) else None}")
    if len(set(g.tolist())) < 2:
        raise ModelError("fit needs samples of at least 2 patients (the inner validation split is by patient)")
    return y, g


# ------------------------------------------------------------------ the model
class MalignancyModel:
    """LightGBM on concatenated nodule features with a calibrated output.

    Args:
        cfg: settings (feature groups, LightGBM, calibration, CNN).
        embedder: optional ``torch.nn.Module`` used frozen for the ``embeddings``
            group instead of training a :class:`~stage3_malignancy.embeddings.SmallCNN3D`
            (e.g. a detector backbone); pooled as in :func:`~stage3_malignancy.embeddings.pooled_embeddings`.
        embedder_layer: submodule whose output to pool (None = the module's output / ``embed``).
        embedder_channels: input channels fed to ``embedder`` (``[0]`` = image only; None = image + mask).
    """

    def __init__(
        self,
        cfg: MalignancyModelConfig = MalignancyModelConfig(),
        *,
        embedder: Any = None,
        embedder_layer: str | None = None,
        embedder_channels: Sequence[int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.embedder = embedder
        self.embedder_layer = embedder_layer
        self.embedder_channels = None if embedder_channels is None else [int(c) for c in embedder_channels]
        self.cnn: Any = None
        self.booster: Any = None
        self.best_iteration: int = 0
        self.calibrator: Calibrator | None = None
        self.feature_names: tuple[str, ...] = ()
        self.fit_info: dict[str, Any] = {}

    @property
    def name(self) -> str:
        """``lightgbm[shape+radiomics+embeddings]`` etc."""
        return f"lightgbm[{'+'.join(self.cfg.features)}]"

    # --------------------------------------------------------------- features
    def _embedding_module(self) -> Any:
        return self.embedder if self.embedder is not None else self.cnn

    def _embeddings(self, samples: Sequence[MalignancySample], cubes: np.ndarray | None = None) -> Any:
        import pandas as pd

        from stage3_malignancy.embeddings import nodule_cubes, pooled_embeddings

        module = self._embedding_module()
        if module is None:
            raise ModelError("no embedding network: fit the model first or pass embedder=")
        if cubes is None:
            cubes = nodule_cubes(samples, self.cfg.embedding)
        e = pooled_embeddings(
            module, cubes, device=self.cfg.embedding.device, batch_size=self.cfg.embedding.batch_size_infer,
            layer=self.embedder_layer if self.embedder is not None else None,
            channels=self.embedder_channels if self.embedder is not None else None,
        )
        return pd.DataFrame(e, columns=[f"emb_{i:03d}" for i in range(e.shape[1])])

    def features(self, samples: Sequence[MalignancySample], *, precomputed: Any = None, progress: bool = False) -> Any:
        """``(N, F)`` feature table of ``samples`` in this model's column order.

        Args:
            samples: nodules.
            precomputed: optional table from :func:`static_features` for the same samples
                (same row order); its diameter / shape / radiomics columns are reused.
            progress: progress bars.
        """
        import pandas as pd

        static_groups = [g for g in self.cfg.features if g != "embeddings"]
        if precomputed is not None:
            static = precomputed.reset_index(drop=True)
            if len(static) != len(samples):
                raise ModelError(f"precomputed features have {len(static)} rows for {len(samples)} samples")
        else:
            static, _ = static_features(samples, self.cfg, static_groups, progress=progress)
        keep = [c for c in static.columns if _group_of(c) in static_groups]
        parts = [static[keep]]
        if "embeddings" in self.cfg.features:
            parts.append(self._embeddings(samples))
        table = pd.concat(parts, axis=1)
        if self.feature_names:
            table = table.reindex(columns=list(self.feature_names))
        return table

    # --------------------------------------------------------------- fitting
    def fit(
        self, samples: Sequence[MalignancySample], *, precomputed: Any = None, progress: bool = True
    ) -> MalignancyModel:
        """Train on labelled samples (see the module docstring); returns self.

        Raises:
            ModelError: unlabelled samples, a single class, or a single patient.
        """
        import lightgbm as lgb
        import pandas as pd

        t0 = time.perf_counter()
        y, g = _labels(samples)
        tr, va = inner_split(y, g, self.cfg.inner_val_fraction, self.cfg.seed)
        self.feature_names = ()
        static_groups = [x for x in self.cfg.features if x != "embeddings"]
        if precomputed is None:
            static, secs = static_features(samples, self.cfg, static_groups, progress=progress)
        else:
            static, secs = precomputed.reset_index(drop=True), {}
        keep = [c for c in static.columns if _group_of(c) in static_groups]
        parts = [static[keep]]
        cnn_info: dict[str, Any] = {}
        if "embeddings" in self.cfg.features:
            from stage3_malignancy.embeddings import nodule_cubes, train_small_cnn

            cubes = nodule_cubes(samples, self.cfg.embedding)
            if self.embedder is None:
                self.cnn, cnn_info = train_small_cnn(
                    cubes[tr], y[tr], self.cfg.embedding, seed=self.cfg.seed, progress=progress
                )
            parts.append(self._embeddings(samples, cubes))
        X = pd.concat(parts, axis=1)
        names = [str(c) for c in X.columns]
        Xa = X.to_numpy(dtype=np.float64)
        params = CVConfig(seed=self.cfg.seed, lgbm_params=self.cfg.lgbm_params).params()
        dtrain = lgb.Dataset(Xa[tr], label=y[tr], feature_name=names, free_raw_data=False)
        dval = lgb.Dataset(Xa[va], label=y[va], reference=dtrain)
        self.booster = lgb.train(
            params, dtrain, num_boost_round=self.cfg.num_boost_round, valid_sets=[dval],
            callbacks=[lgb.early_stopping(self.cfg.early_stopping_rounds, verbose=False)],
        )
        self.best_iteration = int(self.booster.best_iteration or self.booster.current_iteration())
        self.calibrator = Calibrator(self.cfg.calibration).fit(
            self.booster.predict(Xa[va], num_iteration=self.best_iteration), y[va]
        )
        self.feature_names = tuple(names)
        self.fit_info = {
            "n": int(len(y)), "n_malignant": int(y.sum()), "n_patients": int(len(set(g.tolist()))),
            "n_inner_train": int(len(tr)), "n_inner_val": int(len(va)),
            "best_iteration": self.best_iteration, "calibration": self.calibrator.kind,
            "n_features": len(names), "feature_seconds": secs, "cnn": cnn_info,
            "seconds": time.perf_counter() - t0,
        }
        return self

    def _check_fitted(self) -> None:
        if self.booster is None or self.calibrator is None:
            raise ModelError("the model is not fitted (call fit or load)")

    # --------------------------------------------------------------- prediction
    def predict_proba(
        self, samples: Sequence[MalignancySample], *, precomputed: Any = None, calibrated: bool = True
    ) -> np.ndarray:
        """``(N,)`` P(malignant), calibrated unless ``calibrated=False``."""
        self._check_fitted()
        if not samples:
            return np.zeros(0)
        X = self.features(samples, precomputed=precomputed).to_numpy(dtype=np.float64)
        p = self.booster.predict(X, num_iteration=self.best_iteration)
        return np.clip(self.calibrator(p), 0.0, 1.0) if calibrated else p  # type: ignore[misc]

    def predict(self, samples: Sequence[MalignancySample], *, precomputed: Any = None) -> list[MalignancyScore]:
        """One :class:`lidc_det.results.MalignancyScore` per sample (calibrated probability)."""
        p = self.predict_proba(samples, precomputed=precomputed)
        return [
            MalignancyScore(series_uid=s.series_uid, center_xyz_mm=s.center_xyz_mm, probability=float(v),
                            model=self.name, nodule_id=s.nodule_id)
            for s, v in zip(samples, p)
        ]

    def contributions(self, samples: Sequence[MalignancySample], *, precomputed: Any = None) -> Any:
        """LightGBM ``pred_contrib`` (SHAP values, log-odds of the raw model): ``DataFrame``
        ``(N, F + 1)``, one column per feature plus ``bias``; rows sum to the raw log-odds."""
        import pandas as pd

        self._check_fitted()
        X = self.features(samples, precomputed=precomputed).to_numpy(dtype=np.float64)
        c = self.booster.predict(X, num_iteration=self.best_iteration, pred_contrib=True)
        return pd.DataFrame(c, columns=[*self.feature_names, "bias"])

    # --------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> Path:
        """Write ``model.json``, ``booster.txt`` and the CNN (``cnn.pt``: state dict and sizes, or
        ``embedder_state.pt``: the state dict of a given ``embedder`` module) to ``folder``
        (atomic files). The files hold only tensors and plain values, so :meth:`load` reads them
        with the weights-only loader."""
        from lidc_det.atomic import write_json, write_text
        from lidc_det.provenance import provenance

        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "booster.txt", self.booster.model_to_string(num_iteration=self.best_iteration))
        embed_file = None
        if "embeddings" in self.cfg.features:
            import torch

            from lidc_det.atomic import write_with

            if self.embedder is not None:
                embed_file = EMBEDDER_STATE_FILE
                cls_name = f"{type(self.embedder).__module__}.{type(self.embedder).__qualname__}"
                embed_state = {"state_dict": self.embedder.state_dict(), "class": cls_name}
                write_with(folder / embed_file, lambda p: torch.save(embed_state, p))
            else:
                embed_file = "cnn.pt"
                state = {"state_dict": self.cnn.state_dict(), "in_channels": self.cnn.in_channels,
                         "width": self.cnn.width}
                write_with(folder / embed_file, lambda p: torch.save(state, p))
        write_json(folder / "model.json", {
            "format": MODEL_FORMAT,
            "kind": "lidc-det stage3 malignancy model",
            "name": self.name,
            "config": self.cfg.to_dict(),
            "feature_names": list(self.feature_names),
            "best_iteration": self.best_iteration,
            "calibrator": self.calibrator.to_dict(),  # type: ignore[union-attr]
            "embedding_file": embed_file,
            "embedder_layer": self.embedder_layer,
            "embedder_channels": self.embedder_channels,
            "fit_info": self.fit_info,
            "provenance": provenance(),
        })
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, embedder: Any = None) -> MalignancyModel:
        """Read a model written by :meth:`save`.

        Args:
            folder: the model folder.
            embedder: for a model saved with an outside ``embedder`` module: a module of the
                same architecture; its weights are loaded from ``embedder_state.pt``.

        Raises:
            ModelError: missing or unreadable files, another format version, or an outside
                embedder's weights without ``embedder``.
            lidc_det.errors.CheckpointError / UnsafeCheckpointError: a network file that is not
                readable, or that holds pickled Python objects (refused, not unpickled).
        """
        import lightgbm as lgb

        folder = Path(folder)
        try:
            meta = json.loads((folder / "model.json").read_text())
            booster = lgb.Booster(model_str=(folder / "booster.txt").read_text())
        except (OSError, json.JSONDecodeError, lgb.basic.LightGBMError) as err:
            raise ModelError(f"{folder}: not a saved malignancy model ({err})") from err
        if meta.get("format") != MODEL_FORMAT:
            raise ModelError(f"{folder}: model format {meta.get('format')} != {MODEL_FORMAT}")
        cfg = MalignancyModelConfig.from_dict(meta["config"], where=str(folder / "model.json"))
        m = cls(cfg, embedder_layer=meta.get("embedder_layer"), embedder_channels=meta.get("embedder_channels"))
        m.booster = booster
        m.best_iteration = int(meta["best_iteration"])
        m.calibrator = Calibrator.from_dict(meta["calibrator"])
        m.feature_names = tuple(meta["feature_names"])
        m.fit_info = dict(meta.get("fit_info", {}))
        ef = meta.get("embedding_file")
        if ef:
            from lidc_det.checkpoint import load_checkpoint

            path = folder / ef
            if not path.is_file():
                raise ModelError(f"{path}: embedding network missing")
            if ef == "cnn.pt":
                from stage3_malignancy.embeddings import SmallCNN3D

                st = load_checkpoint(path, kind="embedding network")
                m.cnn = SmallCNN3D(in_channels=int(st["in_channels"]), width=int(st["width"]))
                m.cnn.load_state_dict(st["state_dict"])
                m.cnn.eval()
            elif ef == EMBEDDER_STATE_FILE:
                st = load_checkpoint(path, kind="embedding network")
                if embedder is None:
                    raise ModelError(
                        f"{folder}: saved with an outside embedding network ({st.get('class')}); pass a module of "
                        "the same architecture as MalignancyModel.load(folder, embedder=...)"
                    )
                embedder.load_state_dict(st["state_dict"])
                m.embedder = embedder.eval()
            else:
                raise ModelError(
                    f"{path}: a whole pickled module (the format of older versions), which is not loaded because "
                    "unpickling can run code. If you trust the file, convert it: torch.save({'state_dict': "
                    f"torch.load(path, weights_only=False).state_dict()}}, folder / '{EMBEDDER_STATE_FILE}'), set "
                    f"embedding_file to {EMBEDDER_STATE_FILE!r} in model.json and load with embedder=<the module>"
                )
        return m


def _group_of(column: str) -> str:
    if column == "diameter_mm":
        return "diameter"
    if column.startswith("shape_"):
        return "shape"
    if column.startswith("rad_"):
        return "radiomics"
    if column.startswith("emb_"):
        return "embeddings"
    return "other"


# ------------------------------------------------------------------ cross-validation
@dataclass(frozen=True, eq=False)
class SampleCVResult:
    """Out-of-fold predictions of one feature set on samples.

    Attributes:
        name: feature-set name.
        groups: feature groups used.
        folds: ``(N,)`` outer fold per sample.
        prob_raw, prob_calibrated: ``(N,)`` out-of-fold probabilities.
        mean_abs_contrib: ``{feature: mean |SHAP|}`` over the out-of-fold rows (log-odds).
        best_iterations: per fold.
        seconds: wall time of the feature set's folds (fit + predict, static features excluded).
    """

    name: str
    groups: tuple[str, ...]
    folds: np.ndarray
    prob_raw: np.ndarray
    prob_calibrated: np.ndarray
    mean_abs_contrib: dict[str, float]
    best_iterations: tuple[int, ...]
    seconds: float


def cross_validate_samples(
    samples: Sequence[MalignancySample],
    cfg: MalignancyModelConfig,
    feature_sets: dict[str, Sequence[str]],
    *,
    n_folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, SampleCVResult], np.ndarray, dict[str, float]]:
    """Patient-grouped CV of :class:`MalignancyModel` for several feature sets on the same folds.

    Static features (diameter, shape, radiomics) are computed once; each fold
    fits one model per feature set on the other folds (the CNN is trained inside
    each fit, on its inner training part only) and predicts the held-out fold.

    Returns:
        ``(results by set name, folds (N,), feature seconds)``.
    """
    import pandas as pd

    y, g = _labels(samples)
    folds = patient_folds(y, g, n_folds, seed)
    needed = sorted({x for v in feature_sets.values() for x in v if x != "embeddings"})
    static, secs = static_features(samples, cfg, needed, progress=progress)
    out: dict[str, SampleCVResult] = {}
    for name, groups in feature_sets.items():
        t0 = time.perf_counter()
        c = cfg.with_features(tuple(groups))
        raw = np.full(len(y), np.nan)
        cal = np.full(len(y), np.nan)
        contrib: list[Any] = []
        best = []
        for k in range(n_folds):
            te = np.flatnonzero(folds == k)
            trn = np.flatnonzero(folds != k)
            m = MalignancyModel(c).fit([samples[i] for i in trn], precomputed=static.iloc[trn], progress=False)
            test_samples = [samples[i] for i in te]
            pre = static.iloc[te]
            raw[te] = m.predict_proba(test_samples, precomputed=pre, calibrated=False)
            cal[te] = m.predict_proba(test_samples, precomputed=pre)
            contrib.append(m.contributions(test_samples, precomputed=pre).abs())
            best.append(m.best_iteration)
        mac = pd.concat(contrib, axis=0).drop(columns=["bias"]).mean(axis=0)
        out[name] = SampleCVResult(
            name=name, groups=tuple(c.features), folds=folds, prob_raw=raw, prob_calibrated=cal,
            mean_abs_contrib={str(k): float(v) for k, v in mac.items()}, best_iterations=tuple(best),
            seconds=time.perf_counter() - t0,
        )
    return out, folds, secs
