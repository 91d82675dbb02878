"""Folder that lidc-det puts on ``nnUNet_extTrainer`` so nnU-Net finds its trainers by name.

nnU-Net imports every module of this folder as a top-level module and looks
for the trainer class by name; :mod:`lidc_det_nnunet_trainers` re-exports the
classes of :mod:`stage2_segment.trainer`. Nothing else belongs here.
"""
