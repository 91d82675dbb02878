"""lidc-det's nnU-Net trainers, as nnU-Net's trainer lookup (``nnUNet_extTrainer``) sees them."""

from stage2_segment.trainer import nnUNetTrainerLidcShort

__all__ = ["nnUNetTrainerLidcShort"]
