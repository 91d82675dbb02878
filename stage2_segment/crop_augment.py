"""Acquisition augmentation of stage-2 training crops: blur and noise on the image, never on the label.

Real nodule edges ramp more slowly than the twin's. On LIDC-IDRI-0001's 23 mm nodule, resampled
to 1 mm, the mean HU falls from the interior to the lung over about 5 mm around the readers'
consensus boundary. On the twins' nodules (>= 10 mm) it falls over about 3 mm: the interior is
flat up to 1 mm inside the boundary. A Gaussian blur of about 1-1.5 mm on the twin gives the real
ramp (docs/transfer.md, ninth round). A model trained on the sharp edges puts its boundary where
the HU drops steeply. On the real ramp that is well inside the readers' boundary, and the model
under-segments large real nodules.

:func:`augment_crops` adds ``copies`` copies of every training crop, nodule and negative alike,
so that blur is never a cue for a nodule. Each copy gets its own randomised acquisition: an
anisotropic Gaussian blur (in-plane PSF, plus the slice profile along z) and then white noise.
The label stays the sharp reader consensus, so the model learns that the boundary lies in the
middle of a blurred edge. The originals are kept unchanged.
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
    """

    copies: int = 0
    blur_sigma_xy_mm: tuple[float, float] = (0.3, 1.2)
    blur_sigma_z_mm: tuple[float, float] = (0.3, 1.5)
    noise_sd_hu: tuple[float, float] = (0.0, 20.0)

    def __post_init__(self) -> None:
        if self.copies < 0:
            raise ValueError(f"CropAugmentConfig.copies must be >= 0, got {self.copies}")
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


def augment_crops(crops: list[Crop], cfg: CropAugmentConfig, rng: np.random.Generator) -> list[Crop]:
    """``crops`` followed by ``cfg.copies`` re-acquired copies of each (same box, label and
    metadata; :func:`acquired` image). With ``copies == 0`` the list is returned unchanged."""
    out = list(crops)
    for _ in range(cfg.copies):
        for c in crops:
            sigma = (rng.uniform(*cfg.blur_sigma_z_mm), *(rng.uniform(*cfg.blur_sigma_xy_mm),) * 2)
            sd = float(rng.uniform(*cfg.noise_sd_hu))
            spacing = c.volume_geometry.spacing_zyx
            acq = {"sigma_zyx_mm": [round(float(v), 4) for v in sigma], "noise_sd_hu": round(sd, 3)}
            out.append(replace(c, image=acquired(c.image, spacing, sigma, sd, rng), acquisition=acq))  # type: ignore[arg-type]
    return out
