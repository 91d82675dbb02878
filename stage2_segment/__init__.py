"""Stage 2: nnU-Net v2 segmentation of crops around stage-1 candidates.

Consumes :class:`lidc_det.results.Detections`, produces :class:`lidc_det.results.NoduleMask`;
never imports ``stage1_detect``. Modules (nnU-Net and torch are imported lazily,
except by :mod:`stage2_segment.trainer`, which subclasses nnU-Net's trainer):

* :mod:`~stage2_segment.crops` -- fixed physical-size crops (nodules, negatives, detections)
* :mod:`~stage2_segment.nnunet_dataset` -- nnU-Net raw data set, environment, plan + preprocess
* :mod:`~stage2_segment.trainer` -- short registered trainer and the training call
* :mod:`~stage2_segment.predict` -- in-process batched prediction and paste-back
* :mod:`~stage2_segment.segmenter` -- the facade ``NnUnetSegmenter`` and FP rejection
* :mod:`~stage2_segment.metrics` -- Dice, volume error, human reference, histogram
* :mod:`~stage2_segment.evaluate` -- Dice on GT / detector crops, FROC with and without rejection
* :mod:`~stage2_segment.exports` -- merged label NIfTI, JSON, DICOM SEG
* :mod:`~stage2_segment.config` -- YAML -> frozen dataclasses

See docs/stage2.md.
"""
