"""Stage 2: nnU-Net v2 segmentation of crops around stage-1 candidates.

Planned in issue #6; consumes :class:`lidc_det.results.Detections`, never imports stage1_detect.
"""
