"""Stage 3: pyradiomics features + CNN embeddings -> LightGBM malignancy probability.

Planned in issue #7; imports :mod:`lidc_det` only.
"""
