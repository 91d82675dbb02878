"""Evaluation metrics: LUNA16 FROC / CPM for detection (:mod:`lidc_det.metrics.froc`)."""
