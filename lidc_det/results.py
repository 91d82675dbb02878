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
