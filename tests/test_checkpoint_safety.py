"""Checkpoints are read with torch's weights-only loader: a crafted pickle that would run code
on load is refused with a named error before anything runs, at every place that reads a
checkpoint a user can hand us; our own checkpoints still load."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch

from lidc_det.checkpoint import load_checkpoint
from lidc_det.cli import main
from lidc_det.errors import CheckpointError, UnsafeCheckpointError
from stage1_detect.config import DetectorConfig
from stage1_detect.toydata import random_sphere_cases

CFG = DetectorConfig(
    channels=(8, 8, 16, 16), fpn_channels=8, patch_size=(32, 32, 32), batch_size=1, epochs=1, steps_per_epoch=1,
    checkpoint_every=1, warmup_steps=0, window_zyx=(64, 64, 64), use_body_mask=False,
)


class _WritesMarker:
    """Unpickling this object calls ``Path.write_text(marker, "pwned")``: code run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return (pathlib.Path.write_text, (self.marker, "pwned"))


def _malicious(path: Path, marker: Path, fmt: str, *, legacy: bool = False, **extra) -> Path:
    state = {"format": fmt, "config": {}, "model": _WritesMarker(marker), **extra}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "marker.txt"


def test_the_crafted_pickle_does_run_code_without_the_safe_loader(tmp_path: Path, marker: Path) -> None:
    # the exploit is real: an unrestricted load writes the marker
    path = _malicious(tmp_path / "evil.pt", marker, "stage1_detect.retina3d/1")
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_safe_loader_refuses_code_and_names_the_file(tmp_path: Path, marker: Path, legacy: bool) -> None:
    path = _malicious(tmp_path / "evil.pt", marker, "stage1_detect.retina3d/1", legacy=legacy)
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as err:
        load_checkpoint(path)
    assert err.value.path == path and str(err.value).startswith(str(path))
    assert "write_text" in str(err.value) or "getattr" in str(err.value)
    assert not marker.exists()


def test_detect_cli_refuses_a_malicious_model_file(tmp_path: Path, marker: Path, capsys) -> None:
    from stage1_detect.cli import load_detector

    for fmt in ("stage1_detect.retina3d/1", "stage1_detect.monai_retinanet/1", "anything"):
        path = _malicious(tmp_path / "evil.pt", marker, fmt)
        with pytest.raises(UnsafeCheckpointError):
            load_detector(path, device="cpu")
        assert main(["detect", "--model", str(path), "--dicom", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "refused to load" in err and str(path) in err and "Traceback" not in err and err.count("\n") == 1
    assert not marker.exists()


def test_detectors_and_training_refuse_a_malicious_checkpoint(tmp_path: Path, marker: Path) -> None:
    from stage1_detect.detector import Retina3DDetector
    from stage1_detect.monai_baseline import MonaiRetinaNetDetector
    from stage1_detect.train import train_detector

    retina = _malicious(tmp_path / "r.pt", marker, "stage1_detect.retina3d/1")
    monai = _malicious(tmp_path / "m.pt", marker, "stage1_detect.monai_retinanet/1")
    with pytest.raises(UnsafeCheckpointError):
        Retina3DDetector(checkpoint=retina, device="cpu")
    with pytest.raises(UnsafeCheckpointError):
        MonaiRetinaNetDetector(checkpoint=monai, device="cpu")
    cases = random_sphere_cases(1, shape_zyx=(32, 32, 32), spheres_per_case=1, seed=0)
    with pytest.raises(UnsafeCheckpointError):  # fine-tuning from it
        train_detector(CFG, cases, [], tmp_path / "ft", device="cpu", progress=False, init_checkpoint=retina)
    resume = tmp_path / "resume"
    resume.mkdir()
    _malicious(resume / "last.pt", marker, "stage1_detect.retina3d/1")
    with pytest.raises(UnsafeCheckpointError):  # resuming from it
        train_detector(CFG, cases, [], resume, device="cpu", progress=False)
    assert not marker.exists()


def _malignancy_samples(n: int = 8) -> list:
    import numpy as np

    from stage3_malignancy.samples import MalignancySample

    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(16) - 7.5] * 3, indexing="ij")
    out = []
    for i in range(n):
        mask = zz**2 + yy**2 + xx**2 <= (5.0 if i % 2 else 3.0) ** 2
        img = rng.normal(-800, 30, mask.shape).astype(np.float32)
        img[mask] = 30 if i % 2 else -300
        out.append(MalignancySample(img, mask, (1.0, 1.0, 1.0), f"S{i}", f"P{i // 2}", (0.0, 0.0, 0.0), i % 2, f"S{i}:0"))
    return out


def test_malignancy_model_keeps_an_outside_embedder_as_weights_only(tmp_path: Path, marker: Path) -> None:
    import json

    import numpy as np

    from stage3_malignancy.config import EmbeddingConfig, MalignancyModelConfig
    from stage3_malignancy.model import MalignancyModel, ModelError

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU())

    samples = _malignancy_samples()
    cfg = MalignancyModelConfig(features=("diameter", "embeddings"), embedding=EmbeddingConfig(cube_voxels=16, device="cpu"))
    m = MalignancyModel(cfg, embedder=net(), embedder_channels=[0]).fit(samples, progress=False)
    folder = m.save(tmp_path / "model")
    assert (folder / "embedder_state.pt").is_file() and not (folder / "embedder.pt").exists()
    with pytest.raises(ModelError, match="embedder="):
        MalignancyModel.load(folder)
    m2 = MalignancyModel.load(folder, embedder=net())  # other random weights, replaced by the saved ones
    assert np.allclose(m2.predict_proba(samples), m.predict_proba(samples))
    # a crafted weights file is refused, not unpickled
    _malicious(folder / "embedder_state.pt", marker, "x")
    with pytest.raises(UnsafeCheckpointError):
        MalignancyModel.load(folder, embedder=net())
    # the old layout (a whole pickled module) is refused with the way to convert it
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "embedding_file": "embedder.pt"}))
    torch.save(net(), folder / "embedder.pt")
    with pytest.raises(ModelError, match="whole pickled module.*convert"):
        MalignancyModel.load(folder, embedder=net())
    assert not marker.exists()


def test_our_checkpoints_load_and_broken_files_fail_clearly(tmp_path: Path) -> None:
    from stage1_detect.detector import Retina3DDetector
    from stage1_detect.train import train_detector

    cases = random_sphere_cases(1, shape_zyx=(32, 32, 32), spheres_per_case=1, seed=0)
    result = train_detector(CFG, cases, [], tmp_path / "run", device="cpu", progress=False)
    state = load_checkpoint(result.last_checkpoint, formats=("stage1_detect.retina3d/",))
    assert state["step"] == 1 and set(state) >= {"model", "optimizer", "scheduler", "scaler", "config", "step_log"}
    assert state["model_config"] == CFG.model_part()  # the model part, frozen with the weights
    det = Retina3DDetector(checkpoint=result.last_checkpoint, device="cpu", progress=False)
    assert det.config == CFG
    # truncated, foreign and missing files: CheckpointError with the file
    cut = tmp_path / "cut.pt"
    cut.write_bytes(result.last_checkpoint.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="unreadable") as err:
        load_checkpoint(cut)
    assert not isinstance(err.value, UnsafeCheckpointError) and err.value.path == cut
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="format 'x'"):
        torch.save({"format": "x"}, tmp_path / "x.pt")
        load_checkpoint(tmp_path / "x.pt", formats=("stage1_detect.retina3d/",))
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------ nnU-Net model folders (stage 2)
class _RunsShell:
    """Unpickling this object calls ``os.system("touch <marker>")``: a shell command run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        import os

        return (os.system, (f"touch '{self.marker}'",))


def _nnunet_checkpoint(trainer_name: str = "nnUNetTrainerLidcShort") -> dict:
    """A checkpoint with the content and types of ``nnUNetTrainer.save_checkpoint`` (nnunetv2 2.8), without
    training: a network and AdamW (AMSGrad) state, nnU-Net's own logger fed the way the trainer feeds it
    (numpy float32 losses, numpy float64 pseudo-Dice, float timestamps and learning rates), and the init
    arguments with a ``torch.device``."""
    import time

    import numpy as np
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.InstanceNorm3d(4, affine=True), torch.nn.Conv3d(4, 2, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, amsgrad=True)
    net(torch.zeros(1, 1, 5, 5, 5)).sum().backward()
    opt.step()
    logger = MetaLogger(None, False)
    for epoch in range(2):
        logger.log("epoch_start_timestamps", time.time(), epoch)
        logger.log("lrs", opt.param_groups[0]["lr"], epoch)
        logger.log("train_losses", np.mean([np.array(0.9, dtype=np.float32), np.array(0.7, dtype=np.float32)]), epoch)
        tp, fp, fn = np.array([30.0]), np.array([5.0]), np.array([8.0])
        dice = [2 * i / (2 * i + j + k) for i, j, k in zip(tp, fp, fn)]
        logger.log("mean_fg_dice", np.nanmean(dice), epoch)
        logger.log("dice_per_class_or_region", dice, epoch)
        logger.log("val_losses", np.mean([np.array(0.8, dtype=np.float32)]), epoch)
        logger.log("epoch_end_timestamps", time.time(), epoch)
    plans = {"dataset_name": "Dataset990_Test", "plans_name": "nnUNetPlans", "configurations": {"3d_lidc": {
        "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], "lidc_det_schedule": {"num_epochs": 2, "progress": False}}}}
    return {
        "network_weights": net.state_dict(),
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "logging": logger.get_checkpoint(),
        "_best_ema": logger.get_value("ema_fg_dice", step=-1),
        "current_epoch": 2,
        "init_args": {"plans": plans, "configuration": "3d_lidc", "fold": 0, "dataset_json": {"labels": {"background": 0, "nodule": 1}},
                      "device": torch.device("cpu")},
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def _nnunet_model_dir(root: Path, checkpoint: dict | None = None, marker: Path | None = None) -> Path:
    """nnU-Net's model folder layout: ``plans.json``, ``dataset.json``, ``fold_0/checkpoint_final.pth``."""
    import json

    d = root / "nnUNet_results" / "Dataset990_Test" / "nnUNetTrainerLidcShort__nnUNetPlans__3d_lidc"
    (d / "fold_0").mkdir(parents=True)
    (d / "plans.json").write_text(json.dumps({"dataset_name": "Dataset990_Test", "configurations": {}}))
    (d / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "nodule": 1}}))
    if checkpoint is None:
        checkpoint = {**_nnunet_checkpoint(), "network_weights": {"w": _RunsShell(marker)}}
    torch.save(checkpoint, d / "fold_0" / "checkpoint_final.pth")
    return d


def test_the_crafted_nnunet_checkpoint_does_run_a_shell_command_without_the_safe_loader(tmp_path: Path, marker: Path) -> None:
    model = _nnunet_model_dir(tmp_path, marker=marker)
    torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)  # what nnU-Net does
    assert marker.exists()


def test_stage2_refuses_a_malicious_nnunet_checkpoint_before_nnunet_reads_it(tmp_path: Path, marker: Path) -> None:
    from stage2_segment.config import TrainConfig
    from stage2_segment.nnunet_dataset import NnUnetPaths
    from stage2_segment.predict import CropPredictor, load_nnunet_checkpoint
    from stage2_segment.trainer import train

    model = _nnunet_model_dir(tmp_path, marker=marker)
    ck = model / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as err:
        load_nnunet_checkpoint(ck)
    assert err.value.path == ck and "system" in str(err.value)
    with pytest.raises(UnsafeCheckpointError):  # predicting from the folder
        CropPredictor(model)
    paths = NnUnetPaths(tmp_path)
    with pytest.raises(UnsafeCheckpointError):  # a "finished" run is reused only if its checkpoint is safe
        train(paths, "Dataset990_Test", "nnUNetPlans", TrainConfig())
    ck.rename(model / "fold_0" / "checkpoint_latest.pth")
    with pytest.raises(UnsafeCheckpointError):  # resuming from it
        train(paths, "Dataset990_Test", "nnUNetPlans", TrainConfig())
    assert not marker.exists()


def test_an_nnunet_checkpoint_as_its_trainer_saves_it_passes_the_safe_loader(tmp_path: Path) -> None:
    from stage2_segment.predict import load_nnunet_checkpoint
    from stage2_segment.trainer import _ema_dice

    model = _nnunet_model_dir(tmp_path, _nnunet_checkpoint())
    ck = model / "fold_0" / "checkpoint_final.pth"
    state = load_nnunet_checkpoint(ck)
    assert state["trainer_name"] == "nnUNetTrainerLidcShort" and state["init_args"]["device"] == torch.device("cpu")
    assert set(state["network_weights"]) == set(_nnunet_checkpoint()["network_weights"])
    assert _ema_dice(ck) == pytest.approx(2 * 30 / (2 * 30 + 13))  # nnU-Net's EMA of a constant pseudo-Dice
    with pytest.raises(CheckpointError, match="not an nnU-Net checkpoint"):
        torch.save({"model": {}}, tmp_path / "other.pth")
        load_nnunet_checkpoint(tmp_path / "other.pth")
