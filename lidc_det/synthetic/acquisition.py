"""CT acquisition effects for the twin: correlated noise, reconstruction circle, couch, air floor.

The anatomy is drawn with soft edges whose width stands for the kernel's
blur (:mod:`lidc_det.synthetic.render`), and tubes carry their own slice
partial volume, so this step adds what a scanner adds on top:

* noise with a CT-like texture: white noise shaped in the Fourier domain by a
  noise power spectrum ``NPS(f) ~ f * exp(-(f / f_peak)^2)`` (the ramp of
  filtered back-projection rolled off by the kernel), drawn once as a small
  bank of slices and reused per slice with random shifts and flips (cheap);
  its standard deviation grows with the body's cross-section on each slice;
* the floor of the CT number scale (real scanners clip air at about -1024 HU);
* the reconstruction circle: outside the field-of-view circle many scanners
  store a padding value (-2048, -3024) rather than air.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AcquisitionParams", "noise_bank", "sample_acquisition", "simulate_acquisition"]


@dataclass(frozen=True)
class AcquisitionParams:
    """How the twin is "scanned".

    Attributes:
        noise_sd_hu: noise standard deviation (HU) on a slice of median body size.
        nps_peak_per_mm: where the noise power spectrum peaks (cycles/mm);
            lower = blotchier (smooth kernel), higher = finer (sharp kernel).
        body_noise_exponent: noise scales as ``(body area / median area) ** exponent``.
        air_floor_hu: values below are clipped (the scanner's lowest CT number).
        outside_fov_hu: value outside the reconstruction circle; None = no circle
            (air continues to the image edge).
    """

    noise_sd_hu: float
    nps_peak_per_mm: float
    body_noise_exponent: float
    air_floor_hu: float
    outside_fov_hu: float | None


def sample_acquisition(rng: np.random.Generator) -> AcquisitionParams:
    """Random scanner settings: noise 9-35 HU (log-uniform), texture, padding style."""
    pad_choice = int(rng.integers(0, 4))
    return AcquisitionParams(
        noise_sd_hu=float(np.exp(rng.uniform(np.log(9.0), np.log(35.0)))),
        nps_peak_per_mm=float(rng.uniform(0.25, 0.45)),
        body_noise_exponent=float(rng.uniform(0.6, 1.0)),
        air_floor_hu=-1024.0,
        outside_fov_hu=(None, -1024.0, -2048.0, -3024.0)[pad_choice],
    )


def noise_bank(
    rng: np.random.Generator, shape_yx: tuple[int, int], pixel_mm: float, nps_peak_per_mm: float, n: int = 6
) -> np.ndarray:
    """``n`` float32 slices of unit-variance noise with the CT-like spectrum (see module doc)."""
    ny, nx = shape_yx
    fy = np.fft.fftfreq(ny, d=pixel_mm)[:, None]
    fx = np.fft.rfftfreq(nx, d=pixel_mm)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    amp = np.sqrt(f * np.exp(-((f / nps_peak_per_mm) ** 2))).astype(np.float32)
    out = np.empty((n, ny, nx), dtype=np.float32)
    for i in range(n):
        w = rng.standard_normal((ny, nx)).astype(np.float32)
        s = np.fft.irfft2(np.fft.rfft2(w) * amp, s=(ny, nx)).astype(np.float32)
        s /= float(s.std()) or 1.0
        out[i] = s
    return out


def simulate_acquisition(
    hu: np.ndarray, pixel_mm: float, params: AcquisitionParams, rng: np.random.Generator
) -> None:
    """Add noise, clip at the air floor and apply the reconstruction circle, in place.

    Args:
        hu: ``[z, y, x]`` float32 noise-free HU (modified in place).
        pixel_mm: in-plane pixel size (mm).
        params: from :func:`sample_acquisition`.
        rng: randomness (noise bank, shifts, flips).
    """
    nz, ny, nx = hu.shape
    bank = noise_bank(rng, (ny, nx), pixel_mm, params.nps_peak_per_mm)
    area = np.array([np.count_nonzero(hu[k, ::4, ::4] > -500.0) for k in range(nz)], dtype=np.float64)
    med = float(np.median(area[area > 0])) if np.any(area > 0) else 1.0
    scale = np.clip((np.maximum(area, 1.0) / med) ** params.body_noise_exponent, 0.7, 1.8) * params.noise_sd_hu
    picks = rng.integers(0, len(bank), size=nz)
    shifts = rng.integers(0, [ny, nx], size=(nz, 2))
    flips = rng.integers(0, 4, size=nz)
    floor = np.float32(params.air_floor_hu)
    for k in range(nz):
        n = bank[picks[k]]
        if flips[k] & 1:
            n = n[::-1]
        if flips[k] & 2:
            n = n[:, ::-1]
        n = np.roll(n, tuple(int(s) for s in shifts[k]), axis=(0, 1))
        sl = hu[k]
        sl += n * np.float32(scale[k])
        np.maximum(sl, floor, out=sl)
    if params.outside_fov_hu is not None:
        yy = np.arange(ny) - (ny - 1) / 2.0
        xx = np.arange(nx) - (nx - 1) / 2.0
        r = min(nx, ny) / 2.0
        outside = (yy[:, None] ** 2 + xx[None, :] ** 2) > r * r
        hu[:, outside] = np.float32(params.outside_fov_hu)
