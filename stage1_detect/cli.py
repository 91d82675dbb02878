"""Library side of ``lidc-det detect``: load a trained detector, read a DICOM series,
detect, print a table and write a LUNA16 candidates CSV.

The command line itself is the ``_add_detect`` block of :mod:`lidc_det.cli`; it only
parses arguments and calls :func:`run_detect`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lidc_det.errors import CheckpointError, ConfigError
from lidc_det.results import Detections


class UnknownCheckpointError(CheckpointError):
    """A ``--model`` file is not a checkpoint of a known stage-1 detector."""


def checkpoint_format(model: str | Path) -> str:
    """``"onnx"`` for an ``.onnx`` export, ``"blob-lgbm"`` for a ``.txt`` LightGBM model of
    :mod:`stage1_detect.blob`, ``"blob-lgbm-cnn"`` for a ``.json`` manifest of :mod:`stage1_detect.blob_cnn`,
    else the ``format`` string of a training checkpoint (``""`` when it has none), read with the weights-only loader
    (:func:`lidc_det.checkpoint.load_checkpoint`: other pickled objects raise
    :class:`~lidc_det.errors.UnsafeCheckpointError` and are never unpickled). No model is built.
    A missing file raises :class:`UnknownCheckpointError`."""
    from lidc_det.checkpoint import load_checkpoint

    path = Path(model)
    if not path.is_file():
        raise UnknownCheckpointError(path, "no such checkpoint file")
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".txt":
        return "blob-lgbm"
    if path.suffix == ".json":
        return "blob-lgbm-cnn"
    fmt = load_checkpoint(path, kind="checkpoint").get("format", "")
    return fmt if isinstance(fmt, str) else ""


def load_detector(model: str | Path, *, device: str | None = None, progress: bool = True) -> Any:
    """The detector stored in ``model`` (by :func:`checkpoint_format`): an ``.onnx`` file from
    ``lidc-det export`` (:class:`~stage1_detect.export.OnnxDetector`; ``device`` "cuda" picks the
    CUDA provider), :class:`~stage1_detect.blob.BlobDetector` (``blob_model.txt``),
    :class:`~stage1_detect.blob_cnn.BlobCNNDetector` (``blob_cnn.json``),
    :class:`~stage1_detect.detector.Retina3DDetector` (``stage1_detect.retina3d/*``)
    or :class:`~stage1_detect.monai_baseline.MonaiRetinaNetDetector` (``stage1_detect.monai_retinanet/*``)."""
    path = Path(model)
    fmt = checkpoint_format(path)
    if fmt == "onnx":
        from stage1_detect.export import OnnxDetector

        providers = None if device is None else (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        )
        return OnnxDetector(path, providers=providers, progress=progress)
    if fmt == "blob-lgbm":
        from stage1_detect.blob import BlobDetector

        return BlobDetector(checkpoint=path, progress=progress)
    if fmt == "blob-lgbm-cnn":
        from stage1_detect.blob_cnn import BlobCNNDetector

        return BlobCNNDetector(checkpoint=path, progress=progress)
    if fmt.startswith("stage1_detect.retina3d/"):
        from stage1_detect.detector import Retina3DDetector

        return Retina3DDetector(checkpoint=path, device=device, progress=progress)
    if fmt.startswith("stage1_detect.monai_retinanet/"):
        from stage1_detect.monai_baseline import MonaiRetinaNetDetector

        return MonaiRetinaNetDetector(checkpoint=path, device=device, progress=progress)
    raise UnknownCheckpointError(
        path, f"not a stage-1 detector checkpoint (format {fmt!r}; expected best.pt/last.pt from training)"
    )


def detections_table(dets: Detections, *, top: int = 20) -> str:
    """Text table of the ``top`` best candidates: rank, score, world x, y, z (mm), diameter (mm)."""
    best = dets.top_k(top)
    lines = [f"{'rank':>4}  {'score':>6}  {'x_mm':>8}  {'y_mm':>8}  {'z_mm':>8}  {'diam_mm':>7}"]
    for i, (c, d, s) in enumerate(zip(best.centers_xyz_mm, best.diameters_mm, best.scores), 1):
        lines.append(f"{i:>4}  {s:6.3f}  {c[0]:8.1f}  {c[1]:8.1f}  {c[2]:8.1f}  {d:7.1f}")
    if len(dets) > top:
        lines.append(f"... {len(dets) - top} more")
    return "\n".join(lines)


def run_detect(
    model: str | Path | Sequence[str | Path],
    dicom_dir: str | Path,
    *,
    series_uid: str | None = None,
    out_csv: str | Path | None = None,
    device: str | None = None,
    top: int = 20,
    progress: bool = True,
    tta_flip_axes: Sequence[int] | None = None,
) -> Detections:
    """Detect nodule candidates in one DICOM series with a trained checkpoint (or several:
    a :class:`~stage1_detect.ensemble.Retina3DEnsemble` of Retina3D checkpoints).

    ``tta_flip_axes`` (a PyTorch checkpoint only) replaces the checkpoint's test-time flips
    (:class:`stage1_detect.inference.FlipTTA`; ``(2,)``: average with the left-right mirror).

    Reads the series (:func:`lidc_det.io.dicom.read_series`, HU), lets the detector resample
    it to its training spacing, prints a table of the best ``top`` candidates and, with
    ``out_csv``, writes all of them (at most 100) as a LUNA16 candidates CSV
    (``seriesuid,coordX,coordY,coordZ,probability``; world mm).
    """
    import time

    from lidc_det.data.luna import candidates_from_detections, write_candidates
    from lidc_det.io.dicom import read_series

    models = [model] if isinstance(model, (str, Path)) else list(model)
    if len(models) == 1:
        detector = load_detector(models[0], device=device, progress=progress)
    else:
        from stage1_detect.ensemble import Retina3DEnsemble

        for m in models:  # the format alone: each member's network is built once, by the ensemble
            if not checkpoint_format(m).startswith("stage1_detect.retina3d/"):
                raise ConfigError(f"{m}: an ensemble (several --model) takes Retina3D checkpoints (.pt) only")
        detector = Retina3DEnsemble(checkpoints=models, device=device, progress=progress)
        model = models[0]
    if tta_flip_axes is not None:
        if not hasattr(detector, "with_inference_options"):
            raise ConfigError(f"{model}: test-time flips need a PyTorch checkpoint (.pt), not {Path(model).suffix}")
        detector = detector.with_inference_options(tta_flip_axes=tuple(int(a) for a in tta_flip_axes))
    t0 = time.perf_counter()
    volume = read_series(Path(dicom_dir), series_uid=series_uid)
    t1 = time.perf_counter()
    g = volume.geometry
    print(
        f"series {volume.series_uid}: {g.shape_zyx} voxels at {tuple(round(s, 3) for s in g.spacing_zyx)} mm "
        f"(read in {t1 - t0:.1f} s); detecting on {getattr(detector, 'device', '?')}",
        flush=True,
    )
    dets = detector.predict(volume.hu, g, series_uid=volume.series_uid)
    t2 = time.perf_counter()
    print(detections_table(dets, top=top))
    print(f"{len(dets)} candidates in {t2 - t1:.1f} s")
    if out_csv is not None:
        write_candidates(Path(out_csv), candidates_from_detections(dets))
        print(f"written {out_csv}")
    return dets
