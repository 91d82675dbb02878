"""What a blob-lgbm model misses on a semi-real yardstick, and what scores above it.

For one variant of a :mod:`benchmarks.blob_ablation` config (its cached candidates and trained
model), this lists every inserted nodule of a yardstick with what the insertion recorded about it
(diameter, texture rating, placement, core HU) and what the detector made of it:

* ``proposed``: some candidate lies within the nodule's radius (LUNA16 hit rule) before scoring;
* ``score``: the best score of those candidates (before suppression; None when not proposed);
* ``fp_per_scan_above``: the false positives of the whole yardstick (scored region, after
  suppression and the top-``max_detections`` cut) scoring above it, per scan: the FROC abscissa
  from which the nodule counts (0 = found before any false positive; above 8 it adds nothing to CPM);
* the best candidate's features named by ``--features``.

It also groups the yardstick's top false positives by place (a real structure of the background
is a false positive in every copy, at about the same place): for each group its world centre,
the number of copies it appears in and its best score.

Run: ``python -m benchmarks.blob_misses ABLATION_CONFIG --variant base [--set yardstick] [--out CSV]``.
It needs the variant's model (run the ablation first); it prints both tables as Markdown and writes
the nodule table as CSV. SYNTHETIC nodules on a real background: a diagnostic, not a result.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.yardstick_breakdown import NoduleRow, false_positives, fp_groups, inserted_nodules, nodule_row, summary

DEFAULT_FEATURES = ("scale_mm", "response", "dot", "hu_centre", "obj_diam_over_blob", "obj_on_faces",
                    "obj_face_crossings", "obj_core_fraction", "cube_outside_lung")


def nodule_rows(detector: Any, scans: list[tuple[str, Any, list[dict[str, Any]]]], region: str,
                excluded: list[Any], features: tuple[str, ...]) -> tuple[list[NoduleRow], list[Any]]:
    """The table of :class:`NoduleRow` and the scored detections of each scan.

    ``scans``: ``(series uid, BlobCandidates, inserted nodules)`` with each nodule a dict of the scan
    metadata (``center_xyz_mm``, ``diameter_mm``, ``inserted``: placement, texture, core_hu).
    """
    from benchmarks.transfer import _restrict
    from stage1_detect.blob import feature_names

    names = feature_names(detector.config)
    dets = [_restrict(detector.score_candidates(c, series_uid=uid), region) for uid, c, _ in scans]
    by_scan = [(uid, nods) for uid, _, nods in scans]
    fp = np.asarray([s for s, _, _ in false_positives(dets, by_scan, excluded)])
    rows: list[NoduleRow] = []
    for uid, cand, nods in scans:
        raw = detector.candidate_scores(cand)
        for n in nods:
            hit = np.linalg.norm(cand.centers_xyz_mm - np.asarray(n["center_xyz_mm"]), axis=1) < n["diameter_mm"] / 2
            best = int(np.flatnonzero(hit)[np.argmax(raw[hit])]) if hit.any() else None
            rows.append(nodule_row(uid, n, None if best is None else float(raw[best]), fp, len(scans),
                                   {} if best is None else {k: round(float(cand.features[best, names.index(k)]), 2)
                                                             for k in features}))
    return rows, dets


def _markdown(rows: list[NoduleRow], groups: list[dict[str, Any]], features: tuple[str, ...]) -> str:
    head = ["diameter mm", "texture", "placement", "core HU", "proposed", "score", "FP/scan above", *features]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda r: (r.fp_per_scan_above is None, -(r.fp_per_scan_above or 0.0)), reverse=True)
    for r in order:
        lines.append("| " + " | ".join(str(v) for v in [
            r.diameter_mm, r.texture, r.placement, r.core_hu, "yes" if r.proposed else "no", r.score,
            r.fp_per_scan_above, *(r.features.get(k, "") for k in features)]) + " |")
    lines += ["", "| false positive (world x, y, z mm) | FPs | copies | best score | lowest |", "|---|---|---|---|---|"]
    lines += [f"| {g['world_xyz_mm']} | {g['n_fp']} | {g['n_scans']} | {g['best_score']} | {g['lowest_score']} |"
              for g in groups]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json

    from benchmarks.blob_ablation import load_ablation_config
    from benchmarks.transfer import DEFAULT_DICOM_ROOT, _yardstick_findings, load_transfer_config, prepare_transfer_data
    from lidc_det.config import ConfigFileError
    from stage1_detect.blob import BlobDetector

    ap = argparse.ArgumentParser(prog="python -m benchmarks.blob_misses", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="blob_ablation YAML (its cached candidates and models)")
    ap.add_argument("--variant", default="base", help="variant name (its model under <work_dir>/models)")
    ap.add_argument("--set", default="yardstick", help="'yardstick' or the name of an extra yardstick")
    ap.add_argument("--features", default=",".join(DEFAULT_FEATURES), help="comma-separated feature columns to show")
    ap.add_argument("--out", type=Path, default=None, help="nodule table CSV")
    args = ap.parse_args(argv)

    cfg = load_ablation_config(args.config)
    tcfg = load_transfer_config(cfg.transfer)
    model = cfg.work_dir / "models" / args.variant / "blob_model.txt"
    if not model.exists():
        raise ConfigFileError(f"{model} does not exist: run python -m benchmarks.blob_ablation {args.config} first")
    data = prepare_transfer_data(tcfg, cfg.data_dir, cfg.dicom_root or DEFAULT_DICOM_ROOT, progress=False)
    sets = {"yardstick": (data.ds_yard, data.yardstick_region),
            **{b.name: (d, b.region) for b, d in zip(tcfg.extra_yardsticks, data.ds_extra)}}
    if args.set not in sets:
        raise ConfigFileError(f"--set {args.set!r}: the config has {sorted(sets)}")
    ds, region = sets[args.set]
    det = BlobDetector(checkpoint=model, progress=False)
    base = BlobDetector(progress=False, **tcfg.detector.kwargs)
    features = tuple(f for f in args.features.split(",") if f)
    _, excluded = _yardstick_findings(ds)
    scans = [(uid, base.cached_candidates(ds.load_case(uid), cfg.work_dir / "features"), inserted_nodules(ds, uid, region))
             for uid in ds.series_uids]
    rows, dets = nodule_rows(det, scans, region, excluded, features)
    groups = fp_groups(dets, [(uid, nods) for uid, _, nods in scans], excluded)
    print(f"# {args.set} ({region}), variant {args.variant}: SYNTHETIC nodules on a real background\n")
    print(_markdown(rows, groups, features))
    print("\n" + json.dumps(summary(rows), indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["series_uid", "diameter_mm", "texture", "placement", "core_hu", "proposed", "score",
                        "fp_per_scan_above", *features])
            for r in rows:
                w.writerow([r.series_uid, r.diameter_mm, r.texture, r.placement, r.core_hu, int(r.proposed), r.score,
                            r.fp_per_scan_above, *(r.features.get(k, "") for k in features)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
