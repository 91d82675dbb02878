"""Learned lung fields: a slice-wise 2D U-Net and a patch 3D U-Net trained on LIDC-twin lung labels.

* :mod:`~lidc_det.lungs_learned.data`: scans on the networks' working grid (3 mm by
  default), twins with their lung labels (cached), HU normalisation;
* :mod:`~lidc_det.lungs_learned.train`: :class:`~lidc_det.lungs_learned.train.LungNetConfig`,
  the models (MONAI ``UNet``, 2D or 3D), :class:`~lidc_det.lungs_learned.train.Trainer`
  (Dice + cross-entropy, AdamW + cosine, checkpoints with resume and fine-tuning, loss
  curves as PNG and in TensorBoard);
* :mod:`~lidc_det.lungs_learned.infer`: :class:`~lidc_det.lungs_learned.infer.Inferencer`
  (whole-scan probabilities, threshold tuned on validation scans, labels on the scan's
  grid as :class:`lidc_det.lungs.LungFields`).

torch and MONAI are imported inside these modules only; ``import lidc_det`` and
:mod:`lidc_det.lungs` never import them. The comparison with the classical
:func:`lidc_det.lungs.lung_fields` is ``benchmarks/lungs.py`` (docs/lungs.md).
"""
