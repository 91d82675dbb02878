"""Lung-field studies (docs/lungs.md): classical vs learned lung fields, and candidate restriction.

``python -m benchmarks.lungs compare --out runs/lungs``
    LIDC twins (SYNTHETIC) of ``TRAIN`` / ``VAL`` / ``TEST`` patients with their lung
    labels; trains the 2D and the 3D U-Net (:mod:`lidc_det.lungs_learned`), tunes each
    threshold on the validation twins, and scores the classical
    :func:`lidc_det.lungs.lung_fields` and both networks on the test twins (against the
    twin's labels, on the scans' own grid) and on the real LIDC-IDRI-0001 (against the
    classical mask): Dice per lung, HD95, parameters, training time, inference time per
    scan, 3-plane PNGs. Writes ``compare.json`` and ``compare.md``.

``python -m benchmarks.lungs restrict --model BEST_PT --prepared PREPARED --out runs/lungs``
    A stage-1 model on every scan of a prepared data set it was not trained on (e.g. the
    demo's twins) and on the real LIDC-IDRI-0001, with and without the lung-field
    restriction at several margins: FROC/CPM, candidates dropped, target nodules lost,
    false positives on the real scan. Writes ``restrict.json`` and ``restrict.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import write_json, write_text

TRAIN = ("LIDC-IDRI-0101", "LIDC-IDRI-0102", "LIDC-IDRI-0103", "LIDC-IDRI-0104")
VAL = ("LIDC-IDRI-0107", "LIDC-IDRI-0108")
TEST = ("LIDC-IDRI-0110", "LIDC-IDRI-0112")
REAL_DICOM = Path("../shared/data/lidc-idri/LIDC-IDRI-0001")
REAL_NODULE_XYZ_MM = (56.40, 86.34, -115.96)
REAL_NODULE_DIAMETER_MM = 32.76  # mean reader diameter: the LUNA16 hit radius is half of it


def _configs(steps_2d: int, steps_3d: int) -> dict[str, Any]:
    from lidc_det.lungs_learned.train import LungNetConfig

    return {
        "2d": LungNetConfig(kind="2d", channels=(8, 16, 32, 64), strides=(2, 2, 2), patch=(128, 128), batch_size=8,
                            steps=steps_2d, val_every=50, checkpoint_every=50, n_val_patches=16),
        "3d": LungNetConfig(kind="3d", channels=(8, 16, 32, 64), strides=(2, 2, 2), patch=(64, 64, 64), batch_size=2,
                            steps=steps_3d, val_every=50, checkpoint_every=50, n_val_patches=4),
    }


def _scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    from lidc_det.metrics.overlap import dice, hd95

    out: dict[str, float] = {}
    for v, name in ((1, "right"), (2, "left")):
        out[f"dice_{name}"] = round(dice(pred == v, ref == v), 4)
        out[f"hd95_{name}_mm"] = round(hd95(pred == v, ref == v, spacing), 2)
    out["dice_mean"] = round((out["dice_right"] + out["dice_left"]) / 2, 4)
    out["hd95_mean_mm"] = round((out["hd95_right_mm"] + out["hd95_left_mm"]) / 2, 2)
    return out


def _png(hu: np.ndarray, geometry: Any, masks: dict[str, np.ndarray], path: Path, title: str) -> None:
    from lidc_det.overlays import three_plane_png

    colours = {"truth": "#ffffff", "classical": "#ffb000", "2d": "#00c0ff", "3d": "#ff3070", "2d-split": "#00ff80", "3d-split": "#c000ff"}
    ref = next(iter(masks.values()))
    centre = geometry.voxel_to_world(np.argwhere(ref[:, ::4, ::4]).mean(axis=0) * np.array([1, 4, 4]))
    legend = ", ".join(f"{k} {colours[k]}" for k in masks)
    three_plane_png(hu, geometry, centre, path, masks=[(m, colours[k]) for k, m in masks.items()],
                    title=f"{title} (contours: {legend})", half_width_mm=None)


def run_compare(out: Path, *, steps_2d: int = 200, steps_3d: int = 120, seed: int = 0, threads: int | None = 1) -> dict[str, Any]:
    """The comparison (module docstring); resumable (cached twins, resumed training)."""
    from lidc_det.io.dicom import read_series
    from lidc_det.lungs import lung_fields
    from lidc_det.lungs_learned.data import twin_scans
    from lidc_det.lungs_learned.infer import Inferencer, tune_threshold
    from lidc_det.lungs_learned.train import Trainer
    from lidc_det.synthetic.twin import render_twin, scan_spec

    out = Path(out)
    (out / "png").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = twin_scans(TRAIN, out / "cache", seed=seed)
    val = twin_scans(VAL, out / "cache", seed=seed)
    methods: dict[str, dict[str, Any]] = {"classical": {"parameters": 0, "train_seconds": 0.0}}
    infs: dict[str, Inferencer] = {}
    for kind, cfg in _configs(steps_2d, steps_3d).items():
        res = Trainer(cfg, threads=threads).fit(train, val, out / f"unet{kind}")
        train_s = float(np.sum([float(line.split(",")[4]) for line in (out / f"unet{kind}" / "history.csv").read_text().splitlines()[1:] if line.split(",")[4]]))
        # each network twice: right/left from its own output, and its lung mask split as the classical one does;
        # the threshold is tuned on the validation twins for each (threshold.json keeps the network-side one)
        for side, name in (("network", kind), ("split", f"{kind}-split")):
            inf = Inferencer(out / f"unet{kind}" / "best.pt", side=side)
            tuned = tune_threshold(inf, val, write=side == "network")
            methods[name] = {"parameters": inf.n_parameters, "train_seconds": round(train_s, 1), "steps": res.steps, "side": side,
                             "threshold": tuned["threshold"], "val_dice": round(tuned["val_dice"], 4), "config": cfg.to_dict()}
            infs[name] = inf
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in methods}
    for pid in TEST:
        spec = scan_spec(pid)
        tv = render_twin(spec, seed=seed)
        geom = spec.geometry()
        truth = tv.lung_labels()
        preds = {}
        ts = time.perf_counter()
        preds["classical"] = lung_fields(tv.hu, geom).labels
        secs = {"classical": time.perf_counter() - ts}
        for kind, inf in infs.items():
            ts = time.perf_counter()
            preds[kind] = inf.lung_fields(tv.hu, geom).labels
            secs[kind] = time.perf_counter() - ts
        for k, p in preds.items():
            rows[k].append({"scan": pid, "seconds": round(secs[k], 2), **_scores(p, truth, geom.spacing_zyx)})
        _png(tv.hu, geom, {"truth": truth > 0, **{k: p > 0 for k, p in preds.items()}}, out / "png" / f"twin_{pid}.png",
             f"SYNTHETIC twin {pid}")
        print(pid, {k: r[-1]["dice_mean"] for k, r in rows.items()}, flush=True)
    vol = read_series(REAL_DICOM)
    ts = time.perf_counter()
    classical = lung_fields(vol.hu, vol.geometry)
    real: dict[str, Any] = {"classical": {"seconds": round(time.perf_counter() - ts, 2), "volumes_ml": {k: round(v) for k, v in classical.volumes_ml.items()},
                                          "nodule_label": int(classical.label_at(np.array([REAL_NODULE_XYZ_MM]))[0])}}
    real_masks = {"classical": classical.labels > 0}
    for kind, inf in infs.items():
        ts = time.perf_counter()
        lf = inf.lung_fields(vol.hu, vol.geometry)
        real[kind] = {"seconds": round(time.perf_counter() - ts, 2), "volumes_ml": {k: round(v) for k, v in lf.volumes_ml.items()},
                      "nodule_label": int(lf.label_at(np.array([REAL_NODULE_XYZ_MM]))[0]),
                      **{f"vs_classical_{k}": v for k, v in _scores(lf.labels, classical.labels, vol.geometry.spacing_zyx).items()}}
        real_masks[kind] = lf.labels > 0
    _png(vol.hu, vol.geometry, real_masks, out / "png" / "real_LIDC-IDRI-0001.png", "real LIDC-IDRI-0001")
    summary = {}
    for k, r in rows.items():
        summary[k] = {**methods[k], **{m: round(float(np.mean([x[m] for x in r])), 4) for m in ("dice_right", "dice_left", "dice_mean", "hd95_mean_mm", "seconds")}}
    from lidc_det.provenance import device_info, provenance

    rec = {"kind": "lung fields: classical vs 2D / 3D U-Net", "synthetic_test": True, "train": TRAIN, "val": VAL, "test": TEST,
           "seed": seed, "command": f"python -m benchmarks.lungs compare --out {out} --steps-2d {steps_2d} --steps-3d {steps_3d}",
           "summary": summary, "per_scan": rows, "real": real, "wall_seconds": round(time.perf_counter() - t0, 1),
           "provenance": provenance(), "device": device_info("cpu"), "load_average": list(os.getloadavg())}
    write_json(out / "compare.json", rec)
    write_text(out / "compare.md", compare_table(rec))
    return rec


def compare_table(rec: dict[str, Any]) -> str:
    lines = [
        "| method | parameters | training (s) | inference (s/scan) | Dice right | Dice left | HD95 (mm) | real 0001: Dice vs classical | real: HD95 vs classical (mm) | real volume (ml) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, s in rec["summary"].items():
        r = rec["real"].get(k, {})
        name = {"classical": "classical (lidc_det.lungs)", "2d": "2D U-Net (slices)", "3d": "3D U-Net (patches)",
                "2d-split": "2D U-Net, lung mask split into right/left", "3d-split": "3D U-Net, lung mask split into right/left"}[k]
        vs = "-" if k == "classical" else f"{r['vs_classical_dice_mean']:.3f}"
        hd = "-" if k == "classical" else f"{r['vs_classical_hd95_mean_mm']:.1f}"
        lines.append(f"| {name} | {s['parameters']:,} | {s['train_seconds']:.0f} | {s['seconds']:.2f} | {s['dice_right']:.3f} | "
                     f"{s['dice_left']:.3f} | {s['hd95_mean_mm']:.1f} | {vs} | {hd} | {r.get('volumes_ml', {}).get('total', '-')} |")
    prov = rec.get("provenance") or {}
    lines += ["", f"SYNTHETIC test twins {', '.join(rec['test'])}; real LIDC-IDRI-0001 against the classical mask. "
              f"`{rec.get('command', 'python -m benchmarks.lungs compare')}`; git {prov.get('git_revision')}, "
              f"{(rec.get('device') or {}).get('device_name')}, wall {rec['wall_seconds']} s."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ restriction
def _hits(findings: Sequence[Any], dets: Any) -> list[bool]:
    c = np.asarray(dets.centers_xyz_mm).reshape(-1, 3)
    return [bool(len(c) and np.min(np.linalg.norm(c - np.asarray(f.center_xyz_mm), axis=1)) < f.diameter_mm / 2) for f in findings]


def run_restrict(
    model: Path, prepared: Path, out: Path, *, margins: Sequence[float] = (0.0, 5.0, 10.0, 20.0), n_bootstrap: int = 1000,
    real_region: str = "left",
) -> dict[str, Any]:
    """The restriction study (module docstring).

    Args:
        model: a stage-1 checkpoint that was trained on none of the scans of ``prepared``.
        prepared: a prepared data set folder (``lidc-det prepare`` / the demo's ``prepared/``); every scan is scored.
        real_region: ``"left"``: count the real scan's candidates in its left lung half only (world x > 0),
            for a model trained on its right lung (the scored region never seen in training); ``"whole"`` otherwise.
    """
    from lidc_det.data.prepared import PreparedDataset
    from lidc_det.io.dicom import read_series
    from lidc_det.lungs import lung_fields, restrict_detections
    from lidc_det.metrics.froc import evaluate_detections
    from lidc_det.results import Detections
    from stage1_detect.detector import Retina3DDetector

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = PreparedDataset(Path(prepared))
    det = Retina3DDetector.from_checkpoint(Path(model), device="cpu", progress=False)
    scans = []
    for uid in ds.series_uids:
        case = ds.load_case(uid)
        hu = np.asarray(case.image_hu, dtype=np.float32)
        d = det.predict(hu, case.geometry, series_uid=uid)
        ts = time.perf_counter()
        lf = lung_fields(hu, case.geometry)
        targets, excluded = case.luna_findings()
        scans.append((uid, d, lf, targets, excluded, time.perf_counter() - ts))
        print(f"{case.patient_id}: {len(d)} candidates, {len(targets)} targets", flush=True)
    rows = []
    for margin in (None, *margins):
        dets, lost, n_drop = [], 0, 0
        for uid, d, lf, targets, _, _ in scans:
            r = d if margin is None else restrict_detections(d, lf, margin).detections
            n_drop += len(d) - len(r)
            lost += sum(a and not b for a, b in zip(_hits(targets, d), _hits(targets, r)))
            dets.append(r)
        froc = evaluate_detections([t for s in scans for t in s[3]], dets, excluded=[e for s in scans for e in s[4]],
                                   n_bootstrap=n_bootstrap, seed=0)
        outside = 0
        if margin is not None:
            for _, _, lf, targets, _, _ in scans:
                if targets:
                    outside += int((~lf.near(np.array([t.center_xyz_mm for t in targets]), margin)).sum())
        n_targets = sum(len(s[3]) for s in scans)
        non_hit = sum(len(x) - _hits_count(s[3], x) for s, x in zip(scans, dets)) / len(dets)
        rows.append({"margin_mm": margin, "cpm": round(froc.cpm, 3), "cpm_ci": [round(froc.cpm_ci_low, 3), round(froc.cpm_ci_high, 3)],
                     "operating_sensitivity": [round(float(v), 3) for v in froc.operating_sensitivity],
                     "candidates_per_scan": round(sum(len(x) for x in dets) / len(dets), 1),
                     "dropped_per_scan": round(n_drop / len(dets), 1), "non_hit_candidates_per_scan": round(non_hit, 1),
                     "targets_lost": lost, "targets_outside_field": outside, "n_targets": n_targets})
        print(rows[-1], flush=True)
    vol = read_series(REAL_DICOM)
    d = det.predict(vol.hu, vol.geometry, series_uid=vol.series_uid)
    if real_region == "left":
        keep = d.centers_xyz_mm[:, 0] > 0.0
        d = Detections(d.series_uid, d.centers_xyz_mm[keep], d.diameters_mm[keep], d.scores[keep],
                       None if d.boxes_voxel is None else d.boxes_voxel[keep])
    lf = lung_fields(vol.hu, vol.geometry)
    real = []
    for margin in (None, *margins):
        r = d if margin is None else restrict_detections(d, lf, margin).detections
        order = np.argsort(-r.scores, kind="stable")
        hit = [bool(np.linalg.norm(r.centers_xyz_mm[i] - np.asarray(REAL_NODULE_XYZ_MM)) < REAL_NODULE_DIAMETER_MM / 2) for i in order]
        rank = hit.index(True) + 1 if any(hit) else None
        real.append({"margin_mm": margin, "candidates": len(r), "false_positives": int(len(r) - sum(hit)),
                     "fps_above_nodule": None if rank is None else int(rank - 1 - sum(hit[: rank - 1])), "nodule_rank": rank,
                     "nodule_kept": bool(any(hit))})
        print("real", real[-1], flush=True)
    from lidc_det.provenance import device_info, provenance

    rec = {"kind": "stage-1 candidates restricted to the dilated lung field", "synthetic_scans": True, "model": str(model),
           "provenance": provenance(), "device": device_info("cpu"),
           "prepared": str(prepared), "scans": list(ds.series_uids), "twin": rows, "real_LIDC-IDRI-0001": real,
           "real_region": real_region, "lung_field_seconds_per_scan": round(float(np.mean([s[5] for s in scans])), 2)}
    write_json(out / "restrict.json", rec)
    write_text(out / "restrict.md", restrict_table(rec))
    return rec


def _hits_count(targets: Sequence[Any], dets: Any) -> int:
    """Candidates that hit some target (the rest are false positives or on irrelevant findings)."""
    c = np.asarray(dets.centers_xyz_mm).reshape(-1, 3)
    if not len(c) or not targets:
        return 0
    d = np.stack([np.linalg.norm(c - np.asarray(t.center_xyz_mm), axis=1) < t.diameter_mm / 2 for t in targets])
    return int(d.any(axis=0).sum())


def restrict_table(rec: dict[str, Any]) -> str:
    lines = ["| margin (mm) | CPM (95% CI) | sens. at 8 FP/scan | candidates / scan | dropped / scan | non-hit candidates / scan | targets lost | real 0001: candidates | real: FPs | real: nodule rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r, q in zip(rec["twin"], rec["real_LIDC-IDRI-0001"]):
        m = "off" if r["margin_mm"] is None else f"{r['margin_mm']:g}"
        lines.append(f"| {m} | {r['cpm']:.3f} ({r['cpm_ci'][0]:.2f}-{r['cpm_ci'][1]:.2f}) | {r['operating_sensitivity'][-1]:.3f} | {r['candidates_per_scan']} | "
                     f"{r['dropped_per_scan']} | {r['non_hit_candidates_per_scan']} | {r['targets_lost']} of {r['n_targets']} | {q['candidates']} | "
                     f"{q['false_positives']} | {q['nodule_rank'] or 'not hit'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lungs", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="classical vs 2D / 3D U-Net lung fields")
    c.add_argument("--out", type=Path, default=Path("runs/lungs"))
    c.add_argument("--steps-2d", type=int, default=200)
    c.add_argument("--steps-3d", type=int, default=120)
    c.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("restrict", help="stage-1 candidates restricted to the lung field")
    r.add_argument("--model", type=Path, required=True, help="stage-1 checkpoint trained on none of the --prepared scans")
    r.add_argument("--prepared", type=Path, required=True, help="prepared data set folder; every scan is scored")
    r.add_argument("--real-region", choices=("left", "whole"), default="left",
                   help="score the real 0001 in its left half only (model trained on its right lung) or whole")
    r.add_argument("--out", type=Path, default=Path("runs/lungs"))
    r.add_argument("--n-bootstrap", type=int, default=1000)
    a = p.parse_args(argv)
    if a.cmd == "compare":
        rec = run_compare(a.out, steps_2d=a.steps_2d, steps_3d=a.steps_3d, threads=a.threads)
        print(compare_table(rec))
    else:
        rec = run_restrict(a.model, a.prepared, a.out, real_region=a.real_region, n_bootstrap=a.n_bootstrap)
        print(restrict_table(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ------------------------------------------------------------------ the demo's hook
def demo_lung_step(ds: Any, split: Any, detections: Sequence[Any], out_dir: Path, *, synthetic: bool,
                   detector: Any = None, margin_mm: float = 10.0, n_bootstrap: int = 1000) -> dict[str, Any]:
    """Lung fields of the demo's test scans, the restriction's effect on stage 1, and one surface render.

    ``detections`` are stage 1's own candidates on ``split.test``. Two modes (``rec["mode"]``):

    - ``"detector option"``: ``detector.config.lung_restrict`` is on, so ``detections`` are already
      restricted; the same weights detect again with the option off
      (:meth:`~stage1_detect.detector.Retina3DDetector.with_inference_options`), and the two lists are
      compared (the option refills from below the top-k cut);
    - ``"post-filter"`` (any other detector): the candidates outside the dilated field are removed
      from the final list, with no refill: a lower bound on the option's CPM.

    For each test scan: the classical lung field, the unrestricted candidates outside it dilated by
    ``margin_mm`` and the target nodules the restriction loses; the test CPM without and with the
    restriction (``cpm_unrestricted``, ``cpm_restricted``: each ``{"cpm", "ci", "candidates_per_scan"}``)
    and the paired bootstrap of the difference over scans (``cpm_gain``); and for the first scan a render
    (``out_dir/render_<patient>.png``) of the lungs, the reader nodules and the top-10 candidates that
    stage 1 passes on. Stage 1's output is not changed. Returns a JSON-friendly record.
    """
    from lidc_det.lungs import lung_fields, restrict_detections
    from lidc_det.render3d import Sphere, Surface, render_surfaces

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = getattr(detector, "config", None)
    option = bool(getattr(config, "lung_restrict", False)) and hasattr(detector, "with_inference_options")
    if option:
        margin_mm = float(config.lung_margin_mm)
        unrestricted_detector = detector.with_inference_options(lung_restrict=False)
    by_uid = {d.series_uid: d for d in detections}
    rows, render = [], None
    all_targets, all_excluded, plain, restricted = [], [], [], []
    for i, uid in enumerate(split.test):
        d = by_uid.get(uid)
        if d is None:
            continue
        case = ds.load_case(uid)
        hu = np.asarray(case.image_hu, dtype=np.float32)
        lf = lung_fields(hu, case.geometry)
        targets, excluded = case.luna_findings()
        if option:
            d_plain = unrestricted_detector.predict(hu, case.geometry, series_uid=uid)
            d_restricted = d
        else:
            d_plain, d_restricted = d, restrict_detections(d, lf, margin_mm).detections
        dropped = restrict_detections(d_plain, lf, margin_mm).dropped
        all_targets += targets
        all_excluded += excluded
        plain.append(d_plain)
        restricted.append(d_restricted)
        lost = sum(a and not b for a, b in zip(_hits(targets, d_plain), _hits(targets, d_restricted)))
        rows.append({"patient": case.patient_id, "right_ml": round(lf.volumes_ml["right"]), "left_ml": round(lf.volumes_ml["left"]),
                     "candidates": len(d_plain), "dropped": len(dropped), "targets": len(targets), "targets_lost": int(lost),
                     "seconds": round(lf.seconds, 2)})
        if i == 0:
            top = d.top_k(10)
            hit = _hits_per_candidate(targets, top)
            spheres = [Sphere(tuple(c), float(dm) if dm > 0 else 6.0, "#2ca02c" if h else "#ff8c00",
                              "top-10 candidate: hit" if h else "top-10 candidate: false positive")
                       for c, dm, h in zip(top.centers_xyz_mm, top.diameters_mm, hit)]
            surfaces = [Surface(case.nodule_mask(n), "#d62728", "reader nodules") for n in case.nodules]
            tag = "SYNTHETIC twin" if synthetic else "real"
            render = render_surfaces(out_dir / f"render_{case.patient_id}.png", case.geometry, lung_labels=lf.labels,
                                     surfaces=surfaces, spheres=spheres, title=f"{case.patient_id} ({tag}): lungs, nodules, top-10 candidates")
    rec: dict[str, Any] = {"mode": "detector option" if option else "post-filter", "margin_mm": margin_mm, "scans": rows,
                           "render": None if render is None else str(render.relative_to(out_dir.parent))}
    if plain and all_targets:
        rec.update(_restriction_cpms(all_targets, all_excluded, plain, restricted, n_bootstrap))
    write_json(out_dir / "lungs.json", rec)
    return rec


def _restriction_cpms(targets: list[Any], excluded: list[Any], plain: list[Any], restricted: list[Any],
                      n_bootstrap: int) -> dict[str, Any]:
    """CPM (with bootstrap CI) of the unrestricted and restricted candidates of the same scans, and the
    paired bootstrap of the difference (restricted - unrestricted) over scans."""
    from lidc_det.data.luna import candidates_from_detections
    from lidc_det.metrics.froc import froc_from_matches, match_candidates, paired_cpm_difference

    uids = [d.series_uid for d in plain]
    matches = {key: match_candidates(targets, [c for d in dets for c in candidates_from_detections(d)],
                                     excluded=excluded, series_uids=uids)
               for key, dets in (("cpm_unrestricted", plain), ("cpm_restricted", restricted))}
    rec: dict[str, Any] = {}
    for (key, m), dets in zip(matches.items(), (plain, restricted)):
        f = froc_from_matches(m, n_bootstrap=n_bootstrap, seed=0)
        rec[key] = {"cpm": round(f.cpm, 3), "ci": [round(f.cpm_ci_low, 3), round(f.cpm_ci_high, 3)],
                    "candidates_per_scan": round(sum(len(x) for x in dets) / len(dets), 1)}
    g = paired_cpm_difference(matches["cpm_unrestricted"], matches["cpm_restricted"], n_bootstrap=n_bootstrap, seed=0)
    rec["cpm_gain"] = {"difference": round(g.difference, 3), "ci": [round(g.ci_low, 3), round(g.ci_high, 3)],
                       "p_not_better": round(g.p_not_better, 3)}
    return rec


def _hits_per_candidate(targets: Sequence[Any], dets: Any) -> list[bool]:
    c = np.asarray(dets.centers_xyz_mm).reshape(-1, 3)
    if not len(c) or not targets:
        return [False] * len(c)
    return list(np.stack([np.linalg.norm(c - np.asarray(t.center_xyz_mm), axis=1) < t.diameter_mm / 2 for t in targets]).any(axis=0))
