"""Typed results passed between stages (frozen dataclasses; units in field names)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Detections:
    """Nodule candidates in one scan, best first is not required.

    Attributes:
        series_uid: SeriesInstanceUID of the scan.
        centers_xyz_mm: ``(N, 3)`` world LPS centres (x, y, z) in mm.
        diameters_mm: ``(N,)`` estimated diameters in mm (0 where unknown).
        scores: ``(N,)`` confidence, higher is more likely a nodule.
        boxes_voxel: optional ``(N, 6)`` voxel boxes (see :mod:`lidc_det.boxes`).
    """

    series_uid: str
    centers_xyz_mm: np.ndarray
    diameters_mm: np.ndarray
    scores: np.ndarray
    boxes_voxel: np.ndarray | None = None

    def __post_init__(self) -> None:
        c = np.asarray(self.centers_xyz_mm, dtype=np.float64).reshape(-1, 3)
        n = c.shape[0]
        d = np.asarray(self.diameters_mm, dtype=np.float64).reshape(-1)
        s = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if d.shape != (n,) or s.shape != (n,):
            raise ValueError(
                f"Detections: {n} centres but {d.shape[0]} diameters and {s.shape[0]} scores"
            )
        object.__setattr__(self, "centers_xyz_mm", c)
        object.__setattr__(self, "diameters_mm", d)
        object.__setattr__(self, "scores", s)
        if self.boxes_voxel is not None:
            b = np.asarray(self.boxes_voxel, dtype=np.float64).reshape(-1, 6)
            if b.shape[0] != n:
                raise ValueError(f"Detections: {n} centres but {b.shape[0]} boxes")
            object.__setattr__(self, "boxes_voxel", b)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def top_k(self, k: int) -> Detections:
        """The ``k`` highest-scoring candidates, sorted by descending score."""
        order = np.argsort(-self.scores, kind="stable")[:k]
        return Detections(
            self.series_uid,
            self.centers_xyz_mm[order],
            self.diameters_mm[order],
            self.scores[order],
            None if self.boxes_voxel is None else self.boxes_voxel[order],
        )


@dataclass(frozen=True, eq=False)
class NoduleMask:
    """One segmented nodule (stage 2 output), stored as a crop of the full volume.

    Attributes:
        series_uid: SeriesInstanceUID of the scan.
        box_voxel: ``(6,)`` integer voxel box ``z0, y0, x0, z1, y1, x1`` (exclusive
            ends, see :mod:`lidc_det.boxes`) of ``mask`` in the volume it belongs to.
        mask: ``bool [z1-z0, y1-y0, x1-x0]`` nodule voxels inside the box.
        spacing_zyx_mm: voxel spacing of that volume (mm).
        center_xyz_mm: world LPS centre (x, y, z) of the mask (mm).
        volume_mm3: mask volume (mm^3).
        max_diameter_mm: largest in-plane (axial) extent of the mask (mm).
        mean_hu: mean intensity of the image under the mask (HU).
        score: the candidate's detection score, or the segmentation confidence.
        source: what the mask came from, e.g. ``"detection"`` or ``"ground_truth"``.
    """

    series_uid: str
    box_voxel: np.ndarray
    mask: np.ndarray
    spacing_zyx_mm: tuple[float, float, float]
    center_xyz_mm: tuple[float, float, float]
    volume_mm3: float
    max_diameter_mm: float
    mean_hu: float
    score: float = 1.0
    source: str = "detection"

    def __post_init__(self) -> None:
        box = np.asarray(self.box_voxel, dtype=np.int64).reshape(6)
        mask = np.asarray(self.mask, dtype=bool)
        size = tuple(int(v) for v in box[3:] - box[:3])
        if mask.shape != size:
            raise ValueError(f"NoduleMask: mask shape {mask.shape} does not match box size {size}")
        object.__setattr__(self, "box_voxel", box)
        object.__setattr__(self, "mask", mask)

    @property
    def empty(self) -> bool:
        """True when the segmentation found no nodule voxel."""
        return not bool(self.mask.any())

    def full_mask(self, shape_zyx: tuple[int, int, int]) -> np.ndarray:
        """The mask pasted into a ``bool`` volume of ``shape_zyx`` (parts outside are cut)."""
        out = np.zeros(shape_zyx, dtype=bool)
        lo = np.maximum(self.box_voxel[:3], 0)
        hi = np.minimum(self.box_voxel[3:], np.asarray(shape_zyx))
        if np.any(hi <= lo):
            return out
        src = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, self.box_voxel[:3]))
        dst = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        out[dst] = self.mask[src]
        return out


@dataclass(frozen=True)
class MalignancyScore:
    """Stage 3 output for one nodule.

    Attributes:
        series_uid: SeriesInstanceUID of the scan.
        center_xyz_mm: world LPS centre (x, y, z) of the nodule (mm).
        probability: calibrated P(malignant) in [0, 1].
        model: name of the model / feature set that produced it.
        nodule_id: optional identifier (e.g. the LIDC cluster id).
    """

    series_uid: str
    center_xyz_mm: tuple[float, float, float]
    probability: float
    model: str
    nodule_id: str | None = None

    def __post_init__(self) -> None:
        p = float(self.probability)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"MalignancyScore: probability {p} outside [0, 1]")
        object.__setattr__(self, "probability", p)


@dataclass(frozen=True, eq=False)
class Rejection:
    """Stage-2 false-positive rejection of one scan's candidates: which were kept, and why.

    Attributes:
        series_uid: SeriesInstanceUID of the scan.
        kept: ``bool [N]``: candidate ``i`` passed (kept at its full score).
        scores: ``(N,)`` scores after rejection: the detection score where kept; where
            rejected, the score times ``factor`` (``mode="downweight"``) or unchanged
            (``mode="drop"``, the candidate leaves the list).
        reasons: one line per candidate, e.g. ``"mask 123 mm3 >= 20 mm3"``,
            ``"empty mask"`` or ``"mask 5 mm3 < 20 mm3"``.
        min_volume_mm3: the threshold applied (mm^3).
        mode: ``"drop"`` or ``"downweight"``.
    """

    series_uid: str
    kept: np.ndarray
    scores: np.ndarray
    reasons: tuple[str, ...]
    min_volume_mm3: float
    mode: str = "drop"

    def __post_init__(self) -> None:
        k = np.asarray(self.kept, dtype=bool).reshape(-1)
        s = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if s.shape != k.shape or len(self.reasons) != k.shape[0]:
            raise ValueError(f"Rejection: {k.shape[0]} flags, {s.shape[0]} scores, {len(self.reasons)} reasons")
        if self.mode not in ("drop", "downweight"):
            raise ValueError(f"Rejection: mode must be 'drop' or 'downweight', got {self.mode!r}")
        object.__setattr__(self, "kept", k)
        object.__setattr__(self, "scores", s)
        object.__setattr__(self, "reasons", tuple(str(r) for r in self.reasons))

    def __len__(self) -> int:
        return int(self.kept.shape[0])

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    def kept_indices(self) -> np.ndarray:
        """``int [K]``: the candidates that stay in the list (``drop``: the kept ones; ``downweight``: all)."""
        return np.flatnonzero(self.kept) if self.mode == "drop" else np.arange(len(self))

    def apply(self, detections: Detections) -> Detections:
        """The candidates after rejection (``drop``: only the kept ones, in order; ``downweight``:
        all of them with the rejected ones' scores lowered)."""
        if len(detections) != len(self) or detections.series_uid != self.series_uid:
            raise ValueError(f"Rejection of {len(self)} candidates of {self.series_uid} applied to "
                             f"{len(detections)} of {detections.series_uid}")
        idx = self.kept_indices()
        boxes = None if detections.boxes_voxel is None else detections.boxes_voxel[idx]
        return Detections(detections.series_uid, detections.centers_xyz_mm[idx], detections.diameters_mm[idx],
                          self.scores[idx], boxes)
