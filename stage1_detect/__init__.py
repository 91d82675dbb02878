"""Stage 1: nodule candidates in a whole CT scan (world-mm centres, diameters, scores, boxes).

* :mod:`stage1_detect.detector`: ``retina3d``, our 3D RetinaNet-style detector (config in
  :mod:`~stage1_detect.config`, network in :mod:`~stage1_detect.model`, training in
  :mod:`~stage1_detect.train`, sliding-window inference in :mod:`~stage1_detect.inference`).
* :mod:`stage1_detect.monai_baseline`: ``monai_retinanet``, MONAI's RetinaNet with its LUNA16
  tutorial configuration, through the same data path.
* :mod:`stage1_detect.mmdet_adapter`: ``mmdet_retinanet_2p5d``, a 2.5D mmdet RetinaNet
  (optional ``[mmdet]`` extra).
* :mod:`stage1_detect.registry`: ``build_detector`` / ``list_detectors`` and plug-ins through the
  ``lidc_det.detectors`` entry-point group (docs/plugins.md).

Imports :mod:`lidc_det`, never the other stage packages; torch and MONAI are imported lazily.
"""
