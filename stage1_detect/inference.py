"""Whole-scan inference: sliding windows, box decoding, 3D NMS, mapping to world mm.

**Tiling.** The (resampled, normalised) volume is covered by windows of one
size. Along each axis of length ``L``: ``n = ceil(L / (W_max - 2 m))`` windows,
core size ``step = 16 * ceil(L / n / 16)`` and window size ``step + 2 m`` where
``W_max`` is ``config.window_zyx`` and ``m`` is ``config.window_margin``. The
volume is padded with air so that window ``k`` covers voxels
``[k * step - m, (k + 1) * step + m)``; its *core* ``[k * step, (k + 1) * step)``
tiles the volume without overlap. Each anchor is scored by the one window whose
core holds its centre, with ``m`` voxels of context on each side, so there are no
duplicate detections from overlapping windows. Window starts are multiples of 16
(the coarsest stride), so every window's anchors lie on the same global grid.
Windows are run ``config.window_batch`` at a time.

**Decoding.** Per window, anchors of the core with sigmoid score >=
``score_thresh`` are kept (at most ``pre_nms_topk``, best first) and decoded;
over the scan the best ``pre_nms_topk`` go through 3D NMS (IoU >
``nms_iou`` suppresses; :func:`nms_3d`) and at most
``max_detections`` (100) survive.

Boxes whose centre lies outside the volume (in the air padding of the last
windows) are dropped.

**Body mask** (``use_body_mask``): windows whose core holds no body voxel
(:func:`stage1_detect.preprocess.body_mask`) are skipped, and detections whose
centre lies outside the body are dropped.

**Lung field** (``lung_restrict``): candidates whose centre lies more than
``lung_margin_mm`` from the classical lung field of the scan are dropped
(:func:`lung_keep`) before the ``pre_nms_topk`` cut and NMS, so that up to
``max_detections`` candidates inside the lungs survive however many stronger ones
lie outside (restricting the final 100 instead left none on scans whose top 100
were all outside the lungs).

**Test-time flips** (``tta_flip_axes``): each window is also run flipped along
those axes; the outputs are flipped back (box centre codes change sign along a
flipped axis) and the anchors' probabilities and codes are averaged before
decoding (:class:`FlipTTA`). Windows are multiples of 16 and the anchors of a
cell are centred on it, so a flipped map lands on the same anchors.

**Ensembles** (:class:`ModelMean`, :class:`stage1_detect.ensemble.Retina3DEnsemble`):
several networks of one architecture are averaged the same way (probabilities and
codes, anchor by anchor, before decoding and NMS); flips then apply to the mean.

**Spacing.** The network works on the training grid (``config.spacing_mm``). A
scan with another spacing is resampled first (linear,
:func:`lidc_det.resample.resample_image`); boxes are mapped back to the input
grid through world coordinates, so ``Detections.boxes_voxel`` always refers to
the array that was passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lidc_det.boxes import boxes_to_world, world_to_boxes
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from stage1_detect.anchors import decode_boxes
from stage1_detect.config import LEVEL_STRIDES, DetectorConfig
from stage1_detect.preprocess import body_mask, normalize_hu

SPACING_RTOL = 1e-3
"""Relative spacing difference below which a scan is used as is (no resampling)."""


@dataclass(frozen=True)
class WindowPlan:
    """Sliding-window layout over a volume of ``shape_zyx`` (see the module docstring).

    Attributes:
        shape_zyx: volume shape (voxels).
        window_zyx: window shape = ``step_zyx + 2 * margin``.
        step_zyx: core shape; window ``(i, j, k)`` has core start ``(i, j, k) * step``.
        margin: context voxels on each side of a core.
        counts_zyx: windows per axis.
    """

    shape_zyx: tuple[int, int, int]
    window_zyx: tuple[int, int, int]
    step_zyx: tuple[int, int, int]
    margin: int
    counts_zyx: tuple[int, int, int]

    @property
    def n_windows(self) -> int:
        return int(math.prod(self.counts_zyx))

    @property
    def padded_shape_zyx(self) -> tuple[int, int, int]:
        """Shape of the padded volume (``margin`` before, the rest after)."""
        return tuple(n * s + 2 * self.margin for n, s in zip(self.counts_zyx, self.step_zyx))  # type: ignore[return-value]

    def core_starts(self) -> Iterator[tuple[int, int, int]]:
        """Core start of every window (volume voxels), C order; the window starts ``margin`` earlier."""
        for i in range(self.counts_zyx[0]):
            for j in range(self.counts_zyx[1]):
                for k in range(self.counts_zyx[2]):
                    yield (i * self.step_zyx[0], j * self.step_zyx[1], k * self.step_zyx[2])


def plan_windows(shape_zyx: Sequence[int], max_window_zyx: Sequence[int], margin: int) -> WindowPlan:
    """The :class:`WindowPlan` for a volume (cores multiples of 16, windows at most ``max_window_zyx``
    unless the volume is smaller than one core of 16)."""
    if margin % 16 or margin < 0:
        raise ValueError(f"margin must be a multiple of 16 >= 0, got {margin}")
    counts, steps = [], []
    for length, w_max in zip(shape_zyx, max_window_zyx):
        core_max = int(w_max) - 2 * margin
        if core_max < 16:
            raise ValueError(f"window {tuple(max_window_zyx)} leaves no core with margin {margin}")
        n = max(1, math.ceil(int(length) / core_max))
        step = 16 * math.ceil(int(length) / n / 16)
        counts.append(n)
        steps.append(step)
    return WindowPlan(
        tuple(int(s) for s in shape_zyx),  # type: ignore[arg-type]
        tuple(s + 2 * margin for s in steps),  # type: ignore[arg-type]
        tuple(steps),  # type: ignore[arg-type]
        int(margin),
        tuple(counts),  # type: ignore[arg-type]
    )


def box_iou_3d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix ``(N, M)`` of boxes ``a`` ``(N, 6)`` and ``b`` ``(M, 6)`` (``z0, y0, x0, z1, y1, x1``)."""
    lo = torch.maximum(a[:, None, :3], b[None, :, :3])
    hi = torch.minimum(a[:, None, 3:], b[None, :, 3:])
    inter = (hi - lo).clamp(min=0).prod(dim=2)
    vol_a = (a[:, 3:] - a[:, :3]).clamp(min=0).prod(dim=1)
    vol_b = (b[:, 3:] - b[:, :3]).clamp(min=0).prod(dim=1)
    return inter / (vol_a[:, None] + vol_b[None, :] - inter).clamp(min=1e-12)


def nms_3d(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int = -1) -> torch.Tensor:
    """Indices (int64, best first) of the boxes kept by greedy 3D NMS.

    Boxes are visited by decreasing score (ties: lower index first); a box is
    kept unless its IoU with an already kept box exceeds ``iou_threshold``. At
    most ``max_keep`` boxes are kept (-1: no cap). Same rule as MONAI's
    ``non_max_suppression`` (checked in the tests) but with one IoU matrix
    instead of a Python loop over boxes, and without importing MONAI at inference.
    Meant for the <= a few thousand boxes left after the per-window top-k.
    """
    n = int(boxes.shape[0])
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores.float(), descending=True, stable=True)
    iou = box_iou_3d(boxes[order].double(), boxes[order].double())
    over = (iou > iou_threshold).numpy()
    sup = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for i in range(n):
        if sup[i]:
            continue
        keep.append(i)
        if 0 < max_keep <= len(keep):
            break
        sup |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.long)]


def _add_level(prob_sum: list[torch.Tensor], code_sum: list[torch.Tensor], level: int, p: torch.Tensor,
               codes: torch.Tensor) -> None:
    """Add one output level's probabilities and box codes to the running sums (the first time, start them)."""
    if level == len(prob_sum):
        prob_sum.append(p)
        code_sum.append(codes)
    else:
        prob_sum[level] = prob_sum[level] + p
        code_sum[level] = code_sum[level] + codes


class FlipTTA(torch.nn.Module):
    """A detection network averaged over flips of its input (test-time augmentation).

    ``forward(x)`` (``x``: ``[B, 1, D, H, W]``, every side a multiple of 16) returns what
    ``model`` returns, per level ``cls`` ``[B, A, d, h, w]`` logits and ``box``
    ``[B, A * 6, d, h, w]`` codes ``(d_cz, d_cy, d_cx, d_wz, d_wy, d_wx)``: here the logit of
    the mean probability and the mean codes over the ``2 ** len(flip_axes)`` flips, each
    output flipped back and its centre code along a flipped axis negated.

    Args:
        model: a network with :class:`stage1_detect.model.Retina3D`'s output format.
        flip_axes: volume axes (0 z, 1 y, 2 x) whose flips are combined.
    """

    def __init__(self, model: torch.nn.Module, flip_axes: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        axes = tuple(int(a) for a in flip_axes)
        self.flips: tuple[tuple[int, ...], ...] = tuple(
            tuple(a for k, a in enumerate(axes) if m >> k & 1) for m in range(2 ** len(axes))
        )

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        prob_sum: list[torch.Tensor] = []
        code_sum: list[torch.Tensor] = []
        for axes in self.flips:
            dims = [a + 2 for a in axes]
            xin = torch.flip(x, dims).contiguous(memory_format=torch.channels_last_3d) if axes else x
            cls, box = self.model(xin)
            for level, (c, b) in enumerate(zip(cls, box)):
                p = torch.sigmoid(c.float())
                n, ab, d, h, w = b.shape
                codes = b.float().reshape(n, ab // 6, 6, d, h, w)
                if axes:
                    p = torch.flip(p, dims)
                    codes = torch.flip(codes, [a + 3 for a in axes]).clone()
                    codes[:, :, list(axes)] *= -1.0
                _add_level(prob_sum, code_sum, level, p, codes)
        k = float(len(self.flips))
        logits = [torch.logit(p / k, eps=1e-6) for p in prob_sum]
        boxes = [(c / k).reshape(c.shape[0], -1, *c.shape[3:]) for c in code_sum]
        return logits, boxes


class ModelMean(torch.nn.Module):
    """Several networks of one architecture and anchor set run as one: the mean of their
    anchors' probabilities and box codes (a deep ensemble), returned as logits and codes in
    :class:`stage1_detect.model.Retina3D`'s output format, so it can be wrapped by
    :class:`FlipTTA` and decoded like a single network.

    Args:
        models: networks with Retina3D's output format (same levels, anchors and map shapes).
    """

    def __init__(self, models: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("ModelMean needs at least one network")
        self.models = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        prob_sum: list[torch.Tensor] = []
        code_sum: list[torch.Tensor] = []
        for net in self.models:
            cls, box = net(x)
            for level, (c, b) in enumerate(zip(cls, box)):
                p, codes = torch.sigmoid(c.float()), b.float()
                _add_level(prob_sum, code_sum, level, p, codes)
        k = float(len(self.models))
        return [torch.logit(p / k, eps=1e-6) for p in prob_sum], [c / k for c in code_sum]


def _autocast(device: torch.device) -> torch.autocast | None:
    if device.type != "cuda":
        return None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _core_candidates(
    cls_maps: Sequence[torch.Tensor],
    box_maps: Sequence[torch.Tensor],
    core_start: tuple[int, int, int],
    plan: WindowPlan,
    config: DetectorConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(K,)`` and decoded volume-grid boxes ``(K, 6)`` of one window's core anchors
    (``cls_maps[l]``: ``[A, d, h, w]``; ``box_maps[l]``: ``[A * 6, d, h, w]``).

    Every core anchor is scored; only the kept ones (score >= ``score_thresh``, best
    ``pre_nms_topk``) have their box codes gathered and their anchors computed, with the same
    float32 arithmetic as :func:`stage1_detect.anchors.level_anchors` + :func:`decode_boxes`
    on all anchors (identical results; building every anchor of a 200^3 window took ~0.15 s).
    """
    scores_all, levels = [], []
    for cls, box, stride, sizes in zip(cls_maps, box_maps, LEVEL_STRIDES, config.anchor_sizes_vox):
        lo = plan.margin // stride
        core = [s // stride for s in plan.step_zyx]
        c = cls[:, lo : lo + core[0], lo : lo + core[1], lo : lo + core[2]]
        scores_all.append(torch.sigmoid(c.float()).permute(1, 2, 3, 0).reshape(-1).cpu())
        levels.append((box, lo, core, stride, sizes))
    scores = torch.cat(scores_all)
    keep = torch.nonzero(scores >= config.score_thresh).flatten()
    if keep.numel() > config.pre_nms_topk:
        keep = keep[torch.topk(scores[keep], config.pre_nms_topk).indices]
    offset = torch.tensor([*core_start, *core_start], dtype=torch.float32)
    codes_parts, anchor_parts, order_parts = [], [], []
    first = 0
    for (box, lo, core, stride, sizes), level_scores in zip(levels, scores_all):
        n = level_scores.numel()
        in_level = (keep >= first) & (keep < first + n)
        idx = keep[in_level] - first  # ((z * h + y) * w + x) * A + a within the core
        first += n
        if idx.numel() == 0:
            continue
        a_count = len(sizes)
        a = idx % a_count
        pos = idx // a_count
        x = pos % core[2]
        y = (pos // core[2]) % core[1]
        z = pos // (core[2] * core[1])
        b = box.reshape(a_count, 6, *box.shape[1:])  # [A, 6, D, H, W] (window grid)
        codes = b[a.to(b.device), :, (z + lo).to(b.device), (y + lo).to(b.device), (x + lo).to(b.device)]
        codes_parts.append(codes.float().cpu())
        centres = (torch.stack([z, y, x], dim=1).to(torch.float32) + 0.5) * stride
        half = (torch.as_tensor(sizes, dtype=torch.float32) / 2.0)[a]  # (K, 3) voxels, z, y, x
        anchor_parts.append(torch.cat([centres - half, centres + half], dim=1) + offset)
        order_parts.append(torch.nonzero(in_level).flatten())
    if not codes_parts:
        return scores[keep], torch.zeros((0, 6), dtype=torch.float32)
    order = torch.argsort(torch.cat(order_parts))  # back to the order of ``keep``
    codes = torch.cat(codes_parts)[order]
    anchors = torch.cat(anchor_parts)[order]
    return scores[keep], decode_boxes(codes, anchors)


@torch.inference_mode()
def predict_boxes(
    model: torch.nn.Module,
    volume: np.ndarray,
    config: DetectorConfig,
    *,
    device: torch.device | str = "cpu",
    mask: np.ndarray | None = None,
    keep_boxes: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Sliding-window detection on a normalised volume on the training grid.

    Args:
        model: a network with :class:`stage1_detect.model.Retina3D`'s output format, in eval mode.
        volume: float32 ``[z, y, x]`` normalised intensities (:func:`normalize_hu`).
        mask: optional bool ``[z, y, x]`` body mask (windows with an empty core are skipped,
            detections centred outside are dropped).
        keep_boxes: optional filter, voxel boxes ``(N, 6)`` on the volume's grid -> bool ``(N,)``,
            applied to every candidate before the ``pre_nms_topk`` cut and NMS.
        progress: tqdm bar over window batches.

    Returns:
        voxel boxes ``(N, 6)`` on the volume's grid (``lidc_det.boxes`` format) and scores ``(N,)``,
        best first, ``N <= config.max_detections``, after NMS.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    if config.tta_flip_axes:
        model = FlipTTA(model, config.tta_flip_axes)
    plan = plan_windows(volume.shape, config.window_zyx, config.window_margin)
    m = plan.margin
    pad = [(m, n * s + m - length) for n, s, length in zip(plan.counts_zyx, plan.step_zyx, volume.shape)]
    padded = np.pad(np.asarray(volume, dtype=np.float32), pad, mode="constant", constant_values=-1.0)
    starts = list(plan.core_starts())
    if mask is not None:
        starts = [
            s for s in starts if mask[s[0] : s[0] + plan.step_zyx[0], s[1] : s[1] + plan.step_zyx[1], s[2] : s[2] + plan.step_zyx[2]].any()
        ]
    # channels-last on every device: on the CPU it makes torch use oneDNN for every 3D conv
    # (in the default layout the small P3/P4 head convs fall back to the slow im2col kernel)
    channels_last = True
    scores_list, boxes_list = [], []
    wz, wy, wx = plan.window_zyx
    bs = max(1, config.window_batch)
    batches = [starts[i : i + bs] for i in range(0, len(starts), bs)]
    for batch in tqdm(batches, desc="windows", unit="batch", disable=not progress, leave=False):
        x = np.stack([padded[z : z + wz, y : y + wy, k : k + wx] for z, y, k in batch])[:, None]
        xt = torch.from_numpy(x).to(device)
        if channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last_3d)
        ctx = _autocast(device)
        if ctx is None:
            cls, box = model(xt)
        else:
            with ctx:
                cls, box = model(xt)
        for b, start in enumerate(batch):
            s, bx = _core_candidates([c[b] for c in cls], [o[b] for o in box], start, plan, config)
            scores_list.append(s)
            boxes_list.append(bx)
    if not scores_list:
        return np.zeros((0, 6)), np.zeros(0)
    scores = torch.cat(scores_list)
    boxes = torch.cat(boxes_list)
    # windows reach into the air padding beyond the scan: drop boxes centred outside it
    ctr = (boxes[:, :3] + boxes[:, 3:]) / 2
    inside = torch.all((ctr >= 0) & (ctr <= torch.tensor(volume.shape, dtype=ctr.dtype)), dim=1)
    scores, boxes = scores[inside], boxes[inside]
    if keep_boxes is not None and scores.numel():
        keep_mask = torch.from_numpy(np.asarray(keep_boxes(boxes.double().numpy()), dtype=bool))
        scores, boxes = scores[keep_mask], boxes[keep_mask]
    if scores.numel() > config.pre_nms_topk:
        top = torch.topk(scores, config.pre_nms_topk).indices
        scores, boxes = scores[top], boxes[top]
    if mask is not None and scores.numel():
        ctr = ((boxes[:, :3] + boxes[:, 3:]) / 2).floor().long()
        hi = torch.tensor(mask.shape) - 1
        ctr = torch.minimum(ctr.clamp(min=0), hi)
        inside = torch.from_numpy(np.asarray(mask)[ctr[:, 0].numpy(), ctr[:, 1].numpy(), ctr[:, 2].numpy()])
        scores, boxes = scores[inside], boxes[inside]
    keep = nms_3d(boxes, scores, config.nms_iou, config.max_detections)
    return boxes[keep].double().numpy(), scores[keep].double().numpy()


def detections_from_boxes(
    boxes: np.ndarray,
    scores: np.ndarray,
    model_geometry: VolumeGeometry,
    input_geometry: VolumeGeometry,
    series_uid: str,
) -> Detections:
    """:class:`Detections` from voxel boxes on ``model_geometry``: world centres, diameters
    (mean box edge in mm) and voxel boxes on ``input_geometry`` (same world position)."""
    if len(scores) == 0:
        return Detections(series_uid, np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros((0, 6)))
    centres, sizes = boxes_to_world(boxes, model_geometry)
    out_boxes = boxes if model_geometry == input_geometry else world_to_boxes(centres, sizes, input_geometry)
    return Detections(series_uid, centres, np.abs(sizes).mean(axis=1), scores, out_boxes)


def to_model_grid(
    hu: np.ndarray, geometry: VolumeGeometry, config: DetectorConfig
) -> tuple[np.ndarray, VolumeGeometry]:
    """The scan on the training grid (resampled when its spacing differs by more than
    :data:`SPACING_RTOL`), as float32 HU and its geometry."""
    from lidc_det.resample import resample_image

    hu = np.asarray(hu)
    if hu.shape != geometry.shape_zyx:
        raise ValueError(f"volume shape {hu.shape} does not match geometry shape {geometry.shape_zyx}")
    if np.allclose(geometry.spacing_zyx, config.spacing_mm, rtol=SPACING_RTOL, atol=0.0):
        return hu, geometry
    resampled, geom = resample_image(hu, geometry, tuple(config.spacing_mm))  # type: ignore[arg-type]
    return resampled, geom


def predict_scan(
    model: torch.nn.Module,
    hu: np.ndarray,
    geometry: VolumeGeometry,
    config: DetectorConfig,
    *,
    series_uid: str,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Detections:
    """Detect nodules in a whole scan (``hu``: ``[z, y, x]`` HU on ``geometry``, any spacing).

    Returns at most ``config.max_detections`` candidates, best first, with world
    centres (x, y, z mm), diameters (mm), scores and voxel boxes on the input grid.
    """
    grid_hu, grid_geom = to_model_grid(hu, geometry, config)
    volume = normalize_hu(grid_hu, config.hu_window)
    mask = body_mask(grid_hu) if config.use_body_mask else None
    keep = lung_keep(grid_hu, grid_geom, config.lung_margin_mm, series_uid) if config.lung_restrict else None
    boxes, scores = predict_boxes(model, volume, config, device=device, mask=mask, keep_boxes=keep, progress=progress)
    return detections_from_boxes(boxes, scores, grid_geom, geometry, series_uid)


def lung_keep(
    hu: np.ndarray, geometry: VolumeGeometry, margin_mm: float, series_uid: str = "<scan>"
) -> Callable[[np.ndarray], np.ndarray] | None:
    """A ``keep_boxes`` filter for :func:`predict_boxes`: True for voxel boxes on ``geometry`` whose
    world centre lies within ``margin_mm`` of the scan's classical lung field
    (:func:`lidc_det.lungs.lung_fields`, :meth:`~lidc_det.lungs.LungFields.near`); ``None`` (keep
    all, with a warning) when no lung field is found."""
    import warnings

    from lidc_det.lungs import LungFieldError, lung_fields

    try:
        fields = lung_fields(hu, geometry)
    except LungFieldError as err:
        warnings.warn(f"{series_uid}: no lung restriction: {err}", stacklevel=2)
        return None

    def keep(boxes: np.ndarray) -> np.ndarray:
        centres, _ = boxes_to_world(boxes, geometry)
        return fields.near(centres, margin_mm)

    return keep
