"""Stage 1 through the common code path: train a registered detector, detect on the
test scans, score them with the LUNA16 FROC evaluator.

Every detector of a benchmark (ours, the MONAI baseline, a plug-in) goes through
:func:`train_and_score` with the same data, split and evaluator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lidc_det.results import Detections


@dataclass(frozen=True)
class DetectionRun:
    """One detector's result on the test scans.

    Attributes:
        name: label of the run (e.g. ``"retina3d-tiny"``).
        detections: one :class:`Detections` per test scan (test order).
        froc: :class:`lidc_det.metrics.froc.FrocResult`.
        train_seconds: wall time of ``fit`` (0 when the detector was not trained here).
        infer_seconds_per_scan: mean wall time of ``predict`` per test scan.
        out_dir: where candidates.csv and froc/ were written.
    """

    name: str
    detections: tuple[Detections, ...]
    froc: Any
    train_seconds: float
    infer_seconds_per_scan: float
    out_dir: Path


def detect_scans(
    name: str, detector: Any, ds: Any, series_uids: Any, *, progress: bool = True,
    predict_case: Callable[[Any], Detections] | None = None,
) -> tuple[list[Detections], list[Any], list[Any], float]:
    """Run ``detector.predict`` on each scan of ``ds`` in ``series_uids`` (on its float32 image), or
    ``predict_case(case)`` when given (e.g. scoring a scan's cached candidates).

    Returns the detections (scan order), the scans' LUNA16 targets and excluded
    findings, and the total predict wall time in seconds.
    """
    detections: list[Detections] = []
    annotations: list[Any] = []
    excluded: list[Any] = []
    infer = 0.0
    for uid in tqdm(series_uids, desc=f"{name}: detect", unit="scan", disable=not progress):
        case = ds.load_case(uid)
        targets, others = case.luna_findings()
        annotations += targets
        excluded += others
        t0 = time.perf_counter()
        if predict_case is None:
            det = detector.predict(np.asarray(case.image_hu, dtype=np.float32), case.geometry, series_uid=uid)
        else:
            det = predict_case(case)
        infer += time.perf_counter() - t0
        if not isinstance(det, Detections):
            raise TypeError(f"detector {name!r}: predict returned {type(det).__name__}, expected Detections")
        detections.append(det)
    return detections, annotations, excluded, infer


def train_and_score(
    name: str,
    detector: Any,
    ds: Any,
    split: Any,
    out_dir: Path,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> DetectionRun:
    """Fit ``detector`` on ``split.train`` (``split.val`` for checkpoint selection) when it has
    ``fit``, predict every ``split.test`` scan, write ``candidates.csv`` and ``froc/`` under
    ``out_dir`` and return the :class:`DetectionRun`."""
    from lidc_det.data.luna import candidates_from_detections, write_candidates
    from lidc_det.metrics.froc import evaluate_detections, write_froc_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_seconds = 0.0
    if hasattr(detector, "fit"):
        t0 = time.perf_counter()
        detector.fit([ds.load_case(u) for u in split.train], [ds.load_case(u) for u in split.val], out_dir / "train")
        train_seconds = time.perf_counter() - t0

    detections, annotations, excluded, infer = detect_scans(name, detector, ds, split.test, progress=progress)
    write_candidates(out_dir / "candidates.csv", [c for d in detections for c in candidates_from_detections(d)])
    froc = evaluate_detections(annotations, detections, excluded=excluded, n_bootstrap=n_bootstrap, seed=seed)
    write_froc_report(froc, out_dir / "froc", label=name)
    return DetectionRun(
        name=name,
        detections=tuple(detections),
        froc=froc,
        train_seconds=round(train_seconds, 1),
        infer_seconds_per_scan=round(infer / max(len(split.test), 1), 2),
        out_dir=out_dir,
    )
