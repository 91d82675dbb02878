"""The built-in ``retina3d-ensemble`` detector: several :class:`Retina3DDetector` run as one.

The members share one architecture, anchor set and input grid and differ in their
training seed (initialisation and patch sampling). :meth:`Retina3DEnsemble.predict`
averages their anchors' probabilities and box codes window by window
(:class:`stage1_detect.inference.ModelMean`) before decoding, the lung-field filter and
NMS, so the ensemble is scored exactly like one detector. Averaging seeds is the plain
answer to a detector whose ranking of a given nodule swings from seed to seed.

Train ``members`` of them (member ``k`` with ``seed + k``, each into ``out_dir/member<k>``,
each resumable and picking its own best epoch on the validation scans)::

    det = build_detector({"name": "retina3d-ensemble", "config": "tiny", "members": 3})
    det.fit(train_cases, val_cases, "runs/ens")

or load trained checkpoints::

    det = Retina3DEnsemble(checkpoints=["a/best.pt", "b/best.pt", "c/best.pt"])

(``lidc-det detect --model a/best.pt b/best.pt c/best.pt`` does the same). Inference
costs one forward pass per member (times the flips of ``tta_flip_axes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import ConfigError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from stage1_detect.config import MODEL_FIELDS, DetectorConfig, load_config
from stage1_detect.detector import Retina3DDetector
from stage1_detect.registry import register_detector


def _check_same_model(members: Sequence[Retina3DDetector], names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless every member has the first one's model fields."""
    ref = members[0].config.to_dict()
    for m, name in zip(members[1:], names[1:]):
        d = m.config.to_dict()
        diff = [f for f in MODEL_FIELDS if d.get(f) != ref.get(f)]
        if diff:
            raise ConfigError(
                f"ensemble member {name} differs from {names[0]} in {', '.join(diff)}: "
                "members must share architecture, anchors, HU window and spacing"
            )


@register_detector("retina3d-ensemble")
class Retina3DEnsemble:
    """A deep ensemble of :class:`Retina3DDetector` behind the
    :class:`~stage1_detect.registry.Detector` interface.

    Args:
        config: the members' :class:`DetectorConfig` (or a built-in name / YAML path);
            ignored with ``checkpoints``.
        members: how many members to build (member ``k`` gets ``seed + k``); >= 2.
        checkpoints: trained members to load instead (``best.pt`` / ``last.pt``); their model
            fields must agree. The first one's inference fields are used, after ``overrides``.
        device: "cpu", "cuda", ...; default CUDA when available.
        progress: progress bars (training and sliding windows).
        overrides: config fields of every member (e.g. ``tta_flip_axes``, ``steps_per_epoch``).

    Raises:
        ConfigError: fewer than two members, or members of different models.
    """

    def __init__(
        self,
        config: DetectorConfig | str | Path = "tiny",
        *,
        members: int = 3,
        checkpoints: Sequence[str | Path] | None = None,
        device: str | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> None:
        if checkpoints is not None:
            paths = [Path(p) for p in checkpoints]
            if len(paths) < 2:
                raise ConfigError(f"an ensemble needs at least two checkpoints, got {len(paths)}")
            self.members = [Retina3DDetector(checkpoint=p, device=device, progress=progress, **overrides) for p in paths]
            names = [str(p) for p in paths]
        else:
            if int(members) < 2:
                raise ConfigError(f"an ensemble needs at least two members, got members={members}")
            base = config if isinstance(config, DetectorConfig) else load_config(config)
            if overrides:
                base = base.replace(**overrides)
            self.members = [
                Retina3DDetector(base.replace(seed=base.seed + k), device=device, progress=progress)
                for k in range(int(members))
            ]
            names = [f"member{k}" for k in range(int(members))]
        _check_same_model(self.members, names)
        self.progress = progress
        self._build()

    def _build(self) -> None:
        from stage1_detect.inference import ModelMean

        self.config: DetectorConfig = self.members[0].config
        self.device = self.members[0].device
        self._inference_model = ModelMean([m._inference_model for m in self.members])

    @property
    def checkpoints(self) -> list[Path | None]:
        """Each member's checkpoint (``None`` for an untrained member)."""
        return [m.checkpoint for m in self.members]

    def with_inference_options(self, **overrides: Any) -> Retina3DEnsemble:
        """The same trained members with inference fields changed (see
        :meth:`Retina3DDetector.with_inference_options`)."""
        import copy

        other = copy.copy(self)
        other.members = [m.with_inference_options(**overrides) for m in self.members]
        other._build()
        return other

    def predict(self, hu: np.ndarray, geometry: VolumeGeometry, *, series_uid: str) -> Detections:
        """Candidates in one scan from the members' averaged outputs (``hu``: ``[z, y, x]`` HU on
        ``geometry``, any spacing), best first, at most ``config.max_detections``."""
        from stage1_detect.inference import predict_scan

        return predict_scan(
            self._inference_model, hu, geometry, self.config, series_uid=series_uid, device=self.device,
            progress=self.progress,
        )

    def fit(self, train_cases: Sequence[Any], val_cases: Sequence[Any], out_dir: str | Path, **kwargs: Any) -> list[Any]:
        """Train every member on the same scans into ``out_dir/member<k>`` (each resumable, see
        :meth:`Retina3DDetector.fit`); return their :class:`~stage1_detect.train.TrainResult`."""
        results = []
        for k, m in enumerate(self.members):
            print(f"[ensemble] member {k + 1}/{len(self.members)} (seed {m.config.seed})", flush=True)
            results.append(m.fit(train_cases, val_cases, Path(out_dir) / f"member{k}", **kwargs))
        self._build()
        return results
