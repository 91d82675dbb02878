"""Anchors, box coding and anchor-to-box matching of the stage-1 detector.

Box coordinates inside the model are the project's voxel box format
(:mod:`lidc_det.boxes`): ``(z0, y0, x0, z1, y1, x1)`` with exclusive ends, in
voxels of the network input (patch or window). Voxel ``k`` spans ``[k, k + 1)``
in these coordinates. IoU, centre distances and the box code do not depend on
the half-voxel convention, and MONAI's "StandardMode" (``xyzxyz``, spatial axes
in array order) has the same layout, so MONAI's box functions apply directly.

**Anchors.** Cubic in mm. FPN level ``l`` has stride ``s_l`` (4, 8, 16) and the edge
lengths ``anchor_sizes_mm[l]`` (default 4, 6 | 9, 13 | 19, 28 mm; a geometric series of
ratio ~1.47 covering nodules of 3-30 mm), which are ``anchor_sizes_mm / spacing_mm``
voxels on each axis of the training grid (``DetectorConfig.anchor_sizes_vox``; equal to
the mm values at 1 mm spacing). The
anchor of feature voxel ``(i, j, k)`` is centred on the input block it summarises:
centre ``(i + 1/2) * s_l`` (box coordinates) on each axis. Anchors are ordered
level by level, then position (z, y, x, C order), then anchor size, matching the
flattened head outputs (:func:`flatten_head_outputs`).

**Box code** (as in Faster R-CNN / RetinaNet, weights 1): for an anchor with
centre ``c_a`` and size ``w_a`` and a box with ``c``, ``w`` (per axis)::

    d_c = (c - c_a) / w_a,    d_w = log(w / w_a)

**Matcher** (ATSS, Zhang et al. 2020, via MONAI's ``ATSSMatcher`` with
``center_in_gt=False``, as in MONAI's LUNA16 detector): for each ground-truth
box take the ``atss_candidates * anchors_per_location`` anchors with the closest
centres on every level, compute their IoU with the box, and make positive those
whose IoU >= mean + std of these candidates' IoUs. An anchor claimed by two
boxes goes to the one with the higher IoU. All other anchors are negatives (no
ignore band). ``center_in_gt=False`` matters for 3-5 mm nodules, whose boxes
may contain no anchor centre at stride 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BOX_CODE_CLIP = math.log(1000.0 / 16.0)
"""Upper clamp of the log-size deltas before ``exp`` (as torchvision / MONAI)."""


def level_anchors(
    feature_shape: Sequence[int],
    stride: int,
    sizes: Sequence[float] | Sequence[Sequence[float]],
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Anchors of one FPN level, ``(d * h * w * A, 6)`` float32 boxes (see module docstring).

    ``sizes``: ``A`` edge lengths in voxels (cubic anchors) or ``A`` ``(z, y, x)`` voxel sizes."""
    d, h, w = (int(v) for v in feature_shape)
    axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) * stride for n in (d, h, w)]
    cz, cy, cx = torch.meshgrid(*axes, indexing="ij")
    centres = torch.stack([cz, cy, cx], dim=-1).reshape(-1, 1, 3)  # (P, 1, 3)
    half = torch.as_tensor(sizes, dtype=torch.float32, device=device)
    half = half.reshape(1, half.shape[0], -1) / 2.0  # (1, A, 1) or (1, A, 3)
    boxes = torch.cat([centres - half, centres + half], dim=-1)  # (P, A, 6)
    return boxes.reshape(-1, 6)


def anchors_for_shapes(
    feature_shapes: Sequence[Sequence[int]],
    strides: Sequence[int],
    anchor_sizes: Sequence[Sequence[float]] | Sequence[Sequence[Sequence[float]]],
    *,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[int]]:
    """All anchors for an input whose FPN levels have ``feature_shapes``.

    Returns:
        anchors ``(M, 6)`` and the number of *positions* per level (``M = sum(n) * A``).
    """
    parts = [level_anchors(s, st, a, device=device) for s, st, a in zip(feature_shapes, strides, anchor_sizes)]
    positions = [int(math.prod(s)) for s in feature_shapes]
    return torch.cat(parts, dim=0), positions


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Box code ``(N, 6)`` = ``(d_cz, d_cy, d_cx, d_wz, d_wy, d_wx)`` of ``boxes`` w.r.t. ``anchors`` (both ``(N, 6)``)."""
    a_ctr = (anchors[:, :3] + anchors[:, 3:]) / 2
    a_size = anchors[:, 3:] - anchors[:, :3]
    b_ctr = (boxes[:, :3] + boxes[:, 3:]) / 2
    b_size = (boxes[:, 3:] - boxes[:, :3]).clamp(min=1e-3)
    return torch.cat([(b_ctr - a_ctr) / a_size, torch.log(b_size / a_size)], dim=1)


def decode_boxes(codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes`: boxes ``(N, 6)`` from codes and anchors (both ``(N, 6)``)."""
    codes = codes.float()
    anchors = anchors.float()
    a_ctr = (anchors[:, :3] + anchors[:, 3:]) / 2
    a_size = anchors[:, 3:] - anchors[:, :3]
    ctr = a_ctr + codes[:, :3] * a_size
    size = a_size * torch.exp(codes[:, 3:].clamp(max=BOX_CODE_CLIP))
    return torch.cat([ctr - size / 2, ctr + size / 2], dim=1)


def flatten_head_outputs(outputs: Sequence[torch.Tensor], n_values: int) -> torch.Tensor:
    """Per-level head maps ``[B, A * n_values, d, h, w]`` -> ``[B, M, n_values]`` in anchor order."""
    flat = []
    for o in outputs:
        b, c, d, h, w = o.shape
        a = c // n_values
        flat.append(o.view(b, a, n_values, d, h, w).permute(0, 3, 4, 5, 1, 2).reshape(b, d * h * w * a, n_values))
    return torch.cat(flat, dim=1)


class AnchorMatcher:
    """ATSS matching of ground-truth boxes to anchors (see the module docstring).

    ``match(boxes, anchors, positions_per_level)`` returns ``(M,)`` int64: the index
    of the matched box for each anchor, or -1 for background.
    """

    def __init__(self, num_candidates: int, anchors_per_location: int) -> None:
        from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher

        self.anchors_per_location = int(anchors_per_location)
        self._atss = ATSSMatcher(num_candidates=int(num_candidates), center_in_gt=False)

    def match(self, boxes: torch.Tensor, anchors: torch.Tensor, positions_per_level: Sequence[int]) -> torch.Tensor:
        if boxes.numel() == 0:
            return torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
        _, matches = self._atss(boxes.float(), anchors, list(positions_per_level), self.anchors_per_location)
        matches = matches.long()
        matches[matches < 0] = -1
        return matches
