"""Stage 3: malignancy from nodule image + mask; imports :mod:`lidc_det` only.

Modules:

* :mod:`~stage3_malignancy.samples`: :class:`MalignancySample` (HU crop + mask) and builders
  (:func:`samples_from_prepared`, :func:`samples_from_volume`, :func:`samples_from_nodule_masks`).
* :mod:`~stage3_malignancy.shape`, :mod:`~stage3_malignancy.radiomics_features`,
  :mod:`~stage3_malignancy.embeddings`: the three feature groups.
* :mod:`~stage3_malignancy.model`: :class:`MalignancyModel` (LightGBM, early stopping,
  calibration, ``pred_contrib``; save / load) and :func:`cross_validate_samples`.
* :mod:`~stage3_malignancy.classify`: ``lidc-det classify`` (a scan + mask files).
* :mod:`~stage3_malignancy.real_benchmark`: ``lidc-det malignancy-real`` (shape-only on the
  real LIDC reader contours, no images); :mod:`~stage3_malignancy.twin_benchmark`: the
  image-based benchmark on a prepared set (synthetic on the twin).
* :mod:`~stage3_malignancy.labels`, :mod:`~stage3_malignancy.cv`,
  :mod:`~stage3_malignancy.metrics`, :mod:`~stage3_malignancy.plots`: shared pieces.

Heavy dependencies (torch, lightgbm, pyradiomics, pylidc) load inside the functions that use them.
"""
