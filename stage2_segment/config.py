"""Configuration of stage 2 (frozen dataclasses; YAML -> :class:`SegmenterConfig`).

Light module: importing it does not import nnU-Net or torch.

Example YAML (every key optional)::

    dataset_id: 501
    dataset_name: LidcCrops
    seed: 0
    crop: {size_mm: 48, jitter_mm: 6, negatives_per_scan: 2}
    augment: {copies: 1, blur_sigma_xy_mm: [0.3, 1.2], blur_sigma_z_mm: [0.3, 1.5], noise_sd_hu: [0, 20]}
    train: {trainer: nnUNetTrainerLidcShort, num_epochs: 5, num_iterations_per_epoch: 20}
    predict: {batch_size: 8, use_mirroring: true}
    rejection: {min_volume_mm3: null, mode: drop}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stage2_segment.crop_augment import CropAugmentConfig
from stage2_segment.crops import CropConfig
from stage2_segment.predict import PredictConfig

TRAINERS = ("nnUNetTrainerLidcShort", "nnUNetTrainer")


@dataclass(frozen=True)
class TrainConfig:
    """One nnU-Net training run.

    Attributes:
        trainer: ``"nnUNetTrainerLidcShort"`` (schedule below) or ``"nnUNetTrainer"``
            (nnU-Net's 1000 x 250 iterations; the schedule fields are then ignored).
        num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch, initial_lr:
            the short schedule.
        optimizer: ``"sgd"`` (nnU-Net's) or ``"adamw"`` (short trainer only; use
            ``initial_lr`` about 1e-3 with it).
        fold: nnU-Net fold; :func:`~stage2_segment.nnunet_dataset.write_splits` writes fold 0.
        device: ``"cpu"``, ``"cuda"``.
        n_proc_da: data-augmentation worker processes (0 = in the training process,
            best on a 2-core CPU).
        num_threads: torch intra-op threads during training (None = unchanged).
        final_validation: run nnU-Net's full validation (predicts every validation
            crop and writes ``validation/summary.json``) after training.
    """

    trainer: str = "nnUNetTrainerLidcShort"
    num_epochs: int = 5
    num_iterations_per_epoch: int = 20
    num_val_iterations_per_epoch: int = 5
    initial_lr: float = 1e-2
    optimizer: str = "sgd"
    fold: int = 0
    device: str = "cpu"
    n_proc_da: int = 0
    num_threads: int | None = None
    final_validation: bool = False

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"TrainConfig.trainer must be one of {TRAINERS}, got {self.trainer!r}")
        if min(self.num_epochs, self.num_iterations_per_epoch) < 1 or self.num_val_iterations_per_epoch < 0:
            raise ValueError("TrainConfig: num_epochs and num_iterations_per_epoch must be >= 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"TrainConfig.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")

    def schedule(self) -> dict[str, Any]:
        return {
            "num_epochs": self.num_epochs,
            "num_iterations_per_epoch": self.num_iterations_per_epoch,
            "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            "initial_lr": self.initial_lr,
            "optimizer": self.optimizer,
            "save_every": 1,
        }


@dataclass(frozen=True)
class RejectionConfig:
    """False-positive rejection from the crop segmentation.

    Attributes:
        min_volume_mm3: a candidate whose mask is smaller is rejected; None = tune
            on the validation fold (:func:`stage2_segment.segmenter.tune_min_volume`).
        mode: ``"drop"`` removes the candidate; ``"downweight"`` multiplies its
            score by ``factor`` (keeps it for the FROC tail).
        factor: score multiplier for ``"downweight"``.
        tolerance: tuning keeps the smallest threshold whose validation CPM is within
            this of the best one. A handful of validation scans makes the best
            threshold noisy: without a tolerance a 0.02 CPM gain on 3 scans chose a
            threshold (556 mm3) that halved the CPM on the test scans.
    """

    min_volume_mm3: float | None = None
    mode: str = "drop"
    factor: float = 0.1
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        if self.mode not in ("drop", "downweight"):
            raise ValueError(f"RejectionConfig.mode must be 'drop' or 'downweight', got {self.mode!r}")
        if self.tolerance < 0:
            raise ValueError(f"RejectionConfig.tolerance must be >= 0, got {self.tolerance}")


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything that defines a stage-2 run.

    Attributes:
        dataset_id, dataset_name: nnU-Net's ``DatasetNNN_<name>``.
        seed: crop jitter and negative sampling.
        plan_processes: worker processes of nnU-Net's fingerprint and preprocessing.
        plan_batch_size: training batch size (None = nnU-Net's plan).
        plan_base_features: feature maps of the U-Net's first stage, doubled per
            stage up to 320 (None = nnU-Net's 32). 8 trains about 5x faster on a CPU.
        crop: how crops are cut (:class:`~stage2_segment.crops.CropConfig`).
        augment: altered (magnified, blurred, noisy) copies of the training crops
            (:class:`~stage2_segment.crop_augment.CropAugmentConfig`; off by default).
    """

    dataset_id: int = 501
    dataset_name: str = "LidcCrops"
    seed: int = 0
    plan_processes: int = 1
    plan_batch_size: int | None = None
    plan_base_features: int | None = None
    crop: CropConfig = field(default_factory=CropConfig)
    augment: CropAugmentConfig = field(default_factory=CropAugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "SegmenterConfig") -> SegmenterConfig:
        """Build from a (YAML) dict (:func:`lidc_det.config.from_mapping`); unknown keys, wrong
        types and bad values raise :class:`~lidc_det.errors.ConfigError` naming ``where`` and the key."""
        from lidc_det.config import from_mapping

        return from_mapping(cls, d, where)

    @classmethod
    def from_yaml(cls, path: Path | str) -> SegmenterConfig:
        """Read a YAML file (:func:`lidc_det.config.load_yaml_config`; ConfigError naming the file and key)."""
        from lidc_det.config import load_yaml_config

        return load_yaml_config(cls, path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
