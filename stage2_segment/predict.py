"""In-process nnU-Net prediction of crops, batched, and paste-back as :class:`NoduleMask`.

:class:`CropPredictor` loads a trained model folder with nnU-Net's
``nnUNetPredictor`` once (after :func:`load_nnunet_checkpoint` has read every
checkpoint of it with the weights-only unpickler: nnU-Net itself unpickles them
unrestricted) and then segments every crop of a scan:

1. each crop goes through nnU-Net's own preprocessing for the plan
   (``preprocessor.run_case_npy``: CT clipping and z-scoring, resampling);
2. crops whose preprocessed shape equals the patch size (the normal case:
   crops are cut at the planned size) are stacked and run through the network
   ``batch_size`` at a time, with nnU-Net's mirroring test-time augmentation
   when enabled; a crop of another shape falls back to nnU-Net's sliding window;
3. nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape``
   undoes preprocessing and returns the foreground probability on the crop grid.

:func:`masks_from_probabilities` then keeps, per crop, the connected component
of ``probability > 0.5`` nearest the crop centre and measures it
(:func:`nodule_mask_from_crop`). A crop is padded with air outside the scan;
masks never reach outside the volume.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.boxes import box_slices, mask_to_box
from lidc_det.errors import LidcDetError
from lidc_det.measure import max_axial_diameter_mm
from lidc_det.results import NoduleMask
from lidc_det.torch_state import torch_threads
from stage2_segment.crops import Crop


class ModelNotFoundError(LidcDetError):
    """A model folder lacks nnU-Net's plans/dataset.json or the requested checkpoint."""


#: What nnU-Net's ``nnUNetTrainer.save_checkpoint`` writes (nnunetv2 2.5-2.8); the first three are
#: what its predictor reads.
NNUNET_CHECKPOINT_KEYS = ("network_weights", "trainer_name", "init_args")


def load_nnunet_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read an nnU-Net checkpoint (``fold_k/checkpoint_final.pth`` ...) with the project's safe loader.

    nnU-Net's own readers (``nnUNetPredictor.initialize_from_trained_model_folder``,
    ``nnUNetTrainer.load_checkpoint``) call ``torch.load(weights_only=False)``, which
    runs whatever code a crafted pickle names. Every checkpoint of a model folder is
    therefore read here first with torch's weights-only unpickler
    (:func:`lidc_det.checkpoint.load_checkpoint`), allowing only what nnU-Net's trainer
    saves: tensors (weights, optimiser state), plain containers and values (plans,
    dataset.json, fold, trainer name, mirroring axes), ``torch.device`` (its init
    arguments) and numpy scalars (its training log: losses, pseudo-Dice); nnU-Net is
    handed the folder only when all of them pass.

    Raises:
        UnsafeCheckpointError: the file holds any other Python global (nothing of it runs).
        CheckpointError: no such file, unreadable or truncated, or not an nnU-Net checkpoint.
    """
    from lidc_det.checkpoint import load_checkpoint, numpy_scalar_globals
    from lidc_det.errors import CheckpointError

    state = load_checkpoint(path, kind="nnU-Net checkpoint", allow_globals=numpy_scalar_globals())
    missing = [k for k in NNUNET_CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(path, f"not an nnU-Net checkpoint (no {', '.join(missing)})")
    return state


@dataclass(frozen=True)
class PredictConfig:
    """How crops are predicted.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        batch_size: crops per network call.
        use_mirroring: nnU-Net's flip test-time augmentation (8 network calls per
            crop in 3D; on by default, as in nnU-Net). On the demo's narrow, briefly
            trained model it removes a checkerboard pattern (every other voxel of every
            other slice) and raised the median GT-crop Dice from 0.66 to 0.75.
        folds: model folds to average (nnU-Net ensembling).
        checkpoint: checkpoint file name in ``fold_<k>``.
        threshold: foreground probability for a nodule voxel.
        num_threads: torch intra-op threads while predicting (None = unchanged).
    """

    device: str = "cpu"
    batch_size: int = 8
    use_mirroring: bool = True
    folds: tuple[int, ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    threshold: float = 0.5
    num_threads: int | None = None


class CropPredictor:
    """A trained crop model, loaded once.

    >>> pred = CropPredictor(model_dir, PredictConfig())                   # doctest: +SKIP
    >>> probs = pred.predict_probabilities([c.image for c in crops], (1.0, 1.0, 1.0))  # doctest: +SKIP
    """

    def __init__(self, model_dir: Path | str, cfg: PredictConfig = PredictConfig()) -> None:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from stage2_segment.nnunet_dataset import nnunet_environment

        self.model_dir = Path(model_dir)
        self.cfg = cfg
        for f in ("plans.json", "dataset.json"):
            if not (self.model_dir / f).is_file():
                raise ModelNotFoundError(f"{self.model_dir}: no {f} (not an nnU-Net model folder)")
        for k in cfg.folds:
            ck = self.model_dir / f"fold_{k}" / cfg.checkpoint
            if not ck.is_file():
                raise ModelNotFoundError(f"{ck}: checkpoint missing (training not finished?)")
            load_nnunet_checkpoint(ck)  # before nnU-Net unpickles it (weights_only=False)
        self.device = torch.device(cfg.device)
        # nnU-Net narrates (CPU notice, the trainer search through nnUNet_extTrainer): keep it quiet
        with nnunet_environment(None), contextlib.redirect_stdout(io.StringIO()):
            self.predictor = nnUNetPredictor(
                tile_step_size=0.5, use_gaussian=True, use_mirroring=cfg.use_mirroring,
                perform_everything_on_device=self.device.type == "cuda", device=self.device,
                verbose=False, verbose_preprocessing=False, allow_tqdm=False,
            )
            self.predictor.initialize_from_trained_model_folder(
                str(self.model_dir), use_folds=tuple(cfg.folds), checkpoint_name=cfg.checkpoint
            )
        self.predictor.network.to(self.device).eval()
        cm = self.predictor.configuration_manager
        self.patch_size = tuple(int(v) for v in cm.patch_size)
        self.spacing = tuple(float(v) for v in cm.spacing)

    def predict_probabilities(
        self, images: Sequence[np.ndarray], spacing_zyx: tuple[float, float, float]
    ) -> list[np.ndarray]:
        """Foreground probability ``float32 [z, y, x]`` of each ``[z, y, x]`` HU crop (same shape)."""
        import torch
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        if not images:
            return []
        p = self.predictor
        cm, pm = p.configuration_manager, p.plans_manager
        preprocessor = cm.preprocessor_class(verbose=False)
        with torch_threads(self.cfg.num_threads):
            prepped = []
            for img in images:
                data, _, props = preprocessor.run_case_npy(
                    np.asarray(img, dtype=np.float32)[None], None, {"spacing": [float(s) for s in spacing_zyx]},
                    pm, cm, p.dataset_json,
                )
                prepped.append((torch.from_numpy(np.ascontiguousarray(data)), props))
            logits: list[torch.Tensor | None] = [None] * len(prepped)
            same = [i for i, (d, _) in enumerate(prepped) if tuple(d.shape[1:]) == self.patch_size]
            with torch.inference_mode():
                for start in range(0, len(same), max(1, self.cfg.batch_size)):
                    idx = same[start : start + self.cfg.batch_size]
                    batch = torch.stack([prepped[i][0] for i in idx]).to(self.device)
                    out = None
                    for params in p.list_of_parameters:
                        if len(p.list_of_parameters) > 1:
                            p.network.load_state_dict(params)
                        # nnU-Net's network call with its mirroring TTA, on a batch of whole patches
                        pred = p._internal_maybe_mirror_and_predict(batch).float().cpu()
                        out = pred if out is None else out + pred
                    out /= len(p.list_of_parameters)
                    for j, i in enumerate(idx):
                        logits[i] = out[j]
            for i, (d, _) in enumerate(prepped):
                if logits[i] is None:  # not patch-sized: nnU-Net's sliding window
                    logits[i] = p.predict_logits_from_preprocessed_data(d).float().cpu()
            probs = []
            for (_, props), lg in zip(prepped, logits):
                _, prob = convert_predicted_logits_to_segmentation_with_correct_shape(
                    lg, pm, cm, p.label_manager, props, return_probabilities=True,
                    num_threads_torch=torch.get_num_threads(),
                )
                probs.append(np.asarray(prob[1], dtype=np.float32))
        return probs

    def segment_crops(self, crops: Sequence[Crop], hu: np.ndarray, *, source: str = "detection") -> list[NoduleMask]:
        """One :class:`NoduleMask` per crop (same order), measured on ``hu`` (the full volume)."""
        if not crops:
            return []
        geom = crops[0].volume_geometry
        probs = self.predict_probabilities([c.image for c in crops], geom.spacing_zyx)
        return masks_from_probabilities(crops, probs, hu, threshold=self.cfg.threshold, source=source)


# ------------------------------------------------------------------ paste-back
def nearest_component(mask: np.ndarray, center_zyx: np.ndarray) -> np.ndarray:
    """The connected component (26-neighbourhood) of ``mask`` nearest ``center_zyx``.

    The component containing the centre voxel if there is one, else the one
    with the voxel closest to it; an empty mask stays empty.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 1:
        return lab == 1
    c = np.rint(np.asarray(center_zyx, dtype=np.float64)).astype(int)
    if np.all((c >= 0) & (c < np.asarray(mask.shape))) and lab[tuple(c)] > 0:
        return lab == lab[tuple(c)]
    idx = np.argwhere(lab > 0)
    d = np.sum((idx - np.asarray(center_zyx)) ** 2, axis=1)
    return lab == lab[tuple(idx[int(np.argmin(d))])]


def nodule_mask_from_crop(
    crop: Crop, mask_crop: np.ndarray, hu: np.ndarray, *, score: float | None = None, source: str = "detection"
) -> NoduleMask:
    """Paste a crop-grid mask back into the volume as a :class:`NoduleMask`.

    Voxels outside the volume are dropped; the result's box is the tight box of
    the mask (the crop box clipped to the volume when the mask is empty).
    ``center_xyz_mm`` is the mask centroid (the crop's centre when empty).
    """
    geom = crop.volume_geometry
    shape = np.asarray(geom.shape_zyx)
    box = crop.box_voxel
    if mask_crop.shape != crop.shape_zyx:
        raise ValueError(f"mask shape {mask_crop.shape} does not match crop shape {crop.shape_zyx}")
    lo = np.maximum(box[:3], 0)
    hi = np.minimum(box[3:], shape)
    inside = np.zeros_like(mask_crop, dtype=bool)
    if np.all(hi > lo):
        sl = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, box[:3]))
        inside[sl] = mask_crop[sl]
    voxel_mm3 = float(np.prod(geom.spacing_zyx))
    if inside.any():
        idx = np.argwhere(inside)
        tight = mask_to_box(inside).astype(np.int64)
        sub = inside[box_slices(tight, inside.shape)]
        vbox = tight + np.concatenate([box[:3], box[:3]])
        vol_idx = idx + box[:3]
        center = tuple(float(v) for v in geom.voxel_to_world(vol_idx.mean(axis=0)))
        mean_hu = float(np.asarray(hu)[vol_idx[:, 0], vol_idx[:, 1], vol_idx[:, 2]].mean())
        volume = float(len(idx)) * voxel_mm3
        diameter = max_axial_diameter_mm(sub, geom.spacing_zyx)
    else:
        vbox = np.concatenate([lo, np.maximum(hi, lo)])
        sub = np.zeros(tuple(int(v) for v in vbox[3:] - vbox[:3]), dtype=bool)
        center, mean_hu, volume, diameter = crop.center_xyz_mm, float("nan"), 0.0, 0.0
    return NoduleMask(
        series_uid=crop.series_uid,
        box_voxel=vbox,
        mask=sub,
        spacing_zyx_mm=geom.spacing_zyx,
        center_xyz_mm=center,  # type: ignore[arg-type]
        volume_mm3=volume,
        max_diameter_mm=diameter,
        mean_hu=mean_hu,
        score=float(crop.score if score is None else score),
        source=source,
    )


def masks_from_probabilities(
    crops: Sequence[Crop],
    probabilities: Sequence[np.ndarray],
    hu: np.ndarray,
    *,
    threshold: float = 0.5,
    source: str = "detection",
) -> list[NoduleMask]:
    """Threshold each crop's probability, keep the component nearest the crop centre, paste back."""
    if len(crops) != len(probabilities):
        raise ValueError(f"{len(crops)} crops but {len(probabilities)} probability maps")
    out = []
    for crop, prob in zip(crops, probabilities):
        center = np.asarray(crop.shape_zyx) // 2
        mask = nearest_component(np.asarray(prob) > threshold, center)
        out.append(nodule_mask_from_crop(crop, mask, hu, source=source))
    return out
