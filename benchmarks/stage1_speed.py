"""Whole-scan inference time of the stage-1 detector on the real LIDC-IDRI-0001 scan.

``python -m benchmarks.stage1_speed [--config benchmarks/stage1_speed.yaml] [--device cuda]``

For every detector of the config (a built-in :class:`~stage1_detect.config.DetectorConfig`
name plus overrides) the scan is read once (DICOM -> HU) and predicted ``repeats`` times
from HU on its own grid; the time of each stage (resampling to the training grid, body
mask, network windows + decoding + NMS) and the total are recorded. Weights are the seeded
initialisation, **untrained**: the figures are timings only (an untrained network passes
the same windows as a trained one; the config sets ``score_thresh: 0`` so that every window
passes its ``pre_nms_topk`` boxes to decoding and NMS, the worst case for those steps).

Writes ``<out_dir>/stage1_speed-<device>.json`` with the config, provenance (git
revision), device info and wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lidc_det.atomic import write_json
from lidc_det.config import load_yaml_config, to_plain

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path(__file__).resolve().parent / "stage1_speed.yaml"


@dataclass(frozen=True)
class SpeedDetector:
    """One timed detector: display ``label``, built-in ``config`` name and field ``overrides``."""

    label: str
    config: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpeedConfig:
    """The speed benchmark (one YAML file, see ``benchmarks/stage1_speed.yaml``)."""

    name: str
    dicom_dir: Path
    detectors: tuple[SpeedDetector, ...]
    series_uid: str | None = None
    device: str = "cpu"
    threads: int = 2
    repeats: int = 2
    out_dir: Path = Path("benchmarks/results/stage1_speed")


def _resolve(path: Path) -> Path:
    return path if path.is_absolute() else REPO / path


def time_detector(spec: SpeedDetector, volume: Any, device: str, repeats: int) -> dict[str, Any]:
    """Timings (seconds) of ``repeats`` whole-scan predictions of one detector, by stage."""
    import numpy as np
    import torch

    from stage1_detect.detector import Retina3DDetector
    from stage1_detect.inference import plan_windows, predict_boxes, to_model_grid
    from stage1_detect.preprocess import body_mask, normalize_hu

    det = Retina3DDetector(spec.config, device=device, progress=False, **spec.overrides)
    cfg = det.config
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    hu, geom = volume.hu, volume.geometry
    if device.startswith("cuda"):  # warm-up: CUDA context, cuDNN autotuning
        det.predict(hu, geom, series_uid=volume.series_uid)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        grid_hu, grid_geom = to_model_grid(hu, geom, cfg)
        t1 = time.perf_counter()
        mask = body_mask(grid_hu) if cfg.use_body_mask else None
        norm = normalize_hu(grid_hu, cfg.hu_window)
        t2 = time.perf_counter()
        sync()
        boxes, scores = predict_boxes(det._inference_model, norm, cfg, device=det.device, mask=mask, progress=False)
        sync()
        t3 = time.perf_counter()
        runs.append({"resample_s": t1 - t0, "mask_normalize_s": t2 - t1, "network_decode_nms_s": t3 - t2, "total_s": t3 - t0})
    t0 = time.perf_counter()
    dets = det.predict(hu, geom, series_uid=volume.series_uid)  # the public path, timed once more
    sync()
    predict_s = time.perf_counter() - t0
    plan = plan_windows(grid_hu.shape, cfg.window_zyx, cfg.window_margin)
    windows_run = plan.n_windows
    if mask is not None:
        windows_run = sum(
            1 for s in plan.core_starts()
            if mask[s[0] : s[0] + plan.step_zyx[0], s[1] : s[1] + plan.step_zyx[1], s[2] : s[2] + plan.step_zyx[2]].any()
        )
    params = sum(p.numel() for p in det.model.parameters())
    return {
        "label": spec.label,
        "config_name": spec.config,
        "overrides": spec.overrides,
        "config": cfg.to_dict(),
        "weights": "untrained (seeded initialisation): timing only",
        "parameters": int(params),
        "model_grid_shape_zyx": list(grid_hu.shape),
        "windows": {"planned": plan.n_windows, "run": windows_run, "window_zyx": list(plan.window_zyx)},
        "runs": runs,
        "median_total_s": statistics.median(r["total_s"] for r in runs),
        "predict_s": predict_s,
        "n_candidates": len(dets),
        "max_candidates": int(cfg.max_detections),
        "mean_score": float(np.mean(dets.scores)) if len(dets) else None,
    }


def run_speed(config_path: Path = DEFAULT_CONFIG, *, device: str | None = None) -> dict[str, Any]:
    """Run the speed benchmark of ``config_path``; write and return its JSON record."""
    import torch

    from lidc_det.io.dicom import read_series
    from lidc_det.provenance import device_info, provenance

    cfg = load_yaml_config(SpeedConfig, config_path)
    if device is not None:
        cfg = replace(cfg, device=device)
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    volume = read_series(_resolve(cfg.dicom_dir), series_uid=cfg.series_uid)
    read_s = time.perf_counter() - t0
    print(f"read {volume.series_uid}: {volume.geometry.shape_zyx} at {volume.geometry.spacing_zyx} mm in {read_s:.1f} s", flush=True)
    results = []
    for spec in cfg.detectors:
        r = time_detector(spec, volume, cfg.device, cfg.repeats)
        results.append(r)
        print(
            f"{spec.label:>20}: median {r['median_total_s']:.1f} s/scan (predict() {r['predict_s']:.1f} s; "
            f"{r['windows']['run']}/{r['windows']['planned']} windows of {r['windows']['window_zyx']}; "
            f"{r['n_candidates']} candidates)",
            flush=True,
        )
    record = {
        "kind": "stage1 inference speed",
        "config": to_plain(cfg),
        "config_file": str(config_path),
        "series_uid": volume.series_uid,
        "scan_shape_zyx": list(volume.geometry.shape_zyx),
        "scan_spacing_zyx_mm": list(volume.geometry.spacing_zyx),
        "read_dicom_s": read_s,
        "detectors": results,
        "provenance": provenance(),
        "device": device_info(cfg.device),
        "wall_seconds": time.perf_counter() - t_start,
        "load_average_1_5_15min": list(os.getloadavg()),  # other processes sharing the CPU during the run
    }
    out = _resolve(cfg.out_dir) / f"{cfg.name}-{cfg.device.split(':')[0]}.json"
    write_json(out, record)
    print(f"written {out}")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--device", default=None, help="override the config's device (cpu, cuda)")
    a = p.parse_args(argv)
    run_speed(a.config, device=a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
