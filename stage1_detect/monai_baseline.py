"""The MONAI baseline: ``monai.apps.detection`` RetinaNet with its LUNA16 tutorial configuration,
behind the same ``fit`` / ``predict`` interface and data path as ``retina3d``.

Registered as ``"monai_retinanet"``. It is the peer baseline of the leaderboard (MONAI
reports CPM 0.936 on LUNA16 with this configuration after 300 epochs on a GPU).

**Tutorial configuration** (MONAI tutorials, ``detection/config/config_train_luna16_16g.json``
and ``luna16_training.py``), reproduced by :class:`MonaiRetinaNetConfig`'s defaults:

* input resampled to 0.703125 x 0.703125 x 1.25 mm (x, y, z), HU clipped to
  [-1024, 300] and scaled to [0, 1];
* network: 3D ResNet-50 (bottleneck blocks 3-4-6-3, first conv stride (2, 2, 1)) + FPN
  returning layers 1 and 2 (3 levels), RetinaNet heads, 3 anchor shapes per location
  (6 x 8 x 4, 8 x 6 x 5, 10 x 10 x 6 voxels, x y z), one class;
* ATSS matcher (4 candidates, ``center_in_gt=False``), hard negative sampler
  (64 anchors per image, 30 % positive, pool 20, at least 16 negatives), focal loss +
  GIoU box loss (MONAI's defaults);
* training patches 192 x 192 x 80 (x, y, z), batch 4, SGD (lr 0.01, momentum 0.9,
  Nesterov, weight decay 3e-5), 10-epoch linear warm-up then lr x 0.1 every 150 epochs;
* inference: sliding window 512 x 512 x 208 with 25 % overlap, score >= 0.02,
  1000 boxes per level, NMS IoU 0.22; we keep 100 detections per scan (LUNA16's cap;
  the tutorial keeps 300 and lets the evaluation cut them).

**Differences, stated.** The data path is ours, shared with ``retina3d``: patches come from
:class:`stage1_detect.data.PatchDataset` (half centred on a nodule with jitter, half random,
flips, axial 90-degree turns, intensity scale/shift) instead of the tutorial's
``RandCropBoxByPosNegLabeld`` + ``RandZoomBoxd`` pipeline; training is counted in optimiser
steps (``epochs x steps_per_epoch``), not passes over the data. Cases not at the tutorial
spacing are resampled once at the start of :meth:`MonaiRetinaNetDetector.fit` (image linear,
boxes through world coordinates).

**Axes.** MONAI's tutorial works on ``[x, y, z]`` arrays; ours are ``[z, y, x]``. The adapter
transposes volumes to ``[x, y, z]`` before the network and maps boxes with
:func:`lidc_det.boxes.to_monai_boxes` / :func:`~lidc_det.boxes.from_monai_boxes` plus the
axis permutation, so every tutorial setting (spacing, anchor shapes, strides, patch sizes)
keeps its x, y, z meaning.

**Cost on a 2-core CPU** (measured with the LUNA16 tutorial config): about 45 s per training step at 2 x 96 x 96 x 64 and
minutes per scan at inference, so CPU runs use overrides (smaller patches, fewer steps,
a smaller ResNet) and are smoke runs only; the real baseline needs a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import ConfigError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from lidc_det.torch_state import seeded_torch_rng
from stage1_detect.registry import register_detector

CHECKPOINT_FORMAT = "stage1_detect.monai_retinanet/1"


#: Invalid MONAI baseline configuration: the project's one :class:`~lidc_det.errors.ConfigError`.
MonaiConfigError = ConfigError


@dataclass(frozen=True)
class MonaiRetinaNetConfig:
    """MONAI RetinaNet baseline settings; defaults are the LUNA16 tutorial's (module docstring).

    All spatial tuples are in MONAI's ``(x, y, z)`` order.

    Attributes:
        spacing_xyz_mm: network grid spacing (x, y, z) mm.
        hu_range: HU clipped and mapped linearly to [0, 1].
        block: "bottleneck" (ResNet-50 style) or "basic".
        resnet_layers: blocks per ResNet stage.
        block_inplanes: widths of the four ResNet stages (before the bottleneck expansion).
        conv1_t_stride: stride of the first convolution (x, y, z).
        returned_layers: ResNet stages fed to the FPN (levels = len + 1).
        base_anchor_shapes: anchor (x, y, z) sizes in voxels at the finest level.
        atss_candidates: ATSS matcher candidates per level.
        hns_batch_size_per_image, hns_positive_fraction, hns_pool_size, hns_min_neg: hard negative sampler.
        patch_size_xyz: training patch (x, y, z) voxels.
        batch_size: patches per step.
        pos_fraction: fraction of patches centred on a nodule (``RandCropBoxByPosNegLabeld`` pos=1, neg=1).
        aug_flip, aug_rot90, intensity_scale, intensity_shift: augmentation (as :class:`stage1_detect.config.DetectorConfig`).
        lr, momentum, weight_decay, nesterov: SGD.
        warmup_epochs, lr_step_epochs, lr_gamma: linear warm-up, then step decay (in epochs).
        epochs, steps_per_epoch: schedule length (validation after each epoch).
        checkpoint_every: save ``last.pt`` every this many steps.
        val_patch_size_xyz: sliding-window size at inference (x, y, z), or smaller scans padded to it.
        sw_overlap, sw_batch_size: sliding-window overlap and windows per forward.
        score_thresh, topk_candidates_per_level, nms_thresh, detections_per_img: box selector.
        amp: mixed precision on CUDA (ignored on CPU).
        seed: model initialisation and patch sampling seed.
    """

    name: str = "monai_retinanet"
    spacing_xyz_mm: tuple[float, float, float] = (0.703125, 0.703125, 1.25)
    hu_range: tuple[float, float] = (-1024.0, 300.0)
    block: str = "bottleneck"
    resnet_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    block_inplanes: tuple[int, int, int, int] = (64, 128, 256, 512)
    conv1_t_stride: tuple[int, int, int] = (2, 2, 1)
    returned_layers: tuple[int, ...] = (1, 2)
    base_anchor_shapes: tuple[tuple[int, int, int], ...] = ((6, 8, 4), (8, 6, 5), (10, 10, 6))
    atss_candidates: int = 4
    hns_batch_size_per_image: int = 64
    hns_positive_fraction: float = 0.3
    hns_pool_size: int = 20
    hns_min_neg: int = 16
    patch_size_xyz: tuple[int, int, int] = (192, 192, 80)
    batch_size: int = 4
    pos_fraction: float = 0.5
    aug_flip: bool = True
    aug_rot90: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 3e-5
    nesterov: bool = True
    warmup_epochs: int = 10
    lr_step_epochs: int = 150
    lr_gamma: float = 0.1
    epochs: int = 300
    steps_per_epoch: int = 100
    checkpoint_every: int = 50
    val_patch_size_xyz: tuple[int, int, int] = (512, 512, 208)
    sw_overlap: float = 0.25
    sw_batch_size: int = 1
    score_thresh: float = 0.02
    topk_candidates_per_level: int = 1000
    nms_thresh: float = 0.22
    detections_per_img: int = 100
    amp: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.block not in ("bottleneck", "basic"):
            problems.append(f"block must be 'bottleneck' or 'basic', got {self.block!r}")
        div = self.size_divisible_xyz
        for name in ("patch_size_xyz", "val_patch_size_xyz"):
            v = getattr(self, name)
            if len(v) != 3 or any(int(s) % d for s, d in zip(v, div)):
                problems.append(f"{name} {v} must be divisible by {div} (x, y, z)")
        if any(int(s) % 16 for s in self.patch_size_xyz):
            problems.append(f"patch_size_xyz {self.patch_size_xyz} must be multiples of 16 (the shared patch sampler)")
        if not self.returned_layers or max(self.returned_layers) > 3 or min(self.returned_layers) < 1:
            problems.append(f"returned_layers must lie in 1..3, got {self.returned_layers}")
        if min(self.batch_size, self.epochs, self.steps_per_epoch, self.checkpoint_every, self.detections_per_img) < 1:
            problems.append("batch_size, epochs, steps_per_epoch, checkpoint_every, detections_per_img must be >= 1")
        if problems:
            raise MonaiConfigError("invalid MonaiRetinaNetConfig: " + "; ".join(problems))

    @property
    def size_divisible_xyz(self) -> tuple[int, int, int]:
        """Input sizes must be multiples of this (first conv stride x 2 (max pool) x 2^max(returned_layers))."""
        return tuple(int(s) * 2 * 2 ** max(self.returned_layers) for s in self.conv1_t_stride)  # type: ignore[return-value]

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, tuple | list) else v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> MonaiRetinaNetConfig:
        return monai_config_from_dict({**self.to_dict(), **changes})


def monai_config_from_dict(d: dict[str, Any], *, source: str = "<dict>") -> MonaiRetinaNetConfig:
    """:class:`MonaiRetinaNetConfig` from a mapping (:func:`lidc_det.config.from_mapping`: lists ->
    tuples; unknown keys, wrong types and bad values raise :class:`~lidc_det.errors.ConfigError`)."""
    from lidc_det.config import from_mapping

    return from_mapping(MonaiRetinaNetConfig, d, source)


# ----------------------------------------------------------------- model
def build_monai_detector(config: MonaiRetinaNetConfig, device: Any = "cpu") -> Any:
    """The ``monai.apps.detection`` ``RetinaNetDetector`` of ``config`` (network, anchors,
    matcher, sampler, box selector, sliding-window inferer), seeded by ``config.seed``."""
    import torch
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet

    levels = len(config.returned_layers) + 1
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**i for i in range(levels)],
        base_anchor_shapes=[list(s) for s in config.base_anchor_shapes],
    )
    with seeded_torch_rng(config.seed):  # MONAI's layers initialise from the global generator
        backbone = resnet.ResNet(
            block=resnet.ResNetBottleneck if config.block == "bottleneck" else resnet.ResNetBlock,
            layers=list(config.resnet_layers),
            block_inplanes=list(config.block_inplanes),
            n_input_channels=1,
            conv1_t_stride=list(config.conv1_t_stride),
            conv1_t_size=[max(7, 2 * s + 1) for s in config.conv1_t_stride],
        )
        extractor = resnet_fpn_feature_extractor(
            backbone=backbone, spatial_dims=3, pretrained_backbone=False, trainable_backbone_layers=None,
            returned_layers=list(config.returned_layers),
        )
        net = RetinaNet(
            spatial_dims=3, num_classes=1, num_anchors=anchors.num_anchors_per_location()[0],
            feature_extractor=extractor, size_divisible=list(config.size_divisible_xyz),
        )
    det = RetinaNetDetector(network=net, anchor_generator=anchors, debug=False)
    det.set_atss_matcher(num_candidates=config.atss_candidates, center_in_gt=False)
    det.set_hard_negative_sampler(
        batch_size_per_image=config.hns_batch_size_per_image, positive_fraction=config.hns_positive_fraction,
        pool_size=config.hns_pool_size, min_neg=config.hns_min_neg,
    )
    det.set_target_keys(box_key="box", label_key="label")
    det.set_box_selector_parameters(
        score_thresh=config.score_thresh, topk_candidates_per_level=config.topk_candidates_per_level,
        nms_thresh=config.nms_thresh, detections_per_img=config.detections_per_img,
    )
    det.set_sliding_window_inferer(
        roi_size=list(config.val_patch_size_xyz), overlap=config.sw_overlap, sw_batch_size=config.sw_batch_size,
        mode="constant", device=torch.device(device),
    )
    return det.to(device)


# ----------------------------------------------------------------- axes and data
def _spacing_zyx(config: MonaiRetinaNetConfig) -> tuple[float, float, float]:
    return tuple(float(s) for s in config.spacing_xyz_mm[::-1])  # type: ignore[return-value]


def _zyx_boxes_to_monai_xyz(boxes_zyx: np.ndarray) -> np.ndarray:
    """Our voxel boxes on a ``[z, y, x]`` array -> MONAI xyzxyz boxes on the transposed ``[x, y, z]`` array."""
    from lidc_det.boxes import to_monai_boxes

    b = to_monai_boxes(np.asarray(boxes_zyx, dtype=np.float64).reshape(-1, 6))  # same axis order, MONAI coordinates
    return b[:, [2, 1, 0, 5, 4, 3]]


def _monai_xyz_to_zyx_boxes(boxes_xyz: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_zyx_boxes_to_monai_xyz`."""
    from lidc_det.boxes import from_monai_boxes

    b = np.asarray(boxes_xyz, dtype=np.float64).reshape(-1, 6)[:, [2, 1, 0, 5, 4, 3]]
    b[:, 3:] = np.maximum(b[:, 3:], b[:, :3])
    return from_monai_boxes(b)


def _scale_intensity(normalized: Any) -> Any:
    """``[-1, 1]`` (``normalize_hu`` with ``hu_range``) -> the tutorial's ``[0, 1]``."""
    return (normalized + 1.0) * 0.5


def resample_case(case: Any, spacing_zyx: Sequence[float]) -> Any:
    """A training case on ``spacing_zyx`` mm (image linear; target boxes through world mm),
    as :class:`stage1_detect.data.InMemoryCase`; unchanged when already on that spacing."""
    from lidc_det.boxes import boxes_to_world, world_to_boxes
    from lidc_det.resample import resample_image
    from stage1_detect.data import InMemoryCase, case_boxes

    if np.allclose(case.geometry.spacing_zyx, spacing_zyx, rtol=1e-3, atol=0.0):
        return case
    image, geom = resample_image(np.asarray(case.image_hu, dtype=np.float32), case.geometry, tuple(spacing_zyx))  # type: ignore[arg-type]
    boxes = case_boxes(case)
    if len(boxes):
        centres, sizes = boxes_to_world(boxes, case.geometry)
        boxes = world_to_boxes(centres, np.abs(sizes), geom)
    return InMemoryCase(case.series_uid, image, geom, boxes)


def _sampler_config(config: MonaiRetinaNetConfig) -> Any:
    """The :class:`DetectorConfig` that drives :class:`PatchDataset` for this baseline."""
    from stage1_detect.config import DetectorConfig

    return DetectorConfig(
        spacing_mm=_spacing_zyx(config), hu_window=config.hu_range, patch_size=tuple(config.patch_size_xyz[::-1]),
        batch_size=config.batch_size, pos_fraction=config.pos_fraction, aug_flip=config.aug_flip,
        aug_rot90=config.aug_rot90, intensity_scale=config.intensity_scale, intensity_shift=config.intensity_shift,
        seed=config.seed,
    )


# ----------------------------------------------------------------- detector
@register_detector("monai_retinanet")
class MonaiRetinaNetDetector:
    """MONAI RetinaNet (LUNA16 tutorial configuration) behind the
    :class:`~stage1_detect.registry.Detector` interface.

    Args:
        config: a :class:`MonaiRetinaNetConfig` (default: the tutorial's); ignored with ``checkpoint``.
        checkpoint: ``last.pt`` / ``best.pt`` written by :meth:`fit`.
        device: "cpu", "cuda", ...; default CUDA when available.
        progress: tqdm bars in :meth:`fit`.
        overrides: config fields to change, e.g. ``patch_size_xyz=[64, 64, 32], epochs=1``.
    """

    def __init__(
        self,
        config: MonaiRetinaNetConfig | dict[str, Any] | None = None,
        *,
        checkpoint: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
        **overrides: Any,
    ) -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        state = None
        if checkpoint is not None:
            state = _load_checkpoint(checkpoint)
            config = monai_config_from_dict(state["config"], source=f"{checkpoint} [config]")
        elif config is None:
            config = MonaiRetinaNetConfig()
        elif isinstance(config, dict):
            config = monai_config_from_dict(config)
        if overrides:
            config = config.replace(**overrides)
        self.config: MonaiRetinaNetConfig = config
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.progress = progress
        self.detector = build_monai_detector(config, self.device)
        if state is not None:
            self.detector.network.load_state_dict(state["model"])

    def predict(self, hu: np.ndarray, geometry: VolumeGeometry, *, series_uid: str) -> Detections:
        """Candidates in one scan (``hu``: ``[z, y, x]`` HU on ``geometry``, any spacing): resampled to
        the tutorial spacing, sliding-window RetinaNet, MONAI's box selector; at most
        ``detections_per_img`` (100), best first."""
        import torch

        from lidc_det.resample import resample_image
        from stage1_detect.inference import detections_from_boxes
        from stage1_detect.preprocess import normalize_hu

        cfg = self.config
        hu = np.asarray(hu)
        if hu.shape != geometry.shape_zyx:
            raise ValueError(f"volume shape {hu.shape} does not match geometry shape {geometry.shape_zyx}")
        grid_geom = geometry
        if not np.allclose(geometry.spacing_zyx, _spacing_zyx(cfg), rtol=1e-3, atol=0.0):
            hu, grid_geom = resample_image(hu, geometry, _spacing_zyx(cfg))
        image = _scale_intensity(normalize_hu(hu, cfg.hu_range))
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 1, 0)))[None, None].to(self.device)
        self.detector.eval()
        amp = cfg.amp and self.device.type == "cuda"
        with torch.inference_mode(), (torch.autocast("cuda") if amp else contextlib.nullcontext()):
            out = self.detector(x, use_inferer=True)[0]
        boxes_xyz = out["box"].detach().float().cpu().numpy().reshape(-1, 6)
        scores = out["label_scores"].detach().float().cpu().numpy().reshape(-1)
        order = np.argsort(-scores, kind="stable")[: cfg.detections_per_img]
        boxes = _monai_xyz_to_zyx_boxes(boxes_xyz[order]) if len(order) else np.zeros((0, 6))
        return detections_from_boxes(boxes, scores[order], grid_geom, geometry, series_uid)

    def fit(self, train_cases: Sequence[Any], val_cases: Sequence[Any], out_dir: str | Path, **kwargs: Any) -> Any:
        """Train with :func:`train_monai_retinanet` (resuming from ``out_dir/last.pt``), then load
        ``best.pt`` (or ``last.pt`` without validation cases). Returns a
        :class:`stage1_detect.train.TrainResult`."""
        kwargs.setdefault("progress", self.progress)
        result = train_monai_retinanet(self, train_cases, val_cases, Path(out_dir), **kwargs)
        chosen = result.best_checkpoint or result.last_checkpoint
        self.detector.network.load_state_dict(_load_checkpoint(chosen)["model"])
        self.checkpoint = Path(chosen)
        return result


def _load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A MONAI baseline checkpoint, read with the weights-only loader (:func:`lidc_det.checkpoint.load_checkpoint`)."""
    from lidc_det.checkpoint import load_checkpoint

    return load_checkpoint(path, formats=(CHECKPOINT_FORMAT,), kind="MONAI baseline checkpoint")


def _lr_factor(config: MonaiRetinaNetConfig, step: int) -> float:
    """Linear warm-up over ``warmup_epochs``, then x ``lr_gamma`` every ``lr_step_epochs`` (per step)."""
    epoch = step / config.steps_per_epoch
    if epoch < config.warmup_epochs:
        return (step + 1) / (config.warmup_epochs * config.steps_per_epoch)
    return config.lr_gamma ** int((epoch - config.warmup_epochs) // config.lr_step_epochs)


def train_monai_retinanet(
    det: MonaiRetinaNetDetector,
    train_cases: Sequence[Any],
    val_cases: Sequence[Any],
    out_dir: Path,
    *,
    resume: bool = True,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> Any:
    """Train ``det.detector`` on patches of ``train_cases`` (the shared :class:`PatchDataset`),
    validate on ``val_cases`` after each epoch with the LUNA16 CPM
    (:func:`stage1_detect.train.validation_metric`) and keep the best on the validation fold.

    Writes ``last.pt`` (atomic, every ``checkpoint_every`` steps and each epoch; a rerun resumes
    from it), ``best.pt``, ``config.yaml`` + provenance, ``train_log.csv``, ``history.csv`` and
    ``loss_curve.png`` to ``out_dir``.
    """
    import torch
    import yaml
    from tqdm.auto import tqdm

    from lidc_det import atomic
    from lidc_det.provenance import device_info, provenance
    from stage1_detect.data import PatchDataset
    from stage1_detect.train import TrainResult, _write_csv, plot_loss_curve, save_checkpoint, validation_metric

    cfg = det.config
    dev = det.device
    out_dir.mkdir(parents=True, exist_ok=True)
    spacing = _spacing_zyx(cfg)
    train = [resample_case(c, spacing) for c in tqdm(train_cases, desc="resample", disable=not progress, leave=False)]
    net = det.detector
    optimizer = torch.optim.SGD(
        net.network.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(cfg, s))
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    step, step_log, history = 0, [], []
    best_metric: float | None = None
    best_epoch: int | None = None
    if resume and last_path.is_file():
        state = _load_checkpoint(last_path)
        if state["config"] != cfg.to_dict():
            from lidc_det.errors import CheckpointError

            raise CheckpointError(last_path, "saved with a different config; use another out_dir or resume=False")
        net.network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, step_log, history = int(state["step"]), list(state["step_log"]), list(state["history"])
        best_metric, best_epoch = state["best_metric"], state["best_epoch"]
    atomic.write_text(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic.write_json(out_dir / "config.provenance.json", provenance({"device": device_info(str(dev))}))
    metric_fn = validation_metric(val_cases) if val_cases else None

    def state_dict() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": net.network.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "step_log": step_log, "history": history, "best_metric": best_metric, "best_epoch": best_epoch,
        }

    total = cfg.total_steps
    dataset = PatchDataset(train, _sampler_config(cfg), seed=cfg.seed, length=total * cfg.batch_size)
    step_seconds: list[float] = []
    ran = 0
    epoch_t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train monai", unit="step", disable=not progress)
    try:
        while step < total and (stop_after_steps is None or ran < stop_after_steps):
            items = [dataset.sample(i) for i in range(step * cfg.batch_size, (step + 1) * cfg.batch_size)]
            images, targets = [], []
            for image, boxes, _ in items:
                images.append(torch.from_numpy(np.ascontiguousarray(_scale_intensity(image).transpose(2, 1, 0)))[None])
                targets.append({
                    "box": torch.from_numpy(_zyx_boxes_to_monai_xyz(boxes).astype(np.float32)).to(dev),
                    "label": torch.zeros(len(boxes), dtype=torch.long, device=dev),
                })
            x = torch.stack(images).to(dev)
            t0 = time.perf_counter()
            net.train()
            with torch.autocast("cuda") if use_amp else contextlib.nullcontext():
                losses = net(x, targets)
                loss = losses[net.cls_key] + losses[net.box_reg_key]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            ran += 1
            step_seconds.append(time.perf_counter() - t0)
            step_log.append({"step": step, "loss": float(loss.detach()), "cls": float(losses[net.cls_key].detach()),
                             "box": float(losses[net.box_reg_key].detach()), "lr": lr, "seconds": step_seconds[-1]})
            bar.update(1)
            bar.set_postfix(loss=f"{step_log[-1]['loss']:.3f}")
            epoch_end = step % cfg.steps_per_epoch == 0
            if epoch_end:
                metric = None
                if metric_fn is not None:
                    dets = [det.predict(c.image_hu, c.geometry, series_uid=c.series_uid) for c in val_cases]
                    metric = float(metric_fn(dets))
                recent = [r["loss"] for r in step_log[-cfg.steps_per_epoch :]]
                history.append({"epoch": step // cfg.steps_per_epoch, "step": step, "train_loss": float(np.mean(recent)),
                                "val_metric": metric, "seconds": time.perf_counter() - epoch_t0})
                epoch_t0 = time.perf_counter()
                if metric is not None and np.isfinite(metric) and (best_metric is None or metric > best_metric):
                    best_metric, best_epoch = metric, step // cfg.steps_per_epoch
                    save_checkpoint(best_path, state_dict())
            if epoch_end or step % cfg.checkpoint_every == 0 or step == total:
                save_checkpoint(last_path, state_dict())
                _write_csv(out_dir / "train_log.csv", step_log, ["step", "loss", "cls", "box", "lr", "seconds"])
                _write_csv(out_dir / "history.csv", history, ["epoch", "step", "train_loss", "val_metric", "seconds"])
                plot_loss_curve(out_dir / "loss_curve.png", step_log, history)
    finally:
        bar.close()
    return TrainResult.of_run(out_dir, last_path, best_path, best_metric, best_epoch, step, history, step_seconds)
