"""``DetectorConfig``: everything that defines a stage-1 detector run, mapped from YAML.

A config fully describes a model (architecture, anchors), its training
(patches, augmentation, optimiser, schedule) and its inference (sliding
window, NMS). It is saved next to every checkpoint, so a checkpoint can be
rebuilt without the YAML it came from.

Built-in configs live in ``stage1_detect/configs/<name>.yaml``:

* ``tiny``: a small CPU model for tests and the demo (64^3 patches).
* ``default``: the GPU model (96^3 patches, larger channels, longer schedule).

The fields fall in three parts (:data:`MODEL_FIELDS`, :data:`INFERENCE_FIELDS`,
the rest training): the *model* part defines the trained network and what its
outputs mean (input grid and HU window, architecture, anchors). It is frozen
into every checkpoint (``model_config``); a detector built from a checkpoint
refuses a change to it (:class:`ModelOverrideError`), while training and
inference fields may be changed (fine-tuning, another window or threshold).

Geometry conventions: ``patch_size``, ``window_zyx`` and ``window_margin`` are
in voxels *of the training grid* (``spacing_mm``, z, y, x; 1 mm isotropic by
default). ``anchor_sizes_mm`` are in mm and become voxel sizes per axis through
``spacing_mm`` (:attr:`DetectorConfig.anchor_sizes_vox`), so an anchor covers the
same physical size at any training spacing. Shapes are ``(z, y, x)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lidc_det.config import from_mapping, read_yaml_mapping
from lidc_det.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Output strides of the three FPN levels (P2, P3, P4) of :class:`stage1_detect.model.Retina3D`.
#: They follow from the architecture: a stride-2 stem and three stride-2 residual stages.
LEVEL_STRIDES: tuple[int, int, int] = (4, 8, 16)


#: Fields that define the trained network: its input grid and HU window, architecture and anchors.
MODEL_FIELDS: tuple[str, ...] = (
    "name", "spacing_mm", "hu_window", "channels", "blocks", "fpn_channels", "head_convs", "anchor_sizes_mm", "norm",
    "head_norm",
)
#: Model fields added after checkpoints were first written, with the value that older
#: checkpoints' networks have: a checkpoint without the field is read with this value.
LEGACY_MODEL_FIELDS: dict[str, str] = {"norm": "batch", "head_norm": "none"}
#: Fields that only change how a trained network is run on a scan.
INFERENCE_FIELDS: tuple[str, ...] = (
    "window_zyx", "window_margin", "window_batch", "score_thresh", "pre_nms_topk", "nms_iou", "max_detections",
    "use_body_mask", "lung_restrict", "lung_margin_mm", "tta_flip_axes",
)


class ModelOverrideError(ConfigError):
    """A change to a field that defines a trained model (:data:`MODEL_FIELDS`) was asked
    for a detector built from a checkpoint."""


@dataclass(frozen=True)
class DetectorConfig:
    """Frozen description of one stage-1 detector (model + training + inference).

    Model:
        spacing_mm: training grid spacing (z, y, x) mm; inputs are resampled to it.
        hu_window: ``(low, high)`` HU clip; see :func:`stage1_detect.preprocess.normalize_hu`.
        channels: backbone widths ``(stem, stage1, stage2, stage3)``; strides 2, 4, 8, 16.
        blocks: residual blocks in each of the three stages.
        fpn_channels: width of the FPN levels and the heads.
        head_convs: 3x3 conv (+ norm) + ReLU layers in each head tower (shared over levels).
        head_norm: normalisation in the head towers, ``"batch"`` (the default), ``"group"`` or
            ``"none"`` (the plain RetinaNet tower of models trained before this field existed: its
            ReLUs died under AdamW in most runs, so that the model scored every anchor alike; see
            docs/stage1.md "Dead head towers").
        norm: backbone normalisation, ``"batch"`` or ``"group"`` (GroupNorm, 4 channels per group;
            see :func:`stage1_detect.model.norm_layer`).
        anchor_sizes_mm: anchor edge lengths in mm per FPN level (strides 4, 8, 16), the same
            number of anchors on every level; cubic in mm, so ``size / spacing_mm`` voxels per axis.

    Training (losses and matching):
        atss_candidates: ATSS matcher: closest anchor positions per level per box.
        focal_alpha, focal_gamma: sigmoid focal loss parameters.
        box_loss: "smooth_l1" (on encoded deltas, the default and the built-in configs' choice) or
            "giou" (on decoded boxes; diverged on twin data, see docs/stage1.md).
        box_loss_weight: weight of the box loss relative to the focal loss.

    Training (patches and schedule):
        patch_size: training patch (z, y, x) voxels, multiples of 16.
        batch_size: patches per step.
        pos_fraction: probability that a patch is centred on a nodule (with jitter).
        pos_jitter: max offset of the nodule from the patch centre, as a fraction of the patch size.
        aug_flip, aug_rot90: random flips on the three axes, random 90-degree turns in the axial (y, x) plane.
        intensity_scale, intensity_shift: multiply the normalised patch by ``U(1 - s, 1 + s)``
            and add ``U(-t, t)`` (normalised units; 1 unit = half the HU window).
        aug_blur_prob, aug_blur_sigma_mm: with this probability, a Gaussian blur of the patch with
            sigma drawn per axis from ``U(lo, hi)`` mm (z up to 1.5 * hi): other kernels and slice
            thicknesses than the training scans' (domain randomisation).
        aug_noise_prob, aug_noise_hu: with this probability, correlated noise (white noise
            smoothed at 0.6 voxel) of SD ``U(lo, hi)`` HU is added: other doses and kernels.
        neg_dense_fraction: share of the background patches centred on a dense voxel inside the
            lung (a vessel, a bifurcation, a fissure: where false positives sit) instead of a
            random body voxel.
        lr, weight_decay, warmup_steps, grad_clip: AdamW with linear warm-up then cosine decay to 0.
        epochs, steps_per_epoch: schedule length (validation after each epoch).
        checkpoint_every: save ``last.pt`` every this many steps (and at each epoch end).
        amp: mixed precision on CUDA (bf16 where supported, else fp16 + grad scaler); ignored on CPU.
        num_workers: DataLoader worker processes for patch sampling.
        seed: seed of model initialisation and patch sampling.

    Inference:
        window_zyx: largest sliding window (voxels, multiples of 16); smaller when the scan is small.
        window_margin: context voxels on each side of a window's core (multiple of 16); each
            anchor is predicted by exactly the one window whose core contains it.
        window_batch: windows per forward pass.
        score_thresh: minimum sigmoid score kept before NMS.
        pre_nms_topk: best anchors kept per window before NMS (and overall).
        nms_iou: 3D NMS IoU threshold.
        max_detections: cap on detections per scan (LUNA16: 100).
        use_body_mask: skip windows whose core holds no body voxel and drop detections outside the body.
        lung_restrict: drop detections whose centre lies more than ``lung_margin_mm`` from the
            classical lung field (:func:`lidc_det.lungs.lung_fields`, about 1.5 s of CPU per scan);
            a scan where no lung field is found keeps all its detections (with a warning).
        lung_margin_mm: dilation of the lung field for ``lung_restrict`` (mm).
        tta_flip_axes: test-time augmentation: the volume axes (0 z, 1 y, 2 x) whose flips are
            combined; every window is run once per combination (``2 ** len`` passes: ``(2,)``
            is the scan and its left-right mirror) and the anchors' probabilities and box codes
            are averaged (:class:`stage1_detect.inference.FlipTTA`). ``()``: none.
        val_n_bootstrap: bootstrap replicates of the validation CPM (0: none, faster).
    """

    name: str = "retina3d"
    # model
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hu_window: tuple[float, float] = (-1000.0, 500.0)
    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    blocks: tuple[int, int, int] = (1, 1, 1)
    fpn_channels: int = 32
    head_convs: int = 1
    norm: str = "batch"
    head_norm: str = "batch"
    anchor_sizes_mm: tuple[tuple[float, ...], ...] = ((4.0, 6.0), (9.0, 13.0), (19.0, 28.0))
    atss_candidates: int = 4
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "smooth_l1"
    box_loss_weight: float = 1.0
    # training
    patch_size: tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 2
    pos_fraction: float = 0.5
    pos_jitter: float = 0.25
    aug_flip: bool = True
    aug_rot90: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    aug_blur_prob: float = 0.0
    aug_blur_sigma_mm: tuple[float, float] = (0.3, 1.2)
    aug_noise_prob: float = 0.0
    aug_noise_hu: tuple[float, float] = (5.0, 30.0)
    neg_dense_fraction: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 10.0
    epochs: int = 2
    steps_per_epoch: int = 20
    checkpoint_every: int = 10
    amp: bool = True
    num_workers: int = 0
    seed: int = 0
    # inference
    window_zyx: tuple[int, int, int] = (128, 128, 128)
    window_margin: int = 16
    window_batch: int = 2
    score_thresh: float = 0.02
    pre_nms_topk: int = 1000
    nms_iou: float = 0.1
    max_detections: int = 100
    use_body_mask: bool = True
    lung_restrict: bool = False
    lung_margin_mm: float = 10.0
    tta_flip_axes: tuple[int, ...] = ()
    val_n_bootstrap: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if len(self.channels) != 4:
            problems.append(f"channels must have 4 entries (stem + 3 stages), got {self.channels}")
        if len(self.blocks) != 3 or min(self.blocks) < 1:
            problems.append(f"blocks must be 3 positive ints, got {self.blocks}")
        if len(self.anchor_sizes_mm) != len(LEVEL_STRIDES):
            problems.append(f"anchor_sizes_mm needs one list per level {LEVEL_STRIDES}, got {self.anchor_sizes_mm}")
        elif len({len(s) for s in self.anchor_sizes_mm}) != 1 or not self.anchor_sizes_mm[0]:
            problems.append(f"every level needs the same (>= 1) number of anchors, got {self.anchor_sizes_mm}")
        for name in ("patch_size", "window_zyx"):
            v = getattr(self, name)
            if len(v) != 3 or any(int(s) % 16 or s <= 0 for s in v):
                problems.append(f"{name} must be 3 positive multiples of 16, got {v}")
        if self.window_margin % 16 or self.window_margin < 0:
            problems.append(f"window_margin must be a multiple of 16 >= 0, got {self.window_margin}")
        if any(2 * self.window_margin >= w for w in self.window_zyx):
            problems.append(f"window_zyx {self.window_zyx} must exceed 2 * window_margin ({self.window_margin})")
        if self.box_loss not in ("giou", "smooth_l1"):
            problems.append(f"box_loss must be 'giou' or 'smooth_l1', got {self.box_loss!r}")
        for name in ("aug_blur_prob", "aug_noise_prob", "neg_dense_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("aug_blur_sigma_mm", "aug_noise_hu"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi:
                problems.append(f"{name} must be (low, high) with 0 <= low <= high, got {getattr(self, name)}")
        if len(set(self.tta_flip_axes)) != len(self.tta_flip_axes) or not set(self.tta_flip_axes) <= {0, 1, 2}:
            problems.append(f"tta_flip_axes must be distinct axes among 0, 1, 2, got {self.tta_flip_axes}")
        if self.norm not in ("batch", "group"):
            problems.append(f"norm must be 'batch' or 'group', got {self.norm!r}")
        if self.head_norm not in ("batch", "group", "none"):
            problems.append(f"head_norm must be 'batch', 'group' or 'none', got {self.head_norm!r}")
        if not 0.0 <= self.pos_fraction <= 1.0:
            problems.append(f"pos_fraction must lie in [0, 1], got {self.pos_fraction}")
        if self.hu_window[1] <= self.hu_window[0]:
            problems.append(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if min(self.batch_size, self.epochs, self.steps_per_epoch, self.checkpoint_every, self.max_detections) < 1:
            problems.append("batch_size, epochs, steps_per_epoch, checkpoint_every, max_detections must be >= 1")
        if problems:
            raise ConfigError("invalid DetectorConfig: " + "; ".join(problems))

    # ----------------------------------------------------------------- views
    @property
    def anchors_per_location(self) -> int:
        return len(self.anchor_sizes_mm[0])

    @property
    def anchor_sizes_vox(self) -> tuple[tuple[tuple[float, float, float], ...], ...]:
        """Anchor edge lengths in voxels of the training grid: per level, per anchor, ``(z, y, x)``
        (``anchor_sizes_mm / spacing_mm``)."""
        sz, sy, sx = (float(s) for s in self.spacing_mm)
        return tuple(tuple((float(a) / sz, float(a) / sy, float(a) / sx) for a in level) for level in self.anchor_sizes_mm)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def model_part(self) -> dict[str, Any]:
        """The :data:`MODEL_FIELDS` as a plain dict (what a checkpoint freezes)."""
        d = self.to_dict()
        return {k: d[k] for k in MODEL_FIELDS}

    def inference_part(self) -> dict[str, Any]:
        """The :data:`INFERENCE_FIELDS` as a plain dict."""
        d = self.to_dict()
        return {k: d[k] for k in INFERENCE_FIELDS}

    def training_part(self) -> dict[str, Any]:
        """Every other field (losses, matching, patches, augmentation, optimiser, schedule) as a plain dict."""
        return {k: v for k, v in self.to_dict().items() if k not in MODEL_FIELDS and k not in INFERENCE_FIELDS}

    def changed_model_fields(self, other: DetectorConfig | dict[str, Any]) -> list[str]:
        """Names of the :data:`MODEL_FIELDS` whose values differ in ``other`` (a config or a model part)."""
        theirs = other.model_part() if isinstance(other, DetectorConfig) else dict(other)
        mine = self.model_part()
        return [k for k in MODEL_FIELDS if k in theirs and theirs[k] != mine[k]]

    def with_overrides_of_trained(self, source: str, **overrides: Any) -> DetectorConfig:
        """A copy of a *trained* model's config with training / inference fields changed.

        Raises:
            ModelOverrideError: an override changes a :data:`MODEL_FIELDS` value (naming
                ``source``, the checkpoint, and the fields).
        """
        new = self.replace(**overrides) if overrides else self
        changed = self.changed_model_fields(new)
        if changed:
            detail = ", ".join(f"{k}: {self.model_part()[k]} -> {new.model_part()[k]}" for k in changed)
            raise ModelOverrideError(
                f"{source}: cannot change {detail}: these fields define the trained model; train a new "
                "model for them (only training and inference fields may be overridden)"
            )
        return new

    def replace(self, **changes: Any) -> DetectorConfig:
        """A copy with some fields changed (values are coerced like YAML values)."""
        return config_from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) that :func:`config_from_dict` reads back."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def config_from_dict(d: dict[str, Any], *, source: str = "<dict>") -> DetectorConfig:
    """Build a :class:`DetectorConfig` from a mapping (:func:`lidc_det.config.from_mapping`):
    unknown keys, wrong types and bad values raise :class:`~lidc_det.errors.ConfigError`."""
    return from_mapping(DetectorConfig, d, source)


def load_config(name_or_path: str | Path) -> DetectorConfig:
    """A built-in config by name (``"tiny"``, ``"default"``) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        builtin = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"{name_or_path}: no such config file (built-in configs: {builtin})")
    return config_from_dict(read_yaml_mapping(path), source=str(path))


def save_config(config: DetectorConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Atomically write ``config`` as YAML to ``path`` and its provenance (git revision,
    versions, time, plus ``extra``) to ``<path stem>.provenance.json`` beside it."""
    import yaml

    from lidc_det import atomic
    from lidc_det.provenance import provenance

    atomic.write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic.write_json(Path(path).with_suffix(".provenance.json"), provenance(extra))
