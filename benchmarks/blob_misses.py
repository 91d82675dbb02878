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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_FEATURES = ("scale_mm", "response", "dot", "hu_centre", "obj_diam_over_blob", "obj_on_faces",
                    "obj_face_crossings", "obj_core_fraction", "cube_outside_lung")


@dataclass(frozen=True)
class NoduleRow:
    """One inserted nodule and the detector's answer to it (see the module docstring)."""

    series_uid: str
    diameter_mm: float
    texture: int | None
    placement: str | None
    core_hu: float | None
    proposed: bool
    score: float | None
    fp_per_scan_above: float | None
    features: dict[str, float]


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
    fp = np.sort(np.asarray([s for s, _, _ in _false_positives(dets, scans, excluded)]))[::-1]
    rows: list[NoduleRow] = []
    for uid, cand, nods in scans:
        raw = detector.candidate_scores(cand)
        for n in nods:
            centre, radius = np.asarray(n["center_xyz_mm"]), n["diameter_mm"] / 2
            hit = np.linalg.norm(cand.centers_xyz_mm - centre, axis=1) < radius
            ins = n.get("inserted", {})
            best = int(np.flatnonzero(hit)[np.argmax(raw[hit])]) if hit.any() else None
            score = None if best is None else float(raw[best])
            rows.append(NoduleRow(
                uid, round(float(n["diameter_mm"]), 1), ins.get("texture"), ins.get("placement"), ins.get("core_hu"),
                best is not None, None if score is None else round(score, 4),
                None if score is None else float((fp > score).sum()) / len(scans),
                {} if best is None else {k: round(float(cand.features[best, names.index(k)]), 2) for k in features},
            ))
    return rows, dets


def _false_positives(dets: list[Any], scans: list[tuple[str, Any, list[dict[str, Any]]]],
                     excluded: list[Any]) -> list[tuple[float, str, np.ndarray]]:
    """``(score, series uid, world centre)`` of every detection that hits no inserted nodule and no excluded
    finding of its scan (LUNA16 hit rule: closer than the radius)."""
    out: list[tuple[float, str, np.ndarray]] = []
    for (uid, _, nods), d in zip(scans, dets):
        found = [(np.asarray(n["center_xyz_mm"]), n["diameter_mm"] / 2) for n in nods]
        found += [(np.asarray(f.center_xyz_mm), f.diameter_mm / 2) for f in excluded if f.series_uid == uid]
        for c, s in zip(d.centers_xyz_mm, d.scores):
            if not any(np.linalg.norm(c - p) < r for p, r in found):
                out.append((float(s), uid, c))
    return out


def fp_groups(dets: list[Any], scans: list[tuple[str, Any, list[dict[str, Any]]]], excluded: list[Any],
              top: int = 40, reach_mm: float = 6.0) -> list[dict[str, Any]]:
    """The ``top`` best false positives of the set grouped by place (within ``reach_mm``, greedily, best
    first): world centre of the group's best, copies it appears in, best and lowest score."""
    items = sorted(_false_positives(dets, scans, excluded), key=lambda t: -t[0])
    groups: list[dict[str, Any]] = []
    for s, uid, c in items[:top]:
        for g in groups:
            if np.linalg.norm(g["centre"] - c) <= reach_mm:
                g["scans"].add(uid)
                g["n"] += 1
                g["lowest"] = s
                break
        else:
            groups.append({"centre": c, "scans": {uid}, "n": 1, "best": s, "lowest": s})
    return [{"world_xyz_mm": [round(float(v), 1) for v in g["centre"]], "n_fp": g["n"], "n_scans": len(g["scans"]),
             "best_score": round(g["best"], 4), "lowest_score": round(g["lowest"], 4)} for g in groups]


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


def summary(rows: list[NoduleRow]) -> dict[str, Any]:
    """Counts of the table: nodules, never proposed, found below 1 and 8 FP/scan, by placement and size."""
    def part(rs: list[NoduleRow]) -> dict[str, int]:
        return {"n": len(rs), "not_proposed": sum(not r.proposed for r in rs),
                "below_1fp": sum(r.fp_per_scan_above is not None and r.fp_per_scan_above < 1 for r in rs),
                "below_8fp": sum(r.fp_per_scan_above is not None and r.fp_per_scan_above < 8 for r in rs)}

    out = {"all": part(rows), "<=6mm": part([r for r in rows if r.diameter_mm <= 6]),
           ">6mm": part([r for r in rows if r.diameter_mm > 6]),
           "subsolid (texture <= 2)": part([r for r in rows if r.texture is not None and r.texture <= 2])}
    for p in sorted({r.placement for r in rows if r.placement}):
        out[p] = part([r for r in rows if r.placement == p])
    return out


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
    from lidc_det.data.prepare import scan_dir
    from lidc_det.synthetic.semireal import in_region

    _, excluded = _yardstick_findings(ds)
    scans = []
    for uid in ds.series_uids:
        case = ds.load_case(uid)
        meta = json.loads((scan_dir(ds.root, uid) / "meta.json").read_text())
        nods = [n for n in meta["nodules"] if ":inserted" in n["nodule_id"]
                and in_region(np.asarray([n["center_xyz_mm"]]), region)[0]]
        scans.append((uid, base.cached_candidates(case, cfg.work_dir / "features"), nods))
    rows, dets = nodule_rows(det, scans, region, excluded, features)
    groups = fp_groups(dets, scans, excluded)
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
