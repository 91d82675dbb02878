"""``blob-lgbm-cnn``: blob-lgbm with a patch CNN behind it (false-positive reduction in one detector).

:class:`BlobCNNDetector` proposes and scores candidates as :class:`~stage1_detect.blob.BlobDetector` does (the
``max_detections`` best after suppression), then multiplies each score by the mean probability of one or more patch
CNNs (:class:`~stage1_detect.patch_cnn.PatchRescorer`; several: an ensemble, e.g. of seeds), with flip test-time
augmentation by default. The CNNs train on the same training scans as LightGBM, on patches of LightGBM's own
candidates (:func:`~stage1_detect.patch_cnn.training_patches`), so whatever protocol keeps the detector's training
away from a scored region keeps the CNNs away from it too.

:meth:`BlobCNNDetector.fit` writes, in its ``out_dir``: blob-lgbm's model (``blob_model.txt``, ``blob_model.json``),
each CNN (``patch_cnn/<key>/patch_cnn.pt``, :func:`cnn_key`: a rerun with the same model, data and CNN settings
reuses it) and the manifest ``blob_cnn.json`` that names them. Load a trained one with
``BlobCNNDetector(checkpoint="out/blob_cnn.json")`` (or ``lidc-det detect --model out/blob_cnn.json``, or a pipeline
manifest's ``detector``): text, JSON and weights-only torch files, no pickle.

Usage::

    det = build_detector({"name": "blob-lgbm-cnn", "patch_cnn": [{"channels": [16, 32, 64], "epochs": 16}],
                          "ray_features": True})
    det.fit(train_cases, val_cases, "runs/blob_cnn")
    dets = det.predict(hu, geometry, series_uid=uid)    # Detections, best first, score = LightGBM x CNN
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import ConfigError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from stage1_detect.blob import SEMIREAL_PREFIX, BlobCandidates, BlobConfig, BlobDetector, BlobModelError
from stage1_detect.patch_cnn import PatchCNNConfig, PatchRescorer, extract_patches, training_patches
from stage1_detect.registry import register_detector

__all__ = ["MANIFEST_FILE", "BlobCNNDetector", "cnn_config", "cnn_key", "ensemble_probabilities", "train_cnn"]

MANIFEST_FILE = "blob_cnn.json"
KIND = "lidc-det blob-lgbm + patch-CNN model"


def cnn_config(fields: Mapping[str, Any] | PatchCNNConfig | None) -> PatchCNNConfig:
    """A :class:`PatchCNNConfig` from its fields (lists become tuples; None: the defaults).

    Raises:
        ConfigError: an unknown field.
    """
    if isinstance(fields, PatchCNNConfig):
        return fields
    raw = dict(fields or {})
    unknown = sorted(set(raw) - set(PatchCNNConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"patch CNN: unknown fields {unknown}; known: {sorted(PatchCNNConfig.__dataclass_fields__)}")
    return PatchCNNConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


CNN_ADDED_LATER: tuple[tuple[str, Any], ...] = (("negative_pool", 0),)
"""Fields of :class:`PatchCNNConfig` added after CNNs were trained, with their defaults: left out of :func:`cnn_key`
while at them, so those CNNs keep their keys."""


def cnn_key(blob: BlobDetector, ccfg: PatchCNNConfig) -> str:
    """The key of a CNN trained behind the trained ``blob``: its model's ``data_key`` (settings and training scans),
    its suppression settings (they choose the candidates the CNN learns from) and the CNN's config."""
    if "data_key" not in blob.meta:
        raise BlobModelError("blob-lgbm: a CNN's key needs a trained model (fit it or load it first)")
    fields = asdict(ccfg)
    for name, default in CNN_ADDED_LATER:
        if fields[name] == default:
            del fields[name]
    return hashlib.sha1(json.dumps([blob.meta["data_key"], blob.config.max_detections, blob.config.nms_radius_factor,
                                    fields], sort_keys=True, default=list).encode()).hexdigest()[:12]


def train_cnn(blob: BlobDetector, train_cases: Sequence[Any], cache_dir: str | Path, ccfg: PatchCNNConfig,
              path: str | Path, *, progress: bool = True) -> PatchRescorer:
    """The CNN saved at ``path``, or one trained behind ``blob`` on ``train_cases`` and saved there.

    Each training scan's candidates (read from ``cache_dir`` or extracted there, as blob-lgbm's ``fit`` does) are
    scored and suppressed by ``blob`` (its best ``ccfg.negative_pool`` when that is not 0), and
    :func:`training_patches` cuts its labelled patches; patches of scans that are not semi-real (series UID not
    ``semireal-...``: the plain twins) weigh ``ccfg.twin_weight``.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    if path.exists():
        return PatchRescorer.load(path)
    rng = np.random.default_rng(ccfg.seed)
    xs, ys, ws = [], [], []
    for case in tqdm(train_cases, desc="patch CNN: training patches", unit="scan", disable=not progress):
        dets = blob.score_candidates(blob.cached_candidates(case, cache_dir), series_uid=case.series_uid,
                                     top=ccfg.negative_pool or None)
        x, y = training_patches(case, dets, ccfg, rng)
        xs.append(x)
        ys.append(y)
        semireal = str(case.series_uid).startswith(SEMIREAL_PREFIX)
        ws.append(np.full(len(y), 1.0 if semireal else ccfg.twin_weight, np.float32))
    rescorer = PatchRescorer(ccfg)
    rescorer.fit(np.concatenate(xs), np.concatenate(ys), weights=np.concatenate(ws), progress=progress)
    rescorer.meta["train_series_uids"] = sorted(c.series_uid for c in train_cases)
    rescorer.save(path)
    return rescorer


def ensemble_probabilities(rescorers: Sequence[PatchRescorer], hu: np.ndarray, geometry: VolumeGeometry,
                           centres_xyz_mm: np.ndarray, *, flips: Sequence[bool] = (True,)) -> list[np.ndarray]:
    """The mean probability of ``rescorers`` at each centre ``(N, 3)`` (world mm), one ``(N,)`` array per entry of
    ``flips`` (with / without 8-flip test-time augmentation). Patches are cut once per distinct patch geometry
    (:meth:`PatchCNNConfig.patch_key`), not once per CNN."""
    if not rescorers:
        raise ConfigError("patch CNN: an ensemble needs at least one CNN")
    patches: dict[str, np.ndarray] = {}
    probs: list[list[np.ndarray]] = [[] for _ in flips]
    for r in rescorers:
        key = json.dumps(r.config.patch_key(), sort_keys=True)
        if key not in patches:
            patches[key] = extract_patches(hu, geometry, centres_xyz_mm, r.config)
        for out, f in zip(probs, flips):
            out.append(r.predict(patches[key], flips=f))
    return [np.mean(p, axis=0) for p in probs]


@register_detector("blob-lgbm-cnn")
class BlobCNNDetector:
    """blob-lgbm's candidates and scores times a patch-CNN ensemble's probability (see the module docstring).

    Args:
        checkpoint: a ``blob_cnn.json`` written by :meth:`fit` (or its folder); its models and settings win, and
            ``overrides`` may only change ``max_detections`` and ``nms_radius_factor`` (and ``flips``).
        patch_cnn: the CNNs to train: one mapping of :class:`PatchCNNConfig` fields, or a list of them (an
            ensemble whose probabilities are averaged). Default: one CNN of the default config.
        flips: average each CNN over the 8 flips of its cubes (8 times the CNN's work; it added 0 to 0.04 to the
            0001 yardstick and +-0.004 to TCGA's, see docs/transfer.md, sixteenth round).
        progress: tqdm bars in :meth:`fit`.
        overrides: :class:`~stage1_detect.blob.BlobConfig` fields.
    """

    def __init__(self, *, checkpoint: str | Path | None = None, patch_cnn: Any = None, flips: bool | None = None,
                 progress: bool = True, **overrides: Any) -> None:
        self.progress = progress
        self.device = "cpu"
        self.rescorers: list[PatchRescorer] = []
        if checkpoint is not None:
            if patch_cnn is not None:
                raise ConfigError("blob-lgbm-cnn: patch_cnn defines the trained CNNs of a checkpoint and cannot change")
            path = Path(checkpoint)
            path = path / MANIFEST_FILE if path.is_dir() else path
            manifest = _read_manifest(path)
            self.blob = BlobDetector(checkpoint=path.parent / manifest["blob_model"], progress=progress, **overrides)
            self.rescorers = [PatchRescorer.load(path.parent / p) for p in manifest["cnns"]]
            self.cnn_configs = [r.config for r in self.rescorers]
            self.flips = bool(manifest["flips"]) if flips is None else bool(flips)
            self.checkpoint: Path | None = path
        else:
            many = patch_cnn if isinstance(patch_cnn, (list, tuple)) else [patch_cnn]
            self.cnn_configs = [cnn_config(c) for c in many]
            self.flips = True if flips is None else bool(flips)
            self.blob = BlobDetector(progress=progress, **overrides)
            self.checkpoint = None

    @property
    def config(self) -> BlobConfig:
        """blob-lgbm's settings (candidates, features, LightGBM, suppression)."""
        return self.blob.config

    @property
    def trained(self) -> bool:
        return self.blob.trained and len(self.rescorers) == len(self.cnn_configs) > 0

    def cached_candidates(self, case: Any, cache_dir: str | Path) -> BlobCandidates:
        """blob-lgbm's candidates of a scan, through its feature cache (:meth:`BlobDetector.cached_candidates`)."""
        return self.blob.cached_candidates(case, cache_dir)

    def predict(self, hu: np.ndarray, geometry: VolumeGeometry, *, series_uid: str) -> Detections:
        """blob-lgbm's detections of one scan (``hu`` ``[z, y, x]``), rescored (:meth:`rescore`), best first.

        Raises:
            BlobModelError: not trained or loaded.
        """
        self._check_trained()
        return self.rescore(self.blob.predict(hu, geometry, series_uid=series_uid), hu, geometry)

    def score_candidates(self, cand: BlobCandidates, hu: np.ndarray, geometry: VolumeGeometry, *,
                         series_uid: str) -> Detections:
        """:meth:`predict` on candidates extracted before (e.g. by :meth:`cached_candidates`) from the same scan."""
        return self.rescore(self.blob.score_candidates(cand, series_uid=series_uid), hu, geometry)

    def rescore(self, dets: Detections, hu: np.ndarray, geometry: VolumeGeometry) -> Detections:
        """``dets`` (blob-lgbm's, of the scan ``hu`` on ``geometry``) with each score multiplied by the CNNs' mean
        probability, best first.

        Raises:
            BlobModelError: the CNNs are not trained or loaded.
        """
        self._check_trained()
        if not len(dets):
            return dets
        (prob,) = ensemble_probabilities(self.rescorers, hu, geometry, dets.centers_xyz_mm, flips=(self.flips,))
        return Detections(dets.series_uid, dets.centers_xyz_mm, dets.diameters_mm, dets.scores * prob,
                          dets.boxes_voxel).top_k(len(dets))

    def _check_trained(self) -> None:
        if not self.trained:
            raise BlobModelError("blob-lgbm-cnn: not trained; call fit() or build it with checkpoint=")

    def fit(self, train_cases: Sequence[Any], val_cases: Sequence[Any], out_dir: str | Path, *,
            cache_dir: str | Path | None = None, **_: Any) -> dict[str, Any]:
        """Train (or reuse) blob-lgbm (:meth:`BlobDetector.fit`), then each CNN on the training scans
        (:func:`train_cnn`), and write the manifest ``out_dir/blob_cnn.json``. Returns blob-lgbm's training summary
        with each CNN's (``patch_cnns``: patches, epoch losses, seconds, its file)."""
        from lidc_det.atomic import write_json

        out = Path(out_dir)
        cache = out / "features" if cache_dir is None else Path(cache_dir)
        summary = dict(self.blob.fit(train_cases, val_cases, out, cache_dir=cache))
        files = [Path("patch_cnn") / cnn_key(self.blob, c) / "patch_cnn.pt" for c in self.cnn_configs]
        self.rescorers = [train_cnn(self.blob, train_cases, cache, c, out / f, progress=self.progress)
                          for c, f in zip(self.cnn_configs, files)]
        manifest = {"kind": KIND, "blob_model": self.blob.checkpoint.name if self.blob.checkpoint else "blob_model.txt",
                    "cnns": [str(f) for f in files], "flips": self.flips}
        write_json(out / MANIFEST_FILE, manifest)
        self.checkpoint = out / MANIFEST_FILE
        summary["patch_cnns"] = [{"file": str(f), **{k: v for k, v in r.meta.items() if k != "train_series_uids"}}
                                 for f, r in zip(files, self.rescorers)]
        return summary


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``, checked.

    Raises:
        BlobModelError: missing, not JSON, or not a blob-lgbm-cnn manifest.
    """
    if not path.is_file():
        raise BlobModelError(f"{path}: no such blob-lgbm-cnn manifest")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BlobModelError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(m, dict) or m.get("kind") != KIND or not isinstance(m.get("cnns"), list) or not m["cnns"] \
            or not isinstance(m.get("blob_model"), str) or "flips" not in m:
        raise BlobModelError(f"{path}: not a blob-lgbm-cnn manifest (kind {KIND!r} with blob_model, cnns, flips)")
    return m
