"""``lidc-det transfer CONFIG``: train on generated data only, score on real CT.

Every other figure of the project is measured on synthetic twins. This benchmark asks
the question that matters: does a model trained on what we can generate work on real
scans? One run:

1. **Training data, generated only.** LIDC twins of the config's patients (synthetic
   anatomy, real reader contours), plus optional *semi-real* scans: real readers'
   nodules inserted into real chest backgrounds (:mod:`lidc_det.synthetic.semireal`),
   a background either a scan that is not evaluated (``whole``) or one lung of an
   evaluated scan, cut at x = 0 or its other side replaced by the mirror image of the
   trained lung (``other_side: cut`` / ``mirror``), whose other lung is then the only region
   scored on that scan.
2. **Stage 1** (any registered detector) is trained on the twin training scans plus the
   semi-real scans, its checkpoint chosen on the twin validation scans.
3. **Scoring on real DICOM** (``--dicom-root``, default ``../shared/data/lidc-idri``):
   per real nodule the rank of its first hit and the false positives above it; FROC/CPM
   over the real scans; FP/scan on the real scans at the score threshold that gives
   ``operating_sensitivity`` on the twin validation scans; 3-plane PNGs of the top
   false positives and of every real nodule.
4. **Semi-real yardstick.** Nodules of other patients inserted into a real scan's lung
   that nothing was trained on (the left lung of the shared LIDC-IDRI-0001 by default):
   a FROC with tens of nodules on real anatomy, real vessels and real noise. Its targets are
   the inserted nodules; the background's own findings are irrelevant there (the real nodule
   would otherwise count once per copy; it is scored on the real scan itself).
5. **Twin test CPM** on the held-out twin fold (to show the twin score does not fall).

The run refuses configs that would score what was trained on: evaluation patients among
the twins or the nodule sources, yardstick sources among the training sources, an
evaluated series used whole as a background, a yardstick region that was trained on.

Outputs in ``--out``: ``transfer.json`` (config, git revision, device, wall times, every
figure), ``report.md`` / ``report.html``, PNGs, LUNA16 candidate CSVs (twin test, yardstick,
real), the detector's checkpoints. Reruns reuse
finished twins, semi-real scans and training (and blob-lgbm's cached candidates, in ``stage1/features``;
``--scheduler local:N`` extracts them in parallel first).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import DataSpec
from benchmarks.harness import DetectorSpec
from benchmarks.second_look import SecondLookStepConfig
from lidc_det.config import ConfigFileError
from lidc_det.errors import LidcDetError
from stage2_segment.config import SegmenterConfig

DEFAULT_DICOM_ROOT = Path("../shared/data/lidc-idri")
_OPPOSITE = {"right": "left", "left": "right"}


class TransferProtocolError(LidcDetError):
    """The config would score a region or patient it trained on (the message says which)."""


@dataclass(frozen=True)
class PatientRange:
    """LIDC patients ``first`` .. ``last`` (inclusive, by patient id), slice thickness <= 2.5 mm."""

    first: str
    last: str

    def series_uids(self) -> list[str]:
        from lidc_det.data.lidc import list_scans

        return [uid for pid, uid in list_scans(max_slice_thickness_mm=2.5) if self.first <= pid <= self.last]

    def contains(self, patient_id: str) -> bool:
        return self.first <= patient_id <= self.last


@dataclass(frozen=True)
class BackgroundSpec:
    """A real CT that nodules are inserted into (see :class:`lidc_det.synthetic.semireal.SemiRealSpec`)."""

    name: str
    dicom: Path
    region: str = "whole"
    other_side: str = "keep"
    copies: int = 4
    nodules_per_copy: int = 6
    crop_margin_mm: float = 15.0
    crop_in_plane: bool = True

    def semireal(self, sources: PatientRange, seed: int, spacing_zyx: tuple[float, float, float]) -> Any:
        """The :class:`~lidc_det.synthetic.semireal.SemiRealSpec` of this background, nodules from ``sources``."""
        from lidc_det.synthetic.semireal import SemiRealSpec

        return SemiRealSpec(
            self.name, Path(self.dicom), region=self.region, other_side=self.other_side, copies=self.copies,
            nodules_per_copy=self.nodules_per_copy, source_scans=tuple(sources.series_uids()), seed=seed,
            spacing_zyx=spacing_zyx, crop_margin_mm=self.crop_margin_mm, crop_in_plane=self.crop_in_plane,
        )


@dataclass(frozen=True)
class TwinBackgroundSpec:
    """Reader nodules inserted into the training twins: procedural, no real pixel.

    The twin fits its lungs around each nodule with a margin, so its nodules are almost never
    juxtapleural, and they are juxtavascular only by chance; real ones often are both. This inserts
    nodules of ``train_sources`` into the DICOM of the first ``n_twins`` training twins (the split's
    training twins, then ``train_twins``) with :func:`lidc_det.synthetic.semireal.make_semireal_dataset`,
    placed by ``placement_weights`` (parenchymal, juxtapleural, juxtavascular); each twin keeps its own
    nodules as targets. ``subsolid_share``: the share of nodules drawn from the subsolid sources only
    (median texture rating <= 2, ground glass: rare in LIDC, so in the twins). ``wall_bulges_per_copy``: soft-tissue
    bulges painted on the lung border of each copy as negatives (the twin's chest wall is smooth; a real one
    is not, and a detector taught juxtapleural nodules takes its bumps for nodules). The copies train
    stage 1 (and stage 2) beside the twins.
    """

    n_twins: int = 20
    copies: int = 3
    nodules_per_copy: int = 5
    placement_weights: tuple[float, float, float] = (0.0, 0.6, 0.4)
    subsolid_share: float = 0.0
    wall_bulges_per_copy: int = 0

    def __post_init__(self) -> None:
        if self.wall_bulges_per_copy < 0:
            raise ConfigFileError(f"twin_backgrounds.wall_bulges_per_copy must be >= 0, got {self.wall_bulges_per_copy}")
        if not 0.0 <= self.subsolid_share <= 1.0:
            raise ConfigFileError(f"twin_backgrounds.subsolid_share must be in [0, 1], got {self.subsolid_share}")
        w = tuple(float(v) for v in self.placement_weights)
        if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
            raise ConfigFileError(f"twin_backgrounds.placement_weights must be 3 weights >= 0, not all 0; got {w}")
        object.__setattr__(self, "placement_weights", w)
        if self.n_twins < 1 or self.copies < 1 or self.nodules_per_copy < 1:
            raise ConfigFileError("twin_backgrounds: n_twins, copies and nodules_per_copy must be >= 1")


@dataclass(frozen=True)
class TransferConfig:
    """One transfer benchmark (one YAML file, see ``benchmarks/transfer.yaml``).

    Attributes:
        name: label of the run.
        twins: the twin data (train / val / test folds of synthetic scans).
        detector: the stage-1 detector (registry name + kwargs).
        backgrounds: semi-real training scans (empty: twins only).
        train_sources: patients whose nodules are inserted into the training backgrounds (real or twin).
        twin_backgrounds: optional insertion of ``train_sources`` nodules into the training twins
            (:class:`TwinBackgroundSpec`; procedural, no real pixel).
        yardstick: the semi-real yardstick background (a region nothing is trained on).
        yardstick_sources: patients whose nodules go into the yardstick (disjoint from the rest).
        extra_yardsticks: more semi-real yardsticks on other real backgrounds (nodules of the
            same ``yardstick_sources``, other draws), scored and recorded beside the first,
            under the same rule: no region of them is trained on. Another scanner and body
            checks that a change does not only fit one real scan.
        segmentation: optional stage 2 (nnU-Net crop segmenter), trained on the same scans;
            scored on the real nodules (Dice vs consensus, model in each reader's place vs the
            readers' own leave-one-out Dice, volume error), the yardstick and the twin test.
        segmentation_twins: optional more twins for stage 2 only (every scan of them trains
            it; stage 1 never sees them). Their patients must be disjoint from the twins'
            (so the twin test stays unseen), the evaluation scans and the yardstick sources.
        train_twins: optional more twins for both stages (every scan of them trains stage 1
            and stage 2; the twins' validation and test folds stay as they are, so the twin
            test is comparable with runs without them). Same patient rules as
            ``segmentation_twins``, and disjoint from them.
        second_look: optional learned false-positive reduction after stage 2
            (:class:`benchmarks.second_look.SecondLookStepConfig`): LightGBM on features of each
            top candidate's stage-2 mask and crop (shape, HU, vesselness) plus the detector's
            score, trained on the candidates of a pool of twins that neither stage trained on
            (``second_look.data``; same patient rules as ``train_twins``), then applied to the
            top ``max_candidates_per_scan`` candidates of the twin test, the yardsticks and the
            real scans. Recorded beside the detector's figures on the same top candidates.
        second_look_backgrounds: semi-real scans (nodules of ``train_sources`` inserted into real
            backgrounds) added to the second look's pool only: stage 1 and stage 2 never see them, the
            second look learns real vessels and walls as negatives. Trained regions under the same rules
            as ``backgrounds`` (never scored; a one-lung background restricts scoring to the other lung).
        operating_sensitivity: twin-validation sensitivity that fixes the reported operating point.
        n_bootstrap: bootstrap replicates for CIs.
        n_fp_pngs: real false positives shown (highest scores first).
        seed: seed of the semi-real data and the bootstrap.
    """

    name: str
    twins: DataSpec
    detector: DetectorSpec
    yardstick: BackgroundSpec
    yardstick_sources: PatientRange
    extra_yardsticks: tuple[BackgroundSpec, ...] = ()
    backgrounds: tuple[BackgroundSpec, ...] = ()
    train_sources: PatientRange | None = None
    twin_backgrounds: TwinBackgroundSpec | None = None
    segmentation: SegmenterConfig | None = None
    segmentation_twins: DataSpec | None = None
    train_twins: DataSpec | None = None
    second_look: SecondLookStepConfig | None = None
    second_look_backgrounds: tuple[BackgroundSpec, ...] = ()
    operating_sensitivity: float = 0.8
    n_bootstrap: int = 1000
    n_fp_pngs: int = 10
    seed: int = 0
    notes: str = ""

    def __post_init__(self) -> None:
        if self.segmentation_twins is not None and (self.segmentation is None or not self.segmentation_twins.synthetic):
            raise ConfigFileError("segmentation_twins needs segmentation, and source: twin")
        if self.train_twins is not None and not self.train_twins.synthetic:
            raise ConfigFileError("train_twins needs source: twin")
        if self.second_look is not None and (self.segmentation is None or not self.second_look.data.synthetic):
            raise ConfigFileError("second_look needs segmentation (its features come from stage-2 masks), and source: twin")
        if (self.backgrounds or self.second_look_backgrounds or self.twin_backgrounds is not None) and self.train_sources is None:
            raise ConfigFileError("backgrounds, second_look_backgrounds and twin_backgrounds need train_sources "
                                  "(the patients whose nodules are inserted)")
        if self.second_look_backgrounds and self.second_look is None:
            raise ConfigFileError("second_look_backgrounds need a second_look section (they join its pool)")
        look_names = [b.name for b in self.second_look_backgrounds]
        if set(look_names) & {b.name for b in self.backgrounds} or len(set(look_names)) != len(look_names):
            raise ConfigFileError(f"second_look_backgrounds need names of their own, got {look_names}")
        names = [b.name for b in (self.yardstick, *self.extra_yardsticks)]
        if len(set(names)) != len(names):
            raise ConfigFileError(f"yardstick names must be unique, got {names}")
        for b in (self.yardstick, *self.extra_yardsticks, *self.backgrounds, *self.second_look_backgrounds):
            if b.other_side not in ("keep", "cut", "mirror"):
                raise ConfigFileError(f"{b.name}: other_side must be keep, cut or mirror, got {b.other_side!r}")
            if b.region == "whole" and b.other_side != "keep":
                raise ConfigFileError(f"{b.name}: other_side {b.other_side!r} needs region left or right")
        if not 0.0 < self.operating_sensitivity <= 1.0:
            raise ConfigFileError(f"operating_sensitivity must be in (0, 1], got {self.operating_sensitivity}")


def load_transfer_config(path: Path) -> TransferConfig:
    """Read and check a transfer benchmark YAML."""
    from lidc_det.config import load_yaml_config

    return load_yaml_config(TransferConfig, path)


# ------------------------------------------------------------------ protocol
@dataclass(frozen=True)
class EvalScan:
    """A real scan to score and the region of it that may be scored."""

    folder: Path
    series_uid: str
    patient_id: str
    region: str


def _series_uid_of(folder: Path) -> tuple[str, str]:
    from lidc_det.io.dicom import find_series

    found = find_series(Path(folder))
    if len(found) != 1:
        raise TransferProtocolError(f"{folder}: expected one DICOM series, found {len(found)}")
    return found[0].series_uid, found[0].patient_id


def plan_protocol(
    cfg: TransferConfig,
    dicom_root: Path,
    twin_patients: list[str],
    segmentation_patients: Sequence[str] = (),
    train_patients: Sequence[str] = (),
    second_look_patients: Sequence[str] = (),
) -> tuple[list[EvalScan], str, dict[str, Any]]:
    """The evaluation scans with their scored regions, the yardstick's scored region, and a
    record of the protocol; raises :class:`TransferProtocolError` on any overlap.

    ``segmentation_patients``: the patients of the stage-2-only twins (``segmentation_twins``);
    ``train_patients``: those of the extra training twins of both stages (``train_twins``);
    ``second_look_patients``: those of the second look's training pool (``second_look.data``).
    None of them may hold twins' patients (the twin test would be seen), each other's,
    evaluation patients or yardstick sources."""
    from itertools import combinations

    from lidc_det.io.dicom import find_series

    extras = (("segmentation_twins", segmentation_patients), ("train_twins", train_patients),
              ("second_look.data", second_look_patients))
    for name, extra in extras:
        shared = sorted(set(extra) & set(twin_patients))
        if shared:
            raise TransferProtocolError(f"{name} share patients with the twins: {shared}")
    for (name_a, a), (name_b, b) in combinations(extras, 2):
        shared = sorted(set(a) & set(b))
        if shared:
            raise TransferProtocolError(f"{name_a} share patients with {name_b}: {shared}")
    twin_patients = sorted(set(twin_patients).union(*(set(e) for _, e in extras)))

    series = find_series(Path(dicom_root))
    if not series:
        raise TransferProtocolError(f"{dicom_root}: no DICOM series to evaluate")
    trained: dict[str, str] = {}  # series uid -> region trained on
    for b in (*cfg.backgrounds, *cfg.second_look_backgrounds):
        uid, _ = _series_uid_of(b.dicom)
        region = "whole" if b.other_side == "keep" else b.region
        if trained.get(uid, region) != region:
            region = "whole"  # both lungs of one scan trained on
        trained[uid] = region
    evals: list[EvalScan] = []
    for s in series:
        pid = s.patient_id
        if pid in twin_patients:
            raise TransferProtocolError(f"evaluation patient {pid} is among the training twins")
        if cfg.train_sources is not None and cfg.train_sources.contains(pid):
            raise TransferProtocolError(f"evaluation patient {pid} is among the training nodule sources {cfg.train_sources}")
        if cfg.yardstick_sources.contains(pid):
            raise TransferProtocolError(f"evaluation patient {pid} is among the yardstick nodule sources {cfg.yardstick_sources}")
        region = "whole"
        if s.series_uid in trained:
            if trained[s.series_uid] == "whole":
                raise TransferProtocolError(
                    f"{s.folder}: this evaluation series is a whole training background; use region right/left "
                    "with other_side cut or mirror, or evaluate elsewhere"
                )
            region = _OPPOSITE[trained[s.series_uid]]
        evals.append(EvalScan(Path(s.folder), s.series_uid, pid, region))
    ts = cfg.train_sources
    ys = cfg.yardstick_sources
    if ts is not None and not (ys.last < ts.first or ts.last < ys.first):
        raise TransferProtocolError(f"yardstick sources {ys} overlap the training sources {ts}")
    if any(ys.contains(p) for p in twin_patients):
        raise TransferProtocolError(f"yardstick sources {ys} overlap the training twins")
    yard: dict[str, dict[str, str]] = {}
    for y in (cfg.yardstick, *cfg.extra_yardsticks):
        y_uid, _ = _series_uid_of(y.dicom)
        if y_uid in trained:
            t = trained[y_uid]
            if t == "whole" or y.region in ("whole", t):
                raise TransferProtocolError(f"yardstick region {y.region!r} of {y.dicom} overlaps the trained region {t!r}")
        yard[y.name] = {"series_uid": y_uid, "scored_region": y.region}
    y_region = cfg.yardstick.region
    protocol = {
        "trained_backgrounds": {uid: r for uid, r in trained.items()},
        "evaluation": [{"series_uid": e.series_uid, "patient_id": e.patient_id, "scored_region": e.region} for e in evals],
        "yardstick": yard[cfg.yardstick.name],
        "extra_yardsticks": {b.name: yard[b.name] for b in cfg.extra_yardsticks},
        "stage2_only_twin_patients": list(segmentation_patients),
        "extra_training_twin_patients": list(train_patients),
        "second_look_pool_patients": list(second_look_patients),
        "label": _protocol_label(cfg, trained),
    }
    return evals, y_region, protocol


def _protocol_label(cfg: TransferConfig, trained: dict[str, str]) -> str:
    def named(backgrounds: Sequence[BackgroundSpec]) -> str:
        how = {"cut": ", cut at x = 0", "mirror": ", mirrored onto the other side"}
        return ", ".join(f"{b.name} ({'one lung: ' + b.region + how[b.other_side] if b.other_side != 'keep' else 'whole scan'})"
                         for b in backgrounds)

    if not cfg.backgrounds:
        what = "twins and reader nodules inserted into twins" if cfg.twin_backgrounds is not None else "twins"
        if not cfg.second_look_backgrounds:
            return f"procedural only: {what}, no real pixels in training"
        return (f"stages 1-2 procedural only: {what}, no real pixels in stages 1-2; "
                f"second look: twins + real-background insertion: {named(cfg.second_look_backgrounds)}")
    label = "twins + real-background insertion: " + named(cfg.backgrounds)
    if cfg.second_look_backgrounds:
        label += "; second look also: " + named(cfg.second_look_backgrounds)
    return label


# ------------------------------------------------------------------ scoring helpers
def _restrict(det: Any, region: str) -> Any:
    from lidc_det.results import Detections
    from lidc_det.synthetic.semireal import in_region

    keep = in_region(det.centers_xyz_mm, region) if len(det) else np.zeros(0, bool)
    return Detections(
        det.series_uid, det.centers_xyz_mm[keep], det.diameters_mm[keep], det.scores[keep],
        None if det.boxes_voxel is None else det.boxes_voxel[keep],
    )


def _findings_in(findings: list[Any], region: str) -> list[Any]:
    from lidc_det.synthetic.semireal import in_region

    return [f for f in findings if in_region(np.asarray([f.center_xyz_mm]), region)[0]]


def read_real_scan(e: EvalScan) -> tuple[Any, list[Any], list[Any], list[Any]]:
    """A real evaluation scan: its volume, its annotated nodules in ``e.region`` (the scored ones), their
    LUNA16 targets and the scan's irrelevant findings (:class:`~lidc_det.data.luna.LunaFinding`): pylidc's
    clusters that are not targets, and, as LUNA16 counts them, every reader's nodule < 3 mm and non-nodule mark of
    the LIDC XML beside the DICOM files (:mod:`lidc_det.data.lidc_xml`; diameter -1, read as 10 mm), when there is
    one."""
    from lidc_det.data.lidc import load_annotations
    from lidc_det.data.lidc_xml import series_reader_marks
    from lidc_det.data.luna import LunaFinding
    from lidc_det.io.dicom import read_series

    vol = read_series(e.folder, series_uid=e.series_uid)
    ann = load_annotations(vol.series_uid, vol.geometry)
    scored = _findings_in(list(ann.nodules), e.region)
    tg = [LunaFinding(vol.series_uid, n.center_xyz_mm, n.equivalent_diameter_mm) for n in scored]
    ir = [LunaFinding(vol.series_uid, n.center_xyz_mm, n.equivalent_diameter_mm) for n in ann.irrelevant]
    ir += [LunaFinding(vol.series_uid, m.center_xyz_mm, -1.0)
           for m in series_reader_marks(e.folder, vol.series_uid, vol.geometry)]
    return vol, scored, tg, ir


def _froc_dict(froc: Any) -> dict[str, Any]:
    return {
        "cpm": round(froc.cpm, 4),
        "cpm_ci": [round(froc.cpm_ci_low, 4), round(froc.cpm_ci_high, 4)],
        "sensitivity": {str(f): round(s, 4) for f, s in zip(froc.operating_fps, froc.operating_sensitivity)},
        "n_scans": froc.n_scans,
        "n_nodules": froc.n_nodules,
        "n_tp_nodules": froc.n_tp_nodules,
    }


def _history_seconds(stage1_dir: Path) -> float | None:
    """Wall seconds of all training epochs in the stage-1 ``history.csv`` files under ``stage1_dir``
    (one per ensemble member; a resumed run's ``seconds`` only hold the resume, these hold the
    original training time)."""
    import csv

    paths = sorted(Path(stage1_dir).rglob("history.csv"))
    if not paths:
        return None
    total = 0.0
    for path in paths:
        with open(path, newline="") as f:
            total += sum(float(r["seconds"]) for r in csv.DictReader(f))
    return round(total, 1)


def _yardstick_findings(ds: Any) -> tuple[list[Any], list[Any]]:
    """Targets = the inserted nodules only; the background's own findings are irrelevant (the real
    nodule is in every copy: counting it as a target would weigh one real nodule many times;
    its rank is reported on the real scan itself)."""
    from lidc_det.data.luna import LunaFinding

    targets: list[Any] = []
    irrelevant: list[Any] = []
    for uid in ds.series_uids:
        case = ds.load_case(uid)
        for n in case.nodules + case.irrelevant:
            f = LunaFinding(uid, n.center_xyz_mm, n.diameter_mm)
            (targets if ":inserted" in n.nodule_id else irrelevant).append(f)
    return targets, irrelevant


def _score_yardstick(detector: Any, ds: Any, region: str, cfg: TransferConfig, progress: bool,
                     cache: Path | None = None) -> tuple[Any, ...]:
    """Detections (restricted to ``region``), targets, irrelevant findings and FROC of one yardstick
    (``cache``: see :func:`_detect_prepared`)."""
    from lidc_det.metrics.froc import evaluate_detections

    dets, _, _ = _detect_prepared(detector, ds, ds.series_uids, progress, cache)
    dets = [_restrict(d, region) for d in dets]
    targets, irrelevant = _yardstick_findings(ds)
    targets = _findings_in(targets, region)
    froc = evaluate_detections(targets, dets, excluded=irrelevant, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    return dets, targets, irrelevant, froc


def _top_scores(dets: list[Any]) -> list[float | None]:
    """Highest score per scan (None for a scan without candidates)."""
    return [round(float(d.scores.max()), 4) if len(d) else None for d in dets]


def _write_candidates(path: Path, dets: list[Any]) -> None:
    from lidc_det.data.luna import candidates_from_detections, write_candidates

    write_candidates(path, [c for d in dets for c in candidates_from_detections(d)])


def _fp_at(dets: list[Any], targets: list[Any], irrelevant: list[Any], threshold: float | None) -> float | None:
    from lidc_det.metrics.ranks import candidate_kinds

    if threshold is None or not dets:
        return None
    n = 0
    for d in dets:
        top = d.top_k(100)
        kinds = candidate_kinds(top, targets, irrelevant)
        n += int(np.sum((kinds == "fp") & (top.scores >= threshold)))
    return round(n / len(dets), 2)


def _cases_key(cases: list[Any]) -> list[tuple[str, str]]:
    """``(series uid, sha256 of meta.json)`` per case, sorted: regenerated data under the same
    uids (other insertion settings) gives another key, so a shared stage-2 model is never stale."""
    import hashlib

    return sorted((c.series_uid, hashlib.sha256((Path(c.folder) / "meta.json").read_bytes()).hexdigest()) for c in cases)


def _detect_prepared(
    detector: Any, ds: Any, uids: Any, progress: bool, cache: Path | None = None,
) -> tuple[list[Any], list[Any], list[Any]]:
    """Detections, LUNA16 targets and excluded findings of the scans ``uids`` of ``ds``. With a ``cache``
    (blob-lgbm, :func:`_candidate_cache`) each scan's candidates are read from it (:func:`_cached_predict`),
    else ``detector.predict`` runs on each scan (:func:`benchmarks.detection.detect_scans`)."""
    from benchmarks.detection import detect_scans

    predict_case = None if cache is None else (lambda case: _cached_predict(detector, case, cache))
    dets, targets, irrelevant, _ = detect_scans("transfer", detector, ds, list(uids), progress=progress,
                                                predict_case=predict_case)
    return dets, targets, irrelevant


# ------------------------------------------------------------------ blob-lgbm candidate cache
def _candidate_cache(detector: Any, out_dir: Path) -> Path | None:
    """Where a blob-lgbm detector's (or blob-lgbm-cnn's) candidates are cached in a run: the folder its
    :meth:`fit` writes the training scans' to (``out_dir/stage1/features``), so that scoring reads them too and a
    resumed run extracts nothing again; None for any other detector (scored by ``predict``)."""
    from stage1_detect.blob import BlobDetector
    from stage1_detect.blob_cnn import BlobCNNDetector

    return Path(out_dir) / "stage1" / "features" if isinstance(detector, (BlobDetector, BlobCNNDetector)) else None


def _cached_predict(detector: Any, case: Any, cache: Path | None) -> Any:
    """``detector.predict`` of one scan (``case``: ``series_uid``, ``image_hu``, ``geometry``); with a ``cache``
    (blob-lgbm, blob-lgbm-cnn) its candidates are read from there, or extracted and written there, then scored: the
    same detections, as ``predict`` is ``candidates`` then ``score_candidates``."""
    from stage1_detect.blob_cnn import BlobCNNDetector

    if cache is None:
        return detector.predict(np.asarray(case.image_hu, dtype=np.float32), case.geometry, series_uid=case.series_uid)
    cand = detector.cached_candidates(case, cache)
    if isinstance(detector, BlobCNNDetector):
        return detector.score_candidates(cand, np.asarray(case.image_hu), case.geometry, series_uid=case.series_uid)
    return detector.score_candidates(cand, series_uid=case.series_uid)


def _real_case(vol: Any) -> Any:
    """A real scan read by :func:`read_real_scan` as a case (``series_uid``, ``image_hu``, ``geometry``)."""
    from types import SimpleNamespace

    return SimpleNamespace(series_uid=vol.series_uid, image_hu=vol.hu, geometry=vol.geometry)


def _read_real_case(e: EvalScan) -> Any:
    """The real evaluation scan ``e`` read from its DICOM as a case (:func:`_real_case`)."""
    return _real_case(read_real_scan(e)[0])


def warm_transfer_cache(detector: Any, data: TransferData, cache: Path, *, scheduler: str, progress: bool = True) -> Any:
    """Extract the blob-lgbm candidates of every scan a transfer run reads into ``cache``, one task per scan on
    ``scheduler`` (:func:`stage1_detect.blob.warm_candidate_cache`): the training scans, the twin validation and
    test scans, every yardstick's and the real evaluation scans. Blurred training copies (``train_blur_copies``)
    are left to :meth:`~stage1_detect.blob.BlobDetector.fit`. Returns the :class:`~lidc_det.cluster.RunReport`."""
    from dataclasses import asdict
    from functools import partial

    from stage1_detect import blob

    twin = [data.ds_twin.load_case(u) for u in (*data.split.val, *data.split.test)]
    yards = [ds.load_case(u) for ds in (data.ds_yard, *data.ds_extra) for u in ds.series_uids]
    real = [blob.LazyCase(e.series_uid, partial(_read_real_case, e)) for e in data.evals]  # read by the worker
    return blob.warm_candidate_cache(asdict(detector.config), [*data.train_cases(), *twin, *yards, *real], cache,
                                     scheduler=scheduler, progress=progress)


def with_seeds(cfg: TransferConfig, train_seed: int | None, stage2_seed: int | None) -> TransferConfig:
    """``cfg`` with the detector's ``seed`` kwarg set to ``train_seed`` and ``segmentation.seed`` set to
    ``stage2_seed`` (each unchanged when None). A stage-2 seed without a ``segmentation`` section is
    refused (:class:`ConfigFileError`)."""
    if train_seed is not None:
        det = cfg.detector
        cfg = replace(cfg, detector=replace(det, kwargs={**det.kwargs, "seed": int(train_seed)}))
    if stage2_seed is not None:
        if cfg.segmentation is None:
            raise ConfigFileError(f"{cfg.name}: a stage-2 seed needs a segmentation section")
        cfg = replace(cfg, segmentation=replace(cfg.segmentation, seed=int(stage2_seed)))
    return cfg


# ------------------------------------------------------------------ the run
@dataclass
class TransferData:
    """What a transfer config trains and scores on (:func:`prepare_transfer_data`).

    Attributes:
        ds_twin, split: the twins' prepared data set and its train / validation / test split.
        seg_cases: stage-2-only twins (``segmentation_twins``); more_cases: extra training twins of both stages.
        pool_ds: the second look's training pool (or None).
        evals, yardstick_region, protocol: the real evaluation scans, the yardstick's scored region and
            the protocol record of :func:`plan_protocol`.
        semi: the semi-real training data sets (one per background); twin_inserted: the twins with inserted
            nodules (``twin_backgrounds``; None without); ds_yard: the yardstick;
        look_semi: the semi-real scans of ``second_look_backgrounds`` (the second look's pool only);
        ds_extra: the extra yardsticks, in the order of ``cfg.extra_yardsticks``.
    """

    ds_twin: Any
    split: Any
    seg_cases: list[Any]
    more_cases: list[Any]
    pool_ds: Any
    evals: list[EvalScan]
    yardstick_region: str
    protocol: dict[str, Any]
    semi: list[Any]
    ds_yard: Any
    ds_extra: list[Any]
    twin_inserted: Any = None
    look_semi: list[Any] = field(default_factory=list)

    def train_cases(self) -> list[Any]:
        """Stage 1's training scans: the split's training twins, the extra training twins, the semi-real scans,
        the twins with inserted nodules."""
        cases = [self.ds_twin.load_case(u) for u in self.split.train] + list(self.more_cases)
        for ds in [*self.semi, *([self.twin_inserted] if self.twin_inserted is not None else [])]:
            cases += [ds.load_case(u) for u in ds.series_uids]
        return cases


def prepare_transfer_data(
    cfg: TransferConfig, data_dir: Path, dicom_root: Path, *, progress: bool = True,
    lap: Callable[[str, float], None] | None = None,
) -> TransferData:
    """Generate (or reuse from ``data_dir``) every data set of ``cfg`` and check the protocol
    (:func:`plan_protocol` raises :class:`TransferProtocolError` on an overlap). ``lap(name, t0)``
    is called after the twins and after the semi-real data."""
    from benchmarks.data import materialize
    from lidc_det.config import config_hash
    from lidc_det.synthetic.semireal import make_semireal_dataset

    def _lap(name: str, t0: float) -> None:
        if lap is not None:
            lap(name, t0)

    # -- twins and protocol
    t0 = time.perf_counter()
    ds_twin, split = materialize(cfg.twins, data_dir / "twins", progress=progress)
    twin_patients = sorted({ds_twin.load_case(u).patient_id for u in ds_twin.series_uids})
    seg_cases: list[Any] = []
    if cfg.segmentation_twins is not None:
        ds_seg, _ = materialize(cfg.segmentation_twins, data_dir / "segmentation_twins", progress=progress)
        seg_cases = [ds_seg.load_case(u) for u in ds_seg.series_uids]
    seg_patients = sorted({c.patient_id for c in seg_cases})
    more_cases: list[Any] = []
    more_sets: list[tuple[Any, list[str]]] = []
    if cfg.train_twins is not None:
        ds_more, _ = materialize(cfg.train_twins, data_dir / "train_twins", progress=progress)
        more_cases = [ds_more.load_case(u) for u in ds_more.series_uids]
        more_sets = [(ds_more, list(ds_more.series_uids))]
    more_patients = sorted({c.patient_id for c in more_cases})
    pool_ds = None
    if cfg.second_look is not None:
        from benchmarks.second_look import prepared_data

        pool_ds = prepared_data(cfg.second_look.data, second_look_pool_dir(data_dir, cfg.second_look.data), progress=progress)
    pool_patients = [] if pool_ds is None else sorted({pool_ds.load_case(u).patient_id for u in pool_ds.series_uids})
    evals, y_region, protocol = plan_protocol(cfg, dicom_root, twin_patients, seg_patients, more_patients, pool_patients)
    _lap("twins", t0)
    print(f"[transfer] protocol: {protocol['label']}", flush=True)

    # -- semi-real training scans and the yardstick
    t0 = time.perf_counter()
    spacing = cfg.twins.spacing_zyx
    def semireal_sets(backgrounds: Sequence[BackgroundSpec]) -> list[Any]:
        return [make_semireal_dataset([b.semireal(cfg.train_sources, cfg.seed, spacing)], data_dir / "semireal" / b.name,
                                      progress=progress)
                for b in backgrounds if cfg.train_sources is not None]

    semi = semireal_sets(cfg.backgrounds)
    look_semi = semireal_sets(cfg.second_look_backgrounds)
    ds_yard, *ds_extra = yardstick_data(cfg, data_dir, progress=progress)
    twin_inserted = None
    if cfg.twin_backgrounds is not None and cfg.train_sources is not None:
        specs = twin_background_specs(cfg.twin_backgrounds, cfg.train_sources, [(ds_twin, split.train)] + more_sets,
                                      cfg.seed + 2000, spacing)
        # one folder per setting, so configs with other settings do not overwrite each other's copies
        key = config_hash([s.settings() for s in specs])
        twin_inserted = make_semireal_dataset(specs, data_dir / "twin_backgrounds" / key, progress=progress)
    _lap("semi-real data", t0)

    return TransferData(ds_twin, split, seg_cases, more_cases, pool_ds, evals, y_region, protocol, semi, ds_yard, ds_extra,
                        twin_inserted, look_semi)


def yardstick_data(cfg: TransferConfig, data_dir: Path, *, progress: bool = True) -> list[Any]:
    """The semi-real data sets of the yardstick and of each extra yardstick, in that order (made under
    ``data_dir/yardstick/<name>``, or reused when they are there)."""
    from lidc_det.synthetic.semireal import make_semireal_dataset

    spacing = cfg.twins.spacing_zyx
    return [make_semireal_dataset([b.semireal(cfg.yardstick_sources, cfg.seed + 1000 + k, spacing)],
                                  Path(data_dir) / "yardstick" / b.name, progress=progress)
            for k, b in enumerate((cfg.yardstick, *cfg.extra_yardsticks))]


def kinds_of_runs(run_dirs: Sequence[Path], data_dir: Path, *, second_look: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """``(run: yardstick, breakdown)`` of every yardstick of finished transfer runs, from each run's
    ``transfer.json`` (its config) and candidate CSVs and the yardstick data under ``data_dir``
    (:mod:`benchmarks.yardstick_breakdown`). ``second_look``: the second look's rescored top candidates
    (``second_look/candidates_yardstick*.csv``) instead of the detector's."""
    import json

    from benchmarks.yardstick_breakdown import breakdown
    from lidc_det.config import from_mapping
    from lidc_det.data.luna import detections_from_candidates, read_candidates

    out = []
    for run in run_dirs:
        rec = json.loads((Path(run) / "transfer.json").read_text())
        cfg = from_mapping(TransferConfig, rec["config"], where=str(run))
        for b, ds in zip((cfg.yardstick, *cfg.extra_yardsticks), yardstick_data(cfg, data_dir, progress=False)):
            name = "candidates_yardstick.csv" if b is cfg.yardstick else f"candidates_yardstick_{b.name}.csv"
            csv = Path(run) / "second_look" / name if second_look else Path(run) / name
            if not csv.is_file():
                raise FileNotFoundError(f"{csv}: not a finished transfer run of this config")
            cands = read_candidates(csv)
            dets = [detections_from_candidates([c for c in cands if c.series_uid == uid], uid) for uid in ds.series_uids]
            _, irrelevant = _yardstick_findings(ds)
            label = f"{Path(run).name}{' (second look)' if second_look else ''}: {b.name}"
            out.append((label, breakdown(ds, dets, b.region, irrelevant)))
    return out


def second_look_pool_dir(data_dir: Path, pool: DataSpec) -> Path:
    """Where the second look's pool twins are generated and prepared: one folder per pool spec under
    ``data_dir/second_look_pool``, so that configs with other pools never share (or overwrite) its scans."""
    from lidc_det.config import config_hash

    return Path(data_dir) / "second_look_pool" / config_hash(pool)


def twin_background_specs(
    tb: TwinBackgroundSpec, sources: PatientRange, twin_sets: list[tuple[Any, list[str]]], seed: int,
    spacing_zyx: tuple[float, float, float],
) -> list[Any]:
    """One :class:`~lidc_det.synthetic.semireal.SemiRealSpec` per twin background: the first ``tb.n_twins`` of
    the scans of ``twin_sets`` (``(prepared twin data set, series uids)``, in order), each read from the twin
    DICOM it was prepared from (``source_folder`` of its prepared record)."""
    from lidc_det.synthetic.semireal import SemiRealSpec

    uids_sources = sources.series_uids()
    specs = []
    for ds, uids in twin_sets:
        records = {r["series_uid"]: r for r in ds.info["scans"]}
        for uid in uids:
            if len(specs) == tb.n_twins:
                return specs
            r = records[uid]
            specs.append(SemiRealSpec(
                f"twin-{r['patient_id']}", Path(r["source_folder"]), copies=tb.copies,
                nodules_per_copy=tb.nodules_per_copy, source_scans=tuple(uids_sources), seed=seed,
                spacing_zyx=spacing_zyx, placement_weights=tb.placement_weights, subsolid_share=tb.subsolid_share,
                wall_bulges_per_copy=tb.wall_bulges_per_copy,
            ))
    return specs


def run_transfer(
    config_path: Path,
    out_dir: Path,
    *,
    dicom_root: Path | None = None,
    data_dir: Path | None = None,
    progress: bool = True,
    train_seed: int | None = None,
    stage2_seed: int | None = None,
    scheduler: str = "serial",
) -> dict[str, Any]:
    """Run the transfer benchmark of ``config_path`` into ``out_dir``; return the record.

    ``data_dir`` (default ``out_dir``) holds the generated data (twins, semi-real scans,
    yardstick), so runs of several configs (an ablation) can share what they have in common:
    every scan there is keyed by its settings and regenerated when they differ.
    ``train_seed`` replaces the detector's ``seed`` (its initialisation and patch sampling;
    the data stay the same), and the record's config says so. ``stage2_seed`` likewise replaces
    ``segmentation.seed`` (crops, augmentation; a new stage-2 model is trained for each seed).

    A blob-lgbm detector's candidates are cached in ``out_dir/stage1/features`` (training and scoring read
    them there; a rerun extracts nothing again). With a ``scheduler`` other than ``serial`` (``local:N`` or a
    Dask address) the candidates of every scan the run reads are first extracted in parallel
    (:func:`warm_transfer_cache`); other detectors ignore it.
    """
    from benchmarks.harness import _quiet
    from benchmarks.yardstick_breakdown import breakdown
    from lidc_det.atomic import write_json
    from lidc_det.config import config_hash, to_plain
    from lidc_det.metrics.froc import evaluate_detections
    from lidc_det.metrics.ranks import nodule_ranks, score_at_sensitivity
    from lidc_det.provenance import device_info, provenance
    from stage1_detect.registry import build_detector

    t_start = time.perf_counter()
    cfg = with_seeds(load_transfer_config(Path(config_path)), train_seed, stage2_seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dicom_root = Path(dicom_root) if dicom_root is not None else DEFAULT_DICOM_ROOT
    data_dir = Path(data_dir) if data_dir is not None else out_dir
    times: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        times[name] = round(time.perf_counter() - t0, 1)
        print(f"[transfer] {name}: {times[name]:.0f} s", flush=True)

    data = prepare_transfer_data(cfg, data_dir, dicom_root, progress=progress, lap=lap)
    ds_twin, split, seg_cases, more_cases, pool_ds = data.ds_twin, data.split, data.seg_cases, data.more_cases, data.pool_ds
    evals, y_region, protocol, semi, ds_yard, ds_extra = (
        data.evals, data.yardstick_region, data.protocol, data.semi, data.ds_yard, data.ds_extra)

    # -- stage 1
    t0 = time.perf_counter()
    detector = build_detector({"name": cfg.detector.name, **_quiet(cfg.detector, progress)})
    cache = _candidate_cache(detector, out_dir)  # blob-lgbm only; the folder fit caches the training scans in
    if cache is not None and scheduler != "serial":
        t1 = time.perf_counter()
        warm_transfer_cache(detector, data, cache, scheduler=scheduler, progress=progress)
        lap("stage 1 candidates", t1)  # part of "stage 1 training" too, which stays comparable with serial runs
    train_cases = data.train_cases()
    val_cases = [ds_twin.load_case(u) for u in split.val]
    if hasattr(detector, "fit"):
        detector.fit(train_cases, val_cases, out_dir / "stage1")
    lap("stage 1 training", t0)

    # -- twin validation: operating point; twin test: CPM
    t0 = time.perf_counter()
    val_d, val_t, _ = _detect_prepared(detector, ds_twin, split.val, progress, cache)
    thr, thr_sens = score_at_sensitivity(val_d, val_t, cfg.operating_sensitivity)
    test_d, test_t, test_i = _detect_prepared(detector, ds_twin, split.test, progress, cache)
    twin_froc = evaluate_detections(test_t, test_d, excluded=test_i, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    lap("twin scoring", t0)

    # -- semi-real yardstick
    t0 = time.perf_counter()
    y_d, y_t, y_i, yard_froc = _score_yardstick(detector, ds_yard, y_region, cfg, progress, cache)
    extra_yards: dict[str, Any] = {}
    extra_scored: list[tuple[str, Any, list[Any], list[Any], list[Any]]] = []
    for b, ds_b in zip(cfg.extra_yardsticks, ds_extra):
        b_d, b_t, b_i, b_froc = _score_yardstick(detector, ds_b, b.region, cfg, progress, cache)
        extra_scored.append((b.name, ds_b, b_d, b_t, b_i))
        extra_yards[b.name] = {**_froc_dict(b_froc), "semi_real": True, "region": b.region,
                               "top_score": _top_scores(b_d), "by_kind": breakdown(ds_b, b_d, b.region, b_i)}
        _write_candidates(out_dir / f"candidates_yardstick_{b.name}.csv", b_d)
    lap("yardstick", t0)

    # -- real scans
    t0 = time.perf_counter()
    real_rows: list[dict[str, Any]] = []
    real_d: list[Any] = []
    real_t: list[Any] = []
    real_i: list[Any] = []
    pngs: list[dict[str, Any]] = []
    for e in evals:
        vol, scored, tg, ir = read_real_scan(e)
        det = _restrict(_cached_predict(detector, _real_case(vol), cache), e.region).top_k(100)
        real_d.append(det)
        real_t += tg
        real_i += ir
        ranks = nodule_ranks(det, tg, ir)
        for r in ranks:
            real_rows.append({
                "series_uid": vol.series_uid, "patient_id": vol.patient_id, "scored_region": e.region,
                "center_xyz_mm": [round(v, 1) for v in r.center_xyz_mm], "diameter_mm": round(r.diameter_mm, 1),
                "rank": r.rank, "score": None if r.score is None else round(r.score, 4), "fps_above": r.fps_above,
                "distance_mm": r.distance_mm,
            })
        pngs += _real_pngs(vol, scored, ranks, det, tg, ir, out_dir / "png", cfg.n_fp_pngs)
    real_froc = (
        evaluate_detections(real_t, real_d, excluded=real_i, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed) if real_t else None
    )
    lap("real scans", t0)

    stage2 = None
    second_look = None
    if cfg.segmentation is not None:
        t0 = time.perf_counter()
        seg_train = train_cases + seg_cases
        stage2, segmenter = _run_stage2(
            cfg.segmentation, seg_train, val_cases, ds_twin, split, ds_yard, evals, real_d,
            data_dir / "stage2_model" / config_hash([cfg.segmentation, _cases_key(seg_train + val_cases)]),
            out_dir / "png", progress,
        )
        lap("stage 2", t0)
        if cfg.second_look is not None and pool_ds is not None:
            t0 = time.perf_counter()
            scored_sets = [("twin_test", ds_twin, test_d, test_t, test_i), ("yardstick", ds_yard, y_d, y_t, y_i),
                           *((f"yardstick {name}", *rest) for name, *rest in extra_scored)]
            second_look = _run_second_look(
                cfg.second_look, detector, segmenter, [pool_ds, *data.look_semi], out_dir / "second_look", scored_sets,
                evals, real_d, real_t, real_i, seg_train[0].geometry.spacing_zyx, cfg, progress,
            )
            lap("second look", t0)

    for name, dets in (("twin_test", test_d), ("yardstick", y_d), ("real", real_d)):
        _write_candidates(out_dir / f"candidates_{name}.csv", dets)
    dev = device_info(str(getattr(detector, "device", "")) or None)
    record = {
        "kind": "lidc-det transfer benchmark",
        "config_path": str(config_path),
        "config": to_plain(cfg),
        "config_hash": config_hash(cfg),
        "provenance": provenance(),
        "device": dev,
        "protocol": protocol,
        "split": split.to_dict(),
        "n_train_scans": {"twin": len(split.train), "semi_real": sum(len(ds.series_uids) for ds in semi),
                          "twin_inserted": 0 if data.twin_inserted is None else len(data.twin_inserted.series_uids),
                          "stage2_only_twins": len(seg_cases), "extra_training_twins": len(more_cases)},
        "twin_test": {**_froc_dict(twin_froc), "synthetic": True},
        "operating_point": {
            "twin_val_sensitivity_wanted": cfg.operating_sensitivity,
            "threshold": None if thr is None else round(thr, 4),
            "twin_val_sensitivity_reached": round(thr_sens, 3),
            "real_fp_per_scan": _fp_at(real_d, real_t, real_i, thr),
            "yardstick_fp_per_scan": _fp_at(y_d, y_t, y_i, thr),
        },
        "yardstick": {**_froc_dict(yard_froc), "semi_real": True, "region": y_region,
                      "by_kind": breakdown(ds_yard, y_d, y_region, y_i)},
        "extra_yardsticks": extra_yards,
        "real": {
            "nodules": real_rows,
            "froc": None if real_froc is None else _froc_dict(real_froc),
            "top_score": _top_scores(real_d),
            "pngs": pngs,
        },
        "stage2": stage2,
        "second_look": second_look,
        "stage1_train_seconds": _history_seconds(out_dir / "stage1"),
        "scheduler": scheduler,
        "seconds": times,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(out_dir / "transfer.json", record)
    _write_report(record, out_dir)
    return record


def _run_stage2(
    seg_cfg: SegmenterConfig, train_cases: list[Any], val_cases: list[Any], ds_twin: Any, split: Any, ds_yard: Any,
    evals: list[EvalScan], real_dets: list[Any], work_dir: Path, png_dir: Path, progress: bool,
) -> tuple[dict[str, Any], Any]:
    """Train the crop segmenter on the training scans; score it on the real nodules (true centre
    and first hit), the yardstick and the twin test (Dice vs the readers' consensus). Returns the
    record and the trained :class:`~stage2_segment.segmenter.NnUnetSegmenter`."""
    from lidc_det.data.lidc import consensus_mask, load_annotations, reader_masks
    from lidc_det.io.dicom import read_series
    from lidc_det.overlays import three_plane_png
    from lidc_det.resample import resample_image, resample_mask
    from lidc_det.results import Detections
    from stage2_segment.metrics import nodule_scores, summarize
    from stage2_segment.segmenter import NnUnetSegmenter

    import fcntl

    work_dir.mkdir(parents=True, exist_ok=True)
    seg = NnUnetSegmenter(work_dir, seg_cfg)
    with open(work_dir / ".lock", "w") as lock:  # runs sharing --data-dir train one model, one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        fit = seg.fit(train_cases, val_cases, progress=progress)
    real: list[dict[str, Any]] = []
    for e, det in zip(evals, real_dets):
        vol = read_series(e.folder, series_uid=e.series_uid)
        hu, g = resample_image(vol.hu, vol.geometry, train_cases[0].geometry.spacing_zyx)  # the segmenter's grid
        ann = load_annotations(vol.series_uid, vol.geometry)
        for n in ann.nodules:
            if not _findings_in([n], e.region):
                continue
            cons = resample_mask(consensus_mask(n, vol.geometry), vol.geometry, g)
            readers = [resample_mask(m, vol.geometry, g) for m in reader_masks(n, vol.geometry)]
            c = np.asarray([n.center_xyz_mm])
            at_centre = seg.segment(hu, g, Detections(vol.series_uid, c, [n.equivalent_diameter_mm], [1.0]))[0]
            row: dict[str, Any] = {"patient_id": vol.patient_id, "diameter_mm": round(n.equivalent_diameter_mm, 1),
                                   "true_centre": _rounded(nodule_scores(at_centre, cons, readers))}
            hit = np.flatnonzero(np.linalg.norm(det.centers_xyz_mm - c, axis=1) < n.equivalent_diameter_mm / 2) if len(det) else []
            if len(hit):
                k = int(hit[0])
                at_hit = seg.segment(hu, g, Detections(vol.series_uid, det.centers_xyz_mm[k : k + 1], det.diameters_mm[k : k + 1], det.scores[k : k + 1]))[0]
                row["first_hit"] = _rounded(nodule_scores(at_hit, cons, readers))
            p = png_dir / f"{vol.patient_id}_stage2_{len(real) + 1}.png"
            sc = row["true_centre"]
            title = (f"REAL {vol.patient_id} {n.equivalent_diameter_mm:.1f} mm: model (red) Dice {sc['dice_consensus']:.2f} vs consensus "
                     f"(green); model-in-reader's-place {sc.get('dice_model_loo', float('nan')):.2f} vs readers "
                     f"{np.mean(sc.get('dice_human_loo', [np.nan])):.2f}; volume {sc['volume_error_pct']:+.0f}%")
            three_plane_png(hu, g, n.center_xyz_mm, p, masks=[(cons, "lime"), (at_centre.full_mask(g.shape_zyx), "red")], title=title)
            row["png"] = str(p.relative_to(png_dir.parent))
            real.append(row)

    def dice_of(ds: Any, uids: Any, *, inserted_only: bool = False) -> list[float]:
        """Dice vs consensus of every target of ``uids`` (cached in ``work_dir``: the model and
        the scans decide it, not the detector, so runs sharing the model reuse it)."""
        import json

        from lidc_det.atomic import write_json
        from lidc_det.config import config_hash

        cases = [ds.load_case(u) for u in uids]
        cache = work_dir / f"dice-{config_hash([_cases_key(cases), inserted_only])}.json"
        if cache.is_file():
            return [float(v) for v in json.loads(cache.read_text())["dice"]]
        out = []
        for case in cases:
            masks = seg.segment_nodules(case)
            kept = [n for n in case.nodules if n.box_voxel is not None]
            out += [
                nodule_scores(m, case.nodule_mask(n))["dice_consensus"]
                for m, n in zip(masks, kept)
                if not inserted_only or ":inserted" in n.nodule_id
            ]
        write_json(cache, {"series_uids": list(uids), "inserted_only": inserted_only, "dice": out})
        return out

    record = {
        "fit": {k: v for k, v in fit.items() if k in ("n_crops", "n_nodule_crops", "n_negative_crops", "times", "final_pseudo_dice")},
        "real": real,
        "yardstick_dice": _rounded(summarize(dice_of(ds_yard, ds_yard.series_uids, inserted_only=True))),
        "twin_test_dice": _rounded(summarize(dice_of(ds_twin, split.test))),
    }
    return record, seg


def _looked(look: Any, seg: Any, hu: np.ndarray, geometry: Any, det: Any) -> Any:
    """``det`` rescored by the second look ``look`` from ``seg``'s masks (same candidates; ``hu``
    ``[z, y, x]`` HU on ``geometry``, the grid stage 2 runs on)."""
    if not len(det):
        return det
    return look.rescore(hu, geometry, det, seg.segment(hu, geometry, det))


def _rank_row(r: Any) -> dict[str, Any]:
    return {"rank": r.rank, "fps_above": r.fps_above, "score": None if r.score is None else round(r.score, 4)}


def _run_second_look(
    sl: SecondLookStepConfig, detector: Any, seg: Any, pool_sets: list[Any], work_dir: Path,
    scored_sets: list[tuple[str, Any, list[Any], list[Any], list[Any]]],
    evals: list[EvalScan], real_dets: list[Any], real_t: list[Any], real_i: list[Any],
    spacing_zyx: tuple[float, float, float], cfg: TransferConfig, progress: bool,
) -> dict[str, Any]:
    """Train the second look on the top candidates of the pool (``pool_sets``: the pool twins' prepared data set,
    then the semi-real data sets of ``second_look_backgrounds``; never seen by either stage) and
    rescore the top ``sl.max_candidates_per_scan`` candidates of every scored set (name, prepared
    data set, detections, targets, irrelevant findings) and of the real scans.

    Every figure is given for the detector's scores and the second look's on the *same* top
    candidates (the detector's own record keeps its top 100). Writes the model to
    ``work_dir/model`` and the rescored candidates of each set to ``work_dir/candidates_<set>.csv`` (LUNA16
    format; ``candidates_real.csv`` for the real scans)."""
    from benchmarks.second_look import _split_scores, collect, compare, models_key, table_of
    from lidc_det.io.dicom import read_series
    from lidc_det.metrics.froc import evaluate_detections
    from lidc_det.metrics.ranks import nodule_ranks
    from lidc_det.resample import resample_image
    from stage2_segment.second_look import SecondLook

    k = sl.max_candidates_per_scan
    cache = work_dir / "candidates" / models_key(detector, seg)
    pool = [s for ds in pool_sets for s in collect("pool", ds, ds.series_uids, detector, seg, k, sl.model, cache, progress=progress)]
    table = table_of(pool)
    oof = SecondLook(sl.model).out_of_fold(table)
    look = SecondLook(sl.model).fit(table)
    look.save(work_dir / "model")

    def froc(targets: list[Any], dets: list[Any], irrelevant: list[Any]) -> dict[str, Any]:
        return _froc_dict(evaluate_detections(targets, dets, excluded=irrelevant, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed))

    rec: dict[str, Any] = {
        "model": look.name,
        "max_candidates_per_scan": k,
        "pool": {"n_scans": len(pool), "n_candidates": len(table), "n_hits": int((table.labels == 1).sum()),
                 "synthetic": len(pool_sets) == 1, "n_semi_real_scans": sum(len(ds.series_uids) for ds in pool_sets[1:]),
                 "patients": sorted({s.patient_id for s in pool}),
                 "out_of_fold": compare(pool, {"detector": ([s.detections.scores for s in pool], None),
                                               "second look": (_split_scores(pool, oof), None)},
                                        n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)},
        "info": look.info,
    }
    for name, ds, dets, targets, irrelevant in scored_sets:
        top = [d.top_k(k) for d in dets]
        looked = []
        for d in top:
            case = ds.load_case(d.series_uid)
            looked.append(_looked(look, seg, np.asarray(case.image_hu, dtype=np.float32), case.geometry, d))
        rec[name] = {"detector_top_k": froc(targets, top, irrelevant), "second_look": froc(targets, looked, irrelevant)}
        _write_candidates(work_dir / f"candidates_{name.replace(' ', '_')}.csv", looked)
    real_top, real_looked, rows = [], [], []
    for e, d in zip(evals, real_dets):
        vol = read_series(e.folder, series_uid=e.series_uid)
        hu, g = resample_image(vol.hu, vol.geometry, spacing_zyx)
        top = d.top_k(k)
        new = _looked(look, seg, hu, g, top)
        real_top.append(top)
        real_looked.append(new)
        for before, after in zip(nodule_ranks(top, real_t, real_i), nodule_ranks(new, real_t, real_i)):
            rows.append({"patient_id": vol.patient_id, "scored_region": e.region, "diameter_mm": round(before.diameter_mm, 1),
                         "detector_top_k": _rank_row(before), "second_look": _rank_row(after)})
    rec["real"] = {
        "nodules": rows,
        "froc": None if not real_t else {"detector_top_k": froc(real_t, real_top, real_i),
                                          "second_look": froc(real_t, real_looked, real_i)},
        "top_score": _top_scores(real_looked),
    }
    _write_candidates(work_dir / "candidates_real.csv", real_looked)
    return rec


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    def r(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, list):
            return [r(x) for x in v]
        return v

    return {k: r(v) for k, v in d.items()}


def _real_pngs(
    vol: Any, nodules: list[Any], ranks: list[Any], det: Any, targets: list[Any], irrelevant: list[Any], folder: Path, n_fp: int
) -> list[dict[str, Any]]:
    """3-plane PNGs of every scored real nodule (``nodules``, their ``ranks``; with the consensus) and the top
    false positives of ``det``."""
    from lidc_det.data.lidc import consensus_mask
    from lidc_det.metrics.ranks import candidate_kinds
    from lidc_det.overlays import three_plane_png

    folder.mkdir(parents=True, exist_ok=True)
    out: list[dict[str, Any]] = []
    for i, (n, r) in enumerate(zip(nodules, ranks)):
        p = folder / f"{vol.patient_id}_nodule{i + 1}.png"
        title = (f"REAL {vol.patient_id} nodule {n.equivalent_diameter_mm:.1f} mm: "
                 + (f"first hit rank {r.rank} (score {r.score:.2f}), {r.fps_above} FP above" if r.rank else "not hit"))
        three_plane_png(vol.hu, vol.geometry, n.center_xyz_mm, p, masks=[(consensus_mask(n, vol.geometry), "lime")], title=title)
        out.append({"kind": "nodule", "path": str(p.relative_to(folder.parent)), "title": title})
    kinds = candidate_kinds(det, targets, irrelevant)
    fp = [k for k in np.argsort(-det.scores, kind="stable") if kinds[k] == "fp"][:n_fp]
    for j, k in enumerate(fp):
        p = folder / f"{vol.patient_id}_fp{j + 1:02d}.png"
        c = det.centers_xyz_mm[k]
        title = f"REAL {vol.patient_id} false positive #{j + 1} (rank {int(np.sum(det.scores > det.scores[k])) + 1}, score {det.scores[k]:.2f}), x={c[0]:.0f} mm"
        three_plane_png(vol.hu, vol.geometry, c, p, title=title, half_width_mm=30.0)
        out.append({"kind": "fp", "path": str(p.relative_to(folder.parent)), "title": title})
    return out


def _write_report(rec: dict[str, Any], out_dir: Path) -> None:
    from benchmarks.report import Heading, Image, Paragraph, Report, Table

    op = rec["operating_point"]
    rep = Report(f"Transfer benchmark: {rec['config']['name']}")
    rep.add(Paragraph(
        f"Protocol: **{rec['protocol']['label']}**. Trained on {rec['n_train_scans']['twin']} twin scans (SYNTHETIC) and "
        f"{rec['n_train_scans']['semi_real']} semi-real scans (real CT backgrounds, inserted LIDC reader nodules)"
        + (f" and {rec['n_train_scans']['twin_inserted']} twin scans with inserted LIDC reader nodules (SYNTHETIC)"
           if rec["n_train_scans"].get("twin_inserted") else "") + ". "
        f"Git {rec['provenance'].get('git_revision')}, device {rec['device'].get('device')} ({rec['device'].get('name', '')}), "
        f"wall {rec['wall_seconds']:.0f} s, config hash {rec['config_hash']}."
    ))
    rep.add(Heading("Real scans"))
    rows = [[r["patient_id"], r["scored_region"], r["diameter_mm"], r["rank"] if r["rank"] else "not hit", r["fps_above"],
             r["score"] if r["score"] is not None else "-"] for r in rec["real"]["nodules"]]
    rep.add(Table(["patient", "scored region", "diameter mm", "first-hit rank", "FPs above", "score"], rows))
    fr = rec["real"]["froc"]
    rep.add(Paragraph(
        (f"Real FROC over {fr['n_scans']} scan(s), {fr['n_nodules']} nodule(s): CPM {fr['cpm']:.3f} "
         f"(95% CI {fr['cpm_ci'][0]:.2f}-{fr['cpm_ci'][1]:.2f}). " if fr else "No real target nodule in the scored regions. ")
        + f"At the twin-validation {op['twin_val_sensitivity_wanted']:.0%} operating point (threshold {op['threshold']}, "
        f"reached {op['twin_val_sensitivity_reached']:.0%}): {op['real_fp_per_scan']} FP per real scan. "
        f"Highest score per real scan: {rec['real']['top_score']}."
    ))
    for p in rec["real"]["pngs"]:
        rep.add(Image(p["path"], p["title"]))
    y = rec["yardstick"]
    t = rec["twin_test"]
    rep.add(Heading("Semi-real yardstick and twin test"))
    rep.add(Table(
        ["data", "scans", "nodules", "CPM", "95% CI", "sens @1/8", "@1", "@8", "FP/scan at op. point"],
        [
            [f"semi-real (real CT, inserted nodules; region {y['region']})", y["n_scans"], y["n_nodules"], y["cpm"],
             f"{y['cpm_ci'][0]:.2f}-{y['cpm_ci'][1]:.2f}", y["sensitivity"]["0.125"], y["sensitivity"]["1.0"], y["sensitivity"]["8.0"],
             op["yardstick_fp_per_scan"]],
            *[[f"semi-real {name} (region {e['region']})", e["n_scans"], e["n_nodules"], e["cpm"],
               f"{e['cpm_ci'][0]:.2f}-{e['cpm_ci'][1]:.2f}", e["sensitivity"]["0.125"], e["sensitivity"]["1.0"],
               e["sensitivity"]["8.0"], "-"] for name, e in rec.get("extra_yardsticks", {}).items()],
            ["twin test (SYNTHETIC)", t["n_scans"], t["n_nodules"], t["cpm"], f"{t['cpm_ci'][0]:.2f}-{t['cpm_ci'][1]:.2f}",
             t["sensitivity"]["0.125"], t["sensitivity"]["1.0"], t["sensitivity"]["8.0"], "-"],
        ],
    ))
    kinds = [(name, e["by_kind"]) for name, e in [("yardstick", y), *rec.get("extra_yardsticks", {}).items()]
             if e.get("by_kind")]
    if kinds:
        from benchmarks.yardstick_breakdown import summary_table

        rep.add(Paragraph("Yardstick nodules by kind (SYNTHETIC nodules on real CT): found below 1 / below 8 FP/scan / "
                          "inserted; `not_proposed` in `transfer.json` counts those no detection reached."))
        rep.add(Table(*summary_table(kinds)))
    s2 = rec.get("stage2")
    if s2:
        rep.add(Heading("Stage 2 on real nodules"))
        rows = []
        for r in s2["real"]:
            for where in ("true_centre", "first_hit"):
                sc = r.get(where)
                if sc:
                    rows.append([r["patient_id"], r["diameter_mm"], where.replace("_", " "), f"{sc['dice_consensus']:.3f}",
                                 f"{sc.get('dice_model_loo', float('nan')):.3f}",
                                 f"{np.mean(sc.get('dice_human_loo', [np.nan])):.3f}", f"{sc['volume_error_pct']:+.0f}%"])
        rep.add(Table(["patient", "diameter mm", "crop at", "Dice vs consensus", "model in a reader's place",
                       "readers' own leave-one-out", "volume error"], rows))
        rep.add(Paragraph(
            f"Dice vs consensus at the true centres (median): semi-real yardstick {s2['yardstick_dice']['median']:.3f} "
            f"(n = {s2['yardstick_dice']['n']}), twin test (SYNTHETIC) {s2['twin_test_dice']['median']:.3f} "
            f"(n = {s2['twin_test_dice']['n']}). nnU-Net pseudo-Dice at the end of training: {s2['fit'].get('final_pseudo_dice')}."
        ))
        for r in s2["real"]:
            rep.add(Image(r["png"], f"REAL {r['patient_id']}: stage-2 mask (red) and the readers' consensus (green)"))
    sl = rec.get("second_look")
    if sl:
        k = sl["max_candidates_per_scan"]
        rep.add(Heading("Second look: a learned score per candidate"))
        pool = sl["pool"]
        oof = pool["out_of_fold"]["arms"]
        rep.add(Paragraph(
            f"{sl['model']}, trained on the top {k} candidates of {pool['n_scans']} pool twins (SYNTHETIC) that neither "
            f"stage trained on ({pool['n_candidates']} candidates, {pool['n_hits']} hits); out-of-fold CPM on the pool "
            f"{oof['second look']['cpm']:.3f} vs the detector's {oof['detector']['cpm']:.3f}. Below, both scores rank "
            f"the same top {k} candidates of each scan."
        ))
        rows = [[r["patient_id"], r["diameter_mm"], _rank_text(r["detector_top_k"]), _rank_text(r["second_look"])]
                for r in sl["real"]["nodules"]]
        rep.add(Table(["REAL patient", "diameter mm", "detector: rank (FPs above)", "second look: rank (FPs above)"], rows))
        sets = [(name, v) for name, v in sl.items() if isinstance(v, dict) and "second_look" in v and "detector_top_k" in v]
        if sl["real"]["froc"]:
            sets.append(("real", sl["real"]["froc"]))
        rep.add(Table(["data", "nodules", f"detector CPM (top {k})", f"second look CPM (top {k})"],
                      [[("twin test (SYNTHETIC)" if name == "twin_test" else name), v["detector_top_k"]["n_nodules"],
                        f"{v['detector_top_k']['cpm']:.3f}", f"{v['second_look']['cpm']:.3f}"] for name, v in sets]))
    rep.add(Paragraph("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in rec["seconds"].items())))
    rep.write(out_dir)


def _rank_text(r: dict[str, Any]) -> str:
    return f"{r['rank']} ({r['fps_above']})" if r["rank"] else f"not hit ({r['fps_above']})"


def _second_look_cell(r: dict[str, Any]) -> str:
    sl = r.get("second_look")
    if not sl:
        return "-"
    ranks = ", ".join(_rank_text(n["second_look"]) for n in sl["real"]["nodules"]) or "-"
    yards = " / ".join(f"{v['second_look']['cpm']:.3f}" for name, v in sl.items()
                       if isinstance(v, dict) and name.startswith("yardstick") and "second_look" in v)
    return f"{ranks}; {yards}; {sl['twin_test']['second_look']['cpm']:.3f}"


# ------------------------------------------------------------------ ablation table
def ablation_table(records: list[dict[str, Any]]) -> str:
    """One Markdown row per transfer run (config, twin test CPM, yardstick CPM, real ranks, Dice;
    with the second look, its real ranks, yardstick CPMs and twin test CPM on the top candidates)."""
    extra = any(r.get("extra_yardsticks") for r in records)
    look = any(r.get("second_look") for r in records)
    head = ("| config | protocol | twin test CPM (SYNTHETIC) | semi-real yardstick CPM [95% CI] (nodules) | "
            + ("other semi-real yardsticks: CPM (nodules) | " if extra else "")
            + "real nodules: first-hit rank (FPs above) | "
            + ("second look: real rank (FPs above); yardstick CPMs; twin test CPM | " if look else "")
            + "real FP/scan at twin-val 80% | real stage-2 Dice: consensus / in a reader's place (readers) | "
            "stage-1 training s | git |")
    lines = [head, "|" + "---|" * (9 + extra + look)]
    for r in records:
        y, t = r["yardstick"], r["twin_test"]
        others = ("; ".join(f"{k} {e['cpm']:.3f} ({e['n_nodules']})" for k, e in r.get("extra_yardsticks", {}).items()) or "-") + " | "
        ranks = "; ".join(
            f"{n['patient_id']} {n['diameter_mm']} mm ({n['scored_region']}): {_rank_text(n)}" for n in r["real"]["nodules"]
        ) or "-"
        dice = "-"
        if r.get("stage2"):
            dice = "; ".join(
                f"{s['true_centre']['dice_consensus']:.2f} / {s['true_centre'].get('dice_model_loo', float('nan')):.2f} "
                f"({np.mean(s['true_centre'].get('dice_human_loo', [np.nan])):.2f})"
                for s in r["stage2"]["real"]
            )
        seg_seed = (r["config"].get("segmentation") or {}).get("seed", 0)
        seeds = f"train seed {r['config']['detector']['kwargs'].get('seed', 'default')}" + (f", stage-2 seed {seg_seed}" if seg_seed else "")
        lines.append(
            f"| `{Path(r['config_path']).name}` ({seeds}) | "
            f"{r['protocol']['label']} | {t['cpm']:.3f} | "
            f"{y['cpm']:.3f} [{y['cpm_ci'][0]:.2f}, {y['cpm_ci'][1]:.2f}] ({y['n_nodules']}) | {others if extra else ''}{ranks} | "
            + (f"{_second_look_cell(r)} | " if look else "")
            + f"{r['operating_point']['real_fp_per_scan']} | {dice} | {r.get('stage1_train_seconds')} | {str(r['provenance'].get('git_revision'))[:7]} |"
        )
    return "\n".join(lines)


FROC_SETS = ("yardstick", "twin_test")
"""Which FROC of a record :func:`plot_frocs` draws (an extra yardstick is named ``extra:<name>``)."""


def _froc_of(record: dict[str, Any], which: str) -> dict[str, Any] | None:
    if which.startswith("extra:"):
        return record.get("extra_yardsticks", {}).get(which[len("extra:"):])
    if which not in FROC_SETS:
        raise ValueError(f"which must be one of {FROC_SETS} or extra:<name>, got {which!r}")
    return record[which]


def plot_frocs(records: list[dict[str, Any]], path: Path, *, which: str = "yardstick", title: str = "") -> Path:
    """One FROC curve per transfer record (sensitivity at the 7 LUNA16 operating points, log2 FP/scan
    axis), labelled by the detector label, its train seed and the CPM; written atomically to ``path``.
    Records without that FROC are skipped; none at all raises ``ValueError``."""
    from lidc_det.plots import new_figure, save_figure

    fig, ax = new_figure(9.5, 4.8)
    drawn = 0
    for r in records:
        f = _froc_of(r, which)
        if not f:
            continue
        fps = sorted(f["sensitivity"], key=float)
        x = [float(v) for v in fps]
        kw = r["config"]["detector"].get("kwargs", {})
        label = f"{r['config']['detector'].get('label') or r['config']['detector']['name']}"
        label += f" s{kw['seed']}" if "seed" in kw else ""
        ax.plot(x, [f["sensitivity"][v] for v in fps], marker="o", label=f"{label}: CPM {f['cpm']:.3f}")
        drawn += 1
    if not drawn:
        raise ValueError(f"no record has a {which!r} FROC")
    ax.set_xscale("log", base=2)
    ax.set_xticks([0.125, 0.25, 0.5, 1, 2, 4, 8], ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"transfer benchmark: {which} FROC" + (" (SYNTHETIC)" if which == "twin_test" else " (semi-real)"))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.transfer table RUN/transfer.json ...``: the ablation table in Markdown;
    ``python -m benchmarks.transfer froc RUN/transfer.json ... --out froc.png [--which yardstick]``: their FROC curves;
    ``python -m benchmarks.transfer kinds RUN_DIR ... --data-dir DIR``: their yardstick nodules found by kind."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="Markdown ablation table of transfer runs")
    t.add_argument("records", nargs="+", type=Path, help="transfer.json files")
    f = sub.add_parser("froc", help="FROC curves of transfer runs in one PNG")
    f.add_argument("records", nargs="+", type=Path, help="transfer.json files")
    f.add_argument("--out", type=Path, required=True, help="PNG to write")
    f.add_argument("--which", default="yardstick", help="yardstick (default), twin_test or extra:<yardstick name>")
    f.add_argument("--title", default="", help="plot title (default: names the FROC)")
    k = sub.add_parser("kinds", help="yardstick nodules found below 1 / 8 FP/scan by kind, from finished runs")
    k.add_argument("runs", nargs="+", type=Path, help="transfer output folders (transfer.json + candidate CSVs)")
    k.add_argument("--data-dir", type=Path, required=True, help="the runs' --data-dir (their yardstick data)")
    k.add_argument("--second-look", action="store_true", help="the second look's rescored candidates, not the detector's")
    a = p.parse_args(argv)
    if a.cmd == "kinds":
        from benchmarks.yardstick_breakdown import summary_markdown

        named = kinds_of_runs(a.runs, a.data_dir, second_look=a.second_look)
        print("SYNTHETIC nodules on real CT backgrounds\n")
        print(summary_markdown(named))
        return 0
    records = [json.loads(Path(r).read_text()) for r in a.records]
    if a.cmd == "froc":
        print(plot_frocs(records, a.out, which=a.which, title=a.title))
        return 0
    print(ablation_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
