"""Reading a data set written by ``lidc-det prepare`` (layout in :mod:`lidc_det.data.prepare`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.data.luna import LunaFinding
from lidc_det.errors import DatasetError
from lidc_det.geometry import VolumeGeometry


@dataclass(frozen=True)
class PreparedNodule:
    """A nodule of a prepared scan (world mm; ``box_voxel`` on the prepared grid, or None
    when the consensus mask vanished at the prepared spacing). ``diameter_mm`` is the
    diameter of the sphere with the consensus volume (LUNA16's convention)."""

    nodule_id: str
    label: int | None
    center_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    n_readers: int
    malignancy_median: float
    characteristics: dict[str, float]
    box_voxel: tuple[float, ...] | None

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> PreparedNodule:
        box = r.get("box_voxel")
        return cls(
            nodule_id=r["nodule_id"],
            label=r.get("label"),
            center_xyz_mm=tuple(r["center_xyz_mm"]),  # type: ignore[arg-type]
            diameter_mm=float(r["diameter_mm"]),
            volume_mm3=float(r["volume_mm3"]),
            n_readers=int(r["n_readers"]),
            malignancy_median=float(r["malignancy_median"]),
            characteristics=dict(r.get("characteristics", {})),
            box_voxel=None if box is None else tuple(box),
        )


@dataclass(frozen=True, eq=False)
class PreparedCase:
    """One prepared scan.

    Attributes:
        image_hu: int16 ``[z, y, x]`` HU on ``geometry`` (memory-mapped, read-only).
        labels: uint8 ``[z, y, x]``; value ``i`` = target nodule with ``label == i``.
        nodules: the targets; ``irrelevant``: other findings (LUNA16 excluded).
    """

    series_uid: str
    patient_id: str
    fold: int
    geometry: VolumeGeometry
    image_hu: np.ndarray
    labels: np.ndarray
    nodules: tuple[PreparedNodule, ...]
    irrelevant: tuple[PreparedNodule, ...]
    folder: Path

    def luna_findings(self) -> tuple[list[LunaFinding], list[LunaFinding]]:
        """The scan's LUNA16 target nodules and excluded (irrelevant) findings, world mm."""
        uid = self.series_uid
        return (
            [LunaFinding(uid, n.center_xyz_mm, n.diameter_mm) for n in self.nodules],
            [LunaFinding(uid, n.center_xyz_mm, n.diameter_mm) for n in self.irrelevant],
        )

    def nodule_mask(self, nodule: PreparedNodule) -> np.ndarray:
        """Full-volume bool mask of one target nodule (from ``masks.npz``, overlap-safe)."""
        out = np.zeros(self.geometry.shape_zyx, dtype=bool)
        if nodule.label is None or nodule.box_voxel is None:
            return out
        with np.load(self.folder / "masks.npz") as z:
            crop = z[f"mask_{nodule.label}"]
            lo = np.asarray(z[f"box_{nodule.label}"][:3], dtype=int)
        out[lo[0] : lo[0] + crop.shape[0], lo[1] : lo[1] + crop.shape[1], lo[2] : lo[2] + crop.shape[2]] = crop
        return out


class PreparedDataset:
    """A prepared data set folder: ``dataset.json`` + ``scans/<uid>/``.

    >>> ds = PreparedDataset("prepared")          # doctest: +SKIP
    >>> case = ds.load_case(ds.series_uids[0])    # doctest: +SKIP
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        path = self.root / "dataset.json"
        if not path.is_file():
            raise DatasetError(f"{self.root}: no dataset.json (not written by `lidc-det prepare`?)")
        try:
            self.info: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err})") from err
        from lidc_det.data.prepare import FORMAT_VERSION

        if self.info.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{path}: format version {self.info.get('format_version')} != {FORMAT_VERSION}; re-run prepare"
            )
        self._scans = {s["series_uid"]: s for s in self.info["scans"]}

    @property
    def series_uids(self) -> list[str]:
        return list(self._scans)

    @property
    def folds(self) -> dict[str, int]:
        """``{patient_id: fold}``."""
        return {s["patient_id"]: int(s["fold"]) for s in self._scans.values()}

    def scans_in_folds(self, folds: set[int] | list[int]) -> list[str]:
        wanted = set(folds)
        return [uid for uid, s in self._scans.items() if int(s["fold"]) in wanted]

    def resolve_scan(self, key: str) -> str:
        """SeriesInstanceUID for a UID or a patient id (error if none or several)."""
        if key in self._scans:
            return key
        hits = [uid for uid, s in self._scans.items() if s["patient_id"] == key]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise DatasetError(f"{self.root}: no scan {key!r}")
        raise DatasetError(f"{self.root}: patient {key} has {len(hits)} scans; give a SeriesInstanceUID: {hits}")

    def load_case(self, series_uid: str) -> PreparedCase:
        if series_uid not in self._scans:
            raise DatasetError(f"{self.root}: no scan {series_uid!r}")
        folder = self.root / "scans" / series_uid
        try:
            meta = json.loads((folder / "meta.json").read_text())
            image = np.load(folder / "image.npy", mmap_mode="r")
            labels = np.load(folder / "labels.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DatasetError(f"{folder}: unreadable prepared scan ({err}); re-run prepare") from err
        geom = VolumeGeometry.from_dict(meta["geometry"])
        if image.shape != geom.shape_zyx or labels.shape != geom.shape_zyx:
            raise DatasetError(f"{folder}: array shapes {image.shape}/{labels.shape} != geometry {geom.shape_zyx}")
        return PreparedCase(
            series_uid=series_uid,
            patient_id=meta["patient_id"],
            fold=int(self._scans[series_uid]["fold"]),
            geometry=geom,
            image_hu=image,
            labels=labels,
            nodules=tuple(PreparedNodule.from_record(r) for r in meta["nodules"]),
            irrelevant=tuple(PreparedNodule.from_record(r) for r in meta["irrelevant"]),
            folder=folder,
        )
