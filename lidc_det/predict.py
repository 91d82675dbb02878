"""``lidc-det predict``: the whole pipeline on every CT series under a DICOM root.

One task per scan (:mod:`lidc_det.cluster`: a local cluster, an existing Dask cluster, or
serial). Written under ``out_dir``::

    scans/<SeriesInstanceUID>/
        candidates.csv        LUNA16 candidates after stage 2 (kept, final scores; world mm)
        stage1_candidates.csv every stage-1 candidate (LUNA16 columns)
        findings.csv          one row per segmented candidate: rank, centre, detection score,
                              final score, kept, reason, mask label, volume, diameter, P(malignant)
        masks.nii.gz          label map of the kept candidates' masks on the pipeline grid
                              (1 mm; world-aligned with the series), value = findings.csv mask_label
        masks.json            the same masks as a table (box, centre, volume, mean HU)
        malignancy.csv        P(malignant) per kept, non-empty mask
        masks_seg.dcm         DICOM SEG on the source series (``--dicom-seg``)
        overlays/*.png        3-plane views of the best kept candidates
        lungs/                ``--lungs``: lungs.nii.gz (1 right, 2 left, 10 + k kept candidate k),
                              lungs_3plane.png, nodule_<k>_3plane.png, lungs_render.png, lungs.json
        done.json             written last: the scan is finished (timings, counts, settings hash)
    summary.csv               one row per scan
    index.html                the scans with their overlays and files
    run.json                  scheduler, per-task worker / seconds / peak RSS, failures

Resumable: a scan whose ``done.json`` holds the same settings hash (models + options) is
skipped; every file is written atomically, so a killed run goes on where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import write_json, write_text
from lidc_det.errors import DatasetError
from lidc_det.torch_state import torch_threads

__all__ = ["PredictOptions", "PredictReport", "predict_collection", "predict_scan", "scan_out_dir"]

DONE = "done.json"
SUMMARY_COLUMNS = ["patient_id", "series_uid", "status", "n_stage1", "n_segmented", "n_kept", "n_malignancy",
                   "top_score", "top_p_malignant", "seconds", "error"]
FINDING_COLUMNS = ["rank", "coordX", "coordY", "coordZ", "diameter_mm", "detection_score", "second_look_score",
                   "score", "kept", "reason", "mask_label", "volume_mm3", "max_diameter_mm", "mean_hu", "p_malignant"]


@dataclass(frozen=True)
class PredictOptions:
    """Per-scan settings of ``predict`` (part of the done marker's settings hash).

    Attributes:
        dicom_seg: also write a DICOM SEG of the masks on the source series.
        n_overlays: 3-plane PNGs of the best kept candidates per scan.
        device: torch device of the models (None: CUDA when visible).
        torch_threads: CPU threads per task (None: torch's default); 1 on a shared CPU.
        lungs: also write the classical lung fields (``lidc_det.lungs``) into ``lungs/``: a label
            map with the lungs and the kept candidates' masks, 3-plane PNGs and a surface render.
    """

    dicom_seg: bool = False
    lungs: bool = False
    n_overlays: int = 3
    device: str | None = None
    torch_threads: int | None = None


@dataclass(frozen=True)
class PredictReport:
    """What ``predict_collection`` did: ``rows`` (one per scan, summary.csv), the cluster's
    :class:`~lidc_det.cluster.RunReport` as a dict, the output folder and the wall time."""

    out_dir: Path
    rows: tuple[dict[str, Any], ...]
    run: dict[str, Any]
    seconds: float

    @property
    def failed(self) -> dict[str, str]:
        return {r["series_uid"]: r["error"] for r in self.rows if r["status"] == "failed"}

    def summary(self) -> str:
        done = [r for r in self.rows if r["status"] != "failed"]
        skipped = sum(r["status"] == "skipped" for r in self.rows)
        lines = [f"predict: {len(done)} of {len(self.rows)} scans ({skipped} already done), "
                 f"{len(self.failed)} failed, {self.seconds:.1f} s on {self.run.get('scheduler')}; "
                 f"summary {self.out_dir / 'summary.csv'}, index {self.out_dir / 'index.html'}"]
        lines += [f"FAILED {u}: {e}" for u, e in self.failed.items()]
        return "\n".join(lines)


def scan_out_dir(out_dir: Path, series_uid: str) -> Path:
    return Path(out_dir) / "scans" / series_uid


def settings_hash(models_dir: Path, options: PredictOptions) -> str:
    """16 hex digits over the models (manifest content, model file sizes and mtimes) and options."""
    from lidc_det.pipeline import read_manifest

    m = read_manifest(Path(models_dir))
    stamp: dict[str, Any] = {"options": asdict(options)}
    for key in ("detector", "segmenter", "malignancy"):
        p = m.get(key)
        if p is None:
            stamp[key] = None
            continue
        files = [p] if Path(p).is_file() else sorted(q for q in Path(p).rglob("*") if q.is_file() and q.suffix in
                                                     (".json", ".pth", ".pt", ".txt", ".pkl", ".model", ".npz"))
        stamp[key] = [(str(Path(f).name), Path(f).stat().st_size, int(Path(f).stat().st_mtime)) for f in files]
    stamp["manifest"] = {k: str(v) for k, v in m.items() if k not in ("detector", "segmenter", "malignancy")}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


_PIPELINES: dict[tuple[str, str | None], Any] = {}


def _pipeline(models_dir: str, device: str | None) -> Any:
    """One :class:`~lidc_det.pipeline.Pipeline` per models folder and device per process (a
    Dask worker loads the models once, for all its scans)."""
    key = (str(Path(models_dir).resolve()), device)
    if key not in _PIPELINES:
        from lidc_det.pipeline import Pipeline

        _PIPELINES[key] = Pipeline.from_dir(models_dir, device=device, progress=False)
    return _PIPELINES[key]


def read_done(out_dir: Path, series_uid: str, settings: str) -> dict[str, Any] | None:
    """The scan's done marker when it is finished with these settings, else None."""
    path = scan_out_dir(out_dir, series_uid) / DONE
    try:
        done = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return done if done.get("settings_hash") == settings else None


def _csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    return buf.getvalue()


def _f(v: float | None, nd: int = 4) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), nd)


def predict_scan(
    models_dir: str, series_folder: str, series_uid: str, out_dir: str, options: PredictOptions, settings: str
) -> dict[str, Any]:
    """Run the pipeline on one series and write its files (see the module doc); idempotent.

    Returns the scan's summary row (``status`` ``"done"``, or ``"skipped"`` when its done
    marker with ``settings`` was already there).
    """
    done = read_done(Path(out_dir), series_uid, settings)
    if done is not None:
        return {**done["row"], "status": "skipped"}
    t0 = time.perf_counter()
    with torch_threads(options.torch_threads):
        pipe = _pipeline(models_dir, options.device)
        result = pipe.run(Path(series_folder), series_uid=series_uid)
    d = scan_out_dir(Path(out_dir), result.series_uid)
    d.mkdir(parents=True, exist_ok=True)
    files = write_scan_outputs(result, d, options, Path(series_folder), synthetic=pipe.synthetic_training)
    kept = result.kept
    row = {
        "patient_id": result.patient_id, "series_uid": result.series_uid, "status": "done",
        "n_stage1": len(result.detections), "n_segmented": len(result.candidates), "n_kept": len(kept),
        "n_malignancy": len(result.malignancy), "top_score": _f(kept[0].score) if kept else None,
        "top_p_malignant": _f(kept[0].p_malignant) if kept else None,
        "seconds": round(time.perf_counter() - t0, 2), "error": None,
    }
    write_json(d / DONE, {"settings_hash": settings, "row": row, "files": files, "step_seconds": result.seconds,
                          "models": result.models})  # last: marks the scan finished
    return row


def write_scan_outputs(
    result: Any, d: Path, options: PredictOptions, series_folder: Path | None, *, synthetic: bool
) -> list[str]:
    """Every per-scan file of one :class:`~lidc_det.pipeline.ScanResult` into ``d``; returns their names."""
    from lidc_det.data.luna import candidates_from_detections, write_candidates
    from lidc_det.overlays import three_plane_png
    from lidc_det.io.nifti import write_nifti
    from stage2_segment.exports import mask_records, merged_label_map

    files = ["candidates.csv", "stage1_candidates.csv", "findings.csv", "malignancy.csv"]
    write_candidates(d / "candidates.csv", candidates_from_detections(result.final_detections()))
    write_candidates(d / "stage1_candidates.csv", candidates_from_detections(result.detections))
    kept = result.kept
    label_of = {c.rank: j + 1 for j, c in enumerate(c for c in kept if c.mask is not None)}
    rows = []
    for c in result.candidates:
        m = c.mask
        rows.append({
            "rank": c.rank, "coordX": round(c.center_xyz_mm[0], 2), "coordY": round(c.center_xyz_mm[1], 2),
            "coordZ": round(c.center_xyz_mm[2], 2), "diameter_mm": _f(c.diameter_mm, 2),
            "detection_score": _f(c.detection_score), "second_look_score": _f(c.second_look_score),
            "score": _f(c.score), "kept": int(c.kept), "reason": c.reason, "mask_label": label_of.get(c.rank),
            "volume_mm3": None if m is None else _f(m.volume_mm3, 1),
            "max_diameter_mm": None if m is None else _f(m.max_diameter_mm, 2),
            "mean_hu": None if m is None or m.empty else _f(m.mean_hu, 1), "p_malignant": _f(c.p_malignant),
        })
    write_text(d / "findings.csv", _csv(FINDING_COLUMNS, rows))
    mal_rows = [r for r in rows if r["p_malignant"] is not None]
    write_text(d / "malignancy.csv", _csv(["mask_label", "rank", "coordX", "coordY", "coordZ", "volume_mm3",
                                           "max_diameter_mm", "p_malignant"], mal_rows))
    masks = [c.mask for c in kept if c.mask is not None]
    if masks or any(c.mask is not None for c in result.candidates):
        write_nifti(merged_label_map(masks, result.geometry.shape_zyx), result.geometry, d / "masks.nii.gz")
        write_json(d / "masks.json", {"series_uid": result.series_uid, "synthetic_training": synthetic,
                                      "rank_of_label": {str(v): k for k, v in label_of.items()},
                                      "geometry": result.geometry.to_dict(), "masks": mask_records(masks)})
        files += ["masks.nii.gz", "masks.json"]
    if options.dicom_seg and series_folder is not None and any(not m.empty for m in masks):
        from stage2_segment.exports import export_dicom_seg

        export_dicom_seg(masks, result.geometry, series_folder, d / "masks_seg.dcm", series_uid=result.series_uid)
        files.append("masks_seg.dcm")
    tag = "models trained on SYNTHETIC twins" if synthetic else "models trained on real scans"
    shape = result.geometry.shape_zyx
    if options.lungs:
        from lidc_det.lung_outputs import write_lung_outputs
        from lidc_det.lungs import LungFieldError, lung_fields

        try:
            fields = lung_fields(result.image_hu, result.geometry)
        except LungFieldError as err:  # not a chest, say: the scan's other results stand, lungs.json says why
            write_json(d / "lungs" / "lungs.json", {"series_uid": result.series_uid, "error": f"LungFieldError: {err}"})
            files.append("lungs/lungs.json")
        else:
            with_mask = [c for c in kept if c.mask is not None and not c.mask.empty]
            rec = write_lung_outputs(
                result.image_hu, fields, d / "lungs",
                nodule_masks=[c.mask.full_mask(shape) for c in with_mask],  # type: ignore[union-attr]
                nodule_names=[f"candidate {c.rank}" for c in with_mask],
                title=f"{result.patient_id}: lung fields and kept candidates ({tag})",
                record={"series_uid": result.series_uid, "patient_id": result.patient_id},
            )
            lf = rec["files"]
            files += [f"lungs/{f}" for f in ("lungs.nii.gz", "lungs.json", *lf["pngs"], *([lf["render"]] if lf["render"] else []))]
    for j, c in enumerate(kept[: max(0, options.n_overlays)]):
        name = f"overlays/candidate{c.rank:03d}.png"
        mal = "n/a" if c.p_malignant is None else f"{c.p_malignant:.2f}"
        vol = "" if c.mask is None else f", {c.mask.volume_mm3:.0f} mm3"
        three_plane_png(
            result.image_hu, result.geometry, c.center_xyz_mm, d / name,
            masks=[] if c.mask is None or c.mask.empty else [(c.mask.full_mask(shape), "red")],
            title=f"{result.patient_id} #{c.rank}: score {c.score:.2f}{vol}, P(malignant) {mal} ({tag})",
        )
        files.append(name)
    return files


def _select(dicom_root: Path, scans: Sequence[str] | None) -> list[Any]:
    from lidc_det.io.dicom import find_series

    root = Path(dicom_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: DICOM root is not a folder")
    found = [s for s in find_series(root) if s.modality == "CT"]
    if scans:
        wanted = set(scans)
        found = [s for s in found if s.series_uid in wanted or s.patient_id in wanted]
        missing = sorted(wanted - {s.series_uid for s in found} - {s.patient_id for s in found})
        if missing:
            raise DatasetError(f"{root}: no CT series for {', '.join(missing)}")
    if not found:
        raise DatasetError(f"{root}: no CT series found")
    return sorted(found, key=lambda s: (s.patient_id, s.series_uid))


def predict_collection(
    models_dir: Path,
    dicom_root: Path,
    out_dir: Path,
    *,
    scheduler: str | None = "local",
    options: PredictOptions = PredictOptions(),
    scans: Sequence[str] | None = None,
    progress: bool = True,
) -> PredictReport:
    """``predict_scan`` for every CT series under ``dicom_root`` (one task each on ``scheduler``),
    then ``summary.csv``, ``index.html`` and ``run.json``. Failed scans are reported, not raised."""
    from lidc_det.cluster import run_tasks
    from lidc_det.pipeline import read_manifest

    t0 = time.perf_counter()
    models_dir, out_dir = Path(models_dir).resolve(), Path(out_dir).resolve()
    read_manifest(models_dir)  # fail fast on a bad models folder
    series = _select(Path(dicom_root), scans)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = settings_hash(models_dir, options)
    items = [(s.series_uid, (str(models_dir), str(s.folder), s.series_uid, str(out_dir), options, settings))
             for s in series]
    gpu = options.device is not None and options.device.startswith("cuda")
    run = run_tasks(predict_scan, items, scheduler=scheduler, resources={"GPU": 1} if gpu else None,
                    desc="predict", progress=progress)
    rows: list[dict[str, Any]] = []
    for s, o in zip(series, run.outcomes):
        if o.ok:
            rows.append(o.value)
        else:
            rows.append({"patient_id": s.patient_id, "series_uid": s.series_uid, "status": "failed", "error": o.error})
    write_text(out_dir / "summary.csv", _csv(SUMMARY_COLUMNS, rows))
    write_json(out_dir / "run.json", {**run.to_dict(), "models_dir": str(models_dir), "dicom_root": str(dicom_root),
                                      "options": asdict(options), "settings_hash": settings})
    write_index(out_dir, rows, synthetic=bool(read_manifest(models_dir).get("synthetic_training")))
    return PredictReport(out_dir, tuple(rows), run.to_dict(), time.perf_counter() - t0)


def write_index(out_dir: Path, rows: Sequence[dict[str, Any]], *, synthetic: bool) -> Path:
    """``index.html``: one section per scan (counts, kept candidates, overlays, file links)."""
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lidc-det predict</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}</style></head><body>",
             "<h1>lidc-det predict</h1>"]
    if synthetic:
        parts.append("<p><b>The models were trained on SYNTHETIC LIDC twins</b> (procedural anatomy with real "
                     "readers' contours painted in): the candidates, masks and P(malignant) below are not "
                     "clinical findings and not validated on real scans.</p>")
    parts.append(f"<p><a href='summary.csv'>summary.csv</a>, <a href='run.json'>run.json</a>; {len(rows)} scans.</p>")
    for r in rows:
        uid = str(r["series_uid"])
        parts.append(f"<h2>{e(str(r.get('patient_id', '')))} <small>{e(uid)}</small></h2>")
        if r.get("status") == "failed":
            parts.append(f"<p style='color:#b00'>failed: {e(str(r.get('error')))}</p>")
            continue
        d = scan_out_dir(out_dir, uid)
        rel = f"scans/{uid}"
        parts.append(f"<p>{r['n_stage1']} stage-1 candidates, {r['n_segmented']} segmented, {r['n_kept']} kept, "
                     f"{r['n_malignancy']} with P(malignant); files: " + ", ".join(
                         f"<a href='{rel}/{f}'>{f}</a>" for f in
                         ("candidates.csv", "findings.csv", "malignancy.csv", "masks.nii.gz", "masks_seg.dcm")
                         if (d / f).is_file()) + "</p>")
        try:
            with open(d / "findings.csv", newline="") as fh:
                kept = [f for f in csv.DictReader(fh) if f["kept"] == "1"][:10]
        except OSError:
            kept = []
        if kept:
            cols = ["rank", "score", "coordX", "coordY", "coordZ", "volume_mm3", "max_diameter_mm", "p_malignant", "reason"]
            parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{e(f.get(c, ''))}</td>" for c in cols) + "</tr>" for f in kept) + "</table>")
        for png in sorted((d / "overlays").glob("*.png")) if (d / "overlays").is_dir() else []:
            parts.append(f"<p><img src='{rel}/overlays/{png.name}' alt='{e(png.name)}'></p>")
        if (d / "lungs" / "lungs_render.png").is_file():
            parts.append(f"<p>Lung fields (<a href='{rel}/lungs/lungs.nii.gz'>lungs.nii.gz</a>: 1 right, 2 left, "
                         f"10 + k kept candidate k) and a surface render:</p><p><img src='{rel}/lungs/lungs_render.png' "
                         "alt='lungs_render.png'></p>")
    parts.append("</body></html>")
    path = Path(out_dir) / "index.html"
    write_text(path, "\n".join(parts))
    return path
