"""Training of the lung networks: config, model, and a small :class:`Trainer`.

* **Model**: MONAI's residual ``UNet`` (2D on axial slices, or 3D on patches) with
  3 output classes (background, right lung, left lung); widths ``channels``,
  one stride-2 step per entry of ``strides``.
* **Loss**: Dice (foreground classes, softmax) + cross-entropy (MONAI ``DiceCELoss``).
* **Sampling** (seeded ``numpy.random.Generator``): 2D: a random scan, a random
  axial slice (with lung in ``lung_fraction`` of the draws), a random crop of
  ``patch`` (padded with air); 3D: a patch centred on a random lung voxel
  (``lung_fraction``) or any voxel. No left/right flips (they would swap the
  labels); random intensity scale/shift and Gaussian noise.
* **Optimiser**: AdamW, linear warm-up then cosine decay to 0 over ``steps``.
* **Validation**: the loss on a fixed set of validation patches every
  ``val_every`` steps; ``best.pt`` keeps the weights of the lowest.
* **Checkpoints** (atomic): ``last.pt`` every ``checkpoint_every`` steps and at
  the end (model, optimiser, scheduler, step, sampler state, history), so
  :meth:`Trainer.fit` with ``resume=True`` continues a killed run exactly;
  ``init_from`` starts from another run's weights (fine-tuning) with a fresh
  optimiser and schedule.
* **Data record**: ``data.json`` (working-grid spacing, training and validation scans).
* **Curves**: ``history.csv``, ``loss_curve.png`` and TensorBoard events in
  ``tb/`` (when the ``tensorboard`` package is installed).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import CheckpointError, LidcDetError
from lidc_det.lungs_learned.data import LungScan
from lidc_det.torch_state import seeded_torch_rng, torch_threads

FORMAT = "lidc_det.lungs_learned/1"


@dataclass(frozen=True)
class LungNetConfig:
    """One lung network and its training schedule.

    Attributes:
        kind: ``"2d"`` (axial slices) or ``"3d"`` (patches).
        channels: U-Net widths per level; ``strides``: one stride per down-step.
        num_res_units: residual units per block (MONAI ``UNet``).
        patch: training crop, ``(y, x)`` for 2D, ``(z, y, x)`` for 3D, voxels of the working grid;
            multiples of the product of ``strides``.
        batch_size, steps, lr, weight_decay, warmup_steps: optimisation.
        lung_fraction: share of draws centred on lung.
        intensity_scale, intensity_shift, noise_sd: augmentation (normalised units).
        val_every, checkpoint_every: steps between validation losses / ``last.pt`` writes.
        n_val_patches: fixed validation crops (drawn once from the validation scans).
        seed: model initialisation and sampling.
    """

    kind: str = "2d"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    patch: tuple[int, ...] = (128, 128)
    batch_size: int = 8
    steps: int = 400
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    lung_fraction: float = 0.8
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_sd: float = 0.03
    val_every: int = 50
    checkpoint_every: int = 50
    n_val_patches: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        dims = 2 if self.kind == "2d" else 3
        problems = []
        if self.kind not in ("2d", "3d"):
            problems.append(f"kind must be '2d' or '3d', got {self.kind!r}")
        if len(self.channels) != len(self.strides) + 1:
            problems.append(f"channels needs one more entry than strides: {self.channels} vs {self.strides}")
        if len(self.patch) != dims:
            problems.append(f"patch needs {dims} sizes for kind {self.kind!r}, got {self.patch}")
        f = int(np.prod(self.strides)) if self.strides else 1
        if any(int(p) % f for p in self.patch):
            problems.append(f"patch {self.patch} must be multiples of {f} (the product of strides)")
        if min(self.batch_size, self.steps, self.val_every, self.checkpoint_every, self.n_val_patches) < 1:
            problems.append("batch_size, steps, val_every, checkpoint_every, n_val_patches must be >= 1")
        if problems:
            raise LidcDetError("invalid LungNetConfig: " + "; ".join(problems))

    @property
    def dims(self) -> int:
        return 2 if self.kind == "2d" else 3

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LungNetConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise LidcDetError(f"LungNetConfig: unknown keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **changes: Any) -> LungNetConfig:
        return dataclasses.replace(self, **changes)


def build_model(config: LungNetConfig) -> Any:
    """The MONAI ``UNet`` of ``config`` (weights initialised from ``config.seed``; torch's global RNG is left as it was)."""
    from monai.networks.nets import UNet

    with seeded_torch_rng(config.seed):  # MONAI's layers initialise from the global generator
        return UNet(
            spatial_dims=config.dims, in_channels=1, out_channels=3, channels=config.channels,
            strides=config.strides, num_res_units=config.num_res_units,
        )


def n_parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ------------------------------------------------------------------ sampling
def _crop(a: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``a[start : start + size]`` per axis, padded with ``fill`` where it leaves the array."""
    out = np.full(tuple(size), fill, dtype=a.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, a.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    out[tuple(dst)] = a[tuple(src)]
    return out


class PatchSampler:
    """Draws training crops from labelled scans (see the module docstring)."""

    def __init__(self, scans: Sequence[LungScan], config: LungNetConfig, rng: np.random.Generator) -> None:
        if not scans or any(s.labels is None for s in scans):
            raise LidcDetError("training and validation scans must have lung labels")
        self.scans, self.config, self.rng = list(scans), config, rng
        self._lung_slices = [np.nonzero(s.labels.any(axis=(1, 2)))[0] for s in self.scans]  # type: ignore[union-attr]
        self._lung_vox = [np.argwhere(s.labels[::2, ::2, ::2] > 0) * 2 for s in self.scans]  # type: ignore[index]

    def draw(self, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One crop: ``(image [1, *patch] float32, labels [1, *patch] int64)``."""
        c, rng = self.config, self.rng
        i = int(rng.integers(len(self.scans)))
        s = self.scans[i]
        lab = s.labels
        assert lab is not None
        on_lung = rng.random() < c.lung_fraction
        if c.dims == 2:
            zs = self._lung_slices[i] if on_lung and len(self._lung_slices[i]) else np.arange(s.image.shape[0])
            k = int(zs[rng.integers(len(zs))])
            ny, nx = s.image.shape[1:]
            y0 = int(rng.integers(min(0, ny - c.patch[0]), max(0, ny - c.patch[0]) + 1))
            x0 = int(rng.integers(min(0, nx - c.patch[1]), max(0, nx - c.patch[1]) + 1))
            img = _crop(s.image[k], (y0, x0), c.patch, -1.0)
            y = _crop(lab[k], (y0, x0), c.patch, 0)
        else:
            vox = self._lung_vox[i]
            if on_lung and len(vox):
                centre = vox[rng.integers(len(vox))]
            else:
                centre = np.array([rng.integers(n) for n in s.image.shape])
            start = [int(ctr) - p // 2 + int(rng.integers(-p // 4, p // 4 + 1)) for ctr, p in zip(centre, c.patch)]
            img = _crop(s.image, start, c.patch, -1.0)
            y = _crop(lab, start, c.patch, 0)
        if augment:
            img = img * np.float32(1.0 + rng.uniform(-c.intensity_scale, c.intensity_scale)) + np.float32(rng.uniform(-c.intensity_shift, c.intensity_shift))
            if c.noise_sd > 0:
                img = img + rng.normal(0.0, c.noise_sd, img.shape).astype(np.float32)
        return img[None].astype(np.float32), y[None].astype(np.int64)

    def batch(self, n: int, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*(self.draw(augment) for _ in range(n)))
        return np.stack(xs), np.stack(ys)


# ------------------------------------------------------------------ training
@dataclass(frozen=True)
class TrainResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        out_dir: the run folder (``best.pt``, ``last.pt``, ``history.csv``, ``loss_curve.png``, ``tb/``).
        steps: steps done in total (across resumes).
        seconds: wall time of this call.
        best_val_loss: lowest validation loss seen.
        n_parameters: model size.
        resumed_from_step: step the call started from (0 for a fresh run).
    """

    out_dir: Path
    steps: int
    seconds: float
    best_val_loss: float
    n_parameters: int
    resumed_from_step: int


def _lr_lambda(config: LungNetConfig) -> Any:
    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / max(1, config.warmup_steps)
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def _save(path: Path, state: dict[str, Any]) -> None:
    import torch

    from lidc_det.atomic import write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(path, buf.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    """A lung-network checkpoint (torch's weights-only unpickler; named errors)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such lung-network checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(path, f"cannot read the checkpoint: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(path, f"not a lung-network checkpoint (format {FORMAT!r})")
    return state


class Trainer:
    """Trains one lung network (see the module docstring)."""

    def __init__(self, config: LungNetConfig, *, device: str = "cpu", progress: bool = True, threads: int | None = None) -> None:
        """``threads``: torch CPU threads (``torch.set_num_threads``) while :meth:`fit` runs, restored after; None
        leaves torch's count (on a shared, loaded CPU one thread per process is much faster than two that wait
        for each other)."""
        self.config, self.device, self.progress, self.threads = config, device, progress, threads

    def fit(
        self,
        train: Sequence[LungScan],
        val: Sequence[LungScan],
        out_dir: Path,
        *,
        resume: bool = True,
        init_from: Path | None = None,
        stop_after: int | None = None,
    ) -> TrainResult:
        """Train (or continue) in ``out_dir``; see the module docstring for resume / fine-tune.

        ``stop_after``: return after this many steps in total (with ``last.pt`` written), as a
        run that is killed there; a later call with ``resume=True`` finishes the schedule.

        Raises:
            LidcDetError: ``out_dir`` holds a run made with another config.
            CheckpointError: an unreadable ``last.pt`` or ``init_from``.
        """
        with torch_threads(self.threads):
            return self._fit(train, val, Path(out_dir), resume=resume, init_from=init_from, stop_after=stop_after)

    def _fit(
        self,
        train: Sequence[LungScan],
        val: Sequence[LungScan],
        out_dir: Path,
        *,
        resume: bool,
        init_from: Path | None,
        stop_after: int | None,
    ) -> TrainResult:
        import torch
        from monai.losses import DiceCELoss

        t0 = time.perf_counter()
        c = self.config
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model = build_model(c).to(self.device)
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c))
        rng = np.random.default_rng(c.seed)
        history: list[dict[str, float]] = []
        step, best = 0, math.inf
        last = out_dir / "last.pt"
        if resume and last.is_file():
            st = load_state(last)
            if st["config"] != c.to_dict():
                raise LidcDetError(f"{out_dir}: holds a run with another config; use a new folder (or resume=False)")
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            rng.bit_generator.state = st["rng"]
            history, step, best = list(st["history"]), int(st["step"]), float(st["best_val_loss"])
        elif init_from is not None:
            model.load_state_dict(load_state(Path(init_from))["model"])
        start_step = step
        from lidc_det.atomic import write_json

        write_json(out_dir / "data.json", {"spacing_mm": list(train[0].geometry.spacing_zyx),
                                           "train": [s.name for s in train], "val": [s.name for s in val]})
        sampler = PatchSampler(train, c, rng)
        val_x, val_y = PatchSampler(val, c, np.random.default_rng(c.seed + 1)).batch(c.n_val_patches, augment=False)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
        writer = _tensorboard(out_dir / "tb")

        def state() -> dict[str, Any]:
            return {
                "format": FORMAT, "config": c.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng.bit_generator.state, "history": history, "step": step,
                "best_val_loss": best, "init_from": None if init_from is None else str(init_from),
            }

        from tqdm import tqdm

        bar = tqdm(total=c.steps, initial=step, desc=f"lung {c.kind} U-Net", unit="step", disable=not self.progress)
        end = c.steps if stop_after is None else min(c.steps, int(stop_after))
        while step < end:
            model.train()
            x, y = sampler.batch(c.batch_size)
            ts = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(torch.from_numpy(x).to(self.device)), torch.from_numpy(y).to(self.device))
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            row = {"step": step, "train_loss": float(loss.item()), "lr": float(opt.param_groups[0]["lr"]), "step_seconds": time.perf_counter() - ts}
            if step % c.val_every == 0 or step == c.steps:
                row["val_loss"] = self._val_loss(model, loss_fn, val_x, val_y)
                if row["val_loss"] < best:
                    best = row["val_loss"]
                    _save(out_dir / "best.pt", {**state(), "best_val_loss": best})
            history.append(row)
            if writer is not None:
                for k in ("train_loss", "val_loss", "lr"):
                    if k in row:
                        writer.add_scalar(k.replace("_", "/", 1) if k != "lr" else "lr", row[k], step)
            if step % c.checkpoint_every == 0 or step == end:
                _save(last, state())
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}")
        bar.close()
        if writer is not None:
            writer.close()
        _write_history(out_dir, history)
        return TrainResult(out_dir, step, time.perf_counter() - t0, best, n_parameters(model), start_step)

    def _val_loss(self, model: Any, loss_fn: Any, x: np.ndarray, y: np.ndarray) -> float:
        import torch

        model.eval()
        with torch.no_grad():
            losses = [float(loss_fn(model(torch.from_numpy(x[i : i + 4]).to(self.device)), torch.from_numpy(y[i : i + 4]).to(self.device)))
                      for i in range(0, len(x), 4)]
        return float(np.mean(losses))


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is missing: PNG and CSV curves only
        return None
    return SummaryWriter(str(folder))


def _write_history(out_dir: Path, history: Sequence[dict[str, float]]) -> None:
    from lidc_det.atomic import write_text
    from lidc_det.plots import new_figure, save_figure

    cols = ["step", "train_loss", "val_loss", "lr", "step_seconds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in history:
        w.writerow({k: r.get(k, "") for k in cols})
    write_text(out_dir / "history.csv", buf.getvalue())
    if not history:
        return
    fig, ax = new_figure(6.4, 4.0)
    steps = np.array([r["step"] for r in history])
    tr = np.array([r["train_loss"] for r in history])
    k = max(1, len(tr) // 40)
    smooth = np.convolve(tr, np.ones(k) / k, mode="valid")
    ax.plot(steps, tr, color="#9ab", lw=0.6, label="train (per step)")
    ax.plot(steps[k - 1 :], smooth, color="#247", lw=1.5, label=f"train (mean of {k})")
    vr = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if vr:
        ax.plot(*zip(*vr), "o-", color="#c33", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("Dice + CE loss")
    ax.set_title(f"lung U-Net training ({out_dir.name})", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, out_dir / "loss_curve.png", dpi=110)
