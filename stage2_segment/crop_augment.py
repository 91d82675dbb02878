"""Augmented copies of stage-2 training crops: blur and noise on the image only, magnification of both.

Real nodule edges ramp more slowly than the twin's. On LIDC-IDRI-0001's 23 mm nodule, resampled
to 1 mm, the mean HU starts to fall 2-3 mm inside the readers' consensus boundary; on the twins'
nodules (>= 10 mm) the interior is flat up to 1 mm inside it. A Gaussian blur of about 1 mm on the
twin gives the real profile (``python -m benchmarks.edge_contrast --blur-mm``; docs/transfer.md,
ninth round). The idea: a model trained on sharp edges puts its boundary where the HU drops
steeply, which on the real ramp is inside the readers' boundary.

:func:`augment_crops` adds ``copies`` copies of every training crop, nodule and negative alike,
so that blur is never a cue for a nodule. Each copy gets its own randomised acquisition: an
anisotropic Gaussian blur (in-plane PSF, plus the slice profile along z) and then white noise.
The label stays the sharp reader consensus. The originals are kept unchanged.

A copy can also be magnified about the crop centre (``zoom``, image and label alike), to show
nodules larger than the twins' few 15-22 mm ones.

Measured on the real nodule (docs/transfer.md, ninth round): neither helped at the transfer
benchmark's 600 nnU-Net iterations; the magnified copies raised the real nodule's Dice but cost
the semi-real yardstick's small nodules. Training three times as long did more than either.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from stage2_segment.crops import Crop


@dataclass(frozen=True)
class CropAugmentConfig:
    """Randomised acquisition of extra training crops.

    Attributes:
        copies: extra copies of every training crop (0 = off: the crops are used as cut).
        blur_sigma_xy_mm: ``(low, high)`` range of the in-plane Gaussian sigma (mm), drawn
            uniformly per copy.
        blur_sigma_z_mm: ``(low, high)`` range of the sigma along z (mm): the slice profile.
            It is drawn independently of the in-plane sigma.
        noise_sd_hu: ``(low, high)`` range of the SD (HU) of the white noise added after the
            blur. The blur removes most of the crop's own noise.
        zoom: ``(low, high)`` range of the magnification about the crop centre (image linear,
            label by nearest voxel), applied before the blur; ``(1, 1)`` = none. A factor of 1.5 shows
            the central two thirds of the crop at 1.5 times its size, on the same grid.
    """

    copies: int = 0
    blur_sigma_xy_mm: tuple[float, float] = (0.3, 1.2)
    blur_sigma_z_mm: tuple[float, float] = (0.3, 1.5)
    noise_sd_hu: tuple[float, float] = (0.0, 20.0)
    zoom: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if self.copies < 0:
            raise ValueError(f"CropAugmentConfig.copies must be >= 0, got {self.copies}")
        if not 0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"CropAugmentConfig.zoom must be (low, high) with 0 < low <= high, got {self.zoom}")
        for name in ("blur_sigma_xy_mm", "blur_sigma_z_mm", "noise_sd_hu"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"CropAugmentConfig.{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")


def acquired(image: np.ndarray, spacing_zyx: tuple[float, float, float], sigma_zyx_mm: tuple[float, float, float],
             noise_sd_hu: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` (``float32 [z, y, x]`` HU) blurred by a Gaussian of ``sigma_zyx_mm`` (mm per axis,
    on a grid of ``spacing_zyx`` mm), plus white noise of SD ``noise_sd_hu`` HU. Returns a new
    ``float32`` array; voxels beyond the edge are mirrored (``scipy.ndimage`` ``"reflect"``)."""
    from scipy import ndimage

    sigma_vox = tuple(s / sp for s, sp in zip(sigma_zyx_mm, spacing_zyx))
    out = ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), sigma_vox, mode="reflect")
    if noise_sd_hu > 0:
        out = out + rng.normal(0.0, noise_sd_hu, size=out.shape).astype(np.float32)
    return out.astype(np.float32, copy=False)


def zoomed(image: np.ndarray, label: np.ndarray | None, factor: float, fill_hu: float) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` (``[z, y, x]``) and ``label`` magnified ``factor`` times about the array centre,
    same shape: output voxel ``i`` samples input ``c + (i - c) / factor``. Image linear (outside:
    ``fill_hu``), label nearest voxel (outside: 0). ``factor == 1`` returns them unchanged."""
    if factor == 1.0:
        return image, label
    from scipy import ndimage

    c = (np.asarray(image.shape, dtype=np.float64) - 1.0) / 2.0
    matrix, offset = np.full(3, 1.0 / factor), c - c / factor
    img = ndimage.affine_transform(np.asarray(image, dtype=np.float32), matrix, offset, order=1, mode="constant", cval=fill_hu)
    lab = None if label is None else ndimage.affine_transform(label, matrix, offset, order=0, mode="constant", cval=0)
    return img.astype(np.float32, copy=False), lab


def augment_crops(crops: list[Crop], cfg: CropAugmentConfig, rng: np.random.Generator) -> list[Crop]:
    """``crops`` followed by ``cfg.copies`` re-acquired copies of each (same box and metadata;
    :func:`zoomed`, then :func:`acquired`, image; the label zoomed alike). With ``copies == 0`` the
    list is returned unchanged."""
    out = list(crops)
    for _ in range(cfg.copies):
        for c in crops:
            sigma = (rng.uniform(*cfg.blur_sigma_z_mm), *(rng.uniform(*cfg.blur_sigma_xy_mm),) * 2)
            sd = float(rng.uniform(*cfg.noise_sd_hu))
            factor = float(rng.uniform(*cfg.zoom)) if cfg.zoom[1] > cfg.zoom[0] else float(cfg.zoom[0])
            spacing = c.volume_geometry.spacing_zyx
            image, label = zoomed(c.image, c.label, factor, float(c.image.min()))
            acq = {"sigma_zyx_mm": [round(float(v), 4) for v in sigma], "noise_sd_hu": round(sd, 3), "zoom": round(factor, 4)}
            out.append(replace(c, image=acquired(image, spacing, sigma, sd, rng), label=label, acquisition=acq))  # type: ignore[arg-type]
    return out
