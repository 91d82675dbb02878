"""Training loop of the stage-1 detector: AdamW + cosine schedule, AMP on CUDA,
atomic checkpoints with exact resume, per-epoch validation and best-checkpoint selection.

Outputs in ``out_dir``:

* ``last.pt``: the latest state (model, optimiser, scheduler, grad scaler, step,
  per-step log, per-epoch history; no RNG state: training draws from no global
  generator, so resuming neither needs nor changes torch's global RNG); written atomically every
  ``checkpoint_every`` steps and at each epoch end. A run started again with the
  same ``out_dir`` resumes from it (``resume=True``) and, because patches are a
  function of (seed, index) (:class:`stage1_detect.data.PatchDataset`), ends in the
  same state as an uninterrupted run.
* ``best.pt``: the state with the best validation metric so far (validation fold only).
* ``config.yaml`` + ``config.provenance.json``: the run's config, git revision, versions, device.
* ``train_log.csv`` (one row per step), ``history.csv`` (one row per epoch),
  ``loss_curve.png``, and TensorBoard event files in ``tb/`` when tensorboard is installed.

Multi-GPU: run under ``torchrun`` (``python -m stage1_detect.train`` below, or any script
calling :func:`train_detector`): with ``WORLD_SIZE`` > 1 the process group is initialised
(NCCL on CUDA, gloo on CPU), the model is wrapped in ``DistributedDataParallel``, each rank
trains on its own ``batch_size`` patches of every step (global batch ``batch_size x world``;
rank ``r`` takes block ``r`` of the step's patches, so resuming stays exact), BatchNorm
statistics stay per rank (no SyncBatchNorm), and rank 0 alone validates and writes
checkpoints and logs while the other ranks wait at a barrier::

    torchrun --nproc_per_node 4 -m stage1_detect.train --data PREPARED --out runs/r1 --config default

Validation: after each epoch the model predicts every validation scan
(:func:`stage1_detect.inference.predict_scan`) and a metric
``Callable[[list[Detections]], float]`` (higher is better) scores them. The
default is the LUNA16 CPM of :func:`lidc_det.metrics.froc.evaluate_detections`
on the validation cases' targets and irrelevant findings; see
:func:`validation_metric`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidc_det import atomic
from lidc_det.errors import CheckpointError
from lidc_det.results import Detections
from stage1_detect.config import LEGACY_MODEL_FIELDS, DetectorConfig, config_from_dict, save_config

CHECKPOINT_FORMAT = "stage1_detect.retina3d/1"
ValidationMetric = Callable[[list[Detections]], float]
#: Files :func:`train_detector` writes atomically in its run folder (their temp leftovers are removed on start).
RUN_FILES: tuple[str, ...] = (
    "last.pt", "best.pt", "config.yaml", "config.provenance.json", "train_log.csv", "history.csv", "loss_curve.png",
)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_detector`.

    Attributes:
        out_dir: run folder.
        last_checkpoint, best_checkpoint: paths (best is None without validation cases).
        best_metric, best_epoch: best validation metric and its epoch (1-based), or None.
        steps: optimiser steps done in total.
        history: one dict per finished epoch (epoch, step, train_loss, val_metric, seconds).
        seconds_per_step: mean wall time of the optimiser steps run in this call
            (forward, loss, backward, update; data loading and validation excluded).
    """

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_metric: float | None
    best_epoch: int | None
    steps: int
    history: tuple[dict[str, Any], ...]
    seconds_per_step: float

    @classmethod
    def of_run(
        cls,
        out_dir: Path,
        last_path: Path,
        best_path: Path,
        best_metric: float | None,
        best_epoch: int | None,
        steps: int,
        history: Sequence[dict[str, Any]],
        step_seconds: Sequence[float],
    ) -> TrainResult:
        """The result of a training loop: ``best_path`` counts only when it was written; the
        mean of ``step_seconds`` (NaN when no step ran in this call)."""
        return cls(
            out_dir=out_dir,
            last_checkpoint=last_path,
            best_checkpoint=best_path if best_path.is_file() else None,
            best_metric=best_metric,
            best_epoch=best_epoch,
            steps=steps,
            history=tuple(history),
            seconds_per_step=float(np.mean(step_seconds)) if step_seconds else float("nan"),
        )


# ------------------------------------------------------------------ validation
def recall_at_k(val_cases: Sequence[Any], k: int = 10) -> ValidationMetric:
    """Metric: fraction of target nodules whose centre is within their radius of one of
    the top-``k`` detections of their scan (a simple stand-in for the CPM)."""
    from stage1_detect.data import case_findings

    targets = {c.series_uid: case_findings(c)[0] for c in val_cases}

    def metric(detections: list[Detections]) -> float:
        hit = total = 0
        for det in detections:
            top = det.top_k(k).centers_xyz_mm
            for centre, diameter in targets.get(det.series_uid, []):
                total += 1
                if len(top) and np.min(np.linalg.norm(top - np.asarray(centre), axis=1)) < diameter / 2:
                    hit += 1
        return hit / total if total else float("nan")

    return metric


def validation_metric(val_cases: Sequence[Any], *, n_bootstrap: int = 0) -> ValidationMetric:
    """The default validation metric: LUNA16 CPM (:func:`lidc_det.metrics.froc.evaluate_detections`)
    of the validation cases, with irrelevant findings excluded; NaN when they hold no target nodule.
    Falls back to :func:`recall_at_k` when the FROC module is not available."""
    try:
        from lidc_det.data.luna import LunaFinding
        from lidc_det.metrics.froc import evaluate_detections
    except ImportError:
        return recall_at_k(val_cases)
    from stage1_detect.data import case_findings

    annotations, excluded = [], []
    for c in val_cases:
        tgt, irr = case_findings(c)
        annotations += [LunaFinding(c.series_uid, centre, d) for centre, d in tgt]
        excluded += [LunaFinding(c.series_uid, centre, d) for centre, d in irr]

    def metric(detections: list[Detections]) -> float:
        if not annotations:
            return float("nan")
        res = evaluate_detections(annotations, detections, excluded=excluded, n_bootstrap=n_bootstrap)
        return float(res.cpm)

    return metric


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint dict (temp file + rename)."""
    atomic.write_with(Path(path), lambda p: torch.save(state, p))


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`train_detector` with the weights-only loader
    (:func:`lidc_det.checkpoint.load_checkpoint`; raises :class:`CheckpointError`, or
    :class:`~lidc_det.errors.UnsafeCheckpointError` for a file holding other Python objects)."""
    from lidc_det.checkpoint import load_checkpoint as load_safely

    return load_safely(path, map_location=map_location, formats=(CHECKPOINT_FORMAT,), kind="stage-1 detector checkpoint")


def config_of_checkpoint(state: dict[str, Any], path: Path | str = "<checkpoint>") -> DetectorConfig:
    """The :class:`DetectorConfig` saved in a checkpoint; its model part must equal the frozen
    ``model_config`` (checkpoints from before that entry have only ``config``). A model field
    that a checkpoint predates takes the value its network had (:data:`LEGACY_MODEL_FIELDS`)."""
    saved = dict(state["config"])
    frozen = state.get("model_config")
    for name, value in LEGACY_MODEL_FIELDS.items():
        if name not in saved:
            saved[name] = value
            if frozen is not None:
                frozen = {**frozen, name: value}
    config = config_from_dict(saved, source=f"{path} [config]")
    if frozen is not None:
        changed = config.changed_model_fields(frozen)
        if changed or set(frozen) != set(config.model_part()):
            raise CheckpointError(path, f"its config disagrees with its frozen model config on {changed or sorted(frozen)}")
    return config


def _lr_lambda(config: DetectorConfig) -> Callable[[int], float]:
    total = config.total_steps
    warm = max(0, min(config.warmup_steps, total - 1))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic.write_text(path, buf.getvalue())


def plot_loss_curve(path: Path, step_log: Sequence[dict[str, Any]], history: Sequence[dict[str, Any]]) -> None:
    """Atomically write a PNG: training loss per step (raw and moving mean) and the validation metric per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if step_log:
        steps = np.array([r["step"] for r in step_log])
        loss = np.array([r["loss"] for r in step_log])
        ax.plot(steps, loss, color="0.75", lw=0.8, label="loss (step)")
        k = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="C0", label=f"loss (mean of {k})")
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    vals = [(h["step"], h["val_metric"]) for h in history if h.get("val_metric") is not None and np.isfinite(h["val_metric"])]
    if vals:
        ax2 = ax.twinx()
        ax2.plot([v[0] for v in vals], [v[1] for v in vals], "o-", color="C3", label="validation metric")
        ax2.set_ylabel("validation metric (CPM)")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    atomic.write_with(Path(path), lambda p: fig.savefig(p, dpi=100))
    plt.close(fig)


def _tensorboard(out_dir: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=purge_step)


# ------------------------------------------------------------------ distributed
def init_distributed(device: torch.device) -> tuple[int, int]:
    """``(world_size, rank)``; under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the
    default process group is initialised first if needed (NCCL on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 1, 0
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


# ------------------------------------------------------------------ training
def train_detector(
    config: DetectorConfig,
    train_cases: Sequence[Any],
    val_cases: Sequence[Any],
    out_dir: Path | str,
    *,
    device: str | torch.device | None = None,
    resume: bool = True,
    init_checkpoint: Path | str | None = None,
    val_metric: ValidationMetric | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    step_callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a :class:`stage1_detect.model.Retina3D` on patches of ``train_cases``.

    Args:
        config: model + training + inference settings (saved as ``config.yaml``).
        train_cases: scans to sample patches from (see :mod:`stage1_detect.data`).
        val_cases: scans of the validation fold, predicted whole after each epoch
            (never pass the test fold); empty: no validation, ``best.pt`` is not written.
        out_dir: run folder (created); holds ``last.pt`` for resuming.
        device: "cpu", "cuda", ...; default CUDA when available.
        resume: continue from ``out_dir/last.pt`` when it exists (its config must match).
        init_checkpoint: fine-tune: start from this checkpoint's model weights
            (fresh optimiser, schedule and step); ignored when resuming.
        val_metric: ``Callable[[list[Detections]], float]``, higher is better;
            default :func:`validation_metric` of ``val_cases``.
        progress: tqdm bar over steps.
        stop_after_steps: stop (as if killed) once this call has run this many steps,
            without a final checkpoint (for tests and time-boxed runs).
        step_callback: called as ``f(step, loss)`` after each optimiser step (1-based step).
    """
    from tqdm.auto import tqdm

    from lidc_det.provenance import device_info
    from stage1_detect.data import PatchDataset, collate_patches
    from stage1_detect.inference import predict_scan
    from stage1_detect.model import DetectionLoss, Retina3D

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:  # a killed run's half-written temp files (never read)
        atomic.remove_leftovers(out_dir, RUN_FILES)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    world, rank = init_distributed(dev)
    if world > 1 and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    main_rank = rank == 0
    use_amp = config.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    gen = torch.Generator().manual_seed(config.seed)
    model = Retina3D(config, generator=gen).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    criterion = DetectionLoss(config)

    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    step = 0
    step_log: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    best_metric: float | None = None
    best_epoch: int | None = None
    if resume and last_path.is_file():
        state = load_checkpoint(last_path, map_location=dev)
        if config_of_checkpoint(state, last_path) != config:
            raise CheckpointError(last_path, "saved with a different config; use another out_dir or resume=False")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        step_log = list(state["step_log"])
        history = list(state["history"])
        best_metric, best_epoch = state["best_metric"], state["best_epoch"]
    elif init_checkpoint is not None:
        init_state = load_checkpoint(init_checkpoint, map_location=dev)
        config_of_checkpoint(init_state, init_checkpoint).with_overrides_of_trained(
            f"{init_checkpoint} (fine-tuning)", **config.model_part()
        )
        model.load_state_dict(init_state["model"])

    if main_rank:
        save_config(
            config, out_dir / "config.yaml",
            extra={"device": device_info(str(dev)), "world_size": world, "init_checkpoint": str(init_checkpoint) if init_checkpoint else None},
        )
    train_model: torch.nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    metric_fn = val_metric if val_metric is not None else (validation_metric(val_cases, n_bootstrap=config.val_n_bootstrap) if val_cases else None)

    def state_dict() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "model_config": config.model_part(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "step_log": step_log,
            "history": history,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
        }

    def write_logs() -> None:
        _write_csv(out_dir / "train_log.csv", step_log, ["step", "loss", "cls", "box", "num_positive", "lr", "seconds"])
        _write_csv(out_dir / "history.csv", history, ["epoch", "step", "train_loss", "val_metric", "seconds"])
        plot_loss_curve(out_dir / "loss_curve.png", step_log, history)

    total = config.total_steps
    bs = config.batch_size
    dataset = PatchDataset(train_cases, config, seed=config.seed, length=total * bs * world)
    # global step s uses patches [s * bs * world, (s + 1) * bs * world); rank r takes its r-th block of bs
    indices = [(s * world + rank) * bs + i for s in range(step, total) for i in range(bs)]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=bs,
        sampler=indices,
        num_workers=config.num_workers,
        collate_fn=collate_patches,
        generator=torch.Generator().manual_seed(config.seed),
        persistent_workers=False,
        pin_memory=dev.type == "cuda",
    )
    writer = _tensorboard(out_dir, purge_step=step) if step < total and main_rank else None
    ran = 0
    step_seconds: list[float] = []
    epoch_t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not (progress and main_rank))
    try:
        for images, targets in loader:
            if stop_after_steps is not None and ran >= stop_after_steps:
                break
            images = images.to(dev, non_blocking=True)
            if dev.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last_3d)
            t_step = time.perf_counter()
            with torch.autocast(device_type="cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext():
                cls, box = train_model(images)
            loss = criterion(model, cls, box, targets, images.shape[2:])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss.total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            ran += 1
            value = float(loss.total.detach())
            if world > 1:  # log the mean loss over ranks
                t = torch.tensor([value], dtype=torch.float64, device=dev)
                torch.distributed.all_reduce(t)
                value = float(t.item()) / world
            step_seconds.append(time.perf_counter() - t_step)
            step_log.append(
                {
                    "step": step,
                    "loss": value,
                    "cls": float(loss.cls),
                    "box": float(loss.box),
                    "num_positive": loss.num_positive,
                    "lr": lr,
                    "seconds": step_seconds[-1],
                }
            )
            if writer is not None:
                writer.add_scalar("train/loss", value, step)
                writer.add_scalar("train/cls_loss", float(loss.cls), step)
                writer.add_scalar("train/box_loss", float(loss.box), step)
                writer.add_scalar("train/lr", lr, step)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
            if step_callback is not None:
                step_callback(step, value)
            epoch_end = step % config.steps_per_epoch == 0
            if epoch_end:
                epoch = step // config.steps_per_epoch
                recent = [r["loss"] for r in step_log[-config.steps_per_epoch :]]
                metric = None
                if metric_fn is not None and main_rank:
                    model.eval()
                    dets = [
                        predict_scan(model, c.image_hu, c.geometry, config, series_uid=c.series_uid, device=dev, progress=False)
                        for c in val_cases
                    ]
                    model.train()
                    metric = float(metric_fn(dets))
                    if writer is not None:
                        writer.add_scalar("val/metric", metric, step)
                history.append(
                    {"epoch": epoch, "step": step, "train_loss": float(np.mean(recent)), "val_metric": metric, "seconds": time.perf_counter() - epoch_t0}
                )
                epoch_t0 = time.perf_counter()
                # ties go to the later epoch: with a flat metric (e.g. 0 early on) the longest-trained model is kept
                if metric is not None and np.isfinite(metric) and (best_metric is None or metric >= best_metric):
                    best_metric, best_epoch = metric, epoch
                    save_checkpoint(best_path, state_dict())
            if (epoch_end or step % config.checkpoint_every == 0 or step == total) and main_rank:
                save_checkpoint(last_path, state_dict())
                write_logs()
            if world > 1 and (epoch_end or step % config.checkpoint_every == 0):
                torch.distributed.barrier()  # the other ranks wait for validation and checkpoints
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return TrainResult.of_run(out_dir, last_path, best_path, best_metric, best_epoch, step, history, step_seconds)


# ------------------------------------------------------------------ command line (torchrun)
def main(argv: Sequence[str] | None = None) -> int:
    """Train on a prepared data set (``lidc-det prepare``) with patient folds:
    ``python -m stage1_detect.train --data DIR --out RUN [--config tiny] [--set key=value ...]``,
    or the same under ``torchrun --nproc_per_node N -m stage1_detect.train ...`` for DDP."""
    import argparse

    import yaml

    from lidc_det.data.prepared import PreparedDataset
    from stage1_detect.config import load_config

    p = argparse.ArgumentParser(prog="python -m stage1_detect.train", description=main.__doc__)
    p.add_argument("--data", type=Path, required=True, help="prepared data set folder")
    p.add_argument("--out", type=Path, required=True, help="run folder (resumed when it holds last.pt)")
    p.add_argument("--config", default="tiny", help="built-in config name or YAML path (default tiny)")
    p.add_argument("--set", nargs="*", default=(), metavar="KEY=VALUE", help="config overrides (YAML values)")
    p.add_argument("--test-fold", type=int, default=0)
    p.add_argument("--val-fold", type=int, default=None, help="default: test fold + 1")
    p.add_argument("--init-checkpoint", type=Path, default=None, help="fine-tune from these weights")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    overrides = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    config = load_config(a.config)
    if overrides:
        config = config.replace(**overrides)
    ds = PreparedDataset(a.data)
    n_folds = max(ds.folds.values()) + 1
    val_fold = (a.test_fold + 1) % n_folds if a.val_fold is None else a.val_fold
    if val_fold == a.test_fold or not (0 <= a.test_fold < n_folds and 0 <= val_fold < n_folds):
        raise SystemExit(f"need distinct test and validation folds in 0..{n_folds - 1}, got {a.test_fold} and {val_fold}")
    train_folds = set(range(n_folds)) - {a.test_fold, val_fold}
    train_cases = [ds.load_case(u) for u in ds.scans_in_folds(train_folds)]
    val_cases = [ds.load_case(u) for u in ds.scans_in_folds([val_fold])]  # never the test fold
    result = train_detector(config, train_cases, val_cases, a.out, device=a.device, init_checkpoint=a.init_checkpoint)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.steps} steps; best validation CPM {result.best_metric} (epoch {result.best_epoch}); {result.out_dir}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
