"""2.5D RetinaNet from mmdet (slice stacks) with 2D boxes merged into 3D: ``"mmdet_retinanet_2p5d"``.

Needs the optional ``[mmdet]`` extra: mmdet 3.x with mmcv < 2.2 **built with its compiled
ops** (NMS, ...). There is no mmcv wheel for torch 2.14; build it from source (about an hour
on 2 cores)::

    pip install -U openmim && MMCV_WITH_OPS=1 pip install "mmcv>=2.0,<2.2" --no-binary mmcv
    pip install "mmdet>=3.3,<3.4"

Without it the detector is still registered, but building it raises
:class:`MmdetUnavailableError` with these instructions; the tests of the parts that need
mmdet skip.

**Input.** The scan is resampled to ``spacing_zyx_mm`` (1 mm by default) and normalised like
``retina3d`` (HU window -> [-1, 1]). Axial slice ``k`` becomes a 3-channel image: slices
``k - c``, ``k``, ``k + c`` with ``c = round(context_mm / spacing_z)`` (clamped at the ends), so
the network sees a little through-plane context, as in 2.5D detectors for CT.

**Targets.** A 3D target box ``z0, y0, x0, z1, y1, x1`` (exclusive ends) gives the 2D box
``x0, y0, x1, y1`` (mmdet's ``x1 y1 x2 y2`` pixel format, same exclusive-end convention) on
every slice ``z0 <= k < z1`` (:func:`slice_targets`).

**Model.** mmdet ``RetinaNet``: ResNet-18 (3 input channels) + FPN (levels at strides 4-64),
``RetinaHead`` with one class, anchors 4-6.3 px at stride 4 up to 64-100 px at stride 64
(``octave_base_scale`` 1, 3 scales per octave, square), focal + L1 loss, MaxIoU assigner; built
through mmdet's own registry (``mmdet.registry.MODELS``), so mmdet config dicts can be passed
as ``model_overrides``.

**3D merging** (:func:`merge_slice_detections`): 2D detections on consecutive slices are linked
into tracks (a detection joins the track whose last box on the previous slice overlaps it with
IoU >= ``link_iou``; best scores first); each track becomes one 3D box (z extent of the track,
in-plane box of its best slice) scored by the mean of its ``top_k_scores`` best slice scores;
then 3D NMS (:func:`stage1_detect.inference.nms_3d`) and the 100 cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from lidc_det.torch_state import seeded_torch_rng
from stage1_detect.registry import register_detector

CHECKPOINT_FORMAT = "stage1_detect.mmdet_retinanet_2p5d/1"
INSTALL_HINT = (
    "the mmdet adapter needs mmdet 3.x and mmcv<2.2 with compiled ops: "
    'MMCV_WITH_OPS=1 pip install "mmcv>=2.0,<2.2" --no-binary mmcv && pip install "mmdet>=3.3,<3.4" '
    "(source build, about 1 hour on 2 cores); see stage1_detect/mmdet_adapter.py"
)


class MmdetUnavailableError(LidcDetError, ImportError):
    """mmdet / mmcv (with compiled ops) is not installed."""


def mmdet_available() -> bool:
    """True when mmdet imports and mmcv has its compiled ops (``mmcv.ops.nms`` works)."""
    try:
        import mmdet  # noqa: F401
        import torch
        from mmcv.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
    return True


@dataclass(frozen=True)
class Mmdet2p5dConfig:
    """Settings of the 2.5D mmdet detector (see the module docstring).

    Attributes:
        spacing_zyx_mm: working grid spacing (z, y, x) mm.
        hu_window: HU clip mapped to [-1, 1].
        context_mm: through-plane offset of the two side channels (mm).
        depth: ResNet depth (18, 34, 50).
        model_overrides: mmdet config dict merged into the model config (mmengine ``Config`` merge).
        batch_size: slices per training step; pos_fraction: fraction of slices holding a target box.
        lr, weight_decay: AdamW; steps: training steps; checkpoint_every: ``last.pt`` interval.
        score_thresh: 2D score threshold (mmdet ``test_cfg.score_thr``).
        link_iou: IoU linking 2D boxes on consecutive slices; top_k_scores: slices averaged for the score.
        nms_iou: 3D NMS IoU; max_detections: cap per scan.
        slice_batch: slices per forward pass at inference.
        seed: sampling and initialisation seed.
    """

    spacing_zyx_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hu_window: tuple[float, float] = (-1000.0, 500.0)
    context_mm: float = 2.0
    depth: int = 18
    model_overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    pos_fraction: float = 0.5
    lr: float = 1e-4
    weight_decay: float = 1e-4
    steps: int = 2000
    checkpoint_every: int = 200
    score_thresh: float = 0.05
    link_iou: float = 0.3
    top_k_scores: int = 3
    nms_iou: float = 0.1
    max_detections: int = 100
    slice_batch: int = 16
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


# ------------------------------------------------------------------ pure parts (no mmdet)
def slice_stack(volume: np.ndarray, k: int, offset: int) -> np.ndarray:
    """``[3, H, W]`` float32: slices ``k - offset``, ``k``, ``k + offset`` of ``volume`` ``[z, y, x]``
    (indices clamped to the volume)."""
    n = volume.shape[0]
    idx = [min(max(k + d, 0), n - 1) for d in (-offset, 0, offset)]
    return np.ascontiguousarray(volume[idx], dtype=np.float32)


def slice_targets(boxes_zyx: np.ndarray, k: int) -> np.ndarray:
    """2D boxes ``(N, 4)`` ``x0, y0, x1, y1`` on slice ``k`` of the 3D voxel boxes ``(M, 6)``
    (``z0 <= k < z1``; z bounds rounded to whole slices)."""
    b = np.asarray(boxes_zyx, dtype=np.float64).reshape(-1, 6)
    on = (np.floor(b[:, 0]) <= k) & (k < np.ceil(b[:, 3]))
    return b[on][:, [2, 1, 5, 4]]


def _iou_2d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def merge_slice_detections(
    per_slice: Sequence[tuple[int, np.ndarray, np.ndarray]],
    *,
    link_iou: float = 0.3,
    top_k_scores: int = 3,
    nms_iou: float = 0.1,
    max_detections: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Link 2D detections of consecutive slices into 3D boxes (module docstring).

    Args:
        per_slice: ``(k, boxes (N, 4) x0 y0 x1 y1, scores (N,))`` per slice, any order.

    Returns:
        voxel boxes ``(M, 6)`` ``z0, y0, x0, z1, y1, x1`` and scores ``(M,)``, best first, ``M <= max_detections``.
    """
    import torch

    from stage1_detect.inference import nms_3d

    tracks: list[dict[str, Any]] = []
    open_tracks: list[int] = []
    prev_k: int | None = None
    for k, boxes, scores in sorted(per_slice, key=lambda t: t[0]):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if prev_k is None or k != prev_k + 1:
            open_tracks = []
        last = np.array([tracks[t]["boxes"][-1] for t in open_tracks]).reshape(-1, 4)
        iou = _iou_2d(boxes, last) if len(last) and len(boxes) else np.zeros((len(boxes), 0))
        taken: set[int] = set()
        now_open: list[int] = []
        for i in np.argsort(-scores, kind="stable"):
            j = -1
            if iou.shape[1]:
                cand = [(iou[i, c], c) for c in range(iou.shape[1]) if c not in taken and iou[i, c] >= link_iou]
                if cand:
                    j = max(cand)[1]
            if j >= 0:
                taken.add(j)
                t = open_tracks[j]
                tracks[t]["ks"].append(k)
                tracks[t]["boxes"].append(boxes[i])
                tracks[t]["scores"].append(scores[i])
            else:
                t = len(tracks)
                tracks.append({"ks": [k], "boxes": [boxes[i]], "scores": [scores[i]]})
            now_open.append(t)
        open_tracks = now_open
        prev_k = k
    if not tracks:
        return np.zeros((0, 6)), np.zeros(0)
    out_boxes, out_scores = [], []
    for t in tracks:
        s = np.asarray(t["scores"])
        best = t["boxes"][int(np.argmax(s))]
        out_boxes.append([min(t["ks"]), best[1], best[0], max(t["ks"]) + 1, best[3], best[2]])
        out_scores.append(float(np.mean(np.sort(s)[::-1][:top_k_scores])))
    b = torch.as_tensor(np.asarray(out_boxes), dtype=torch.float64)
    sc = torch.as_tensor(np.asarray(out_scores), dtype=torch.float64)
    keep = nms_3d(b, sc, nms_iou, max_detections)
    return b[keep].numpy(), sc[keep].numpy()


# ------------------------------------------------------------------ mmdet model
def mmdet_model_config(config: Mmdet2p5dConfig) -> dict[str, Any]:
    """The mmdet ``RetinaNet`` config dict (module docstring), with ``model_overrides`` merged."""
    widths = [64, 128, 256, 512] if config.depth < 50 else [256, 512, 1024, 2048]
    cfg: dict[str, Any] = dict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[0.0] * 3, std=[1.0] * 3, bgr_to_rgb=False, pad_size_divisor=64),
        backbone=dict(type="ResNet", depth=config.depth, in_channels=3, num_stages=4, out_indices=(0, 1, 2, 3),
                      frozen_stages=-1, norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False, style="pytorch"),
        neck=dict(type="FPN", in_channels=widths, out_channels=128, start_level=0, add_extra_convs="on_input", num_outs=5),
        bbox_head=dict(
            type="RetinaHead", num_classes=1, in_channels=128, stacked_convs=2, feat_channels=128,
            anchor_generator=dict(type="AnchorGenerator", octave_base_scale=1, scales_per_octave=3, ratios=[1.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.1, ignore_iof_thr=-1),
                       sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=config.score_thresh, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=100),
    )
    if config.model_overrides:
        from mmengine.config import Config

        merged = Config(cfg)
        merged.merge_from_dict(dict(config.model_overrides))
        cfg = merged.to_dict()
    return cfg


def _build_model(config: Mmdet2p5dConfig, device: Any) -> Any:
    if not mmdet_available():
        raise MmdetUnavailableError(INSTALL_HINT)
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    with seeded_torch_rng(config.seed):  # mmdet's layers initialise from the global generator
        model = MODELS.build(mmdet_model_config(config))
        model.init_weights()
    return model.to(device)


def _samples(shape_hw: tuple[int, int], targets: Sequence[np.ndarray] | None, n: int, device: Any) -> list[Any]:
    import torch
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    out = []
    for i in range(n):
        s = DetDataSample(metainfo=dict(img_shape=shape_hw, ori_shape=shape_hw, pad_shape=shape_hw,
                                        batch_input_shape=shape_hw, scale_factor=(1.0, 1.0)))
        if targets is not None:
            gt = InstanceData()
            gt.bboxes = torch.as_tensor(targets[i], dtype=torch.float32, device=device).reshape(-1, 4)
            gt.labels = torch.zeros(len(targets[i]), dtype=torch.long, device=device)
            s.gt_instances = gt
        out.append(s)
    return out


def _pad_hw(shape_hw: Sequence[int], divisor: int = 64) -> tuple[int, int]:
    return tuple(int(-(-s // divisor) * divisor) for s in shape_hw)  # type: ignore[return-value]


@register_detector("mmdet_retinanet_2p5d")
class Mmdet2p5dDetector:
    """2.5D mmdet RetinaNet behind the :class:`~stage1_detect.registry.Detector` interface
    (module docstring). Raises :class:`MmdetUnavailableError` when mmdet/mmcv ops are missing.

    Args:
        config: :class:`Mmdet2p5dConfig` or a mapping of its fields; ignored with ``checkpoint``.
        checkpoint: ``last.pt`` written by :meth:`fit`.
        device: "cpu", "cuda", ...; progress: tqdm bars.
        overrides: config fields to change.
    """

    def __init__(self, config: Mmdet2p5dConfig | dict[str, Any] | None = None, *, checkpoint: str | Path | None = None,
                 device: str | None = None, progress: bool = True, **overrides: Any) -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        state = None
        if checkpoint is not None:
            from lidc_det.checkpoint import load_checkpoint

            state = load_checkpoint(checkpoint, formats=(CHECKPOINT_FORMAT,), kind="mmdet 2.5D detector checkpoint")
            config = state["config"]
        if config is None:
            config = Mmdet2p5dConfig()
        from lidc_det.config import from_mapping

        if isinstance(config, dict):
            config = from_mapping(Mmdet2p5dConfig, config, f"{checkpoint} [config]" if checkpoint else "<dict>")
        if overrides:
            config = from_mapping(Mmdet2p5dConfig, {**config.to_dict(), **overrides}, "<overrides>")
        self.config: Mmdet2p5dConfig = config
        self.progress = progress
        self.model = _build_model(self.config, self.device)
        if state is not None:
            self.model.load_state_dict(state["model"])

    def _volume(self, hu: np.ndarray, geometry: VolumeGeometry) -> tuple[np.ndarray, VolumeGeometry]:
        from lidc_det.resample import resample_image
        from stage1_detect.preprocess import normalize_hu

        hu = np.asarray(hu)
        if not np.allclose(geometry.spacing_zyx, self.config.spacing_zyx_mm, rtol=1e-3, atol=0.0):
            hu, geometry = resample_image(hu, geometry, tuple(self.config.spacing_zyx_mm))  # type: ignore[arg-type]
        return normalize_hu(hu, self.config.hu_window), geometry

    def _offset(self) -> int:
        return max(1, int(round(self.config.context_mm / self.config.spacing_zyx_mm[0])))

    def predict(self, hu: np.ndarray, geometry: VolumeGeometry, *, series_uid: str) -> Detections:
        """Candidates in one scan: every axial slice through the 2D detector, merged into 3D."""
        import torch
        from tqdm.auto import tqdm

        from stage1_detect.inference import detections_from_boxes

        vol, grid = self._volume(hu, geometry)
        h, w = vol.shape[1:]
        ph, pw = _pad_hw((h, w))
        off = self._offset()
        per_slice = []
        self.model.eval()
        ks = list(range(vol.shape[0]))
        for i in tqdm(range(0, len(ks), self.config.slice_batch), desc="slices", disable=not self.progress, leave=False):
            batch = ks[i : i + self.config.slice_batch]
            x = np.full((len(batch), 3, ph, pw), -1.0, dtype=np.float32)
            for j, k in enumerate(batch):
                x[j, :, :h, :w] = slice_stack(vol, k, off)
            with torch.inference_mode():
                res = self.model.predict(torch.from_numpy(x).to(self.device), _samples((ph, pw), None, len(batch), self.device), rescale=False)
            for k, r in zip(batch, res):
                p = r.pred_instances
                per_slice.append((k, p.bboxes.float().cpu().numpy(), p.scores.float().cpu().numpy()))
        boxes, scores = merge_slice_detections(
            per_slice, link_iou=self.config.link_iou, top_k_scores=self.config.top_k_scores,
            nms_iou=self.config.nms_iou, max_detections=self.config.max_detections,
        )
        return detections_from_boxes(boxes, scores, grid, geometry, series_uid)

    def fit(self, train_cases: Sequence[Any], val_cases: Sequence[Any], out_dir: str | Path, *, resume: bool = True) -> Path:
        """Train on axial slices of ``train_cases`` (``pos_fraction`` of them through a target);
        atomic ``last.pt`` every ``checkpoint_every`` steps, resumed from ``out_dir``. The validation
        cases are not used for selection (the last state is kept). Returns the checkpoint path."""
        import torch
        from tqdm.auto import tqdm

        from lidc_det import atomic
        from stage1_detect.data import case_boxes

        cfg = self.config
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        last = out / "last.pt"
        vols = []
        for c in train_cases:
            vol, grid = self._volume(c.image_hu, c.geometry)
            boxes = case_boxes(c)
            if len(boxes) and grid != c.geometry:
                from lidc_det.boxes import boxes_to_world, world_to_boxes

                centres, sizes = boxes_to_world(boxes, c.geometry)
                boxes = world_to_boxes(centres, np.abs(sizes), grid)
            vols.append((vol, boxes))
        positives = [(ci, k) for ci, (v, b) in enumerate(vols) for k in range(v.shape[0]) if len(slice_targets(b, k))]
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        step = 0
        if resume and last.is_file():
            from lidc_det.checkpoint import load_checkpoint

            state = load_checkpoint(last, formats=(CHECKPOINT_FORMAT,), kind="mmdet 2.5D detector checkpoint")
            self.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step = int(state["step"])
        off = self._offset()
        self.model.train()
        for step in tqdm(range(step, cfg.steps), desc="train mmdet", disable=not self.progress, initial=step, total=cfg.steps):
            rng = np.random.default_rng([cfg.seed, step])
            items = []
            for _ in range(cfg.batch_size):
                if positives and rng.random() < cfg.pos_fraction:
                    ci, k = positives[int(rng.integers(len(positives)))]
                else:
                    ci = int(rng.integers(len(vols)))
                    k = int(rng.integers(vols[ci][0].shape[0]))
                items.append((ci, k))
            ph, pw = _pad_hw(np.max([vols[ci][0].shape[1:] for ci, _ in items], axis=0))
            x = np.full((len(items), 3, ph, pw), -1.0, dtype=np.float32)
            targets = []
            for j, (ci, k) in enumerate(items):
                v, b = vols[ci]
                x[j, :, : v.shape[1], : v.shape[2]] = slice_stack(v, k, off)
                targets.append(slice_targets(b, k))
            xt = torch.from_numpy(x).to(self.device)
            losses = self.model.loss(xt, _samples((ph, pw), targets, len(items), self.device))
            loss, _ = self.model.parse_losses(losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                state = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": self.model.state_dict(),
                         "optimizer": optimizer.state_dict(), "step": step + 1}
                atomic.write_with(last, lambda p, s=state: torch.save(s, p))
        return last
