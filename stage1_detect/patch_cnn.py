"""A patch CNN that rescores a detector's candidates (false-positive reduction, LUNA16's second track).

Each candidate is seen as cubes centred on it and resampled from the scan: ``patch_vox``^3 voxels at each of
``spacings_mm`` (default 24^3 at 1 mm, the nodule, and 24^3 at 2 mm, its 48 mm context), HU windowed to
``window_hu`` and scaled to [0, 1], one channel per spacing. A small 3D CNN (``channels``: conv-BN-ReLU-maxpool
stages, global average pooling, one linear unit) gives each candidate a probability. Trained on the candidates of
the training scans (:func:`training_patches`): every candidate that hits a nodule, jittered copies of each nodule's
centre, the detector's highest-scored false positives and some random ones; random flips and in-plane transposes.

:meth:`PatchRescorer.rescore` multiplies a detection's score by the CNN's probability (so the CNN reorders the
detector's top candidates and cannot bring back one the detector dropped). Saved as a weights-only torch file
(read back by :func:`lidc_det.checkpoint.load_checkpoint`).

Usage::

    rescorer = PatchRescorer(PatchCNNConfig())
    rescorer.fit(patches, labels)          # (N, C, P, P, P) float16 in [0, 1], (N,) 0/1
    dets = rescorer.rescore(dets, hu, geometry)
    rescorer.save("patch_cnn.pt"); PatchRescorer.load("patch_cnn.pt")
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import LidcDetError
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections

__all__ = ["PatchCNNConfig", "PatchCNNError", "PatchRescorer", "extract_patches", "training_patches"]

FORMAT = "stage1_detect.patch_cnn/1"


class PatchCNNError(LidcDetError):
    """The patch CNN cannot train or score: no positive patches, not trained, bad input."""


@dataclass(frozen=True)
class PatchCNNConfig:
    """Patches, network, training and training-patch choice of :class:`PatchRescorer`.

    Attributes:
        patch_vox: voxels along each side of a cube.
        spacings_mm: one cube (channel) per spacing (mm), all centred on the candidate.
        window_hu: HU mapped to 0 and 1 (clipped outside).
        channels: output channels of each conv stage (each stage halves the cube).
        epochs, batch_size, learning_rate, weight_decay: AdamW training, cosine schedule.
        hard_negatives: per training scan, the false positives with the detector's highest scores.
        random_negatives: per training scan, further false positives drawn at random.
        negative_pool: how many of the detector's best candidates per training scan (after suppression) the
            negatives are drawn from (:func:`stage1_detect.blob_cnn.train_cnn`); 0: the detector's own
            ``max_detections``, the candidates it scores. A larger pool shows the CNN the candidates the detector
            ranks low, which it must also reject when it rescores more of them.
        centre_copies: per training nodule, patches at its centre moved by up to ``jitter_mm`` on each axis.
        twin_weight: the loss weight the benchmark gives patches of training scans that are not semi-real (the
            plain twins; semi-real scans, twins with inserted nodules among them, keep 1, as blob-lgbm's
            ``lgbm_twin_weight``); used through ``weights`` of :meth:`PatchRescorer.fit`.
        seed: weights, sampling and augmentation.
        threads: torch's CPU threads.
    """

    patch_vox: int = 24
    spacings_mm: tuple[float, ...] = (1.0, 2.0)
    window_hu: tuple[float, float] = (-1000.0, 400.0)
    channels: tuple[int, ...] = (8, 16, 32)
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    hard_negatives: int = 30
    random_negatives: int = 20
    negative_pool: int = 0
    centre_copies: int = 2
    jitter_mm: float = 2.0
    twin_weight: float = 1.0
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.patch_vox < 2 ** len(self.channels):
            raise PatchCNNError(f"patch_vox {self.patch_vox} is too small for {len(self.channels)} pooling stages")
        if not self.spacings_mm or min(self.spacings_mm) <= 0:
            raise PatchCNNError(f"spacings_mm must be positive, got {self.spacings_mm}")
        if self.window_hu[1] <= self.window_hu[0]:
            raise PatchCNNError(f"window_hu must rise, got {self.window_hu}")
        if self.epochs < 1 or self.batch_size < 2:
            raise PatchCNNError("epochs must be >= 1 and batch_size >= 2")
        if self.negative_pool < 0:
            raise PatchCNNError(f"negative_pool must be >= 0 (0: the detector's max_detections), got {self.negative_pool}")

    def patch_key(self) -> dict[str, Any]:
        """The fields that define a patch (a cache of patches stays valid while they do not change)."""
        return {"patch_vox": self.patch_vox, "spacings_mm": list(self.spacings_mm), "window_hu": list(self.window_hu)}


def extract_patches(hu: np.ndarray, geometry: VolumeGeometry, centres_xyz_mm: np.ndarray, cfg: PatchCNNConfig,
                    *, chunk: int = 64) -> np.ndarray:
    """Cubes around world points, resampled (trilinear) from a scan.

    Args:
        hu: ``[z, y, x]`` HU of the scan on ``geometry``.
        centres_xyz_mm: ``(N, 3)`` world LPS centres (mm).

    Returns:
        ``(N, len(spacings_mm), P, P, P)`` float16 in [0, 1], axes ``[z, y, x]`` of the world (not of the array);
        outside the scan reads as -1000 HU.
    """
    from scipy.ndimage import map_coordinates

    centres = np.asarray(centres_xyz_mm, dtype=np.float64).reshape(-1, 3)
    p = cfg.patch_vox
    lo, hi = cfg.window_hu
    out = np.empty((len(centres), len(cfg.spacings_mm), p, p, p), dtype=np.float16)
    img = np.asarray(hu, dtype=np.float32)
    step = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
    for c, s in enumerate(cfg.spacings_mm):
        dz, dy, dx = np.meshgrid(step * s, step * s, step * s, indexing="ij")
        offsets_xyz = np.stack([dx.ravel(), dy.ravel(), dz.ravel()], axis=1)  # (P^3, 3) in cube [z, y, x] order
        for a in range(0, len(centres), chunk):
            pts = (centres[a:a + chunk, None, :] + offsets_xyz[None]).reshape(-1, 3)
            vox = geometry.world_to_voxel(pts).T  # (3, M) z, y, x
            vals = map_coordinates(img, vox, order=1, mode="constant", cval=-1000.0)
            vals = np.clip((vals - lo) / (hi - lo), 0.0, 1.0)
            out[a:a + chunk, c] = vals.reshape(-1, p, p, p).astype(np.float16)
    return out


def training_patches(case: Any, dets: Detections, cfg: PatchCNNConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labelled patches of one training scan (``case``: ``image_hu``, ``geometry`` and its findings).

    ``dets``: the detector's candidates of the scan (its top ones after suppression). Positives: every candidate
    that hits a target nodule, and ``centre_copies`` jittered copies of each target's centre. Negatives: the
    ``hard_negatives`` highest-scored candidates that hit nothing, and ``random_negatives`` more of the rest.
    Candidates that hit only an irrelevant finding are left out. Returns ``(patches, labels)``, labels 0/1 int8.
    """
    from stage1_detect.blob import candidate_labels
    from stage1_detect.data import case_findings

    lab, _, _ = candidate_labels(dets.centers_xyz_mm, case)
    pos = np.flatnonzero(lab == 1)
    neg = np.flatnonzero(lab == 0)
    neg = neg[np.argsort(-dets.scores[neg], kind="stable")]
    hard, rest = neg[:cfg.hard_negatives], neg[cfg.hard_negatives:]
    extra = rng.choice(rest, size=min(cfg.random_negatives, len(rest)), replace=False) if len(rest) else rest
    targets, _ = case_findings(case)
    centres = [dets.centers_xyz_mm[pos]]
    for c, _d in targets:
        jit = rng.uniform(-cfg.jitter_mm, cfg.jitter_mm, size=(cfg.centre_copies, 3))
        centres.append(np.asarray(c, dtype=np.float64)[None] + jit)
    pos_centres = np.concatenate(centres)
    neg_centres = dets.centers_xyz_mm[np.concatenate([hard, extra]).astype(int)]
    pts = np.concatenate([pos_centres, neg_centres])
    labels = np.concatenate([np.ones(len(pos_centres), np.int8), np.zeros(len(neg_centres), np.int8)])
    return extract_patches(case.image_hu, case.geometry, pts, cfg), labels


def _network(cfg: PatchCNNConfig) -> Any:
    import torch.nn as nn

    layers: list[Any] = []
    c_in = len(cfg.spacings_mm)
    for c_out in cfg.channels:
        layers += [nn.Conv3d(c_in, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True), nn.MaxPool3d(2)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, 1)]
    return nn.Sequential(*layers)


def _augment(x: Any, gen: Any) -> Any:
    """Random flips of each cube axis and a random swap of y and x, the same for a whole batch (``x``: ``(B, C, P, P, P)``)."""
    import torch

    flips = [d for d, f in zip((2, 3, 4), torch.rand(3, generator=gen).tolist()) if f < 0.5]
    if flips:
        x = torch.flip(x, dims=flips)
    if float(torch.rand(1, generator=gen)) < 0.5:
        x = x.transpose(3, 4)
    return x


class PatchRescorer:
    """The patch CNN (see the module docstring). ``state``: a trained network's ``state_dict`` (else untrained)."""

    def __init__(self, config: PatchCNNConfig | None = None, *, state: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.config = config or PatchCNNConfig()
        self.net = _network(self.config)
        self.meta: dict[str, Any] = dict(meta or {})
        self._trained = state is not None
        if state is not None:
            self.net.load_state_dict(state)
        self.net.eval()

    @property
    def trained(self) -> bool:
        return self._trained

    def fit(self, patches: np.ndarray, labels: np.ndarray, *, weights: np.ndarray | None = None,
            progress: bool = True) -> dict[str, Any]:
        """Train on ``patches`` ``(N, C, P, P, P)`` (as :func:`extract_patches` gives) and 0/1 ``labels`` ``(N,)``;
        positives weighted by negatives / positives, each patch also by ``weights`` ``(N,)`` (default 1). Returns
        (and keeps in ``meta``) the loss of each epoch, counts and seconds.

        Raises:
            PatchCNNError: shapes that do not match the config, or no positive / no negative patch.
        """
        import torch
        from tqdm.auto import tqdm

        from lidc_det.torch_state import seeded_torch_rng, torch_threads

        cfg = self.config
        want = (len(cfg.spacings_mm), cfg.patch_vox, cfg.patch_vox, cfg.patch_vox)
        if patches.ndim != 5 or patches.shape[1:] != want or len(labels) != len(patches):
            raise PatchCNNError(f"patches must be (N, {', '.join(map(str, want))}) with N labels, got {patches.shape} and {len(labels)}")
        y = np.asarray(labels, dtype=np.float32)
        w = np.ones(len(y), np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
        if w.shape != y.shape or (w < 0).any():
            raise PatchCNNError(f"weights must be {len(y)} non-negative numbers, got shape {w.shape}")
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if n_pos == 0 or n_neg == 0:
            raise PatchCNNError(f"patch CNN: needs positive and negative patches, got {n_pos} and {n_neg}")
        t0 = time.perf_counter()
        losses: list[float] = []
        with torch_threads(cfg.threads), seeded_torch_rng(cfg.seed):
            self.net = _network(cfg)
            gen = torch.Generator().manual_seed(cfg.seed)
            opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
            steps = cfg.epochs * int(np.ceil(len(y) / cfg.batch_size))
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=steps, pct_start=0.1)
            loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_neg / n_pos), reduction="none")
            x_all = torch.from_numpy(np.ascontiguousarray(patches))
            y_all = torch.from_numpy(y)
            w_all = torch.from_numpy(w / w.mean())
            self.net.train()
            bar = tqdm(total=steps, desc="patch CNN", unit="batch", disable=not progress)
            for _ in range(cfg.epochs):
                order = torch.randperm(len(y), generator=gen)
                total = 0.0
                for a in range(0, len(y), cfg.batch_size):
                    idx = order[a:a + cfg.batch_size]
                    if len(idx) < 2:  # batch norm needs two
                        continue
                    xb = _augment(x_all[idx].float(), gen)
                    opt.zero_grad()
                    loss = (loss_fn(self.net(xb).squeeze(1), y_all[idx]) * w_all[idx]).mean()
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss.detach()) * len(idx)
                    bar.update(1)
                losses.append(round(total / len(y), 4))
                bar.set_postfix(loss=losses[-1])
            bar.close()
            self.net.eval()
        self._trained = True
        self.meta = {"n_patches": len(y), "n_positive": n_pos, "n_negative": n_neg, "epoch_loss": losses,
                     "seconds": round(time.perf_counter() - t0, 1)}
        return self.meta

    def predict(self, patches: np.ndarray, *, flips: bool = False, batch_size: int = 256) -> np.ndarray:
        """The CNN's probability ``(N,)`` for patches ``(N, C, P, P, P)``; with ``flips``, the mean over the 8
        combinations of flipping the three cube axes (test-time augmentation, 8 times the work).

        Raises:
            PatchCNNError: not trained.
        """
        import itertools

        import torch

        from lidc_det.torch_state import torch_threads

        if not self._trained:
            raise PatchCNNError("patch CNN: not trained; call fit() or PatchRescorer.load()")
        views = [d for k in range(4) for d in itertools.combinations((2, 3, 4), k)] if flips else [()]
        out = []
        with torch_threads(self.config.threads), torch.no_grad():
            for a in range(0, len(patches), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(patches[a:a + batch_size])).float()
                p = [torch.sigmoid(self.net(torch.flip(xb, dims=v) if v else xb).squeeze(1)) for v in views]
                out.append(torch.stack(p).mean(0).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def rescore(self, dets: Detections, hu: np.ndarray, geometry: VolumeGeometry, *, flips: bool = False) -> Detections:
        """``dets`` with each score multiplied by the CNN's probability of its patch (``flips``: see
        :meth:`predict`), best first."""
        prob = self.predict(extract_patches(hu, geometry, dets.centers_xyz_mm, self.config), flips=flips)
        return Detections(dets.series_uid, dets.centers_xyz_mm, dets.diameters_mm, dets.scores * prob,
                          dets.boxes_voxel).top_k(len(dets))

    def save(self, path: str | Path) -> Path:
        """Write the config, weights and ``meta`` as a weights-only torch file; returns the path."""
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        torch.save({"format": FORMAT, "config": cfg, "state_dict": self.net.state_dict(), "meta": self.meta}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatchRescorer:
        """Read a file written by :meth:`save` (weights only: no pickled code runs).

        Raises:
            lidc_det.checkpoint.CheckpointError: missing, truncated or not a patch-CNN file.
        """
        from lidc_det.checkpoint import load_checkpoint

        d = load_checkpoint(path, formats=(FORMAT,), kind="patch-CNN rescorer")
        cfg = PatchCNNConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["config"].items()})
        return cls(cfg, state=d["state_dict"], meta=d.get("meta") or {})
