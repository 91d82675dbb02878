"""Intensity normalisation and the body mask used by the stage-1 detector.

**HU normalisation** (the only place it is defined): clip to the config's
``hu_window = (low, high)`` (default -1000 .. 500 HU: air to bone-ish, which keeps
lung parenchyma, soft tissue, ground-glass and solid nodules distinct), then map
linearly to ``[-1, 1]``::

    x = 2 * (clip(hu, low, high) - low) / (high - low) - 1

so -1000 HU -> -1, 500 HU -> +1 and water (0 HU) -> 1/3 with the default window.
Padding outside the scan is air (-1024 HU -> -1).
"""

from __future__ import annotations

import numpy as np

PAD_HU = -1024.0
"""HU used to pad volumes and patches outside the scan (air)."""


def normalize_hu(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """float32 ``[z, y, x]`` normalised intensities in ``[-1, 1]`` (see the module docstring)."""
    low, high = float(hu_window[0]), float(hu_window[1])
    out = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    out -= low
    out *= 2.0 / (high - low)
    out -= 1.0
    return out


def body_mask(hu: np.ndarray, *, threshold_hu: float = -500.0, step: int = 4, dilate_vox: int = 8) -> np.ndarray:
    """Rough body mask ``[z, y, x]`` bool (body + the lungs inside it), for skipping air.

    On a grid subsampled by ``step``: voxels above ``threshold_hu``, the largest
    connected component (the body; the table and blankets are usually smaller or
    separate), holes filled slice by slice in the axial plane (this adds the
    lungs and airways), then dilated by ``dilate_vox`` voxels (full resolution)
    and upsampled by repetition. Conservative on purpose: it only has to say
    where there certainly is no patient. An empty threshold image gives an
    all-True mask (nothing is skipped).
    """
    from scipy import ndimage

    hu = np.asarray(hu)
    small = hu[::step, ::step, ::step] > threshold_hu
    labels, n = ndimage.label(small)
    if n == 0:
        return np.ones(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    it = max(1, int(np.ceil(dilate_vox / step)))
    body = ndimage.binary_dilation(body, iterations=it)
    full = body.repeat(step, 0).repeat(step, 1).repeat(step, 2)
    return np.ascontiguousarray(full[: hu.shape[0], : hu.shape[1], : hu.shape[2]])
