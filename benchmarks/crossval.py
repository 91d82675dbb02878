"""``lidc-det bench CONFIG --folds all``: LUNA16-style cross-validation over the patient folds.

For each of the data's ``n_folds`` folds ``k`` (LUNA16: 10) and each detector of the config,
one independent task (:mod:`lidc_det.cluster`; ``--scheduler`` puts them on a cluster):

* test on fold ``k``, validate (checkpoint selection, stage-2 rejection tuning) on fold
  ``k + 1`` (mod n), train on the other ``n - 2`` folds;
* the test scans go through :class:`lidc_det.pipeline.Pipeline` (stage 1, and with a
  ``segmentation`` section the fold's own stage-2 model and tuned FP rejection);
* writes ``<label>/fold_<k>/candidates.csv`` (the pipeline's candidates),
  ``stage1_candidates.csv`` and ``done.json`` (written last; a finished fold is skipped
  on a re-run with the same config).

Then, as LUNA16 scores a system, the candidates of all folds are pooled (every scan is a
test scan exactly once) and scored once: the pooled CPM with a bootstrap CI over scans,
beside each fold's own CPM. Written to ``<label>/crossval/`` (``froc.json``, ``froc.png``,
``crossval.json``, ``candidates.csv`` of all folds) and one leaderboard row per detector.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import write_json

__all__ = ["fold_split", "fold_task", "run_cross_validation"]


def fold_split(ds: Any, fold: int) -> Any:
    """Train / val / test scans of cross-validation fold ``fold``: test = fold, val = the next
    fold (mod n), train = the others."""
    from benchmarks.data import Split
    from lidc_det.errors import DatasetError

    n = int(ds.info["n_folds"])
    test = tuple(ds.scans_in_folds([fold]))
    val = tuple(ds.scans_in_folds([(fold + 1) % n]))
    held = set(test) | set(val)
    train = tuple(u for u in ds.series_uids if u not in held)
    if not (train and val and test):
        raise DatasetError(f"{ds.root}: fold {fold} of {n}: empty split (train {len(train)}, val {len(val)}, "
                           f"test {len(test)} scans)")
    return Split(train=train, val=val, test=test)


def _findings(ds: Any, uids: Any) -> tuple[list[Any], list[Any]]:
    targets: list[Any] = []
    others: list[Any] = []
    for uid in uids:
        t, o = ds.load_case(uid).luna_findings()
        targets += t
        others += o
    return targets, others


def fold_task(config_path: str, out_dir: str, label: str, fold: int, progress: bool = False) -> dict[str, Any]:
    """Train and test one detector on one fold (see the module doc); idempotent. Returns the
    fold's ``done.json`` record."""
    import json

    from benchmarks.harness import _quiet, load_bench_config
    from lidc_det.config import config_hash
    from lidc_det.data.luna import candidates_from_detections, write_candidates
    from lidc_det.data.prepared import PreparedDataset
    from lidc_det.metrics.froc import evaluate_detections
    from lidc_det.pipeline import Pipeline
    from stage1_detect.registry import build_detector

    cfg = load_bench_config(Path(config_path))
    chash = config_hash(cfg)
    spec = next(d for d in cfg.detectors if d.display == label)
    fold_dir = Path(out_dir) / label / f"fold_{fold}"
    done_path = fold_dir / "done.json"
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("config_hash") == chash:
            return {**done, "skipped": True}
    t_start = time.perf_counter()
    ds = PreparedDataset(Path(out_dir) / "prepared")
    split = fold_split(ds, fold)
    detector = build_detector({"name": spec.name, **_quiet(spec, progress)})
    t0 = time.perf_counter()
    if hasattr(detector, "fit"):
        detector.fit([ds.load_case(u) for u in split.train], [ds.load_case(u) for u in split.val], fold_dir / "train")
    train_seconds = time.perf_counter() - t0
    segmenter = None
    if cfg.segmentation is not None:
        from benchmarks.segmentation import run_segmentation_step

        seg_run = run_segmentation_step(
            ds, split, detector, [], fold_dir / "stage2", cfg.segmentation, synthetic=cfg.data.synthetic,
            n_bootstrap=0, progress=progress, work_dir=fold_dir / "stage2_model",
        )
        segmenter = seg_run.segmenter
    k = cfg.segmentation.max_candidates_per_scan if cfg.segmentation is not None else 100
    pipe = Pipeline(detector, segmenter, None, max_candidates=k)
    final, stage1 = [], []
    t0 = time.perf_counter()
    for uid in split.test:
        case = ds.load_case(uid)
        res = pipe.run_volume(np.asarray(case.image_hu), case.geometry, series_uid=uid, patient_id=case.patient_id)
        final.append(res.final_detections())
        stage1.append(res.detections)
    infer_seconds = time.perf_counter() - t0
    write_candidates(fold_dir / "candidates.csv", [c for d in final for c in candidates_from_detections(d)])
    write_candidates(fold_dir / "stage1_candidates.csv", [c for d in stage1 for c in candidates_from_detections(d)])
    targets, others = _findings(ds, split.test)
    froc = evaluate_detections(targets, final, excluded=others, n_bootstrap=0)
    froc1 = evaluate_detections(targets, stage1, excluded=others, n_bootstrap=0)
    record = {
        "config_hash": chash, "label": label, "fold": fold, "split": split.to_dict(),
        "n_test_nodules": len(targets), "cpm": float(froc.cpm), "cpm_stage1": float(froc1.cpm),
        "train_seconds": round(train_seconds, 1), "infer_seconds_per_scan": round(infer_seconds / len(split.test), 2),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(done_path, record)  # last: the fold is finished
    return record


def run_cross_validation(
    config_path: Path,
    out_dir: Path,
    *,
    leaderboard_dir: Path | None = None,
    only: tuple[str, ...] = (),
    scheduler: str | None = "serial",
    progress: bool = True,
) -> dict[str, Any]:
    """Every fold of every detector as a task, then the pooled LUNA16 score; returns
    ``crossval.json``'s record (also written to ``out_dir``)."""
    from benchmarks.data import materialize
    from benchmarks.harness import load_bench_config
    from benchmarks.leaderboard import append_rows, froc_fields, run_id
    from lidc_det.cluster import run_tasks
    from lidc_det.config import ConfigFileError, config_hash, to_plain
    from lidc_det.data.luna import candidates_from_detections, detections_from_candidates, read_candidates, write_candidates
    from lidc_det.metrics.froc import evaluate_detections, write_froc_report
    from lidc_det.provenance import device_info, provenance

    cfg = load_bench_config(config_path)
    specs = [d for d in cfg.detectors if not only or d.display in only]
    if only and len(specs) != len(only):
        raise ConfigFileError(f"--only {list(only)}: the config's detectors are {[d.display for d in cfg.detectors]}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"== data ({cfg.data.label()})", flush=True)
    ds, _ = materialize(cfg.data, out_dir, progress=progress)
    n = int(ds.info["n_folds"])
    folds = list(range(n))
    for k in folds:
        fold_split(ds, k)  # fail before training when a fold is empty
    items = [(f"{s.display}/fold{k}", (str(Path(config_path).resolve()), str(out_dir), s.display, k, False))
             for s in specs for k in folds]
    print(f"== {len(items)} fold tasks ({n} folds x {len(specs)} detectors) on {scheduler}", flush=True)
    run = run_tasks(fold_task, items, scheduler=scheduler, desc="folds", progress=progress)
    print(run.summary(), flush=True)
    targets, others = _findings(ds, ds.series_uids)
    prov = provenance()
    rows, per_detector = [], {}
    for s in specs:
        outs = [o for o in run.outcomes if o.key.startswith(f"{s.display}/")]
        done = [o.value for o in outs if o.ok]
        det_dir = out_dir / s.display
        pooled_det, pooled1 = [], []
        for rec in done:
            fold_dir = det_dir / f"fold_{rec['fold']}"
            cands, cands1 = read_candidates(fold_dir / "candidates.csv"), read_candidates(fold_dir / "stage1_candidates.csv")
            for uid in rec["split"]["test"]:
                pooled_det.append(detections_from_candidates(cands, uid))
                pooled1.append(detections_from_candidates(cands1, uid))
        summary: dict[str, Any] = {
            "folds_done": sorted(r["fold"] for r in done),
            "folds_failed": {o.key: o.error for o in outs if not o.ok},
            "per_fold": [{k: r[k] for k in ("fold", "cpm", "cpm_stage1", "n_test_nodules", "train_seconds",
                                             "infer_seconds_per_scan", "seconds")} for r in sorted(done, key=lambda r: r["fold"])],
        }
        if pooled_det:
            cv_dir = det_dir / "crossval"
            froc = evaluate_detections(targets, pooled_det, excluded=others, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
            froc1 = evaluate_detections(targets, pooled1, excluded=others, n_bootstrap=0)
            write_froc_report(froc, cv_dir, label=f"{s.display} ({len(done)}-fold CV, pooled)")
            write_candidates(cv_dir / "candidates.csv", [c for d in pooled_det for c in candidates_from_detections(d)])
            fold_cpms = [r["cpm"] for r in summary["per_fold"]]
            summary.update({
                "pooled_cpm": float(froc.cpm), "pooled_cpm_ci": [float(froc.cpm_ci_low), float(froc.cpm_ci_high)],
                "pooled_cpm_stage1": float(froc1.cpm), "fold_cpm_mean": float(np.mean(fold_cpms)),
                "fold_cpm_sd": float(np.std(fold_cpms, ddof=1)) if len(fold_cpms) > 1 else None,
                "n_scans": froc.n_scans, "n_nodules": froc.n_nodules,
            })
            write_json(cv_dir / "crossval.json", summary)
            complete = len(done) == n
            rows.append({
                "method": s.display, "detector": s.name, "dataset": cfg.data.label(), "synthetic": cfg.data.synthetic,
                "split": (f"{n}-fold patient CV, candidates of all folds pooled (LUNA16 style), seed {cfg.data.seed}"
                          + ("" if complete else f"; ONLY folds {summary['folds_done']} finished")),
                **froc_fields(froc),
                "fold_cpms": [round(v, 4) for v in fold_cpms],
                "dice": None, "cpm_with_rejection": None, "cpm_second_look": None, "auc": None,
                "train_seconds": round(sum(r["train_seconds"] for r in done), 1),
                "infer_seconds_per_scan": round(float(np.mean([r["infer_seconds_per_scan"] for r in done])), 2),
                "device": device_info(), "git_revision": prov["git_revision"], "config": f"{cfg.name} --folds all",
                "config_hash": config_hash(cfg), "run_id": run_id(out_dir, config_hash(cfg), "crossval"),
                "created_utc": prov["created_utc"],
            })
            print(f"{s.display}: pooled CPM {froc.cpm:.3f} (95% CI {froc.cpm_ci_low:.2f}-{froc.cpm_ci_high:.2f}) over "
                  f"{froc.n_scans} scans / {froc.n_nodules} nodules; per fold "
                  + ", ".join(f"{v:.3f}" for v in fold_cpms), flush=True)
        per_detector[s.display] = summary
    record = {
        "kind": "lidc-det bench --folds all", "config_path": str(config_path), "config": to_plain(cfg),
        "config_hash": config_hash(cfg), "provenance": prov, "n_folds": n, "detectors": per_detector,
        "tasks": run.to_dict(), "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(out_dir / "crossval.json", record)
    if leaderboard_dir is not None and rows:
        _, md = append_rows(leaderboard_dir, rows)
        print(f"leaderboard: {md}", flush=True)
    return record
