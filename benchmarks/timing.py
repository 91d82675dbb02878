"""Timing pieces shared by the speed benchmark (:mod:`benchmarks.speed`) and the GPU check
(:mod:`benchmarks.gpu_check`): a generated chest volume, whole-scan inference of ``retina3d``,
MONAI RetinaNet per-window inference and the MONAI sliding-window count, and one training
step of each detector at a given patch and batch.

Import graph (checked by ``tests/test_gpu_check.py``): numpy, torch, ``lidc_det`` core
(geometry, boxes, results), ``stage1_detect`` (config, model, anchors, inference, data) and,
inside the MONAI functions only, ``monai``. No SimpleITK, pydicom, pylidc or nnU-Net: a volume
already on the detector's grid is never resampled.

All times are wall-clock seconds (``time.perf_counter``, CUDA synchronised); memory is the peak
of the process (CPU: ``ru_maxrss``, which never decreases, so run one measurement per process
for a per-measurement figure) or of the CUDA allocator (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lidc_det.geometry import VolumeGeometry

LIDC_SHAPE_1MM = (332, 360, 360)
"""LIDC-IDRI-0001 (133 x 512 x 512 at 2.5 x 0.703 x 0.703 mm) on the 1 mm grid, ``[z, y, x]``."""


def generated_chest(
    shape_zyx: Sequence[int] = LIDC_SHAPE_1MM,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    seed: int = 0,
    n_nodules: int = 6,
    series_uid: str = "generated-chest",
) -> Any:
    """A generated chest CT (not a simulator; timing and smoke data), as
    :class:`stage1_detect.data.InMemoryCase`.

    Air (-1000 HU) around an elliptic body cylinder (40 HU), two lung ellipsoids (-850 HU),
    Gaussian noise (sd 30 HU) and ``n_nodules`` solid spheres (5-20 mm, 40 HU) inside the lungs,
    with their boxes (voxel, ``lidc_det.boxes`` format). Sizes are in mm: the same
    anatomy on any ``spacing_zyx`` (so each detector can get it on its own grid).
    """
    from stage1_detect.data import InMemoryCase

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape_zyx)
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    ext = np.asarray(shape) * sp  # mm
    z, y, x = (np.arange(n, dtype=np.float32) * float(s) - float(e) / 2 for n, s, e in zip(shape, sp, ext))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = (y / (0.36 * ext[1])) ** 2 + (x / (0.46 * ext[2])) ** 2 <= 1.0
    hu[np.broadcast_to(body, shape)] = 40.0
    lungs = []
    for side in (-1.0, 1.0):
        cx = side * 0.2 * ext[2]
        lung = (z / (0.42 * ext[0])) ** 2 + (y / (0.27 * ext[1])) ** 2 + ((x - cx) / (0.16 * ext[2])) ** 2 <= 1.0
        hu[lung] = -850.0
        lungs.append((cx, lung))
    hu += rng.normal(0.0, 30.0, shape).astype(np.float32)
    boxes = []
    for k in range(n_nodules):
        cx, _ = lungs[k % 2]
        d = float(rng.uniform(5.0, 20.0))
        c_mm = np.array([rng.uniform(-0.25, 0.25) * ext[0], rng.uniform(-0.12, 0.12) * ext[1],
                         cx + rng.uniform(-0.06, 0.06) * ext[2]])
        ball = (z - c_mm[0]) ** 2 + (y - c_mm[1]) ** 2 + (x - c_mm[2]) ** 2 <= (d / 2) ** 2
        hu[ball] = 40.0 + rng.normal(0.0, 30.0, int(ball.sum())).astype(np.float32)
        centre_vox = (c_mm + ext / 2) / sp  # box coordinates: voxel k spans [k, k + 1)
        half = d / 2 / sp
        boxes.append(np.concatenate([centre_vox - half, centre_vox + half]))
    geom = VolumeGeometry(shape, tuple(float(s) for s in sp), (0.0, 0.0, 0.0))  # type: ignore[arg-type]
    return InMemoryCase(series_uid, hu, geom, np.asarray(boxes, dtype=np.float64).reshape(-1, 6))


# ------------------------------------------------------------------ devices and memory
def sync(device: Any) -> None:
    """Wait for queued CUDA work (no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: Any) -> dict[str, float]:
    """``process_rss_mib`` (peak resident memory of this process so far) and, on CUDA,
    ``cuda_allocated_mib`` (peak of the CUDA allocator since :func:`reset_peak`)."""
    import torch

    out = {"process_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.device(device).type == "cuda":
        out["cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ------------------------------------------------------------------ retina3d
def time_retina3d_inference(
    config: str, hu: np.ndarray, geometry: VolumeGeometry, *, device: str, repeats: int = 1,
    warmup: bool = False, overrides: dict[str, Any] | None = None, series_uid: str = "scan",
) -> dict[str, Any]:
    """Whole-scan ``Retina3DDetector.predict`` (untrained seeded weights) ``repeats`` times.

    Returns the per-run seconds, their median, the window plan, the candidate count and peak memory.
    """
    from stage1_detect.detector import Retina3DDetector
    from stage1_detect.inference import SPACING_RTOL, plan_windows

    det = Retina3DDetector(config, device=device, progress=False, **(overrides or {}))
    if warmup:
        det.predict(hu, geometry, series_uid=series_uid)
    reset_peak(device)
    runs, dets = [], None
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        dets = det.predict(hu, geometry, series_uid=series_uid)
        sync(device)
        runs.append(time.perf_counter() - t0)
    same = np.allclose(geometry.spacing_zyx, det.config.spacing_mm, rtol=SPACING_RTOL, atol=0.0)
    grid_shape = geometry.shape_zyx if same else geometry.with_spacing(tuple(det.config.spacing_mm)).shape_zyx
    plan = plan_windows(grid_shape, det.config.window_zyx, det.config.window_margin)
    return {
        "config": config, "overrides": dict(overrides or {}), "seconds": runs, "median_s": float(np.median(runs)),
        "grid_shape_zyx": list(grid_shape), "windows": plan.n_windows, "window_zyx": list(plan.window_zyx),
        "window_margin": plan.margin, "n_candidates": len(dets) if dets is not None else 0,
        "parameters": int(sum(p.numel() for p in det.model.parameters())), "memory": peak_memory_mib(device),
        "detections": dets,
    }


def time_retina3d_train_step(
    config: str, patch_zyx: Sequence[int], batch: int, *, device: str, steps: int = 3, amp: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds per optimiser step of ``retina3d`` (forward, ATSS loss, backward, AdamW) on
    ``batch`` generated patches of ``patch_zyx`` with one sphere each; the first step
    (allocations, cuDNN/oneDNN set-up) is timed apart as ``first_step_s``."""
    import contextlib

    import torch

    from stage1_detect.config import load_config
    from stage1_detect.model import DetectionLoss, Retina3D

    cfg = load_config(config).replace(patch_size=list(patch_zyx), batch_size=batch)
    dev = torch.device(device)
    model = Retina3D(cfg, generator=torch.Generator().manual_seed(seed)).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    loss_fn = DetectionLoss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, boxes = _patch_batch(patch_zyx, batch, seed)
    x = x.to(dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    targets = [torch.as_tensor(b, dtype=torch.float32, device=dev) for b in boxes]
    use_amp = amp and dev.type == "cuda"
    model.train()
    times = []
    reset_peak(device)
    for _ in range(steps + 1):
        sync(dev)
        t0 = time.perf_counter()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with ctx:
            cls, box = model(x)
        parts = loss_fn(model, cls, box, targets, x.shape[2:])
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"config": config, "patch_zyx": list(patch_zyx), "batch": batch, "amp_bf16": use_amp,
            "first_step_s": times[0], "step_s": float(np.median(times[1:])), "memory": peak_memory_mib(device)}


def _patch_batch(patch_zyx: Sequence[int], batch: int, seed: int) -> tuple[Any, list[np.ndarray]]:
    """``[B, 1, z, y, x]`` float32 normalised patches with one sphere each, and their boxes."""
    import torch

    from stage1_detect.toydata import random_sphere_cases

    cases = random_sphere_cases(batch, shape_zyx=tuple(patch_zyx), spheres_per_case=1, seed=seed)
    from stage1_detect.preprocess import normalize_hu

    x = np.stack([normalize_hu(c.image_hu, (-1000.0, 500.0)) for c in cases])[:, None]
    return torch.from_numpy(x), [np.asarray(c.boxes_voxel, dtype=np.float64) for c in cases]


# ------------------------------------------------------------------ MONAI RetinaNet
def monai_window_count(shape_xyz: Sequence[int], roi_xyz: Sequence[int], overlap: float) -> int:
    """Windows MONAI's ``SlidingWindowInferer`` runs over a volume (its ``_get_scan_interval``
    and ``dense_patch_slices`` rules: interval ``int(roi * (1 - overlap))``, the volume padded
    to at least one window)."""
    n = 1
    for length, roi in zip(shape_xyz, roi_xyz):
        length = max(int(length), int(roi))
        interval = max(1, int(roi * (1 - overlap)))
        n *= 1 if length <= roi else math.ceil((length - roi) / interval) + 1
    return n


def time_monai_windows(
    window_xyz: Sequence[int], *, device: str, n_windows: int = 1, overrides: dict[str, Any] | None = None,
    amp: bool = True,
) -> dict[str, Any]:
    """Seconds per sliding window of MONAI RetinaNet (LUNA16 tutorial network unless
    ``overrides``): the detector's forward on one ``window_xyz`` input without the inferer
    (network + anchors + box selection), ``n_windows`` times (plus one untimed warm-up on CUDA)."""
    import contextlib

    import torch

    from stage1_detect.monai_baseline import MonaiRetinaNetDetector

    det = MonaiRetinaNetDetector(device=device, progress=False, **(overrides or {}))
    net = det.detector.eval()
    dev = torch.device(device)
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, *window_xyz), dtype=np.float32)).to(dev)
    use_amp = amp and dev.type == "cuda"
    times = []
    reset_peak(device)
    with torch.inference_mode():
        for k in range(n_windows + (1 if dev.type == "cuda" else 0)):
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
            sync(dev)
            t0 = time.perf_counter()
            with ctx:
                net(x, use_inferer=False)
            sync(dev)
            if dev.type != "cuda" or k > 0:
                times.append(time.perf_counter() - t0)
    return {"window_xyz": list(window_xyz), "n_timed": len(times), "seconds": times,
            "window_s": float(np.median(times)), "amp_bf16": use_amp,
            "parameters": int(sum(p.numel() for p in net.network.parameters())), "memory": peak_memory_mib(device)}


def time_monai_train_step(
    patch_xyz: Sequence[int], batch: int, *, device: str, steps: int = 1, amp: bool = True,
    overrides: dict[str, Any] | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Seconds per SGD step of MONAI RetinaNet (forward with ATSS + hard negative sampling,
    focal + GIoU losses, backward, SGD as in the tutorial) on ``batch`` generated patches of
    ``patch_xyz``; the first step is timed apart (``first_step_s``)."""
    import contextlib

    import torch

    from stage1_detect.monai_baseline import MonaiRetinaNetDetector, _zyx_boxes_to_monai_xyz

    det = MonaiRetinaNetDetector(device=device, progress=False, patch_size_xyz=list(patch_xyz), batch_size=batch,
                                 **(overrides or {}))
    cfg, net, dev = det.config, det.detector, torch.device(device)
    opt = torch.optim.SGD(net.network.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    x_zyx, boxes = _patch_batch(tuple(patch_xyz)[::-1], batch, seed)
    x = ((x_zyx + 1.0) * 0.5).permute(0, 1, 4, 3, 2).contiguous().to(dev)
    targets = [{"box": torch.from_numpy(_zyx_boxes_to_monai_xyz(b).astype(np.float32)).to(dev),
                "label": torch.zeros(len(b), dtype=torch.long, device=dev)} for b in boxes]
    use_amp = amp and dev.type == "cuda"
    net.train()
    times = []
    reset_peak(device)
    for _ in range(steps + 1):
        sync(dev)
        t0 = time.perf_counter()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with ctx:
            losses = net(x, targets)
            loss = losses[net.cls_key] + losses[net.box_reg_key]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"patch_xyz": list(patch_xyz), "batch": batch, "amp_bf16": use_amp, "first_step_s": times[0],
            "step_s": float(np.median(times[1:])), "memory": peak_memory_mib(device)}
