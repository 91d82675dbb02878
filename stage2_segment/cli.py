"""Library side of ``lidc-det segment`` (the CLI handler in :mod:`lidc_det.cli` calls :func:`run_segment`)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lidc_det.errors import LidcDetError


def run_segment(
    dataset: Path,
    scan: str,
    work_dir: Path,
    out: Path,
    *,
    config: Path | None = None,
    candidates: Path | None = None,
    reject: bool = False,
    dicom_seg: bool = False,
) -> int:
    """Segment one prepared scan's candidates (or GT nodules); write label NIfTI + JSON; print a table."""
    import json

    from lidc_det.data.prepared import PreparedDataset
    from lidc_det.provenance import provenance
    from stage2_segment.config import SegmenterConfig
    from stage2_segment.exports import export_masks
    from stage2_segment.segmenter import NnUnetSegmenter

    work_dir = Path(work_dir)
    if config is not None:
        cfg = SegmenterConfig.from_yaml(config)
    elif (work_dir / "segmenter.json").is_file():
        cfg = SegmenterConfig.from_dict(json.loads((work_dir / "segmenter.json").read_text())["config"])
    else:
        raise LidcDetError(f"{work_dir}: no segmenter.json; pass --config or train first")
    seg = NnUnetSegmenter(work_dir, cfg)
    ds = PreparedDataset(dataset)
    case = ds.load_case(ds.resolve_scan(scan))
    hu = np.asarray(case.image_hu)
    t0 = time.perf_counter()
    if candidates is None:
        masks = seg.segment_nodules(case)
        detections = None
    else:
        from lidc_det.data.luna import detections_from_candidates, read_candidates

        cands = [c for c in read_candidates(candidates) if c.series_uid == case.series_uid]
        detections = detections_from_candidates(cands, case.series_uid)
        masks = seg.segment(hu, case.geometry, detections)
    seconds = time.perf_counter() - t0
    extra = {"series_uid": case.series_uid, "seconds": round(seconds, 2), "provenance": provenance()}
    if reject and detections is not None:
        record = seg.reject(detections, masks)
        extra["rejection"] = {"min_volume_mm3": seg.min_volume_mm3, "kept": record.n_kept, "of": len(detections),
                              "kept_flags": record.kept.tolist(), "reasons": list(record.reasons)}
    nii, js = export_masks(masks, case.geometry, Path(out), stem=case.series_uid, extra=extra)
    print(f"{'label':>5} {'score':>6} {'volume mm3':>11} {'diam mm':>8} {'mean HU':>8}  centre (x, y, z) mm")
    for i, m in enumerate(masks):
        c = ", ".join(f"{v:.1f}" for v in m.center_xyz_mm)
        print(f"{i + 1:>5} {m.score:>6.3f} {m.volume_mm3:>11.1f} {m.max_diameter_mm:>8.1f} {m.mean_hu:>8.1f}  ({c})")
    per = seconds / max(1, len(masks))
    print(f"{len(masks)} masks in {seconds:.1f} s ({per:.2f} s per crop, model load included)")
    if "rejection" in extra:
        r = extra["rejection"]
        print(f"FP rejection at {r['min_volume_mm3']} mm3: kept {r['kept']} of {r['of']} candidates")
    print(f"written {nii} and {js}")
    if dicom_seg:
        from stage2_segment.exports import export_dicom_seg

        meta = json.loads((case.folder / "meta.json").read_text())
        seg_path = export_dicom_seg(masks, case.geometry, Path(meta["source_folder"]),
                                    Path(out) / f"{case.series_uid}_seg.dcm", series_uid=case.series_uid)
        print(f"written {seg_path} (DICOM SEG on {meta['source_folder']})")
    return 0
