"""Training data for the stage-1 detector: cases, target boxes, and the patch sampler.

**Cases.** Training takes any sequence of objects exposing ``series_uid``,
``image_hu`` (``[z, y, x]`` HU), ``geometry`` (:class:`~lidc_det.geometry.VolumeGeometry`)
and targets, either as

* ``boxes_voxel``: ``(N, 6)`` voxel boxes on ``image_hu`` (:class:`InMemoryCase`), or
* ``nodules``: records with ``box_voxel`` / ``center_xyz_mm`` / ``diameter_mm``, and
  ``irrelevant`` findings: :class:`lidc_det.data.prepared.PreparedCase` as written by
  ``lidc-det prepare`` (nodules whose box vanished at the prepared spacing are skipped).

Cases must already be on the training grid (``config.spacing_mm``, 1 mm by
default: what ``lidc-det prepare`` writes); another spacing raises
:class:`SpacingMismatchError`. Irrelevant findings are treated as background.

**Patches** (:class:`PatchDataset`). Item ``i`` is drawn with its own generator
``numpy.random.default_rng([seed, i])``, so a patch depends only on the seed and
its index: training resumed at step ``t`` sees exactly the patches an
uninterrupted run would, and DataLoader workers need no seeding. With
probability ``pos_fraction`` a patch is centred on a random target box (boxes
drawn uniformly over all targets) moved by up to ``pos_jitter * patch_size``
per axis; otherwise it is centred on a random voxel (re-drawn up to 10 times
while the 8^3 block around it is all air, < -950 HU). The image is padded with
air where the patch leaves the scan. Targets are the boxes whose centre lies
in the patch, clipped to it; boxes thinner than 1 voxel after clipping are dropped.

With ``neg_dense_fraction`` f > 0, a share f of the background patches is centred
(with the same jitter) on a dense voxel inside the lung instead
(:func:`dense_lung_voxels`: vessels, bifurcations, fissures, where a detector's
false positives sit on real CT).

**Augmentation** (training only): a flip of each axis with probability 1/2, a
random number of 90-degree turns in the axial (y, x) plane (only 0 or 2 when the
patch's y and x sizes differ), then optional domain randomisation (a Gaussian blur
and correlated noise of random strength, ``aug_blur_*`` / ``aug_noise_*``: other
kernels, slice thicknesses and doses than the training scans'), then
``x * U(1 - s, 1 + s) + U(-t, t)`` on the normalised intensities
(``intensity_scale`` s, ``intensity_shift`` t). Boxes follow every geometric step exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lidc_det.boxes import boxes_to_world
from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from stage1_detect.config import DetectorConfig
from stage1_detect.preprocess import PAD_HU, normalize_hu


class SpacingMismatchError(LidcDetError):
    """A training case is not on the detector's training grid (resample it first)."""


@dataclass(frozen=True, eq=False)
class InMemoryCase:
    """A training/validation scan held in memory (tests, demos, synthetic data).

    Attributes:
        series_uid: scan identifier.
        image_hu: ``[z, y, x]`` HU.
        geometry: where the array sits (``shape_zyx == image_hu.shape``).
        boxes_voxel: ``(N, 6)`` target boxes on ``image_hu`` (:mod:`lidc_det.boxes` format).
        irrelevant_boxes_voxel: ``(K, 6)`` findings that are neither hits nor false positives.
    """

    series_uid: str
    image_hu: np.ndarray
    geometry: VolumeGeometry
    boxes_voxel: np.ndarray
    irrelevant_boxes_voxel: np.ndarray | None = None

    def __post_init__(self) -> None:
        if tuple(np.shape(self.image_hu)) != self.geometry.shape_zyx:
            raise ValueError(f"{self.series_uid}: image shape {np.shape(self.image_hu)} != geometry {self.geometry.shape_zyx}")
        object.__setattr__(self, "boxes_voxel", np.asarray(self.boxes_voxel, dtype=np.float64).reshape(-1, 6))
        if self.irrelevant_boxes_voxel is not None:
            object.__setattr__(
                self, "irrelevant_boxes_voxel", np.asarray(self.irrelevant_boxes_voxel, dtype=np.float64).reshape(-1, 6)
            )


def case_boxes(case: Any) -> np.ndarray:
    """Target voxel boxes ``(N, 6)`` of a case (``boxes_voxel``, or ``nodules[*].box_voxel``)."""
    if hasattr(case, "boxes_voxel"):
        return np.asarray(case.boxes_voxel, dtype=np.float64).reshape(-1, 6)
    if hasattr(case, "nodules"):
        boxes = [n.box_voxel for n in case.nodules if n.box_voxel is not None]
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    raise TypeError(f"{type(case).__name__}: a training case needs `boxes_voxel` or `nodules` with `box_voxel`")


def _findings_from_boxes(boxes: np.ndarray, geometry: VolumeGeometry) -> list[tuple[tuple[float, float, float], float]]:
    if len(boxes) == 0:
        return []
    centres, sizes = boxes_to_world(boxes, geometry)
    return [(tuple(c), float(np.abs(s).mean())) for c, s in zip(centres, sizes)]  # type: ignore[misc]


def case_findings(case: Any) -> tuple[list[tuple[tuple[float, float, float], float]], list[tuple[tuple[float, float, float], float]]]:
    """``(targets, irrelevant)`` of a case as lists of (world centre x, y, z mm; diameter mm)."""
    if hasattr(case, "nodules"):
        tgt = [(tuple(n.center_xyz_mm), float(n.diameter_mm)) for n in case.nodules]
        irr = [(tuple(n.center_xyz_mm), float(n.diameter_mm)) for n in getattr(case, "irrelevant", ())]
        return tgt, irr  # type: ignore[return-value]
    irrelevant = getattr(case, "irrelevant_boxes_voxel", None)
    return (
        _findings_from_boxes(case_boxes(case), case.geometry),
        [] if irrelevant is None else _findings_from_boxes(irrelevant, case.geometry),
    )


def check_spacing(cases: Sequence[Any], config: DetectorConfig) -> None:
    """Raise :class:`SpacingMismatchError` naming the first case not on ``config.spacing_mm``."""
    for case in cases:
        if not np.allclose(case.geometry.spacing_zyx, config.spacing_mm, rtol=1e-3, atol=0.0):
            raise SpacingMismatchError(
                f"{case.series_uid}: spacing {case.geometry.spacing_zyx} mm differs from the detector's training "
                f"spacing {tuple(config.spacing_mm)} mm; prepare the data at that spacing (lidc-det prepare --spacing)"
            )


def crop_with_padding(image: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """``image[start : start + size]`` (3D), padded with ``pad_value`` where it leaves the array."""
    out = np.full(tuple(int(s) for s in size), pad_value, dtype=np.float32)
    src_lo = [max(0, int(s)) for s in start]
    src_hi = [min(n, int(s) + int(w)) for n, s, w in zip(image.shape, start, size)]
    if any(h <= lo for lo, h in zip(src_lo, src_hi)):
        return out
    dst_lo = [lo - int(s) for lo, s in zip(src_lo, start)]
    out[
        dst_lo[0] : dst_lo[0] + src_hi[0] - src_lo[0],
        dst_lo[1] : dst_lo[1] + src_hi[1] - src_lo[1],
        dst_lo[2] : dst_lo[2] + src_hi[2] - src_lo[2],
    ] = image[src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]]
    return out


def boxes_in_patch(boxes: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Boxes moved into patch coordinates, keeping those whose centre is inside, clipped to the patch."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 6) - np.tile(np.asarray(start, dtype=np.float64), 2)
    size_arr = np.asarray(size, dtype=np.float64)
    ctr = (b[:, :3] + b[:, 3:]) / 2
    inside = np.all((ctr >= 0) & (ctr < size_arr), axis=1)
    b = b[inside]
    b[:, :3] = np.clip(b[:, :3], 0, size_arr)
    b[:, 3:] = np.clip(b[:, 3:], 0, size_arr)
    return b[np.all(b[:, 3:] - b[:, :3] >= 1.0, axis=1)]


def flip_boxes(boxes: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Boxes after ``np.flip(array, axis)`` of an array whose ``axis`` has ``length`` voxels."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 6)
    lo, hi = out[:, axis].copy(), out[:, axis + 3].copy()
    out[:, axis], out[:, axis + 3] = length - hi, length - lo
    return out


def rot90_boxes(boxes: np.ndarray, k: int, shape_zyx: Sequence[int]) -> np.ndarray:
    """Boxes after ``np.rot90(array, k, axes=(1, 2))`` of a ``shape_zyx`` array.

    One turn is a flip of x followed by swapping y and x (NumPy's definition).
    """
    out = np.array(boxes, dtype=np.float64).reshape(-1, 6)
    shape = list(shape_zyx)
    for _ in range(k % 4):
        out = flip_boxes(out, 2, shape[2])
        out = out[:, [0, 2, 1, 3, 5, 4]]
        shape[1], shape[2] = shape[2], shape[1]
    return out


def augment(
    image: np.ndarray, boxes: np.ndarray, config: DetectorConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random flips, axial 90-degree turns and intensity scale/shift (see the module docstring)."""
    if config.aug_flip:
        for axis in range(3):
            if rng.random() < 0.5:
                image = np.flip(image, axis)
                boxes = flip_boxes(boxes, axis, image.shape[axis])
    if config.aug_rot90:
        k = int(rng.integers(0, 4)) if image.shape[1] == image.shape[2] else 2 * int(rng.integers(0, 2))
        if k:
            boxes = rot90_boxes(boxes, k, image.shape)
            image = np.rot90(image, k, axes=(1, 2))
    image = np.ascontiguousarray(image, dtype=np.float32)
    image = _domain_randomise(image, config, rng)
    if config.intensity_scale or config.intensity_shift:
        scale = 1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale)
        shift = rng.uniform(-config.intensity_shift, config.intensity_shift)
        image = image * np.float32(scale) + np.float32(shift)
    return image, boxes


def _domain_randomise(image: np.ndarray, config: DetectorConfig, rng: np.random.Generator) -> np.ndarray:
    """Blur and correlated noise of random strength (``aug_blur_*``, ``aug_noise_*``), on the
    normalised patch; no random draw is made when both probabilities are 0."""
    from scipy.ndimage import gaussian_filter

    spacing = np.asarray(config.spacing_mm, dtype=np.float64)
    if config.aug_blur_prob > 0 and rng.random() < config.aug_blur_prob:
        lo, hi = config.aug_blur_sigma_mm
        sigma_mm = np.array([rng.uniform(lo, 1.5 * hi), *([rng.uniform(lo, hi)] * 2)])
        image = gaussian_filter(image, sigma=sigma_mm / spacing).astype(np.float32)
    if config.aug_noise_prob > 0 and rng.random() < config.aug_noise_prob:
        lo, hi = config.aug_noise_hu
        noise = gaussian_filter(rng.standard_normal(image.shape).astype(np.float32), sigma=0.6)
        noise /= float(noise.std()) or 1.0
        half_window = 0.5 * (config.hu_window[1] - config.hu_window[0])
        image = image + noise * np.float32(rng.uniform(lo, hi) / half_window)
    return image


def dense_lung_voxels(image_hu: np.ndarray, *, step: int = 3) -> np.ndarray:
    """Voxel indices ``(K, 3)`` of dense voxels (> -500 HU) whose neighbourhood is mostly lung
    (mean < -600 HU over about 12 voxels around): vessels, bifurcations, fissures, nodules.

    Works on every ``step``-th voxel (the patch sampler only needs centres).
    """
    from scipy.ndimage import uniform_filter

    small = np.asarray(image_hu[::step, ::step, ::step], dtype=np.float32)
    around = uniform_filter(small, size=5, mode="nearest")
    idx = np.argwhere((small > -500.0) & (around < -600.0))
    return idx * step


class PatchDataset:
    """Map-style dataset of augmented training patches (see the module docstring).

    ``dataset[i]`` is ``(image, boxes)``: float32 ``[1, D, H, W]`` normalised patch
    and float32 ``(N, 6)`` patch-voxel boxes (torch tensors). ``len`` is ``length``.
    """

    def __init__(self, cases: Sequence[Any], config: DetectorConfig, *, seed: int, length: int, augment: bool = True) -> None:
        check_spacing(cases, config)
        self.cases = list(cases)
        self.config = config
        self.seed = int(seed)
        self.length = int(length)
        self.augment = augment
        self.boxes = [case_boxes(c) for c in self.cases]
        self.targets = [(ci, bi) for ci, b in enumerate(self.boxes) for bi in range(len(b))]
        self._dense_cache: dict[int, np.ndarray] = {}
        if not self.cases:
            raise ValueError("PatchDataset needs at least one case")

    def __len__(self) -> int:
        return self.length

    def _dense(self, ci: int) -> np.ndarray:
        """Dense lung voxels of case ``ci`` (computed once, see :func:`dense_lung_voxels`)."""
        if ci not in self._dense_cache:
            self._dense_cache[ci] = dense_lung_voxels(self.cases[ci].image_hu)
        return self._dense_cache[ci]

    def _background_centre(self, ci: int, rng: np.random.Generator) -> np.ndarray:
        """Centre (voxel, float) of a background patch of case ``ci`` (see the module doc)."""
        cfg = self.config
        if cfg.neg_dense_fraction > 0 and rng.random() < cfg.neg_dense_fraction:
            dense = self._dense(ci)
            if len(dense):
                jitter = rng.uniform(-1, 1, 3) * cfg.pos_jitter * np.asarray(cfg.patch_size)
                return dense[int(rng.integers(len(dense)))] + jitter
        shape = np.asarray(self.cases[ci].geometry.shape_zyx)
        for _ in range(10):
            centre = rng.uniform(0, 1, 3) * shape
            c = centre.astype(int)
            block = np.asarray(self.cases[ci].image_hu[max(0, c[0] - 4) : c[0] + 4, max(0, c[1] - 4) : c[1] + 4, max(0, c[2] - 4) : c[2] + 4])
            if block.size and block.max() >= -950:
                break
        return centre

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """NumPy ``(image [D, H, W] float32, boxes (N, 6), info)`` of item ``index`` (info: case, start, positive)."""
        cfg = self.config
        rng = np.random.default_rng([self.seed, int(index)])
        size = np.asarray(cfg.patch_size)
        positive = bool(self.targets) and rng.random() < cfg.pos_fraction
        if positive:
            ci, bi = self.targets[int(rng.integers(len(self.targets)))]
            box = self.boxes[ci][bi]
            centre = (box[:3] + box[3:]) / 2 + rng.uniform(-1, 1, 3) * cfg.pos_jitter * size
        else:
            ci = int(rng.integers(len(self.cases)))
            centre = self._background_centre(ci, rng)
        case = self.cases[ci]
        start = np.floor(centre - size / 2).astype(int)
        hu = crop_with_padding(case.image_hu, start, size, PAD_HU)
        image = normalize_hu(hu, cfg.hu_window)
        boxes = boxes_in_patch(self.boxes[ci], start, size)
        if self.augment:
            image, boxes = augment(image, boxes, cfg, rng)
        return image, boxes, {"case": ci, "start": tuple(int(s) for s in start), "positive": positive}

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch

        image, boxes, _ = self.sample(index)
        return torch.from_numpy(np.ascontiguousarray(image)[None]), torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 6)


def collate_patches(batch: Sequence[tuple[Any, Any]]) -> tuple[Any, list[Any]]:
    """Stack patch images to ``[B, 1, D, H, W]``; keep the per-patch box tensors in a list."""
    import torch

    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
