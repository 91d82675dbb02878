"""Settings of the image-based malignancy model (frozen dataclasses, read from YAML).

Kept apart from :mod:`stage3_malignancy.embeddings` so that reading a config
does not import torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lidc_det.config import from_mapping, load_yaml_config
from lidc_det.errors import ConfigError

__all__ = ["FEATURE_GROUPS", "ConfigError", "EmbeddingConfig", "MalignancyModelConfig"]

#: Feature groups a model can use, in column order.
FEATURE_GROUPS: tuple[str, ...] = ("diameter", "shape", "radiomics", "embeddings")


@dataclass(frozen=True)
class EmbeddingConfig:
    """Cube extraction and small-CNN training settings (see :mod:`stage3_malignancy.embeddings`).

    Attributes:
        cube_voxels: edge of the input cube (voxels, multiple of 8, >= 16).
        voxel_mm: isotropic voxel size of the cube (field of view ``cube_voxels * voxel_mm`` mm).
        hu_window: HU range mapped to [0, 1].
        width: channels of the first SmallCNN3D block (then 2x, 4x, 4x); embedding size ``4 * width``.
        epochs, batch_size, lr, weight_decay: training of the SmallCNN3D (AdamW, one-cycle schedule).
        augment: random flips along the three axes and 90-degree in-plane rotations.
        batch_size_infer: batch size when computing embeddings.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        torch_threads: CPU threads for torch (0 = leave torch's default).
    """

    cube_voxels: int = 32
    voxel_mm: float = 1.25
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    width: int = 8
    epochs: int = 20
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    augment: bool = True
    batch_size_infer: int = 32
    device: str = "auto"
    torch_threads: int = 0

    def __post_init__(self) -> None:
        if self.cube_voxels < 16 or self.cube_voxels % 8:
            raise ConfigError(f"EmbeddingConfig.cube_voxels must be a multiple of 8 and >= 16, got {self.cube_voxels}")
        if self.voxel_mm <= 0 or self.width < 1 or self.epochs < 0 or self.batch_size < 1:
            raise ConfigError("EmbeddingConfig: voxel_mm, width, batch_size must be positive and epochs >= 0")
        lo, hi = (float(v) for v in self.hu_window)
        if not lo < hi:
            raise ConfigError(f"EmbeddingConfig.hu_window must increase, got {self.hu_window}")
        object.__setattr__(self, "hu_window", (lo, hi))


@dataclass(frozen=True)
class MalignancyModelConfig:
    """Everything a :class:`~stage3_malignancy.model.MalignancyModel` depends on.

    Attributes:
        features: feature groups from :data:`FEATURE_GROUPS` (concatenated in that order).
        radiomics_params: pyradiomics YAML file; None = the committed
            ``stage3_malignancy/params/radiomics_ct.yaml``.
        embedding: cube and SmallCNN3D settings.
        seed: seeds the inner split, LightGBM and the CNN.
        inner_val_fraction: share of the training patients held out (grouped by
            patient) for early stopping and calibration.
        calibration: ``"isotonic"``, ``"platt"`` or ``"none"``.
        num_boost_round, early_stopping_rounds: LightGBM boosting.
        lgbm_params: LightGBM parameters over :data:`stage3_malignancy.cv.DEFAULT_LGBM_PARAMS`
            (defaults here suit tens to hundreds of nodules).
        workers: processes for the radiomics extraction.
        cache_dir: radiomics cache root (None = no cache).
    """

    features: tuple[str, ...] = ("shape", "radiomics", "embeddings")
    radiomics_params: str | None = None
    embedding: EmbeddingConfig = EmbeddingConfig()
    seed: int = 0
    inner_val_fraction: float = 0.25
    calibration: Literal["isotonic", "platt", "none"] = "platt"
    num_boost_round: int = 1000
    early_stopping_rounds: int = 50
    lgbm_params: dict[str, Any] = field(
        default_factory=lambda: {"num_leaves": 7, "min_data_in_leaf": 5, "learning_rate": 0.05,
                                 "feature_fraction": 0.5},
        hash=False,
    )
    workers: int = 1
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        feats = tuple(self.features)
        bad = [f for f in feats if f not in FEATURE_GROUPS]
        if bad or not feats or len(set(feats)) != len(feats):
            raise ConfigError(f"features must be distinct names from {FEATURE_GROUPS}, got {feats}")
        object.__setattr__(self, "features", tuple(f for f in FEATURE_GROUPS if f in feats))
        if not 0.0 < self.inner_val_fraction < 0.5:
            raise ConfigError(f"inner_val_fraction must be in (0, 0.5), got {self.inner_val_fraction}")
        if self.calibration not in ("isotonic", "platt", "none"):
            raise ConfigError(f"calibration must be isotonic, platt or none, got {self.calibration!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")

    def with_features(self, features: tuple[str, ...]) -> MalignancyModelConfig:
        """A copy using other feature groups."""
        return replace(self, features=tuple(features))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        d["embedding"]["hu_window"] = list(self.embedding.hu_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "MalignancyModelConfig") -> MalignancyModelConfig:
        """Build from a mapping (YAML) with :func:`lidc_det.config.from_mapping`: unknown keys,
        wrong types and bad values raise :class:`~lidc_det.errors.ConfigError` naming ``where``."""
        return from_mapping(cls, dict(d or {}), where)

    @classmethod
    def from_yaml(cls, path: str | Path, key: str | None = None) -> MalignancyModelConfig:
        """Read a YAML file (or its ``key`` section) with :func:`lidc_det.config.load_yaml_config`."""
        return load_yaml_config(cls, path, key)
