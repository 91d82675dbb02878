"""Scans on the lung networks' working grid, and LIDC twins with their lung labels.

The networks see the scan resampled (linear) to ``spacing_mm`` (3 mm
isotropic by default: a 512 x 512 x 133 LIDC scan becomes about 120 x 120 x 110)
and HU normalised by :func:`normalize` (clip to -1000..400 HU, map to -1..1).
Labels (0 background, 1 right lung, 2 left lung; :mod:`lidc_det.lungs`) are
resampled per class (linear on the one-hot, then arg-max), which keeps them
consistent with the image.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lidc_det.geometry import VolumeGeometry

HU_WINDOW = (-1000.0, 400.0)
DEFAULT_SPACING_MM = (3.0, 3.0, 3.0)


def normalize(hu: np.ndarray, window: tuple[float, float] = HU_WINDOW) -> np.ndarray:
    """float32 HU clipped to ``window`` and mapped linearly to ``[-1, 1]``."""
    lo, hi = window
    out = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    return (out - lo) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)


@dataclass(frozen=True, eq=False)
class LungScan:
    """One scan on the working grid.

    Attributes:
        name: patient id or series UID.
        image: ``[z, y, x]`` float32 normalised intensities (:func:`normalize`).
        labels: ``[z, y, x]`` uint8 0 / 1 right / 2 left, or None (no labels).
        geometry: the working grid.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray | None
    geometry: VolumeGeometry


def resample_labels(labels: np.ndarray, geometry: VolumeGeometry, target: VolumeGeometry) -> np.ndarray:
    """Resample 0/1/2 labels onto ``target`` (linear per class, arg-max), uint8."""
    from lidc_det.resample import resample_to_geometry

    probs = [resample_to_geometry((labels == c).astype(np.float32), geometry, target, default_value=float(c == 0)) for c in (0, 1, 2)]
    return np.argmax(np.stack(probs), axis=0).astype(np.uint8)


def to_work_grid(
    name: str,
    hu: np.ndarray,
    geometry: VolumeGeometry,
    labels: np.ndarray | None = None,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
) -> LungScan:
    """Resample a scan (and its labels) to the working grid."""
    from lidc_det.resample import resample_image

    img, geom = resample_image(hu, geometry, tuple(float(s) for s in spacing_mm))  # type: ignore[arg-type]
    lab = None if labels is None else resample_labels(labels, geometry, geom)
    return LungScan(name, normalize(img), lab, geom)


def save_scan(scan: LungScan, path: Path) -> None:
    """Write ``scan`` as one ``.npz`` (atomically)."""
    from lidc_det.atomic import write_with

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(
                fh, image=scan.image.astype(np.float16), labels=scan.labels if scan.labels is not None else np.zeros(0, np.uint8),
                geometry=json.dumps(scan.geometry.to_dict()), name=scan.name,
            )

    write_with(Path(path), write)


def load_scan(path: Path) -> LungScan:
    """Read a scan written by :func:`save_scan`."""
    with np.load(path) as z:
        lab = z["labels"]
        return LungScan(
            str(z["name"]), z["image"].astype(np.float32), lab if lab.size else None,
            VolumeGeometry.from_dict(json.loads(str(z["geometry"]))),
        )


def twin_scans(
    patients: Sequence[str],
    cache_dir: Path,
    *,
    seed: int = 0,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
    progress: bool = True,
) -> list[LungScan]:
    """LIDC twins of ``patients`` (rendered in memory, SYNTHETIC) with their lung labels, on the working grid.

    Each is cached in ``cache_dir/<patient>_s<seed>.npz``; a cached file is reused.
    """
    from lidc_det.synthetic.twin import render_twin, scan_spec

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = "x".join(f"{s:g}" for s in spacing_mm)
    out = []
    for pid in patients:
        path = cache_dir / f"{pid}_s{seed}_{tag}mm.npz"
        if not path.is_file():
            t0 = time.perf_counter()
            spec = scan_spec(pid)
            tv = render_twin(spec, seed=seed)
            save_scan(to_work_grid(pid, tv.hu, spec.geometry(), tv.lung_labels(), spacing_mm), path)
            if progress:
                print(f"twin {pid}: {time.perf_counter() - t0:.1f} s", flush=True)
        out.append(load_scan(path))
    return out
