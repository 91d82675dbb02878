"""The whole pipeline on one scan: detect -> segment -> (second look) -> reject -> classify.

This is the one place that chains the stages (they never import each other; each is
imported lazily here). Typed results go from stage to stage:

    DICOM series / HU volume
      -> resampled to the models' grid (``spacing_zyx``, the prepared spacing they were trained on)
      -> stage 1 ``Detections`` (every candidate)                         ``detector.predict``
      -> the top ``max_candidates`` segmented: one ``NoduleMask`` each    ``segmenter.segment``
      -> optional second look: new scores for those candidates            ``second_look.rescore``
      -> ``Rejection``: kept / rejected with the reason                   ``segmenter.reject``
      -> ``MalignancyScore`` per kept, non-empty mask                     ``malignancy.predict``

>>> pipe = Pipeline.from_dir("lidc-det-demo")                      # doctest: +SKIP
>>> result = pipe.run("LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>")  # doctest: +SKIP
>>> [(c.rank, c.kept, c.reason, c.p_malignant) for c in result.candidates][:3]  # doctest: +SKIP

A models folder holds ``pipeline.json`` (see :func:`write_manifest`; the demo writes one),
naming the stage models by paths relative to the folder::

    {"format": "lidc-det.pipeline/1", "detector": "stage1/train/best.pt",
     "segmenter": "stage2/work", "malignancy": "stage3/model",
     "spacing_zyx": [1, 1, 1], "max_candidates": 40, "synthetic_training": true}

Stage 2 and stage 3 are optional (``null``): without a segmenter every candidate is kept
and no malignancy is scored. A folder without a manifest but with the demo's layout
(``stage1/train/best.pt``, ``stage2/work``, ``stage3/model``) loads the same way.

Second look (the plug-in point of a learned false-positive classifier): any object with

    rescore(hu: np.ndarray, geometry: VolumeGeometry, detections: Detections,
            masks: Sequence[NoduleMask] | None) -> np.ndarray | Detections
        # float [N] new scores, or the same Detections with new scores
        # (stage2_segment.second_look.SecondLook.rescore is one)

and optionally ``min_score: float | None`` and ``name: str``. It sees the segmented
candidates (``hu`` ``[z, y, x]`` on the pipeline grid, ``masks[i]`` for candidate ``i``,
None without stage 2); its scores replace the detection scores for ranking, and with
``min_score`` candidates below it are rejected (reason ``"second look 0.12 < 0.30"``).
The stage-2 volume rule is applied after it. In ``pipeline.json``:
``"second_look": {"factory": "package.module:function", "path": "relative/folder"}``
(e.g. ``"stage2_segment.second_look:SecondLook.load"``); ``factory(path)`` must return such an object.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections, MalignancyScore, NoduleMask, Rejection

__all__ = [
    "MANIFEST",
    "Candidate",
    "Pipeline",
    "PipelineError",
    "ScanResult",
    "SecondLook",
    "read_manifest",
    "write_manifest",
]

MANIFEST = "pipeline.json"
MANIFEST_FORMAT = "lidc-det.pipeline/1"
DEMO_LAYOUT = {"detector": "stage1/train/best.pt", "segmenter": "stage2/work", "malignancy": "stage3/model"}


class PipelineError(LidcDetError):
    """A models folder that cannot make a pipeline (names the folder and what is missing)."""


@runtime_checkable
class SecondLook(Protocol):
    """A rescoring step between segmentation and rejection (e.g. a learned FP classifier)."""

    def rescore(
        self, hu: np.ndarray, geometry: VolumeGeometry, detections: Detections, masks: Sequence[NoduleMask] | None
    ) -> np.ndarray | Detections:
        """``float [N]`` (or ``detections`` with new scores): a new score for each candidate
        (higher = more likely a nodule)."""
        ...


@dataclass(frozen=True, eq=False)
class Candidate:
    """One segmented stage-1 candidate and what the later stages made of it.

    Attributes:
        rank: 1-based rank by detection score among the scan's candidates.
        center_xyz_mm: world LPS centre (x, y, z), mm (the detection's).
        diameter_mm: the detector's diameter estimate, mm.
        detection_score: stage-1 score.
        score: final score (second look if any, down-weighted when rejected in that mode).
        kept: survived the second look and the stage-2 rejection.
        reason: why it was kept or rejected (e.g. ``"mask 80 mm3 >= 20 mm3"``, ``"empty mask"``).
        mask: its stage-2 mask (None without stage 2).
        p_malignant: stage-3 P(malignant) of a kept, non-empty mask, else None.
        second_look_score: the second look's score, or None.
    """

    rank: int
    center_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    detection_score: float
    score: float
    kept: bool
    reason: str
    mask: NoduleMask | None = None
    p_malignant: float | None = None
    second_look_score: float | None = None


@dataclass(frozen=True, eq=False)
class ScanResult:
    """The pipeline's output for one scan.

    Attributes:
        series_uid, patient_id: the scan.
        geometry: the pipeline grid (``image_hu``, masks and boxes live on it).
        image_hu: ``float32 [z, y, x]`` HU on ``geometry`` (the resampled scan).
        source_geometry: the geometry of the series as read (None when a volume was given).
        detections: every stage-1 candidate, best first.
        candidates: the top ``max_candidates`` by detection score, in that order.
        rejection: stage 2's record over ``candidates`` (None without stage 2).
        malignancy: one score per kept candidate with a non-empty mask (candidate order).
        seconds: wall time per step (``resample``, ``detect``, ``segment``, ``second_look``,
            ``classify``), s.
        models: what made it (paths / names of the stage models, ``synthetic_training``).
    """

    series_uid: str
    patient_id: str
    geometry: VolumeGeometry
    image_hu: np.ndarray
    source_geometry: VolumeGeometry | None
    detections: Detections
    candidates: tuple[Candidate, ...]
    rejection: Rejection | None
    malignancy: tuple[MalignancyScore, ...]
    seconds: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> list[Candidate]:
        """The kept candidates, best final score first."""
        return sorted((c for c in self.candidates if c.kept), key=lambda c: (-c.score, c.rank))

    def final_detections(self) -> Detections:
        """The kept candidates as :class:`Detections` with their final scores (best first): the
        pipeline's answer, the list a LUNA16 candidates file holds."""
        kept = self.kept
        return Detections(
            self.series_uid,
            np.array([c.center_xyz_mm for c in kept], dtype=np.float64).reshape(-1, 3),
            np.array([c.diameter_mm for c in kept], dtype=np.float64),
            np.array([c.score for c in kept], dtype=np.float64),
        )


def write_manifest(
    models_dir: Path,
    *,
    detector: str | Path,
    segmenter: str | Path | None,
    malignancy: str | Path | None,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    max_candidates: int = 40,
    synthetic_training: bool = True,
    second_look: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``models_dir/pipeline.json`` (paths are stored relative to ``models_dir``)."""
    from lidc_det.atomic import write_json

    models_dir = Path(models_dir)

    def rel(p: str | Path | None) -> str | None:
        if p is None:
            return None
        p = Path(p)
        try:
            return str(p.resolve().relative_to(models_dir.resolve()))
        except ValueError:
            return str(p.resolve())

    record = {
        "format": MANIFEST_FORMAT,
        "detector": rel(detector),
        "segmenter": rel(segmenter),
        "malignancy": rel(malignancy),
        "spacing_zyx": [float(s) for s in spacing_zyx],
        "max_candidates": int(max_candidates),
        "synthetic_training": bool(synthetic_training),
        "second_look": second_look,
        **(extra or {}),
    }
    path = models_dir / MANIFEST
    write_json(path, record)
    return path


def read_manifest(models_dir: Path) -> dict[str, Any]:
    """The manifest of ``models_dir`` (``pipeline.json``, or the demo's layout when absent), paths resolved.

    Raises:
        PipelineError: no manifest and no demo layout, another format, or a missing model file.
    """
    models_dir = Path(models_dir)
    path = models_dir / MANIFEST
    if path.is_file():
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path}: not JSON ({err})") from err
        if m.get("format") != MANIFEST_FORMAT:
            raise PipelineError(f"{path}: format {m.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    elif (models_dir / DEMO_LAYOUT["detector"]).is_file():
        m = {"format": MANIFEST_FORMAT, "spacing_zyx": [1.0, 1.0, 1.0], "max_candidates": 40,
             "synthetic_training": True, "second_look": None}
        for key, rel in DEMO_LAYOUT.items():
            m[key] = rel if (models_dir / rel).exists() else None
    else:
        raise PipelineError(f"{models_dir}: no {MANIFEST} and no demo layout ({DEMO_LAYOUT['detector']})")
    for key in ("detector", "segmenter", "malignancy"):
        if m.get(key) is not None:
            p = (models_dir / m[key]).resolve()
            if not p.exists():
                raise PipelineError(f"{path}: the {key} model {p} does not exist")
            m[key] = p
    if m.get("detector") is None:
        raise PipelineError(f"{models_dir}: the manifest names no detector")
    return m


def _build_second_look(spec: dict[str, str] | None, models_dir: Path) -> Any:
    if not spec:
        return None
    mod_name, _, attr = str(spec["factory"]).partition(":")
    try:
        factory: Any = importlib.import_module(mod_name)
        for part in attr.split("."):  # "module:Class.load" works too
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as err:
        raise PipelineError(f"{models_dir}: second_look factory {spec['factory']!r} not found ({err})") from err
    path = spec.get("path")
    return factory(None if path is None else models_dir / path)


class Pipeline:
    """The stages chained on one scan at a time.

    Args:
        detector: stage 1, anything with ``predict(hu, geometry, *, series_uid) -> Detections``.
        segmenter: stage 2 (``segment(hu, geometry, detections) -> list[NoduleMask]`` and
            ``reject(detections, masks) -> Rejection``, e.g.
            :class:`stage2_segment.segmenter.NnUnetSegmenter`), or None.
        malignancy: stage 3 (``predict(samples) -> list[MalignancyScore]``, e.g.
            :class:`stage3_malignancy.model.MalignancyModel`), or None.
        second_look: optional rescoring step (:class:`SecondLook`).
        spacing_zyx: grid the scan is resampled to before stage 1 (mm; the models' training grid).
        max_candidates: top candidates per scan that stage 2 segments (the LUNA16 CPM looks at
            up to 8 FPs per scan, so a few dozen keep every figure).
        models: description of the stage models, copied into every result.
    """

    def __init__(
        self,
        detector: Any,
        segmenter: Any = None,
        malignancy: Any = None,
        *,
        second_look: Any = None,
        spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
        max_candidates: int = 40,
        models: dict[str, Any] | None = None,
    ) -> None:
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        if second_look is not None and not isinstance(second_look, SecondLook):
            raise TypeError(f"second_look {type(second_look).__name__} has no rescore(hu, geometry, detections, masks)")
        self.detector = detector
        self.segmenter = segmenter
        self.malignancy = malignancy
        self.second_look = second_look
        self.spacing_zyx = tuple(float(s) for s in spacing_zyx)
        self.max_candidates = int(max_candidates)
        self.models = dict(models or {})

    @classmethod
    def from_dir(cls, models_dir: str | Path, *, device: str | None = None, progress: bool = False) -> Pipeline:
        """The pipeline of a models folder (``pipeline.json`` or the demo's layout, see the module doc)."""
        from stage1_detect.cli import load_detector

        models_dir = Path(models_dir)
        m = read_manifest(models_dir)
        detector = load_detector(m["detector"], device=device, progress=progress)
        segmenter = None
        if m.get("segmenter") is not None:
            from stage2_segment.config import SegmenterConfig
            from stage2_segment.segmenter import NnUnetSegmenter

            state_file = Path(m["segmenter"]) / "segmenter.json"
            if not state_file.is_file():
                raise PipelineError(f"{m['segmenter']}: no segmenter.json (not a trained stage-2 work folder)")
            cfg = SegmenterConfig.from_dict(json.loads(state_file.read_text())["config"])
            segmenter = NnUnetSegmenter(m["segmenter"], cfg)
            if not segmenter.is_fitted:
                raise PipelineError(f"{m['segmenter']}: the stage-2 model is not trained")
        malignancy = None
        if m.get("malignancy") is not None:
            from stage3_malignancy.model import MalignancyModel

            malignancy = MalignancyModel.load(m["malignancy"])
        models = {k: (str(v) if isinstance(v, Path) else v) for k, v in m.items()}
        return cls(
            detector, segmenter, malignancy, second_look=_build_second_look(m.get("second_look"), models_dir),
            spacing_zyx=m.get("spacing_zyx", (1.0, 1.0, 1.0)), max_candidates=int(m.get("max_candidates", 40)),
            models=models,
        )

    @property
    def synthetic_training(self) -> bool:
        return bool(self.models.get("synthetic_training", False))

    # ------------------------------------------------------------------ entry points
    def run(self, source: str | Path | Any, *, series_uid: str | None = None) -> ScanResult:
        """The pipeline on a DICOM series folder (``series_uid`` picks one when there are several)
        or on a volume with ``hu``, ``geometry``, ``series_uid``, ``patient_id`` (e.g.
        :class:`lidc_det.io.dicom.CTVolume`); the scan is resampled to ``spacing_zyx`` first."""
        from lidc_det.resample import resample_image

        if isinstance(source, (str, Path)):
            from lidc_det.io.dicom import read_series

            source = read_series(Path(source), series_uid=series_uid)
        t0 = time.perf_counter()
        geom: VolumeGeometry = source.geometry
        if np.allclose(geom.spacing_zyx, self.spacing_zyx):
            hu, grid = np.asarray(source.hu, dtype=np.float32), geom
        else:
            hu, grid = resample_image(np.asarray(source.hu), geom, self.spacing_zyx)
        resample_s = time.perf_counter() - t0
        result = self.run_volume(hu, grid, series_uid=str(source.series_uid), patient_id=str(source.patient_id))
        return _replace(result, source_geometry=geom, seconds={"resample": round(resample_s, 3), **result.seconds})

    def run_volume(
        self,
        hu: np.ndarray,
        geometry: VolumeGeometry,
        *,
        series_uid: str,
        patient_id: str = "",
        detections: Detections | None = None,
    ) -> ScanResult:
        """The pipeline on ``hu`` (``[z, y, x]`` HU already on the models' grid, e.g. a prepared scan);
        ``detections`` given: stage 1 is skipped and these candidates are used."""
        seconds: dict[str, float] = {}
        hu = np.asarray(hu, dtype=np.float32)
        t0 = time.perf_counter()
        if detections is None:
            detections = self.detector.predict(hu, geometry, series_uid=series_uid)
            if not isinstance(detections, Detections):
                raise TypeError(f"detector returned {type(detections).__name__}, expected Detections")
        seconds["detect"] = time.perf_counter() - t0
        detections = detections.top_k(len(detections))
        top = detections.top_k(self.max_candidates)
        n = len(top)

        masks: list[NoduleMask] | None = None
        t0 = time.perf_counter()
        if self.segmenter is not None and n:
            masks = list(self.segmenter.segment(hu, geometry, top))
            if len(masks) != n:
                raise ValueError(f"segmenter returned {len(masks)} masks for {n} candidates")
        seconds["segment"] = time.perf_counter() - t0

        scores = top.scores.copy()
        kept = np.ones(n, dtype=bool)
        reasons = ["kept (no stage 2)" if self.segmenter is None else "kept"] * n
        second: np.ndarray | None = None
        t0 = time.perf_counter()
        if self.second_look is not None and n:
            out = self.second_look.rescore(hu, geometry, top, masks)
            second = np.asarray(out.scores if isinstance(out, Detections) else out, dtype=np.float64).reshape(-1)
            if second.shape != (n,):
                raise ValueError(f"second look returned {second.shape[0]} scores for {n} candidates")
            scores = second.copy()
            min_score = getattr(self.second_look, "min_score", None)
            if min_score is not None:
                for i in np.flatnonzero(second < float(min_score)):
                    kept[i] = False
                    reasons[i] = f"second look {second[i]:.2f} < {float(min_score):.2f}"
        seconds["second_look"] = time.perf_counter() - t0

        rejection: Rejection | None = None
        if masks is not None and getattr(self.segmenter, "min_volume_mm3", None) is not None:
            rejection = self.segmenter.reject(top, masks)
            for i in range(n):
                if not kept[i]:
                    continue
                if rejection.kept[i]:
                    reasons[i] = f"kept: {rejection.reasons[i]}"
                elif rejection.mode == "downweight":  # stays in the list at a lower score
                    reasons[i] = f"down-weighted: {rejection.reasons[i]}"
                    scores[i] *= rejection.scores[i] / max(top.scores[i], 1e-12)
                else:
                    kept[i] = False
                    reasons[i] = f"rejected: {rejection.reasons[i]}"

        probs: dict[int, float] = {}
        scores_out: list[MalignancyScore] = []
        t0 = time.perf_counter()
        if self.malignancy is not None and masks is not None:
            from stage3_malignancy.samples import samples_from_nodule_masks

            idx = [i for i in range(n) if kept[i] and not masks[i].empty]
            if idx:
                samples = samples_from_nodule_masks(hu, geometry, [masks[i] for i in idx], patient_id=patient_id)
                scores_out = list(self.malignancy.predict(samples))
                probs = {i: s.probability for i, s in zip(idx, scores_out)}
        seconds["classify"] = time.perf_counter() - t0

        cands = tuple(
            Candidate(
                rank=i + 1,
                center_xyz_mm=tuple(float(v) for v in top.centers_xyz_mm[i]),  # type: ignore[arg-type]
                diameter_mm=float(top.diameters_mm[i]),
                detection_score=float(top.scores[i]),
                score=float(scores[i]),
                kept=bool(kept[i]),
                reason=reasons[i],
                mask=None if masks is None else masks[i],
                p_malignant=probs.get(i),
                second_look_score=None if second is None else float(second[i]),
            )
            for i in range(n)
        )
        return ScanResult(
            series_uid=series_uid, patient_id=patient_id, geometry=geometry, image_hu=hu, source_geometry=None,
            detections=detections, candidates=cands, rejection=rejection, malignancy=tuple(scores_out),
            seconds={k: round(v, 3) for k, v in seconds.items()}, models=dict(self.models),
        )


def _replace(result: ScanResult, **changes: Any) -> ScanResult:
    from dataclasses import replace

    return replace(result, **changes)
