"""nnU-Net v2 training of the crop segmenter: a short registered trainer and the training call.

* :class:`nnUNetTrainerLidcShort`: nnU-Net's standard trainer with a short,
  configurable schedule (epochs, iterations per epoch, validation iterations,
  learning rate), read from the ``lidc_det_schedule`` entry of the plans'
  configuration, so the demo and CI train in minutes on a CPU. nnU-Net finds it
  by name through ``nnUNet_extTrainer`` (:data:`~stage2_segment.nnunet_dataset.EXT_TRAINER_DIR`,
  set by :func:`~stage2_segment.nnunet_dataset.nnunet_environment`), so
  ``nnUNetv2_train DatasetNNN_x 3d_lidc 0 -tr nnUNetTrainerLidcShort`` works
  from a shell with that variable set too.
* ``trainer="nnUNetTrainer"``: nnU-Net's standard 1000-epoch schedule for real runs.
  Multi-GPU: use nnU-Net's own DDP (``nnUNetv2_train ... -num_gpus N``) inside
  :func:`~stage2_segment.nnunet_dataset.nnunet_environment`.

This module imports nnU-Net (and torch) at import time: import it lazily.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lidc_det.atomic import remove_leftovers, tmp_prefix, write_json
from lidc_det.torch_state import torch_threads
from stage2_segment.config import TrainConfig
from stage2_segment.nnunet_dataset import CONFIGURATION, NnUnetPaths, nnunet_environment
from stage2_segment.predict import load_nnunet_checkpoint

#: key of the plans configuration that holds the short schedule
SCHEDULE_KEY = "lidc_det_schedule"


class nnUNetTrainerLidcShort(nnUNetTrainer):  # noqa: N801 (nnU-Net's class naming)
    """nnU-Net's trainer with a short schedule taken from the plans.

    The configuration's ``lidc_det_schedule`` dict may set ``num_epochs`` (default 5),
    ``num_iterations_per_epoch`` (20), ``num_val_iterations_per_epoch`` (5),
    ``initial_lr`` (1e-2), ``save_every`` (1: a checkpoint every epoch, so a
    killed run resumes where it stopped) and ``optimizer`` (``"sgd"``: nnU-Net's
    SGD, momentum 0.99, Nesterov; ``"adamw"``: AdamW with AMSGrad as in nnU-Net's
    ``nnUNetTrainerAdam``, learns faster in a few hundred iterations). Everything
    else is nnU-Net's default (augmentation, Dice+CE loss, poly learning rate,
    deep supervision).
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        schedule = dict(self.configuration_manager.configuration.get(SCHEDULE_KEY, {}))
        self.num_epochs = int(schedule.get("num_epochs", 5))
        self.num_iterations_per_epoch = int(schedule.get("num_iterations_per_epoch", 20))
        self.num_val_iterations_per_epoch = int(schedule.get("num_val_iterations_per_epoch", 5))
        self.initial_lr = float(schedule.get("initial_lr", 1e-2))
        self.save_every = int(schedule.get("save_every", 1))
        self.optimizer_name = str(schedule.get("optimizer", "sgd"))
        self.show_progress = bool(schedule.get("progress", False))
        self._bar: Any = None

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.show_progress and self.local_rank == 0:
            from tqdm import tqdm

            # stderr: nnU-Net's own stdout narration goes to the training log
            self._bar = tqdm(total=self.num_epochs, initial=self.current_epoch, desc="nnU-Net training",
                             unit="epoch", file=sys.stderr)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{self.logger.get_value('train_losses', step=-1):.3f}",
                                  pseudo_dice=f"{self.logger.get_value('ema_fg_dice', step=-1):.3f}", refresh=False)
            self._bar.update(1)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, object]:
        if self.optimizer_name == "sgd":
            return super().configure_optimizers()
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay, amsgrad=True
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)


#: The checkpoints nnU-Net's trainer writes into ``fold_<k>``.
CHECKPOINT_NAMES = ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth")


def atomic_save_checkpoint(save: Any) -> Any:
    """nnU-Net's ``save_checkpoint(filename)`` made atomic: written to a hidden temp file, then renamed.

    nnU-Net's trainers ``torch.save`` straight onto ``checkpoint_latest.pth`` (every
    ``save_every`` epochs) and ``checkpoint_final.pth``; a run killed in the middle left a
    truncated file there, which a resume reads (latest) or takes as a finished model
    (final). With this wrapper a killed write leaves the previous checkpoint and a
    ``.checkpoint_*.pth.tmp-*`` file that :func:`train` removes on its next start. When
    nnU-Net writes nothing (checkpointing disabled, not rank 0) nothing is renamed.
    """

    def atomic_save(filename: str) -> None:
        path = Path(filename)
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix=".pth", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)  # nnU-Net may write nothing: only a file it wrote is renamed
        try:
            save(tmp)
            if os.path.isfile(tmp):
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    return atomic_save


@dataclass(frozen=True)
class TrainResult:
    """Where the model is and what training took."""

    model_dir: Path
    checkpoint: Path
    seconds: float
    resumed_from_epoch: int
    final_ema_dice: float | None


def model_dir(paths: NnUnetPaths, dataset_name: str, trainer: str, plans_identifier: str) -> Path:
    """nnU-Net's model folder ``<results>/<dataset>/<trainer>__<plans>__<configuration>``."""
    return paths.results / dataset_name / f"{trainer}__{plans_identifier}__{CONFIGURATION}"


def train(
    paths: NnUnetPaths,
    dataset_name: str,
    plans_identifier: str,
    cfg: TrainConfig,
    *,
    verbose: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train (or resume, or skip when finished) fold ``cfg.fold`` of the crop model.

    The trainer class is looked up by name the way nnU-Net's prediction looks
    it up (built-ins, then ``nnUNet_extTrainer``), then instantiated directly.
    A run with ``checkpoint_final.pth`` is not retrained; a run with
    ``checkpoint_latest.pth`` continues from it (the trainer's checkpoints are written
    atomically, :func:`atomic_save_checkpoint`, so a killed run leaves no truncated one). nnU-Net's console output goes
    to ``<model_dir>/lidc_det_train.log`` unless ``verbose``; ``progress`` shows an
    epoch progress bar on stderr (short trainer).

    Raises:
        CheckpointError: an existing ``checkpoint_final.pth`` / ``checkpoint_latest.pth``
            is unreadable, or unsafe (:func:`~stage2_segment.predict.load_nnunet_checkpoint`
            reads it with the weights-only unpickler before nnU-Net does).
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from stage2_segment.nnunet_dataset import _maybe_quiet

    out = model_dir(paths, dataset_name, cfg.trainer, plans_identifier)
    fold_dir = out / f"fold_{cfg.fold}"
    final = fold_dir / "checkpoint_final.pth"
    if final.is_file():
        return TrainResult(out, final, 0.0, -1, _ema_dice(final))
    latest = fold_dir / "checkpoint_latest.pth"
    remove_leftovers(fold_dir, CHECKPOINT_NAMES)  # a killed checkpoint write's temp file
    if latest.is_file():  # read safely before nnU-Net's load_checkpoint unpickles it (weights_only=False)
        load_nnunet_checkpoint(latest)
    t0 = time.perf_counter()
    fold_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    # rc_context: nnU-Net's progress plot calls seaborn.set(font_scale=2.5), which would restyle
    # every later matplotlib figure of this process (our FROC, Dice and overlay PNGs)
    with nnunet_environment(paths, n_proc_da=cfg.n_proc_da), _maybe_quiet(fold_dir / "lidc_det_train.log", verbose), \
            matplotlib.rc_context(), torch_threads(cfg.num_threads):
        trainer_cls = recursive_find_trainer_class_by_name(cfg.trainer)
        plans = json.loads((paths.preprocessed / dataset_name / f"{plans_identifier}.json").read_text())
        if cfg.trainer == "nnUNetTrainerLidcShort":
            plans["configurations"][CONFIGURATION][SCHEDULE_KEY] = {**cfg.schedule(), "progress": progress}
        resume = latest.is_file()
        plans["continue_training"] = resume
        dataset_json = json.loads((paths.preprocessed / dataset_name / "dataset.json").read_text())
        trainer = trainer_cls(
            plans=plans, configuration=CONFIGURATION, fold=cfg.fold, dataset_json=dataset_json,
            device=torch.device(cfg.device),
        )
        trainer.save_checkpoint = atomic_save_checkpoint(trainer.save_checkpoint)  # type: ignore[method-assign]
        start_epoch = 0
        if resume:
            trainer.load_checkpoint(str(latest))
            start_epoch = int(trainer.current_epoch)
        trainer.run_training()
        if cfg.final_validation:
            trainer.perform_actual_validation(False)
    seconds = time.perf_counter() - t0
    write_json(
        out / f"fold_{cfg.fold}" / "lidc_det_train.json",
        {"config": asdict(cfg), "seconds": round(seconds, 2), "resumed_from_epoch": start_epoch},
    )
    return TrainResult(out, final, seconds, start_epoch, _ema_dice(final))


def _ema_dice(checkpoint: Path) -> float | None:
    """nnU-Net's pseudo-Dice (EMA over epochs, validation patches) at the end of training.

    Raises:
        CheckpointError: an unreadable or unsafe checkpoint (read with the weights-only loader).
    """
    ck = load_nnunet_checkpoint(checkpoint)
    try:
        values = ck["logging"]["ema_fg_dice"] if "ema_fg_dice" in ck["logging"] else None
        if values is None:  # logger checkpoints are nested in newer nnU-Net versions
            values = ck["logging"].get("local", {}).get("ema_fg_dice")
        return float(values[-1]) if values else None
    except (KeyError, TypeError, IndexError, AttributeError):
        return None
