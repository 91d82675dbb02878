"""Compare a twin with the real scan it copies: HU histograms, noise, vessel density, 3-plane views.

Both volumes go through the same automatic tissue recipe (no hand-drawn
regions), so the comparison is like for like:

* body: the largest 3D component of ``HU > -500``, holes filled slice by slice;
* lungs: body voxels ``< -400 HU`` (the two largest 3D components), eroded by
  two voxels in plane so the pleura and partial-volume rim stay out; they
  include the vessels and airways inside the lungs;
* lung parenchyma: lung voxels ``< -500 HU`` (vessels out);
* vessel density: the fraction of lung voxels ``>= -500 HU`` (vessels,
  bronchial walls, fissures), nodules (dilated 3 mm) left out;
* soft tissue: body voxels outside the (undilated) lungs with ``-250 <= HU < 200``
  (fat, muscle, organs, blood);
* bone: body voxels ``>= 200 HU``;
* nodules: the readers' 50 % consensus masks of the >= 3-reader nodules
  (:func:`lidc_det.data.lidc.consensus_mask`, on each volume's own geometry);
* noise: the median over soft-tissue voxels of the in-plane 7 x 7 local
  standard deviation, where the whole window is soft tissue within
  ``[-150, 150]`` HU (homogeneous regions: muscle, liver, heart, fat).

:func:`compare_real` writes ``calibration.json``, ``calibration.md`` (a
table), ``histograms.png`` and 3-plane PNGs of real and twin (whole slices
through the nodule, and 80 mm crops around it) into ``out_dir``. Every
twin figure is labelled SYNTHETIC.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import LidcDetError

__all__ = ["CalibrationReport", "TissueStats", "compare_real", "tissue_stats"]

_CLASSES = ("lung_parenchyma", "soft_tissue", "bone", "nodules")
_BINS = {
    "lung_parenchyma": np.arange(-1050.0, -450.0, 5.0),
    "soft_tissue": np.arange(-250.0, 205.0, 5.0),
    "bone": np.arange(200.0, 1610.0, 10.0),
    "nodules": np.arange(-1000.0, 420.0, 20.0),
}


class CalibrationError(LidcDetError):
    """The comparison could not be made (the message names the folder and the reason)."""


@dataclass(frozen=True)
class TissueStats:
    """Measurements of one volume.

    Attributes:
        label: ``"real"`` or ``"twin (synthetic)"``.
        percentiles: per class, HU at the 5th, 25th, 50th, 75th, 95th percentile.
        voxels: per class, voxel count.
        histograms: per class, density (sums to 1) over :data:`_BINS` of that class.
        noise_sd_hu: median local SD in homogeneous soft tissue (HU).
        vessel_fraction: fraction of lung voxels >= -500 HU (nodules left out).
        lung_volume_l: volume of the lung mask, litres.
        body_area_cm2: median body cross-section per slice, cm^2.
    """

    label: str
    percentiles: dict[str, list[float]]
    voxels: dict[str, int]
    histograms: dict[str, list[float]]
    noise_sd_hu: float
    vessel_fraction: float
    lung_volume_l: float
    body_area_cm2: float


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`compare_real` measured and wrote.

    Attributes:
        real, twin: the two volumes' statistics.
        files: the files written (JSON, Markdown, PNGs).
        twin_folder: the twin series compared.
        seconds: wall time.
    """

    real: TissueStats
    twin: TissueStats
    files: tuple[Path, ...]
    twin_folder: Path
    seconds: float

    def table(self) -> str:
        """Markdown table real vs twin."""
        return _table(self.real, self.twin)


# ------------------------------------------------------------------ measuring
def _masks(hu: np.ndarray, nodule_mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> dict[str, np.ndarray]:
    from scipy import ndimage as ndi

    fg = hu > -500.0
    lab, n = ndi.label(fg)
    if n == 0:
        raise CalibrationError("no body found (no voxel above -500 HU)")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    del lab, fg
    for k in range(body.shape[0]):
        body[k] = ndi.binary_fill_holes(body[k])
    low = body & (hu < -400.0)
    lab, n = ndi.label(low)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = np.argsort(sizes)[::-1][:2]
    lungs_raw = np.isin(lab, keep[sizes[keep] > 0.002 * body.sum()])
    del lab, low
    # close the lungs over vessels and nodules (in plane), then erode away the rim
    lungs = np.zeros_like(lungs_raw)
    st = np.ones((3, 3), bool)
    for k in range(lungs.shape[0]):
        if lungs_raw[k].any():
            lungs[k] = ndi.binary_fill_holes(ndi.binary_closing(lungs_raw[k], st, iterations=3))
    inner = np.zeros_like(lungs)
    for k in range(lungs.shape[0]):
        if lungs[k].any():
            inner[k] = ndi.binary_erosion(lungs[k], st, iterations=2)
    r_vox = np.maximum(1, np.round(3.0 / np.asarray(spacing_zyx)).astype(int))
    nod_big = ndi.binary_dilation(nodule_mask, np.ones(tuple(2 * r_vox + 1), bool)) if nodule_mask.any() else nodule_mask
    lung_wo_nod = inner & ~nod_big
    soft = body & ~lungs & (hu >= -250.0) & (hu < 200.0)
    bone = body & (hu >= 200.0)
    return {"body": body, "lungs": lungs, "lung": lung_wo_nod, "soft": soft, "bone": bone}


def _noise_sd(hu: np.ndarray, soft: np.ndarray) -> float:
    from scipy import ndimage as ndi

    homog = soft & (hu >= -150.0) & (hu <= 150.0)
    sds = []
    for k in range(hu.shape[0]):
        m = homog[k]
        if m.sum() < 500:
            continue
        full = ndi.minimum_filter(m.astype(np.uint8), size=7) > 0
        if not full.any():
            continue
        x = hu[k].astype(np.float64)
        mean = ndi.uniform_filter(x, 7)
        sq = ndi.uniform_filter(x * x, 7)
        sd = np.sqrt(np.clip(sq - mean * mean, 0.0, None))
        sds.append(sd[full])
    if not sds:
        return float("nan")
    return float(np.median(np.concatenate(sds)))


def tissue_stats(hu: np.ndarray, nodule_mask: np.ndarray, spacing_zyx: tuple[float, float, float], label: str) -> TissueStats:
    """Measure one volume (see the module doc for the recipe).

    Args:
        hu: ``[z, y, x]`` HU.
        nodule_mask: bool ``[z, y, x]``, the nodules' consensus masks.
        spacing_zyx: voxel size (mm).
        label: name shown in tables and plots.
    """
    m = _masks(hu, nodule_mask, spacing_zyx)
    values = {
        "lung_parenchyma": hu[m["lung"] & (hu < -500.0)],
        "soft_tissue": hu[m["soft"]],
        "bone": hu[m["bone"]],
        "nodules": hu[nodule_mask],
    }
    pct, vox, hist = {}, {}, {}
    for name in _CLASSES:
        v = values[name]
        vox[name] = int(v.size)
        pct[name] = [round(float(p), 1) for p in np.percentile(v, [5, 25, 50, 75, 95])] if v.size else []
        h, _ = np.histogram(v, bins=_BINS[name])
        hist[name] = (h / max(1, v.size)).round(6).tolist()
    lung = m["lung"]
    vessel = float(np.count_nonzero(lung & (hu >= -500.0)) / max(1, np.count_nonzero(lung)))
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    areas = m["body"].reshape(m["body"].shape[0], -1).sum(axis=1) * spacing_zyx[1] * spacing_zyx[2] / 100.0
    return TissueStats(
        label=label,
        percentiles=pct,
        voxels=vox,
        histograms=hist,
        noise_sd_hu=round(_noise_sd(hu, m["soft"]), 2),
        vessel_fraction=round(vessel, 4),
        lung_volume_l=round(float(m["lungs"].sum()) * voxel_ml / 1000.0, 2),
        body_area_cm2=round(float(np.median(areas[areas > 0])) if np.any(areas > 0) else 0.0, 1),
    )


# ------------------------------------------------------------------ report
def _table(real: TissueStats, twin: TissueStats) -> str:
    def med(s: TissueStats, c: str) -> str:
        p = s.percentiles[c]
        return f"{p[2]:.0f} ({p[0]:.0f} .. {p[4]:.0f})" if p else "n/a"

    rows = [
        ("Lung parenchyma HU, median (5% .. 95%)", med(real, "lung_parenchyma"), med(twin, "lung_parenchyma")),
        ("Soft tissue HU, median (5% .. 95%)", med(real, "soft_tissue"), med(twin, "soft_tissue")),
        ("Bone HU (>= 200), median (5% .. 95%)", med(real, "bone"), med(twin, "bone")),
        ("Nodule HU (consensus), median (5% .. 95%)", med(real, "nodules"), med(twin, "nodules")),
        ("Noise SD in homogeneous soft tissue (HU)", f"{real.noise_sd_hu:.1f}", f"{twin.noise_sd_hu:.1f}"),
        ("Vessel density (lung voxels >= -500 HU)", f"{100 * real.vessel_fraction:.1f} %", f"{100 * twin.vessel_fraction:.1f} %"),
        ("Lung volume in the scan (l)", f"{real.lung_volume_l:.2f}", f"{twin.lung_volume_l:.2f}"),
        ("Body cross-section, median per slice (cm^2)", f"{real.body_area_cm2:.0f}", f"{twin.body_area_cm2:.0f}"),
        ("Bone voxels / soft-tissue voxels", f"{real.voxels['bone'] / max(1, real.voxels['soft_tissue']):.3f}",
         f"{twin.voxels['bone'] / max(1, twin.voxels['soft_tissue']):.3f}"),
    ]
    lines = ["| measure | real | twin (synthetic) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _histogram_png(real: TissueStats, twin: TissueStats, path: Path, title: str) -> Path:
    from lidc_det.plots import save_figure

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, name in zip(axes, _CLASSES):
        edges = _BINS[name]
        centres = 0.5 * (edges[:-1] + edges[1:])
        for s, colour in ((real, "tab:blue"), (twin, "tab:orange")):
            ax.plot(centres, s.histograms[name], color=colour, label=f"{s.label} (n={s.voxels[name]:,})")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("HU")
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = save_figure(fig, path, dpi=80)
    plt.close(fig)
    return out


def _resolve_twin(twin: Path, series_uid: str) -> Path:
    """The twin series folder: ``twin`` itself, or the folder of ``series_uid`` below it."""
    from lidc_det.io.dicom import find_series

    found = [s for s in find_series(twin) if s.series_uid == series_uid]
    if not found:
        raise CalibrationError(f"{twin}: no DICOM series with SeriesInstanceUID {series_uid} (the real scan's) below it")
    return found[0].folder


def compare_real(
    real_dicom_dir: Path,
    twin: Path | None,
    out_dir: Path,
    *,
    seed: int = 0,
) -> CalibrationReport:
    """Compare the real scan in ``real_dicom_dir`` with its twin; write the report into ``out_dir``.

    Args:
        real_dicom_dir: folder holding one real LIDC-IDRI CT series (e.g.
            ``../shared/data/lidc-idri/LIDC-IDRI-0001``).
        twin: a folder holding the twin of that series (its own folder or a
            TCIA root), or None: generate it (``seed``) into ``out_dir/twin``.
        out_dir: report folder (created).
        seed: twin seed when ``twin`` is None.

    Returns:
        A :class:`CalibrationReport`.

    Raises:
        InvalidSeriesError: unreadable real or twin series.
        CalibrationError: no twin of that series below ``twin``, or no body.
        TwinError: the twin could not be generated.
    """
    from lidc_det.atomic import write_json, write_text
    from lidc_det.data.lidc import consensus_mask, load_annotations
    from lidc_det.io.dicom import SkippedFileWarning, read_series
    from lidc_det.overlays import three_plane_png
    from lidc_det.provenance import provenance

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)  # the LIDC folders hold the reader XML too
        real = read_series(Path(real_dicom_dir))
    if twin is None:
        from lidc_det.synthetic.twin import generate_twin

        made = generate_twin(real.series_uid, out_dir / "twin", seed=seed)
        twin_folder = made.folder
    else:
        twin_folder = _resolve_twin(Path(twin), real.series_uid)
    tw = read_series(twin_folder)

    stats, centres, nmasks = [], [], []
    for vol, label in ((real, "real"), (tw, "twin (synthetic)")):
        ann = load_annotations(vol.series_uid, vol.geometry)
        nm = np.zeros(vol.geometry.shape_zyx, dtype=bool)
        for nod in ann.nodules:
            nm |= consensus_mask(nod, vol.geometry)
        nmasks.append(nm)
        centres.append(ann.nodules[0].center_xyz_mm if ann.nodules else vol.geometry.voxel_to_world((np.asarray(vol.geometry.shape_zyx) - 1) / 2.0))
        stats.append(tissue_stats(vol.hu, nm, vol.geometry.spacing_zyx, label))
    s_real, s_twin = stats

    files = [_histogram_png(s_real, s_twin, out_dir / "histograms.png", f"HU histograms: {real.patient_id} real vs twin (SYNTHETIC)")]
    for vol, nm, c, name, lab in (
        (real, nmasks[0], centres[0], "real", f"{real.patient_id} real"),
        (tw, nmasks[1], centres[1], "twin", f"{real.patient_id} twin (SYNTHETIC)"),
    ):
        files.append(three_plane_png(vol.hu, vol.geometry, c, out_dir / f"{name}_3plane.png", title=f"{lab}, lung window, through the nodule", half_width_mm=None))
        files.append(three_plane_png(vol.hu, vol.geometry, c, out_dir / f"{name}_nodule.png", masks=[(nm, "red")], title=f"{lab}, 80 mm around the nodule, consensus contour red", half_width_mm=40.0))
        files.append(three_plane_png(vol.hu, vol.geometry, c, out_dir / f"{name}_3plane_soft.png", title=f"{lab}, soft-tissue window", half_width_mm=None, window=(-160.0, 240.0)))
    seconds = time.perf_counter() - t0
    table = _table(s_real, s_twin)
    record: dict[str, Any] = {
        "kind": "lidc-det twin calibration",
        "real_folder": str(real.source),
        "twin_folder": str(twin_folder),
        "series_uid": real.series_uid,
        "real": s_real.__dict__,
        "twin": s_twin.__dict__,
        "bins": {k: v.tolist() for k, v in _BINS.items()},
        "seconds": round(seconds, 1),
        "provenance": provenance(),
    }
    write_json(out_dir / "calibration.json", record)
    md = (
        f"# Twin calibration: {real.patient_id} real vs twin (SYNTHETIC)\n\n"
        f"Series {real.series_uid}; twin {twin_folder}.\n\n{table}\n\n"
        "Recipe: see `lidc_det/synthetic/calibrate.py` (same automatic masks on both volumes).\n"
    )
    write_text(out_dir / "calibration.md", md)
    files += [out_dir / "calibration.json", out_dir / "calibration.md"]
    return CalibrationReport(s_real, s_twin, tuple(files), twin_folder, seconds)
