"""The built-in ``retina3d`` detector: :class:`Retina3DDetector` (model + config + device).

>>> det = Retina3DDetector.from_checkpoint("runs/x/best.pt")          # doctest: +SKIP
>>> dets = det.predict(volume.hu, volume.geometry, series_uid=volume.series_uid)  # doctest: +SKIP

torch is imported when a detector is built, not when this module is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from stage1_detect.config import DetectorConfig, load_config
from stage1_detect.registry import register_detector

if TYPE_CHECKING:
    import torch

    from stage1_detect.train import TrainResult


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@register_detector("retina3d")
class Retina3DDetector:
    """Our 3D RetinaNet-style detector (:mod:`stage1_detect.model`) behind the
    :class:`~stage1_detect.registry.Detector` interface.

    Args:
        config: a :class:`DetectorConfig`, a built-in config name ("tiny", "default")
            or a YAML path. Ignored when ``checkpoint`` is given (the checkpoint's config wins).
        checkpoint: a ``.pt`` written by training (``best.pt`` / ``last.pt``).
        device: "cpu", "cuda", ...; default CUDA when available.
        progress: show a tqdm bar over sliding windows in :meth:`predict`.
        overrides: config fields to change (e.g. ``window_zyx``, ``score_thresh``). With a
            ``checkpoint``, a change to a field that defines the trained model
            (:data:`~stage1_detect.config.MODEL_FIELDS`: spacing, HU window, architecture,
            anchors) raises :class:`~stage1_detect.config.ModelOverrideError`; training and
            inference fields may change (fine-tuning, sliding window, thresholds).
    """

    def __init__(
        self,
        config: DetectorConfig | str | Path = "tiny",
        *,
        checkpoint: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> None:
        import torch

        from stage1_detect.model import Retina3D
        from stage1_detect.train import config_of_checkpoint, load_checkpoint

        self.device = torch.device(device or default_device())
        state = None
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, map_location="cpu")
            config = config_of_checkpoint(state, checkpoint).with_overrides_of_trained(str(checkpoint), **overrides)
        else:
            if not isinstance(config, DetectorConfig):
                config = load_config(config)
            if overrides:
                config = config.replace(**overrides)
        self.config: DetectorConfig = config
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.progress = progress
        self.model = Retina3D(config, generator=torch.Generator().manual_seed(config.seed))
        if state is not None:
            self.model.load_state_dict(state["model"])
        self._prepare_for_inference()

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | None = None, **kwargs: Any) -> Retina3DDetector:
        """A detector with the config and weights of a training checkpoint."""
        return cls(checkpoint=path, device=device, **kwargs)

    def _prepare_for_inference(self) -> None:
        import copy

        import torch

        # channels-last on the CPU too: oneDNN then runs every 3D conv (see predict_boxes)
        net = copy.deepcopy(self.model).eval().fuse_for_inference().to(self.device)
        net = net.to(memory_format=torch.channels_last_3d)
        self._inference_model: torch.nn.Module = net

    def with_inference_options(self, **overrides: Any) -> Retina3DDetector:
        """The same trained weights with inference fields changed (e.g. ``lung_restrict=False``,
        ``score_thresh``): a new detector that shares this one's inference network.

        Raises:
            ModelOverrideError: an override changes a field that defines the model.
        """
        import copy

        other = copy.copy(self)
        other.config = self.config.with_overrides_of_trained("with_inference_options", **overrides)
        return other

    def predict(self, hu: np.ndarray, geometry: VolumeGeometry, *, series_uid: str) -> Detections:
        """Candidates in one scan (``hu``: ``[z, y, x]`` HU on ``geometry``, any spacing),
        best first, at most ``config.max_detections`` (see :func:`stage1_detect.inference.predict_scan`)."""
        from stage1_detect.inference import predict_scan

        return predict_scan(
            self._inference_model, hu, geometry, self.config, series_uid=series_uid, device=self.device, progress=self.progress
        )

    def fit(
        self,
        train_cases: Sequence[Any],
        val_cases: Sequence[Any],
        out_dir: str | Path,
        **kwargs: Any,
    ) -> TrainResult:
        """Train with :func:`stage1_detect.train.train_detector` (resuming from ``out_dir``
        when possible; a detector built from a checkpoint is fine-tuned from it), then load
        ``best.pt`` (or ``last.pt`` without validation) into this detector."""
        from stage1_detect.train import load_checkpoint, train_detector

        if self.checkpoint is not None:
            kwargs.setdefault("init_checkpoint", self.checkpoint)
        kwargs.setdefault("progress", self.progress)
        result = train_detector(self.config, train_cases, val_cases, out_dir, device=self.device, **kwargs)
        chosen = result.best_checkpoint or result.last_checkpoint
        self.model.load_state_dict(load_checkpoint(chosen, map_location="cpu")["model"])
        self.checkpoint = chosen
        self._prepare_for_inference()
        return result
