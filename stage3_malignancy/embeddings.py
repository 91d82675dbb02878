"""CNN embeddings of nodule crops: pooled features of any 3D ``torch.nn.Module``.

Two ways to get them:

* :func:`pooled_embeddings` runs any 3D CNN (e.g. a detector backbone, loaded
  by the caller) on nodule cubes and global-average-pools its output, or the
  output of a named submodule (forward hook): ``(N, C)`` features.
* :class:`SmallCNN3D` + :func:`train_small_cnn`: a small 3D CNN trained on the
  crops themselves (binary cross-entropy on the malignancy label); its pooled
  last block is the embedding.

Input cubes (:func:`nodule_cube`): the sample resampled to ``voxel_mm``
isotropic (linear for the image, nearest for the mask) on a ``cube_voxels^3``
grid centred on the mask centroid (outside the crop: air, -1000 HU / no mask);
channel 0 is HU clipped to ``hu_window`` and scaled to [0, 1], channel 1 the
mask. Batches run on the given device (CUDA when present with
``device="auto"``), with autocast on CUDA only. This module imports torch;
:mod:`stage3_malignancy.model` imports it only when embeddings are used.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn  # this module is the torch part of stage 3; model.py imports it lazily

from lidc_det.torch_state import seeded_torch_rng, torch_threads
from stage3_malignancy.config import EmbeddingConfig
from stage3_malignancy.samples import MalignancySample

__all__ = [
    "EmbeddingConfig",
    "SmallCNN3D",
    "nodule_cube",
    "nodule_cubes",
    "pooled_embeddings",
    "resolve_device",
    "train_small_cnn",
]


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; other values unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def nodule_cube(sample: MalignancySample, cfg: EmbeddingConfig = EmbeddingConfig()) -> np.ndarray:
    """float32 ``(2, S, S, S)`` cube of one nodule (``S = cfg.cube_voxels``): HU in [0, 1] and mask.

    Centred on the mask centroid; world size ``S * voxel_mm`` mm on each axis.
    """
    from scipy.ndimage import map_coordinates

    s = cfg.cube_voxels
    spacing = np.asarray(sample.spacing_zyx_mm, dtype=np.float64)
    centre = np.argwhere(sample.mask).mean(axis=0)  # crop voxel (z, y, x)
    offs = (np.arange(s, dtype=np.float64) - (s - 1) / 2.0) * cfg.voxel_mm  # mm from the centre
    axes = [centre[a] + offs / spacing[a] for a in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0).reshape(3, -1)
    img = map_coordinates(sample.image_hu, grid, order=1, mode="constant", cval=-1000.0).reshape(s, s, s)
    msk = map_coordinates(sample.mask.astype(np.float32), grid, order=0, mode="constant", cval=0.0).reshape(s, s, s)
    lo, hi = cfg.hu_window
    img = (np.clip(img, lo, hi) - lo) / (hi - lo)
    return np.stack([img, msk], axis=0).astype(np.float32)


def nodule_cubes(samples: Sequence[MalignancySample], cfg: EmbeddingConfig = EmbeddingConfig()) -> np.ndarray:
    """``(N, 2, S, S, S)`` cubes of many samples."""
    s = cfg.cube_voxels
    if not samples:
        return np.zeros((0, 2, s, s, s), dtype=np.float32)
    return np.stack([nodule_cube(x, cfg) for x in samples], axis=0)


class SmallCNN3D(nn.Module):
    """Four conv blocks (Conv3d 3^3 - GroupNorm - ReLU - MaxPool 2), global average pool, linear head.

    Input ``(B, in_channels, S, S, S)``; :meth:`embed` gives ``(B, 4 * width)``;
    :meth:`forward` gives the malignancy logit ``(B,)``.
    """

    def __init__(self, in_channels: int = 2, width: int = 8) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for a, b in zip(chans[:-1], chans[1:]):
            blocks += [
                nn.Conv3d(a, b, 3, padding=1, bias=False),
                nn.GroupNorm(min(4, b), b),
                nn.ReLU(inplace=True),
                nn.MaxPool3d(2),
            ]
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(chans[-1], 1)
        self.in_channels = in_channels
        self.width = width

    def embed(self, x: Any) -> Any:
        """``(B, 4 * width)`` pooled features."""
        return self.features(x).mean(dim=(2, 3, 4))

    def forward(self, x: Any) -> Any:
        return self.head(self.dropout(self.embed(x))).squeeze(1)


def _augment(x: Any, gen: Any) -> Any:
    """Random flips on z, y, x and a random 90-degree in-plane rotation, per batch (torch)."""
    import torch

    for dim in (2, 3, 4):
        if torch.rand((), generator=gen).item() < 0.5:
            x = torch.flip(x, dims=(dim,))
    k = int(torch.randint(0, 4, (), generator=gen).item())
    return torch.rot90(x, k, dims=(3, 4)) if k else x


def train_small_cnn(
    cubes: np.ndarray,
    labels: np.ndarray,
    cfg: EmbeddingConfig = EmbeddingConfig(),
    *,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SmallCNN3D, dict[str, Any]]:
    """Train :class:`SmallCNN3D` on cubes with binary cross-entropy (positive class re-weighted).

    Args:
        cubes: ``(N, 2, S, S, S)`` from :func:`nodule_cubes`.
        labels: ``(N,)`` in {0, 1}.
        cfg: settings (epochs, batch size, learning rate, device).
        seed: seeds the weights, the batch order and the augmentation (``torch.Generator``).
        progress: tqdm bar over epochs.

    Returns:
        ``(model in eval mode on the CPU, info)`` with info = epochs, final loss, seconds, device.
    """
    import torch
    from tqdm import tqdm

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    y = np.asarray(labels, dtype=np.float32)
    # weights and dropout draw from torch's global generator: seeded inside seeded_torch_rng, so the
    # caller's global RNG state is restored afterwards (batch order and augmentation use ``gen``)
    with torch_threads(cfg.torch_threads), seeded_torch_rng(seed, device):
        model = SmallCNN3D(in_channels=cubes.shape[1], width=cfg.width).to(device)
        gen = torch.Generator().manual_seed(seed)
        pos = float(y.sum())
        pos_weight = torch.tensor([(len(y) - pos) / pos if 0 < pos < len(y) else 1.0], device=device)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = max(1, int(np.ceil(len(y) / cfg.batch_size)))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch))
        X = torch.from_numpy(np.ascontiguousarray(cubes))
        Y = torch.from_numpy(y)
        last = float("nan")
        model.train()
        for _ in tqdm(range(cfg.epochs), desc="train SmallCNN3D", unit="epoch", disable=not progress, leave=False):
            order = torch.randperm(len(y), generator=gen)
            total = 0.0
            for b in range(steps_per_epoch):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                if len(idx) == 0:
                    continue
                xb = X[idx]
                if cfg.augment:
                    xb = _augment(xb, gen)
                xb, yb = xb.to(device), Y[idx].to(device)
                with torch.autocast("cuda", enabled=device.startswith("cuda")):
                    logits = model(xb)
                loss = loss_fn(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.item()) * len(idx)
            last = total / max(1, len(y))
        model.eval()
        model.to("cpu")
        return model, {"epochs": cfg.epochs, "final_train_loss": last, "seconds": time.perf_counter() - t0,
                       "device": device, "n": int(len(y))}


def _pool(out: Any) -> Any:
    """Global-average-pool a module output to ``(B, C)``: 5D/4D/3D tensors are pooled over the
    trailing axes, 2D kept; lists / tuples / dicts of them are pooled and concatenated."""
    import torch

    if isinstance(out, dict):
        return torch.cat([_pool(v) for _, v in sorted(out.items())], dim=1)
    if isinstance(out, (list, tuple)):
        return torch.cat([_pool(v) for v in out], dim=1)
    if not torch.is_tensor(out):
        raise TypeError(f"pooled_embeddings: cannot pool a {type(out).__name__}")
    if out.ndim == 2:
        return out
    if out.ndim >= 3:
        return out.flatten(2).mean(dim=2)
    raise TypeError(f"pooled_embeddings: output of shape {tuple(out.shape)} has no batch and channel axes")


def pooled_embeddings(
    module: Any,
    cubes: np.ndarray,
    *,
    device: str = "auto",
    batch_size: int = 32,
    layer: str | None = None,
    channels: Sequence[int] | None = None,
) -> np.ndarray:
    """Global-average-pooled features of any 3D ``torch.nn.Module`` on nodule cubes.

    Args:
        module: the network; used in eval mode under ``torch.no_grad``. A module
            with an ``embed`` method (e.g. :class:`SmallCNN3D`) is called through it.
        cubes: ``(N, C, S, S, S)`` float32 (see :func:`nodule_cubes`).
        device: where to run (``"auto"``: CUDA when present); the module is moved there
            and back to its original device afterwards.
        batch_size: cubes per forward pass.
        layer: name of a submodule (``dict(module.named_modules())``) whose output
            to pool instead of the module's output (forward hook).
        channels: input channels to keep (e.g. ``[0]`` for an image-only backbone).

    Returns:
        ``(N, F)`` float32 embeddings.
    """
    import torch

    dev = resolve_device(device)
    try:
        orig = next(module.parameters()).device
    except StopIteration:
        orig = torch.device("cpu")
    was_training = module.training
    module.eval().to(dev)
    grabbed: list[Any] = []
    hook = None
    if layer is not None:
        sub = dict(module.named_modules()).get(layer)
        if sub is None:
            raise KeyError(f"pooled_embeddings: module has no submodule {layer!r}")
        hook = sub.register_forward_hook(lambda _m, _i, o: grabbed.append(o))
    outs = []
    try:
        with torch.no_grad():
            for b in range(0, len(cubes), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(cubes[b:b + batch_size]))
                if channels is not None:
                    xb = xb[:, list(channels)]
                xb = xb.to(dev)
                grabbed.clear()
                with torch.autocast("cuda", enabled=dev.startswith("cuda")):
                    if layer is None and hasattr(module, "embed"):
                        out = module.embed(xb)
                    else:
                        out = module(xb)
                        if layer is not None:
                            out = grabbed[-1]
                outs.append(_pool(out).float().cpu().numpy())
    finally:
        if hook is not None:
            hook.remove()
        module.to(orig)
        module.train(was_training)
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outs, axis=0).astype(np.float32)
