"""ONNX export of the ``retina3d`` network and an ONNX Runtime detector with the same output.

>>> path = export_onnx(Retina3DDetector.from_checkpoint("best.pt"), "retina3d.onnx")   # doctest: +SKIP
>>> det = OnnxDetector(path)                                    # doctest: +SKIP
>>> dets = det.predict(hu, geometry, series_uid=uid)            # same candidates as the torch model

The exported graph is the BatchNorm-fused inference network: input ``image``
``[B, 1, D, H, W]`` (normalised intensities; D, H, W multiples of 16, all four
dynamic), outputs ``cls_0..2`` ``[B, A, d, h, w]`` and ``box_0..2`` ``[B, A*6, d, h, w]``
per FPN level (strides 4, 8, 16). The detector config is stored in the model's
metadata (``lidc_det_config``), so an ``.onnx`` file is a complete detector: the sliding
window, decoding and NMS are the same Python code as for the torch model
(:func:`stage1_detect.inference.predict_scan`).

Execution providers: TensorRT, then CUDA, then CPU, as far as the installed
onnxruntime build offers them (the PyPI ``onnxruntime`` wheel is CPU-only; use
``onnxruntime-gpu`` on a GPU machine).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import atomic_path
from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from stage1_detect.config import DetectorConfig, config_from_dict

CONFIG_KEY = "lidc_det_config"
N_LEVELS = 3
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxExportError(LidcDetError):
    """onnx / onnxruntime missing, or an ONNX file that is not a lidc-det detector."""


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OnnxExportError(f"{module} is not installed: pip install 'lidc-det[export]' ({err})") from err


def export_onnx(detector: Any, path: str | Path, *, opset: int = 17, window_zyx: Sequence[int] = (64, 64, 64)) -> Path:
    """Write the detector's inference network to ``path`` (atomically) and return it.

    Args:
        detector: a :class:`stage1_detect.detector.Retina3DDetector` (trained or not).
        path: output ``.onnx`` file.
        opset: ONNX opset.
        window_zyx: shape of the example input used for tracing (any multiples of 16;
            the exported axes are dynamic).
    """
    import torch

    _need("onnx")
    config: DetectorConfig = detector.config
    net = detector._inference_model.to("cpu").eval()
    example = torch.zeros((1, 1, *[int(s) for s in window_zyx]), dtype=torch.float32)
    names = [f"cls_{i}" for i in range(N_LEVELS)] + [f"box_{i}" for i in range(N_LEVELS)]
    axes = {"image": {0: "batch", 2: "depth", 3: "height", 4: "width"}}
    axes.update({n: {0: "batch", 2: f"{n}_d", 3: f"{n}_h", 4: f"{n}_w"} for n in names})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import onnx

    import warnings

    with atomic_path(path) as tmp, warnings.catch_warnings():
        # the TorchScript-based exporter handles our dynamic D, H, W axes without extra packages
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(
            net, (example,), str(tmp), dynamo=False, input_names=["image"], output_names=names,
            dynamic_axes=axes, opset_version=opset,
        )
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = CONFIG_KEY, json.dumps(config.to_dict())
        onnx.save(model, str(tmp))
    detector._inference_model.to(detector.device)
    return path


class OnnxRetina3D:
    """An ONNX Runtime session that is called like the torch network:
    ``cls, box = net(x)`` with ``x`` a float32 ``[B, 1, D, H, W]`` tensor; returns lists of CPU tensors."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None) -> None:
        ort = _need("onnxruntime")
        available = ort.get_available_providers()
        chosen = [p for p in (providers or PREFERRED_PROVIDERS) if p in available]
        if not chosen:
            raise OnnxExportError(f"none of the execution providers {providers} is available (have {available})")
        self.session = ort.InferenceSession(str(path), providers=chosen)
        self.providers = tuple(self.session.get_providers())
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in meta:
            raise OnnxExportError(f"{path}: no '{CONFIG_KEY}' metadata; not exported by lidc-det export")
        self.config = config_from_dict(json.loads(meta[CONFIG_KEY]), source=str(path))

    def __call__(self, x: Any) -> tuple[list[Any], list[Any]]:
        import torch

        outs = self.session.run(None, {"image": x.detach().cpu().numpy().astype(np.float32, copy=False)})
        tensors = [torch.from_numpy(o) for o in outs]
        return tensors[:N_LEVELS], tensors[N_LEVELS:]


class OnnxDetector:
    """A detector backed by an exported ``.onnx`` file (same interface as the torch one).

    Args:
        path: file written by :func:`export_onnx`.
        providers: onnxruntime execution providers in order of preference
            (default: TensorRT, CUDA, CPU, as available).
        progress: tqdm bar over sliding windows.
    """

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None, progress: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxExportError(f"{self.path}: no such ONNX file")
        self.net = OnnxRetina3D(self.path, providers)
        self.config: DetectorConfig = self.net.config
        self.progress = progress
        self.device = "cuda" if any(p != "CPUExecutionProvider" for p in self.net.providers[:1]) else "cpu"

    def predict(self, hu: np.ndarray, geometry: VolumeGeometry, *, series_uid: str) -> Detections:
        """Candidates in one scan, as :meth:`Retina3DDetector.predict` (inputs go through CPU memory)."""
        from stage1_detect.inference import predict_scan

        return predict_scan(self.net, hu, geometry, self.config, series_uid=series_uid, device="cpu", progress=self.progress)  # type: ignore[arg-type]


def compare_detections(a: Detections, b: Detections, *, atol_mm: float = 0.5, atol_score: float = 1e-3) -> dict[str, float]:
    """How far two detection sets of one scan are apart (same order expected, best first).

    Returns ``{"n_a", "n_b", "max_center_mm", "max_score"}``; raises :class:`OnnxExportError`
    when the counts differ or a difference exceeds the tolerances.
    """
    out = {"n_a": float(len(a)), "n_b": float(len(b)), "max_center_mm": 0.0, "max_score": 0.0}
    if len(a) != len(b):
        raise OnnxExportError(f"parity: {len(a)} vs {len(b)} detections")
    if len(a):
        out["max_center_mm"] = float(np.abs(a.centers_xyz_mm - b.centers_xyz_mm).max())
        out["max_score"] = float(np.abs(a.scores - b.scores).max())
    if out["max_center_mm"] > atol_mm or out["max_score"] > atol_score:
        raise OnnxExportError(
            f"parity: centres differ by up to {out['max_center_mm']:.3g} mm, scores by {out['max_score']:.3g}"
        )
    return out
