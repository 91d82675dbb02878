"""Stage-1 detector core: anchors, box code, matcher, network shapes, BN folding, loss."""

from __future__ import annotations

import numpy as np
import pytest

import torch

from stage1_detect.anchors import (  # noqa: E402
    AnchorMatcher,
    anchors_for_shapes,
    decode_boxes,
    encode_boxes,
    flatten_head_outputs,
    level_anchors,
)
from stage1_detect.config import LEVEL_STRIDES, DetectorConfig  # noqa: E402
from stage1_detect.model import DetectionLoss, Retina3D  # noqa: E402

TINY = DetectorConfig(channels=(8, 16, 32, 32), fpn_channels=16, patch_size=(32, 32, 32))


def test_level_anchors_centres_sizes_and_order() -> None:
    a = level_anchors((2, 3, 4), stride=4, sizes=(4.0, 6.0))
    assert a.shape == (2 * 3 * 4 * 2, 6)
    # position (z=1, y=2, x=3), second size: C order over positions, then sizes
    idx = ((1 * 3 + 2) * 4 + 3) * 2 + 1
    ctr = (a[idx, :3] + a[idx, 3:]) / 2
    assert torch.allclose(ctr, torch.tensor([1.5 * 4, 2.5 * 4, 3.5 * 4]))
    assert torch.allclose(a[idx, 3:] - a[idx, :3], torch.full((3,), 6.0))
    assert torch.allclose(a[0], torch.tensor([0.0, 0.0, 0.0, 4.0, 4.0, 4.0]))


def test_box_code_round_trip_and_identity() -> None:
    g = torch.Generator().manual_seed(0)
    anchors = level_anchors((3, 3, 3), 8, (9.0, 13.0))
    ctr = torch.rand(anchors.shape[0], 3, generator=g) * 30
    size = 2 + torch.rand(anchors.shape[0], 3, generator=g) * 30
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], 1)
    codes = encode_boxes(boxes, anchors)
    assert torch.allclose(decode_boxes(codes, anchors), boxes, atol=1e-4)
    assert torch.allclose(encode_boxes(anchors, anchors), torch.zeros_like(anchors), atol=1e-6)
    # one hand-computed code: anchor centre 4, size 4; box centre 6, size 8 on every axis
    c = encode_boxes(torch.tensor([[2.0, 2, 2, 10, 10, 10]]), torch.tensor([[2.0, 2, 2, 6, 6, 6]]))
    expected = torch.tensor([[0.5, 0.5, 0.5, np.log(2.0), np.log(2.0), np.log(2.0)]], dtype=torch.float32)
    assert torch.allclose(c, expected, atol=1e-6)


def test_flatten_head_outputs_matches_anchor_order() -> None:
    # a head map whose value is the anchor's own index must flatten to 0..M-1
    shapes = [(4, 4, 4), (2, 2, 2), (1, 1, 1)]
    a = 2
    maps, start = [], 0
    for s in shapes:
        n = int(np.prod(s)) * a
        idx = torch.arange(start, start + n, dtype=torch.float32).reshape(*s, a).permute(3, 0, 1, 2)
        maps.append(idx[None])
        start += n
    flat = flatten_head_outputs(maps, 1)
    assert torch.equal(flat[0, :, 0], torch.arange(start, dtype=torch.float32))


@pytest.mark.parametrize("size", [3.0, 5.0, 10.0, 25.0])
def test_matcher_gives_every_nodule_size_positive_anchors_near_it(size: float) -> None:
    cfg = DetectorConfig()
    shapes = [[64 // s] * 3 for s in LEVEL_STRIDES]
    anchors, positions = anchors_for_shapes(shapes, LEVEL_STRIDES, cfg.anchor_sizes_mm)
    centre = torch.tensor([30.3, 33.0, 29.6])
    box = torch.cat([centre - size / 2, centre + size / 2])[None]
    matcher = AnchorMatcher(cfg.atss_candidates, cfg.anchors_per_location)
    matches = matcher.match(box, anchors, positions)
    pos = torch.nonzero(matches == 0).flatten()
    assert 1 <= pos.numel() <= 40
    assert set(matches.unique().tolist()) <= {-1, 0}
    ctrs = (anchors[pos, :3] + anchors[pos, 3:]) / 2
    assert float((ctrs - centre).norm(dim=1).max()) <= max(size, 8.0)
    # the positives' sizes are those closest to the nodule size (within a factor 2.5)
    sizes = (anchors[pos, 3] - anchors[pos, 0]).numpy()
    assert np.all(sizes / size < 2.5 + 1.5 * (size < 4)) and np.all(size / sizes < 2.5)
    # no box -> all background
    assert torch.all(matcher.match(torch.zeros(0, 6), anchors, positions) == -1)


def test_network_output_shapes_and_anchor_count() -> None:
    net = Retina3D(TINY, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 1, 32, 48, 64)
    with torch.no_grad():
        cls, box = net(x)
    assert [tuple(c.shape) for c in cls] == [(2, 2, 8, 12, 16), (2, 2, 4, 6, 8), (2, 2, 2, 3, 4)]
    assert [tuple(b.shape) for b in box] == [(2, 12, 8, 12, 16), (2, 12, 4, 6, 8), (2, 12, 2, 3, 4)]
    anchors, positions = net.anchors((32, 48, 64))
    assert anchors.shape[0] == flatten_head_outputs(cls, 1).shape[1] == 2 * sum(positions)
    # initial scores sit at the focal-loss prior (0.01)
    assert abs(float(torch.sigmoid(cls[0]).mean()) - 0.01) < 0.005
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 1, 30, 32, 32))


def test_seeded_initialisation_is_reproducible() -> None:
    a = Retina3D(TINY, generator=torch.Generator().manual_seed(3)).state_dict()
    b = Retina3D(TINY, generator=torch.Generator().manual_seed(3)).state_dict()
    c = Retina3D(TINY, generator=torch.Generator().manual_seed(4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fused_batchnorm_gives_the_same_outputs() -> None:
    net = Retina3D(TINY, generator=torch.Generator().manual_seed(0))
    # make the BatchNorm statistics non-trivial
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 1, 32, 32, 32) * 2 + 0.5)
    net.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = net(x)
        fused = net.fuse_for_inference()
        out = fused(x)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
    for r, o in zip(ref[0] + ref[1], out[0] + out[1]):
        assert torch.allclose(r, o, atol=1e-4, rtol=1e-4)


def test_group_norm_is_batch_independent_and_survives_fusion() -> None:
    import dataclasses

    net = Retina3D(dataclasses.replace(TINY, norm="group", head_norm="group"), generator=torch.Generator().manual_seed(0))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        net.train()
        train_pair = net(x)[0][0]
        train_one = net(x[:1])[0][0]
        net.eval()
        ref = net(x[:1])
        out = net.fuse_for_inference()(x[:1])
    # no batch statistics: a sample's output does not depend on the rest of the batch, nor on train/eval mode
    assert torch.allclose(train_pair[:1], train_one, atol=1e-5)
    assert torch.allclose(train_one, ref[0][0], atol=1e-5)
    for r, o in zip(ref[0] + ref[1], out[0] + out[1]):
        assert torch.equal(r, o)
    with pytest.raises(ValueError, match="norm"):
        DetectorConfig(norm="layer")
    with pytest.raises(ValueError, match="head_norm"):
        DetectorConfig(head_norm="layer")


def test_loss_is_finite_with_and_without_targets_and_both_box_losses() -> None:
    for box_loss in ("giou", "smooth_l1"):
        cfg = TINY.replace(box_loss=box_loss)
        net = Retina3D(cfg, generator=torch.Generator().manual_seed(0))
        crit = DetectionLoss(cfg)
        x = torch.randn(2, 1, 32, 32, 32)
        cls, box = net(x)
        targets = [torch.tensor([[10.0, 10, 10, 18, 18, 18]]), torch.zeros(0, 6)]
        parts = crit(net, cls, box, targets, x.shape[2:])
        assert parts.num_positive > 0
        assert torch.isfinite(parts.total) and float(parts.box) > 0
        parts.total.backward()
        assert net.box_out.weight.grad is not None and float(net.box_out.weight.grad.abs().sum()) > 0
        empty = crit(net, *net(x), [torch.zeros(0, 6), torch.zeros(0, 6)], x.shape[2:])
        assert empty.num_positive == 0 and float(empty.box) == 0.0 and torch.isfinite(empty.total)


def test_loss_decreases_on_a_tiny_sphere_set() -> None:
    """A few dozen optimiser steps on fixed sphere patches must cut the loss clearly."""
    from stage1_detect.data import PatchDataset, collate_patches
    from stage1_detect.toydata import random_sphere_cases

    cfg = TINY.replace(pos_fraction=1.0, aug_flip=False, aug_rot90=False, intensity_scale=0.0, intensity_shift=0.0)
    cases = random_sphere_cases(2, shape_zyx=(48, 48, 48), spheres_per_case=1, diameter_range=(6.0, 10.0), seed=2)
    ds = PatchDataset(cases, cfg, seed=0, length=4)
    images, targets = collate_patches([ds[i] for i in range(4)])
    torch.manual_seed(0)  # BatchNorm has no randomness; this only pins any library default
    net = Retina3D(cfg, generator=torch.Generator().manual_seed(0)).train()
    crit = DetectionLoss(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        parts = crit(net, *net(images), targets, images.shape[2:])
        opt.zero_grad()
        parts.total.backward()
        opt.step()
        losses.append(float(parts.total.detach()))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
