"""The stage-2 facade: train nnU-Net on crops, segment detections, reject false positives.

>>> seg = NnUnetSegmenter("work/stage2", SegmenterConfig())            # doctest: +SKIP
>>> seg.fit(train_cases, val_cases)                                      # doctest: +SKIP
>>> masks = seg.segment(hu, geometry, detections)                        # doctest: +SKIP
>>> record = seg.reject(detections, masks)    # Rejection: kept flags + reasons  # doctest: +SKIP
>>> kept = record.apply(detections)                                        # doctest: +SKIP

Everything is written under ``work_dir`` (nnU-Net's three folders and
``segmenter.json`` with the config, plan, timings and provenance). ``fit`` is
resumable: crops already written are kept, a finished plan is reused, and
nnU-Net resumes from its latest checkpoint. Call it from a guarded entry point
(``if __name__ == "__main__":``): nnU-Net spawns processes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lidc_det.atomic import write_json
from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections, NoduleMask, Rejection
from stage2_segment.config import SegmenterConfig
from stage2_segment.crops import Crop, detection_crops, make_crop, negative_crops, nodule_crops
from stage2_segment.nnunet_dataset import CONFIGURATION, NnUnetDatasetError, NnUnetPaths, dataset_name

if TYPE_CHECKING:
    from lidc_det.data.luna import LunaFinding
    from lidc_det.data.prepared import PreparedCase
    from stage2_segment.predict import CropPredictor


class NotFittedError(LidcDetError):
    """The segmenter has no trained model in its work folder."""


def training_crops(cases: Sequence[PreparedCase], cfg: SegmenterConfig, rng: np.random.Generator) -> list[Crop]:
    """Jittered nodule crops and negatives of every case, in case order, then ``cfg.augment.copies``
    re-acquired copies of them all (:func:`~stage2_segment.crop_augment.augment_crops`)."""
    from stage2_segment.crop_augment import augment_crops

    crops: list[Crop] = []
    for case in cases:
        crops += nodule_crops(case, cfg.crop, rng)
        crops += negative_crops(case, cfg.crop, rng)
    return augment_crops(crops, cfg.augment, rng)


class NnUnetSegmenter:
    """nnU-Net v2 crop segmenter with a work folder.

    Attributes:
        work_dir: everything is written here.
        config: the run's :class:`SegmenterConfig`.
        min_volume_mm3: FP-rejection threshold (config value, or the tuned one
            after :meth:`tune_rejection`; None before).
    """

    def __init__(self, work_dir: Path | str, config: SegmenterConfig = SegmenterConfig()) -> None:
        self.work_dir = Path(work_dir)
        self.config = config
        self.paths = NnUnetPaths(self.work_dir / "nnunet")
        self.dataset = dataset_name(config.dataset_id, config.dataset_name)
        self.min_volume_mm3: float | None = config.rejection.min_volume_mm3
        self._predictor: CropPredictor | None = None
        state = self._read_state()
        if self.min_volume_mm3 is None and state.get("tuned_min_volume_mm3") is not None:
            self.min_volume_mm3 = float(state["tuned_min_volume_mm3"])

    # ---------------------------------------------------------------- state
    @property
    def state_file(self) -> Path:
        return self.work_dir / "segmenter.json"

    def _read_state(self) -> dict[str, Any]:
        if self.state_file.is_file():
            return json.loads(self.state_file.read_text())
        return {}

    def _update_state(self, **kv: Any) -> None:
        from lidc_det.provenance import device_info, provenance

        state = self._read_state()
        state.update(kv)
        state["config"] = self.config.to_dict()
        state["provenance"] = provenance()
        state["device"] = device_info(self.config.train.device)
        write_json(self.state_file, state)

    @property
    def model_dir(self) -> Path:
        """nnU-Net's model folder of this run."""
        state = self._read_state()
        plans_id = state.get("plan", {}).get("plans_identifier", "nnUNetPlans")
        return self.paths.results / self.dataset / f"{self.config.train.trainer}__{plans_id}__{CONFIGURATION}"

    @property
    def is_fitted(self) -> bool:
        return (self.model_dir / f"fold_{self.config.train.fold}" / self.config.predict.checkpoint).is_file()

    # ---------------------------------------------------------------- training
    def training_crops(self, cases: Sequence[PreparedCase], rng: np.random.Generator) -> list[Crop]:
        """The nnU-Net training cases cut from ``cases`` (:func:`training_crops`)."""
        return training_crops(cases, self.config, rng)

    def fit(
        self, train_cases: Sequence[PreparedCase], val_cases: Sequence[PreparedCase], *, progress: bool = True
    ) -> dict[str, Any]:
        """Crops -> nnU-Net raw data set -> plan/preprocess -> train fold 0 (train vs val scans).

        Returns the timings and nnU-Net's final pseudo-Dice (also in ``segmenter.json``).
        """
        from stage2_segment.nnunet_dataset import plan_and_preprocess, write_raw_dataset, write_splits
        from stage2_segment.trainer import train

        cfg = self.config
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        rng = np.random.default_rng(cfg.seed)
        crops = self.training_crops([*train_cases, *val_cases], rng)
        write_raw_dataset(
            crops, self.paths, cfg.dataset_id, cfg.dataset_name, progress=progress,
            extra={"config": cfg.to_dict(), "train_series": [c.series_uid for c in train_cases],
                   "val_series": [c.series_uid for c in val_cases]},
        )
        times["crops_s"] = time.perf_counter() - t0
        state = self._read_state()
        n_cases = len(crops)
        t0 = time.perf_counter()
        plan_settings = {"n_cases": n_cases, "batch_size": cfg.plan_batch_size, "base_features": cfg.plan_base_features}
        model_settings = {**plan_settings, "trainer": cfg.train.trainer, "fold": cfg.train.fold, **cfg.train.schedule()}
        old_plan = state.get("plan", {})
        old_model = state.get("model_settings")
        if (self.paths.results / self.dataset).is_dir() and old_model is not None and old_model != model_settings:
            changed = sorted(k for k in model_settings if old_model.get(k) != model_settings[k])
            raise NnUnetDatasetError(
                f"{self.work_dir}: holds a model trained with other settings (changed: {changed}); "
                "use a new work folder"
            )
        if any(old_plan.get(k) != v for k, v in plan_settings.items()) or not (self.paths.preprocessed / self.dataset).is_dir():
            plan = plan_and_preprocess(
                self.paths, cfg.dataset_id, cfg.dataset_name, num_processes=cfg.plan_processes,
                batch_size=cfg.plan_batch_size, base_features=cfg.plan_base_features,
            )
            plan_rec = {**asdict(plan), "plans_file": str(plan.plans_file), **plan_settings}
            self._update_state(plan=plan_rec)
        else:
            plan_rec = state["plan"]
        self._update_state(model_settings=model_settings)
        write_splits(
            self.paths, cfg.dataset_id, cfg.dataset_name,
            [c.series_uid for c in train_cases], [c.series_uid for c in val_cases],
        )
        times["plan_preprocess_s"] = time.perf_counter() - t0
        result = train(self.paths, self.dataset, plan_rec["plans_identifier"], cfg.train, progress=progress)
        times["train_s"] = result.seconds
        if result.seconds == 0.0:  # finished earlier: report the time that training took then
            times["train_s"] = float(state.get("fit", {}).get("times", {}).get("train_s", 0.0))
            times["train_reused"] = 1.0
        info = {
            "n_crops": n_cases,
            "n_nodule_crops": sum(c.kind == "nodule" for c in crops),
            "n_negative_crops": sum(c.kind == "negative" for c in crops),
            "times": {k: round(v, 2) for k, v in times.items()},
            "final_pseudo_dice": result.final_ema_dice,
            "model_dir": str(result.model_dir),
        }
        self._update_state(fit=info)
        return info

    # ---------------------------------------------------------------- inference
    @property
    def predictor(self) -> CropPredictor:
        if self._predictor is None:
            from stage2_segment.predict import CropPredictor

            if not self.is_fitted:
                raise NotFittedError(f"{self.model_dir}: no trained model; call fit() first")
            self._predictor = CropPredictor(self.model_dir, self.config.predict)
        return self._predictor

    def segment(self, hu: np.ndarray, geometry: VolumeGeometry, detections: Detections) -> list[NoduleMask]:
        """One :class:`NoduleMask` per detection (same order; ``empty`` when nothing was found).

        Args:
            hu: ``[z, y, x]`` HU on ``geometry`` (the grid the model was trained on,
                e.g. a prepared 1 mm scan).
        """
        crops = detection_crops(hu, geometry, detections, self.config.crop)
        return self.segment_crops(crops, hu, source="detection")

    def segment_nodules(self, case: PreparedCase) -> list[NoduleMask]:
        """Masks from crops centred on the case's target nodules (ground-truth crops, no jitter),
        in ``case.nodules`` order (nodules lost at the prepared spacing are skipped)."""
        hu = np.asarray(case.image_hu)
        crops = [
            make_crop(hu, case.geometry, case.series_uid, np.asarray(n.center_xyz_mm), self.config.crop,
                      kind="nodule", nodule_id=n.nodule_id)
            for n in case.nodules
            if n.box_voxel is not None
        ]
        return self.segment_crops(crops, hu, source="ground_truth")

    def segment_crops(self, crops: Sequence[Crop], hu: np.ndarray, *, source: str) -> list[NoduleMask]:
        """One :class:`NoduleMask` per crop of the scan ``hu`` (the model predicts each crop)."""
        return self.predictor.segment_crops(crops, hu, source=source)

    # ---------------------------------------------------------------- FP rejection
    def tune_rejection(
        self,
        detections: Sequence[Detections],
        masks: Sequence[Sequence[NoduleMask]],
        annotations: Sequence[LunaFinding],
        excluded: Sequence[LunaFinding] = (),
    ) -> dict[str, Any]:
        """Choose ``min_volume_mm3`` on validation scans (the smallest threshold within
        ``rejection.tolerance`` of the best CPM) and store it in ``segmenter.json``."""
        r = self.config.rejection
        result = tune_min_volume(detections, masks, annotations, excluded, rejection_mode=r.mode, factor=r.factor,
                                 tolerance=r.tolerance)
        self.min_volume_mm3 = result["min_volume_mm3"]
        self._update_state(tuned_min_volume_mm3=self.min_volume_mm3, tuning=result)
        return result

    def reject(self, detections: Detections, masks: Sequence[NoduleMask]) -> Rejection:
        """The record of :func:`rejection` with this segmenter's threshold and mode: which candidates
        were kept and why (``.apply(detections)`` gives the candidates after rejection, the same as
        :func:`reject_false_positives`)."""
        if self.min_volume_mm3 is None:
            raise NotFittedError("no FP-rejection threshold: set rejection.min_volume_mm3 or call tune_rejection()")
        r = self.config.rejection
        return rejection(detections, masks, self.min_volume_mm3, mode=r.mode, factor=r.factor)


def rejection(
    detections: Detections,
    masks: Sequence[NoduleMask],
    min_volume_mm3: float,
    *,
    mode: str = "drop",
    factor: float = 0.1,
) -> Rejection:
    """Which candidates pass ``min_volume_mm3`` (mask volume, mm^3), their scores after rejection
    and the reason for each (a :class:`~lidc_det.results.Rejection`); same rules as
    :func:`reject_false_positives`, which equals ``rejection(...).apply(detections)``."""
    kept_det = reject_false_positives(detections, masks, min_volume_mm3, mode=mode, factor=factor)
    keep = passes_rejection(masks, min_volume_mm3)
    t = float(min_volume_mm3)
    reasons = [
        ("empty mask" if m.empty else f"mask {m.volume_mm3:.0f} mm3 {'>=' if k else '<'} {t:g} mm3")
        for m, k in zip(masks, keep)
    ]
    scores = kept_det.scores if mode == "downweight" else detections.scores
    return Rejection(detections.series_uid, keep, scores, tuple(reasons), t, mode)


def reject_false_positives(
    detections: Detections,
    masks: Sequence[NoduleMask],
    min_volume_mm3: float,
    *,
    mode: str = "drop",
    factor: float = 0.1,
) -> Detections:
    """Drop (or down-weight) candidates whose segmentation is smaller than ``min_volume_mm3``.

    ``masks[i]`` must belong to ``detections`` candidate ``i`` (as returned by
    :meth:`NnUnetSegmenter.segment`). An empty mask has volume 0: threshold 0
    rejects nothing, any positive threshold rejects at least the empty masks.
    ``mode="downweight"`` keeps every candidate and multiplies the rejected
    ones' scores by ``factor``.
    """
    if len(masks) != len(detections):
        raise ValueError(f"{len(detections)} detections but {len(masks)} masks")
    if mode not in ("drop", "downweight"):
        raise ValueError(f"mode must be 'drop' or 'downweight', got {mode!r}")
    for m in masks:
        if m.series_uid != detections.series_uid:
            raise ValueError(f"mask of scan {m.series_uid} given for detections of {detections.series_uid}")
    keep = passes_rejection(masks, min_volume_mm3)
    if mode == "drop":
        boxes = None if detections.boxes_voxel is None else detections.boxes_voxel[keep]
        return Detections(detections.series_uid, detections.centers_xyz_mm[keep], detections.diameters_mm[keep],
                          detections.scores[keep], boxes)
    scores = np.where(keep, detections.scores, detections.scores * float(factor))
    return Detections(detections.series_uid, detections.centers_xyz_mm, detections.diameters_mm, scores,
                      detections.boxes_voxel)


def passes_rejection(masks: Sequence[NoduleMask], min_volume_mm3: float) -> np.ndarray:
    """``bool [N]``: which masks are at least ``min_volume_mm3`` (the candidates rejection keeps
    at full score; with ``mode="drop"`` the kept candidates are exactly these, in order)."""
    return np.array([m.volume_mm3 for m in masks], dtype=np.float64).reshape(-1) >= float(min_volume_mm3)


def tune_min_volume(
    detections: Sequence[Detections],
    masks: Sequence[Sequence[NoduleMask]],
    annotations: Sequence[LunaFinding],
    excluded: Sequence[LunaFinding] = (),
    *,
    candidates_mm3: Sequence[float] | None = None,
    rejection_mode: str = "drop",
    factor: float = 0.1,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """The smallest ``min_volume_mm3`` whose LUNA16 CPM on these (validation) scans is within
    ``tolerance`` of the best.

    Tries 0 and every distinct mask volume (or ``candidates_mm3``); with
    ``tolerance=0`` that is the best threshold, ties going to the smallest (reject
    as little as possible). Returns the chosen value, the CPM without rejection and
    with it, the best CPM seen, and the whole table.
    """
    from lidc_det.metrics.froc import evaluate_detections

    if len(detections) != len(masks):
        raise ValueError(f"{len(detections)} Detections but {len(masks)} mask lists")
    if candidates_mm3 is None:
        vols = sorted({round(m.volume_mm3, 3) for ms in masks for m in ms})
        candidates_mm3 = [0.0, *[v for v in vols if v > 0]]
        if len(candidates_mm3) > 60:  # keep the tuning fast: quantiles of the volumes
            candidates_mm3 = [0.0, *np.quantile(vols, np.linspace(0, 1, 59)).tolist()]
    table = []
    for t in sorted(set(float(v) for v in candidates_mm3)):
        kept = [reject_false_positives(d, m, t, mode=rejection_mode, factor=factor) for d, m in zip(detections, masks)]
        cpm = evaluate_detections(annotations, kept, excluded=excluded,
                                  series_uids=[d.series_uid for d in detections], n_bootstrap=0).cpm
        table.append({"min_volume_mm3": t, "cpm": float(cpm), "n_candidates": int(sum(len(k) for k in kept))})
    best_cpm = max(r["cpm"] for r in table)
    chosen = next(r for r in table if r["cpm"] >= best_cpm - float(tolerance) - 1e-12)  # table is sorted
    return {"min_volume_mm3": chosen["min_volume_mm3"], "cpm_without": table[0]["cpm"], "cpm_with": chosen["cpm"],
            "cpm_best": best_cpm, "tolerance": float(tolerance), "table": table}
