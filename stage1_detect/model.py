"""The stage-1 network: a small 3D ResNet + FPN with RetinaNet heads, and its loss.

Architecture (shapes for an input ``[B, 1, D, H, W]`` with D, H, W multiples of 16)::

    stem    conv3x3x3 stride 2, c0            -> [B, c0, D/2,  H/2,  W/2 ]
    stage1  residual blocks, first stride 2  -> [B, c1, D/4,  H/4,  W/4 ]  C2
    stage2  residual blocks, first stride 2  -> [B, c2, D/8,  H/8,  W/8 ]  C3
    stage3  residual blocks, first stride 2  -> [B, c3, D/16, H/16, W/16]  C4
    FPN     1x1 laterals + nearest top-down + 3x3 smoothing -> P2, P3, P4 (F channels)
    heads   shared over levels: cls tower -> [B, A, d, h, w] logits,
                                box tower -> [B, A * 6, d, h, w] box codes

Residual blocks are the basic ResNet block (two 3x3x3 convs, BatchNorm, ReLU,
1x1 projection shortcut when the shape changes). BatchNorm (not GroupNorm) is
deliberate: in eval mode it is a fixed affine map, so predictions do not depend
on the window size or tiling used at inference, and it can be folded into the
convolutions (:meth:`Retina3D.fuse_for_inference`).

The head towers are conv-BatchNorm-ReLU by default (``head_norm``; one BatchNorm per tower
layer, shared over the levels like the convolutions). The plain RetinaNet tower (conv with
bias, ReLU, weights N(0, 0.01); ``head_norm: none``) died under AdamW in our runs: in the
final checkpoints 0-5 % of its ReLUs were active (box tower 0-0.5 %), nearly every anchor got
the same score and the box loss stayed at its initial value. GroupNorm in the heads
(``head_norm: group``) trains too, but its statistics are taken over the whole input, so
its predictions depend on the inference window.

The loss (:class:`DetectionLoss`) is the RetinaNet loss: sigmoid focal loss
over all anchors, normalised by the number of positive anchors, plus a box loss
on positive anchors (GIoU on decoded boxes, or smooth-L1 on box codes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stage1_detect.anchors import AnchorMatcher, anchors_for_shapes, decode_boxes, encode_boxes, flatten_head_outputs
from stage1_detect.config import LEVEL_STRIDES, DetectorConfig

PRIOR_PROBABILITY = 0.01
"""Initial foreground probability of every anchor (RetinaNet's classification bias prior)."""


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalisation after each backbone convolution: ``"batch"`` (BatchNorm3d: running
    statistics at inference, folded into the convolution there) or ``"group"`` (GroupNorm with
    groups of 4 channels: the same statistics in training and at inference, whatever the batch size)."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 4), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class ResBlock(nn.Module):
    """Basic 3D ResNet block: conv-norm-ReLU-conv-norm + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride, bias=False), norm_layer(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


def _tower(channels: int, n_convs: int, norm: str) -> nn.Sequential:
    """A head tower: ``n_convs`` times 3x3x3 conv, then ``norm`` (:func:`norm_layer`; ``"none"``:
    a conv with bias and nothing else), then ReLU."""
    layers: list[nn.Module] = []
    for _ in range(n_convs):
        if norm == "none":
            layers += [nn.Conv3d(channels, channels, 3, 1, 1), nn.ReLU(inplace=True)]
        else:
            layers += [nn.Conv3d(channels, channels, 3, 1, 1, bias=False), norm_layer(norm, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Retina3D(nn.Module):
    """3D RetinaNet-style network (see the module docstring). ``forward`` returns
    ``(cls_logits, box_codes)``: two lists over the FPN levels (strides 4, 8, 16) of
    ``[B, A, d, h, w]`` and ``[B, A * 6, d, h, w]`` tensors."""

    def __init__(self, config: DetectorConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        c0, c1, c2, c3 = config.channels
        f = config.fpn_channels
        a = config.anchors_per_location
        self.strides = LEVEL_STRIDES
        self.anchor_sizes = config.anchor_sizes_vox  # per level, per anchor, (z, y, x) voxels
        self.num_anchors = a
        norm = config.norm
        self.stem = nn.Sequential(nn.Conv3d(1, c0, 3, 2, 1, bias=False), norm_layer(norm, c0), nn.ReLU(inplace=True))

        def stage(c_in: int, c_out: int, n: int) -> nn.Sequential:
            return nn.Sequential(ResBlock(c_in, c_out, 2, norm), *[ResBlock(c_out, c_out, 1, norm) for _ in range(n - 1)])

        self.stage1 = stage(c0, c1, config.blocks[0])
        self.stage2 = stage(c1, c2, config.blocks[1])
        self.stage3 = stage(c2, c3, config.blocks[2])
        self.lateral = nn.ModuleList([nn.Conv3d(c, f, 1) for c in (c1, c2, c3)])
        self.smooth = nn.ModuleList([nn.Conv3d(f, f, 3, 1, 1) for _ in range(3)])
        self.cls_tower = _tower(f, config.head_convs, config.head_norm)
        self.box_tower = _tower(f, config.head_convs, config.head_norm)
        self.cls_out = nn.Conv3d(f, a, 3, 1, 1)
        self.box_out = nn.Conv3d(f, a * 6, 3, 1, 1)
        self._init_weights(generator)

    def _init_weights(self, generator: torch.Generator | None) -> None:
        """Kaiming-normal convs, zero biases; heads N(0, 0.01) with the focal-loss prior bias.
        Every parameter is (re)drawn from ``generator``, so a seed fixes the initial model."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in [*self.cls_tower, *self.box_tower, self.cls_out, self.box_out]:
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, std=0.01, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if x.ndim != 5 or x.shape[1] != 1 or any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"Retina3D expects [B, 1, D, H, W] with D, H, W multiples of 16, got {tuple(x.shape)}")
        c2 = self.stage1(self.stem(x))
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        p4 = self.lateral[2](c4)
        p3 = self.lateral[1](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        p2 = self.lateral[0](c2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        cls, box = [], []
        for p, smooth in zip((p2, p3, p4), self.smooth):
            p = smooth(p)
            cls.append(self.cls_out(self.cls_tower(p)))
            box.append(self.box_out(self.box_tower(p)))
        return cls, box

    def anchors(self, input_shape: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[int]]:
        """Anchors ``(M, 6)`` for an input of spatial shape ``(D, H, W)``, and positions per level."""
        shapes = [[int(s) // st for s in input_shape] for st in self.strides]
        return anchors_for_shapes(shapes, self.strides, self.anchor_sizes, device=device)

    @torch.no_grad()
    def fuse_for_inference(self) -> Retina3D:
        """Fold every eval-mode BatchNorm into the convolution before it (in place; eval only;
        GroupNorm layers stay as they are)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        if self.training:
            raise RuntimeError("fuse_for_inference() needs eval mode")

        def fuse_seq(seq: nn.Sequential) -> None:
            mods = list(seq)
            for i in range(len(mods) - 1):
                if isinstance(mods[i], nn.Conv3d) and isinstance(mods[i + 1], nn.BatchNorm3d):
                    seq[i] = fuse_conv_bn_eval(mods[i], mods[i + 1])
                    seq[i + 1] = nn.Identity()

        fuse_seq(self.stem)
        fuse_seq(self.cls_tower)
        fuse_seq(self.box_tower)
        for block in self.modules():
            if isinstance(block, ResBlock) and isinstance(block.bn1, nn.BatchNorm3d):
                block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
                block.bn1 = nn.Identity()  # type: ignore[assignment]
                block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
                block.bn2 = nn.Identity()  # type: ignore[assignment]
                if isinstance(block.shortcut, nn.Sequential):
                    fuse_seq(block.shortcut)
        return self


@dataclass(frozen=True)
class LossParts:
    """Loss of one batch: ``total = cls + box_weight * box`` (scalar tensors) and counts."""

    total: torch.Tensor
    cls: torch.Tensor
    box: torch.Tensor
    num_positive: int


class DetectionLoss:
    """RetinaNet loss with ATSS matching (see :mod:`stage1_detect.anchors`).

    ``loss(cls_logits, box_codes, targets, input_shape)`` where ``targets`` is a
    list (one per batch item) of ``(N_i, 6)`` float boxes in input voxel
    coordinates (possibly empty).
    """

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.matcher = AnchorMatcher(config.atss_candidates, config.anchors_per_location)

    def __call__(
        self,
        model: Retina3D,
        cls_logits: Sequence[torch.Tensor],
        box_codes: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        input_shape: Sequence[int],
    ) -> LossParts:
        from torchvision.ops import sigmoid_focal_loss

        cfg = self.config
        device = cls_logits[0].device
        anchors, positions = model.anchors(input_shape, device=device)
        logits = flatten_head_outputs(cls_logits, 1)[..., 0].float()  # [B, M]
        codes = flatten_head_outputs(box_codes, 6).float()  # [B, M, 6]
        cls_target = torch.zeros_like(logits)
        pos_codes, pos_anchors, pos_boxes = [], [], []
        for b, boxes in enumerate(targets):
            boxes = boxes.to(device=device, dtype=torch.float32).reshape(-1, 6)
            matches = self.matcher.match(boxes, anchors, positions)
            pos = matches >= 0
            cls_target[b, pos] = 1.0
            if pos.any():
                pos_codes.append(codes[b, pos])
                pos_anchors.append(anchors[pos])
                pos_boxes.append(boxes[matches[pos]])
        n_pos = int(cls_target.sum().item())
        norm = max(1.0, float(n_pos))
        cls_loss = sigmoid_focal_loss(
            logits, cls_target, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="sum"
        ) / norm
        if pos_codes:
            p_codes = torch.cat(pos_codes)
            p_anchors = torch.cat(pos_anchors)
            p_boxes = torch.cat(pos_boxes)
            if cfg.box_loss == "giou":
                from monai.data.box_utils import box_pair_giou

                pred = decode_boxes(p_codes, p_anchors)
                box_loss = (1.0 - box_pair_giou(pred, p_boxes)).sum() / norm
            else:
                target_codes = encode_boxes(p_boxes, p_anchors)
                box_loss = F.smooth_l1_loss(p_codes, target_codes, beta=1.0 / 9.0, reduction="sum") / norm
        else:
            box_loss = codes.sum() * 0.0
        total = cls_loss + cfg.box_loss_weight * box_loss
        return LossParts(total=total, cls=cls_loss.detach(), box=box_loss.detach(), num_positive=n_pos)
