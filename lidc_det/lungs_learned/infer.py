"""Whole-scan inference of a lung network and the threshold tuned on validation scans.

:class:`Inferencer` turns a scan into class probabilities on the working grid
(2D: every axial slice, padded to a multiple of the network's stride; 3D:
MONAI's sliding-window inference with Gaussian blending), then into labels:

* lung where ``1 - p(background) > threshold`` (the threshold is tuned on
  validation scans by :func:`tune_threshold` and stored as ``threshold.json``
  beside the checkpoint);
* right or left by the larger of ``p(right)``, ``p(left)`` (``side="network"``), or by
  splitting the lung mask as the classical segmenter does (``side="split"``);
* per side, the largest 3D component is kept (small islands are dropped).

:meth:`Inferencer.lung_fields` returns the labels on the scan's own grid
(per-class linear resampling, arg-max) as a :class:`lidc_det.lungs.LungFields`
(``split`` names the network; no airways are reported).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.geometry import VolumeGeometry
from lidc_det.lungs import LungFields
from lidc_det.lungs_learned.data import LungScan, resample_labels, to_work_grid
from lidc_det.lungs_learned.train import LungNetConfig, build_model, load_state

THRESHOLD_FILE = "threshold.json"


SIDES = ("network", "split")


def labels_from_probabilities(
    p: np.ndarray, threshold: float, *, largest_component: bool = True, side: str = "network",
    geometry: VolumeGeometry | None = None,
) -> np.ndarray:
    """``[3, z, y, x]`` probabilities -> uint8 labels 0 / 1 right / 2 left (see the module docstring).

    ``side="split"`` ignores the network's right/left and splits its lung mask as the classical
    segmenter does (:func:`lidc_det.lungs.split_lung_mask`; needs ``geometry``, the grid of ``p``;
    that split keeps the two largest components, so ``largest_component`` does not apply).
    """
    from scipy import ndimage as ndi

    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    lung = (1.0 - p[0]) > threshold
    if side == "split":
        if geometry is None:
            raise ValueError('side="split" needs the geometry of the probabilities')
        from lidc_det.lungs import split_lung_mask

        return split_lung_mask(lung, geometry)[0]
    side_label = np.where(p[2] > p[1], 2, 1).astype(np.uint8)
    out = np.where(lung, side_label, 0).astype(np.uint8)
    if largest_component:
        for v in (1, 2):
            lab, n = ndi.label(out == v)
            if n > 1:
                sizes = np.bincount(lab.ravel())
                sizes[0] = 0
                out[(lab > 0) & (lab != int(np.argmax(sizes)))] = 0
    return out


class Inferencer:
    """A trained lung network ready to predict (CPU or any torch device).

    Args:
        checkpoint: ``best.pt`` / ``last.pt`` of a :class:`~lidc_det.lungs_learned.train.Trainer` run.
        threshold: lung threshold; default the tuned one in ``threshold.json`` beside it, else 0.5.
        side: ``"network"`` (right/left by the larger probability) or ``"split"`` (the network's
            lung mask split into two lungs by :func:`lidc_det.lungs.split_lung_mask`).
    """

    def __init__(self, checkpoint: Path, *, device: str = "cpu", threshold: float | None = None, side: str = "network") -> None:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.side = side
        self.checkpoint = Path(checkpoint)
        state = load_state(self.checkpoint)
        self.config = LungNetConfig.from_dict(state["config"])
        self.model = build_model(self.config)
        self.model.load_state_dict(state["model"])
        self.model.to(device).eval()
        self.device = device
        tfile = self.checkpoint.with_name(THRESHOLD_FILE)
        if threshold is None:
            threshold = float(json.loads(tfile.read_text())["threshold"]) if tfile.is_file() else 0.5
        self.threshold = float(threshold)

    @property
    def n_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def probabilities(self, scan: LungScan) -> np.ndarray:
        """``[3, z, y, x]`` float32 softmax probabilities on ``scan``'s grid."""
        import torch

        img = torch.from_numpy(np.ascontiguousarray(scan.image, dtype=np.float32))
        f = int(np.prod(self.config.strides))
        with torch.no_grad():
            if self.config.kind == "2d":
                nz, ny, nx = img.shape
                py, px = (-ny) % f, (-nx) % f
                x = torch.nn.functional.pad(img[:, None], (0, px, 0, py), value=-1.0)
                outs = [torch.softmax(self.model(x[k : k + 16].to(self.device)), dim=1).cpu() for k in range(0, nz, 16)]
                p = torch.cat(outs)[:, :, :ny, :nx].permute(1, 0, 2, 3)
            else:
                from monai.inferers import sliding_window_inference

                logits = sliding_window_inference(
                    img[None, None].to(self.device), roi_size=self.config.patch, sw_batch_size=2,
                    predictor=self.model, overlap=0.25, mode="gaussian", padding_mode="constant", cval=-1.0,
                )
                p = torch.softmax(logits, dim=1)[0].cpu()
        return p.numpy().astype(np.float32)

    def labels(self, scan: LungScan, threshold: float | None = None) -> np.ndarray:
        """uint8 labels on ``scan``'s grid."""
        return labels_from_probabilities(self.probabilities(scan), self.threshold if threshold is None else threshold,
                                         side=self.side, geometry=scan.geometry)

    def lung_fields(self, hu: np.ndarray, geometry: VolumeGeometry, *, name: str = "") -> LungFields:
        """Lung fields of a HU volume on its own grid (resampled to the working grid and back)."""
        t0 = time.perf_counter()
        spacing = self.work_spacing
        scan = to_work_grid(name, hu, geometry, None, spacing)
        lab = self.labels(scan)
        full = resample_labels(lab, scan.geometry, geometry)
        method = f"learned {self.config.kind} U-Net" + (", sides split from the mask" if self.side == "split" else "")
        return LungFields(
            labels=full, geometry=geometry, airways=np.zeros(geometry.shape_zyx, dtype=bool),
            split=method, work_spacing_zyx=tuple(scan.geometry.spacing_zyx),  # type: ignore[arg-type]
            threshold_hu=math.nan, close_mm=0.0, seconds=time.perf_counter() - t0,
        )

    @property
    def work_spacing(self) -> tuple[float, float, float]:
        """Working-grid spacing the network was trained on (mm)."""
        meta = self.checkpoint.with_name("data.json")
        if meta.is_file():
            return tuple(json.loads(meta.read_text())["spacing_mm"])  # type: ignore[return-value]
        from lidc_det.lungs_learned.data import DEFAULT_SPACING_MM

        return DEFAULT_SPACING_MM


def tune_threshold(
    inferencer: Inferencer,
    val: Sequence[LungScan],
    *,
    thresholds: Sequence[float] = tuple(np.round(np.arange(0.1, 0.91, 0.05), 2)),
    write: bool = True,
) -> dict[str, Any]:
    """The lung threshold with the best mean Dice (both lungs, per scan) on labelled validation scans.

    Writes ``threshold.json`` beside the checkpoint (when ``write``) and sets
    ``inferencer.threshold``. Returns ``{"threshold", "val_dice", "table": [[t, dice], ...]}``.
    """
    from lidc_det.atomic import write_json
    from lidc_det.metrics.overlap import dice

    probs = [inferencer.probabilities(s) for s in val]
    table = []
    for t in thresholds:
        ds = []
        for s, p in zip(val, probs):
            lab = labels_from_probabilities(p, float(t), side=inferencer.side, geometry=s.geometry)
            assert s.labels is not None
            ds.append(np.mean([dice(lab == v, s.labels == v) for v in (1, 2)]))
        table.append([float(t), float(np.mean(ds))])
    best_t, best_d = max(table, key=lambda r: (r[1], -abs(r[0] - 0.5)))
    rec = {"threshold": best_t, "val_dice": best_d, "table": table, "val_scans": [s.name for s in val]}
    if write:
        write_json(inferencer.checkpoint.with_name(THRESHOLD_FILE), rec)
    inferencer.threshold = best_t
    return rec
