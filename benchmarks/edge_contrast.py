"""Edge contrast of nodules in prepared data sets: how sharp their borders are.

For each target nodule of at least ``--min-diameter`` mm (default 8) in a prepared data set
(twins, semi-real scans, or a real scan prepared with ``lidc-det prepare``), the mean HU of the
one-voxel shell just inside its readers' consensus mask and of the one-voxel shell just outside
it. Their difference (HU) is small where the edge ramps (slice profile, PSF, partial volume)
and large where it is painted sharp. Used to compare twin, semi-real and real nodules
(docs/transfer.md, seventh round).

It also gives each nodule's edge profile: the mean HU of the shells at signed distances -4 .. +4
voxels from the consensus boundary (0 = the shell just inside it, 1 = just outside), and with
``--blur-mm S`` measures the images blurred by a Gaussian of S mm first (to find the blur that
matches one data set's edges to another's; docs/transfer.md, ninth round).

``python -m benchmarks.edge_contrast DATASET [DATASET ...] [--which inserted|own|all] [--blur-mm S] [--out FILE]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np


def edge_shells_hu(image_hu: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean HU of the voxels of ``mask`` (bool ``[z, y, x]``) that touch its outside (face
    neighbours), and of the voxels outside it that touch it: ``(inside, outside)``."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("empty mask")
    found = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in found)
    m, im = mask[box], np.asarray(image_hu, dtype=np.float32)[box]
    inner = m & ~ndimage.binary_erosion(m)
    outer = ndimage.binary_dilation(m) & ~m
    return float(im[inner].mean()), float(im[outer].mean())


#: Signed distances (voxels) of the profile shells: negative inside the mask, 0 its boundary shell.
PROFILE_VOXELS = tuple(range(-4, 5))


def edge_profile_hu(image_hu: np.ndarray, mask: np.ndarray, distances: tuple[int, ...] = PROFILE_VOXELS) -> list[float]:
    """Mean HU of the shells of ``mask`` (bool ``[z, y, x]``) at each signed distance (voxels,
    Euclidean): shell ``d <= 0`` holds the mask voxels ``1 - d`` voxels from the outside (0: those
    touching it), shell ``d > 0`` the outside voxels ``d`` voxels from the mask. NaN for an empty shell."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("empty mask")
    pad = max(abs(d) for d in distances) + 2
    found = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - pad, 0), s.stop + pad) for s in found)
    m, im = mask[box], np.asarray(image_hu, dtype=np.float32)[box]
    signed = np.where(m, 1.0 - ndimage.distance_transform_edt(m), ndimage.distance_transform_edt(~m))
    out = []
    for d in distances:
        shell = (signed > d - 0.5) & (signed <= d + 0.5)
        out.append(float(im[shell].mean()) if shell.any() else float("nan"))
    return out


def dataset_edges(root: Path, which: str, min_diameter_mm: float, max_scans: int | None, blur_mm: float = 0.0) -> dict[str, Any]:
    """Per-nodule shells and edge profiles of one prepared data set; ``which``: ``inserted``
    (semi-real nodules only), ``own`` (the background's own nodules only) or ``all``. ``blur_mm``:
    Gaussian sigma (mm) applied to each image first (0 = none)."""
    from scipy import ndimage

    from lidc_det.data.prepared import PreparedDataset

    ds = PreparedDataset(root)
    rows = []
    for uid in ds.series_uids[:max_scans]:
        case = ds.load_case(uid)
        image = np.asarray(case.image_hu, dtype=np.float32)
        if blur_mm > 0:
            image = ndimage.gaussian_filter(image, [blur_mm / s for s in case.geometry.spacing_zyx])
        for n in case.nodules + case.irrelevant:
            inserted = ":inserted" in n.nodule_id
            if (which == "inserted" and not inserted) or (which == "own" and inserted) or n.diameter_mm < min_diameter_mm:
                continue
            mask = case.nodule_mask(n)
            if not mask.any():  # a finding without a stored mask (nodule_mask gives an empty one)
                continue
            inside, outside = edge_shells_hu(image, mask)
            rows.append({"series_uid": uid, "nodule_id": n.nodule_id, "diameter_mm": round(float(n.diameter_mm), 1),
                         "inside_hu": round(inside, 1), "outside_hu": round(outside, 1),
                         "profile_hu": [round(v, 1) for v in edge_profile_hu(image, mask)]})
    contrast = [r["inside_hu"] - r["outside_hu"] for r in rows]
    profile = np.nanmean([r["profile_hu"] for r in rows], axis=0) if rows else None
    return {
        "dataset": str(root), "which": which, "blur_mm": blur_mm, "n": len(rows), "nodules": rows,
        "profile_voxels": list(PROFILE_VOXELS),
        "mean_profile_hu": None if profile is None else [round(float(v), 1) for v in profile],
        "mean_inside_hu": round(float(np.mean([r["inside_hu"] for r in rows])), 1) if rows else None,
        "mean_outside_hu": round(float(np.mean([r["outside_hu"] for r in rows])), 1) if rows else None,
        "mean_contrast_hu": round(float(np.mean(contrast)), 1) if rows else None,
    }


def main(argv: list[str] | None = None) -> int:
    from lidc_det.atomic import write_json
    from lidc_det.provenance import provenance

    p = argparse.ArgumentParser(prog="python -m benchmarks.edge_contrast", description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+", type=Path, help="prepared data set folders (with dataset.json)")
    p.add_argument("--which", choices=("inserted", "own", "all"), default="all")
    p.add_argument("--min-diameter", type=float, default=8.0, help="mm")
    p.add_argument("--max-scans", type=int, default=None, help="first N scans of each data set")
    p.add_argument("--blur-mm", type=float, default=0.0, help="Gaussian sigma (mm) applied to the images first")
    p.add_argument("--out", type=Path, default=None, help="JSON record")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = [dataset_edges(d, a.which, a.min_diameter, a.max_scans, a.blur_mm) for d in a.datasets]
    for r in res:
        print(f"{r['dataset']} ({r['which']}, blur {a.blur_mm:g} mm): n = {r['n']} nodules >= {a.min_diameter:g} mm, inside shell "
              f"{r['mean_inside_hu']} HU, outside shell {r['mean_outside_hu']} HU, contrast {r['mean_contrast_hu']} HU")
        if r["mean_profile_hu"] is not None:
            print("  profile (voxels from the boundary: HU): "
                  + ", ".join(f"{d:+d}: {v:.0f}" for d, v in zip(r["profile_voxels"], r["mean_profile_hu"])))
    if a.out is not None:
        write_json(a.out, {"kind": "nodule edge contrast", "args": {k: str(v) for k, v in vars(a).items()},
                           "provenance": provenance(), "device": "cpu", "results": res,
                           "wall_seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
