"""GPU check for a bare, offline GPU machine: ours vs MONAI RetinaNet on CUDA with bf16 AMP.

``python -m benchmarks.gpu_check --out $OUT`` (one command: ``bash benchmarks/gpu_check.sh``;
see docs/benchmarks.md for the wheels and the ``run`` tool's carry). ``--smoke`` runs the same
steps at toy sizes on the CPU in seconds (the fast test suite runs it).

It needs only torch, numpy, scipy, matplotlib (preinstalled there) and the carried wheels
(monai, PyYAML, tqdm). It makes its own volumes (:func:`benchmarks.timing.generated_chest`,
:func:`stage1_detect.toydata.random_sphere_cases`): no DICOM, no pylidc. The packages absent on
that machine (SimpleITK, pydicom, pylidc, nnunetv2, lightgbm, radiomics) are blocked at start,
so an import of one of them fails here exactly as it would there.

Steps, each recorded in ``gpu_check.json`` (written after every step, so a run cut short
still leaves what it measured):

1. ``speed``: whole-scan inference of ``retina3d`` tiny and default and of MONAI RetinaNet at
   the LUNA16 tutorial settings (a generated chest on each one's grid), both again at a
   matched window / overlap on the 1 mm grid, and one training step each at equal patch and
   batch plus each one's default patch and batch; peak CUDA memory; ratio MONAI / ours.
2. ``training``: equal optimiser steps of both detectors on generated sphere scans (the
   project's training loops), then the LUNA16 CPM of each on held-out generated scans
   (SYNTHETIC).
3. ``parity``: the trained ``retina3d`` on CPU (fp32) vs CUDA (fp32 and bf16 AMP) on one
   held-out scan: detections matched by centre, score differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ABSENT_ON_GPU_MACHINE = ("SimpleITK", "pydicom", "pylidc", "nnunetv2", "lightgbm", "radiomics")
"""Packages the bare GPU machine does not have; blocked so that importing one fails here too."""


def block_absent_packages() -> None:
    """Make ``import`` of every :data:`ABSENT_ON_GPU_MACHINE` package raise ImportError."""
    for name in ABSENT_ON_GPU_MACHINE:
        sys.modules[name] = None  # type: ignore[assignment]


SIZES = {
    # chest_zyx: generated whole scan (1 mm); monai_chest_zyx: the same chest on MONAI's grid
    "full": dict(chest_zyx=(332, 360, 360), monai_chest_zyx=(266, 512, 512), matched_window_zyx=(128, 128, 128),
                 train_patch_zyx=(64, 96, 96), train_batch=2, timed_steps=5, default_train=True,
                 monai_overrides={}, case_zyx=(96, 128, 128), n_train_cases=24, n_test_cases=8,
                 train_steps=400, steps_per_epoch=200, ours_patch=(64, 64, 64), ours_batch=4, diameter_range=(5.0, 20.0),
                 monai_patch_xyz=(96, 96, 64), monai_batch=4, ours_config="default"),
    "smoke": dict(chest_zyx=(48, 64, 64), monai_chest_zyx=(32, 64, 64), matched_window_zyx=(64, 64, 64),
                  train_patch_zyx=(32, 32, 32), train_batch=1, timed_steps=1, default_train=False,
                  monai_overrides={"resnet_layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64],
                                   "val_patch_size_xyz": [64, 64, 32]},
                  case_zyx=(32, 48, 48), n_train_cases=2, n_test_cases=1, train_steps=2, steps_per_epoch=2,
                  diameter_range=(4.0, 8.0),
                  ours_patch=(32, 32, 32), ours_batch=1, monai_patch_xyz=(32, 32, 32), monai_batch=1,
                  ours_config="tiny"),
}


class Recorder:
    """The JSON record, rewritten after every step."""

    def __init__(self, out_dir: Path, record: dict[str, Any]) -> None:
        self.path = Path(out_dir) / "gpu_check.json"
        self.record = record
        self.t0 = time.perf_counter()

    def save(self) -> None:
        from lidc_det.atomic import write_json

        self.record["wall_seconds"] = time.perf_counter() - self.t0
        write_json(self.path, self.record)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", flush=True)


def _ratio(monai: float | None, ours: float | None) -> float | None:
    return monai / ours if monai and ours else None


def speed_table(device: str, size: dict[str, Any], rec: Recorder) -> list[dict[str, Any]]:
    """Step 1 (see the module docstring)."""
    import torch

    from benchmarks.timing import (
        generated_chest, time_monai_train_step, time_monai_windows, time_retina3d_inference, time_retina3d_train_step,
    )
    from stage1_detect.monai_baseline import MonaiRetinaNetConfig, MonaiRetinaNetDetector

    rows: list[dict[str, Any]] = []
    mo = dict(size["monai_overrides"])
    chest = generated_chest(size["chest_zyx"], seed=0)
    mcfg = MonaiRetinaNetConfig().replace(**mo) if mo else MonaiRetinaNetConfig()
    mspacing_zyx = tuple(mcfg.spacing_xyz_mm[::-1])
    mchest = generated_chest(size["monai_chest_zyx"], mspacing_zyx, seed=0)

    def monai_scan(overrides: dict[str, Any], case: Any) -> dict[str, Any]:
        det = MonaiRetinaNetDetector(device=device, progress=False, **{**mo, **overrides})
        det.predict(case.image_hu, case.geometry, series_uid=case.series_uid)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        d = det.predict(case.image_hu, case.geometry, series_uid=case.series_uid)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        mem = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
        return {"s": time.perf_counter() - t0, "n": len(d), "cuda_peak_mib": mem}

    def ours_scan(config: str, case: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        r = time_retina3d_inference(config, case.image_hu, case.geometry, device=device,
                                    repeats=1 if size is SIZES["smoke"] else 3, warmup=device.startswith("cuda"),
                                    overrides={"score_thresh": 0.0, **overrides}, series_uid=case.series_uid)
        r.pop("detections")
        return r

    monai_def = monai_scan({}, mchest)
    rec.log(f"MONAI LUNA16 inference: {monai_def['s']:.2f} s")
    w = size["matched_window_zyx"]
    matched = {"window_margin": int(round(0.25 * min(w) / 2 / 16)) * 16, "window_zyx": list(w)}
    monai_m = monai_scan({"spacing_xyz_mm": [1.0, 1.0, 1.0], "val_patch_size_xyz": list(w)[::-1], "sw_overlap": 0.25},
                         chest)
    for config in ("tiny", "default"):
        o = ours_scan(config, chest, {})
        rows.append({"what": f"inference s/scan, each at its defaults: retina3d {config} vs MONAI LUNA16",
                     "ours": o["median_s"], "monai": monai_def["s"], "ratio": _ratio(monai_def["s"], o["median_s"]),
                     "ours_cuda_peak_mib": o["memory"].get("cuda_allocated_mib"),
                     "monai_cuda_peak_mib": monai_def["cuda_peak_mib"], "ours_detail": o})
        om = ours_scan(config, chest, matched)
        rows.append({"what": f"inference s/scan, 1 mm grid, window {list(w)} overlap 0.25: retina3d {config} vs MONAI",
                     "ours": om["median_s"], "monai": monai_m["s"], "ratio": _ratio(monai_m["s"], om["median_s"]),
                     "ours_cuda_peak_mib": om["memory"].get("cuda_allocated_mib"),
                     "monai_cuda_peak_mib": monai_m["cuda_peak_mib"], "ours_detail": om})
        rec.log(f"retina3d {config}: {o['median_s']:.2f} s defaults, {om['median_s']:.2f} s matched")
    rec.record["speed"] = rows
    rec.save()
    patch, batch, steps = size["train_patch_zyx"], size["train_batch"], size["timed_steps"]
    tm = time_monai_train_step(tuple(patch)[::-1], batch, device=device, steps=steps, overrides=mo)
    for config in ("tiny", "default"):
        t = time_retina3d_train_step(config, patch, batch, device=device, steps=steps)
        rows.append({"what": f"training s/step, batch {batch} x {list(patch)} (z, y, x): retina3d {config} vs MONAI",
                     "ours": t["step_s"], "monai": tm["step_s"], "ratio": _ratio(tm["step_s"], t["step_s"]),
                     "ours_cuda_peak_mib": t["memory"].get("cuda_allocated_mib"),
                     "monai_cuda_peak_mib": tm["memory"].get("cuda_allocated_mib")})
    if size["default_train"]:
        from stage1_detect.config import load_config

        dc = load_config("default")
        t = time_retina3d_train_step("default", dc.patch_size, dc.batch_size, device=device, steps=steps)
        td = time_monai_train_step(mcfg.patch_size_xyz, mcfg.batch_size, device=device, steps=steps, overrides=mo)
        rows.append({"what": f"training s/step at each one's default (ours {dc.batch_size} x {list(dc.patch_size)} zyx, "
                             f"MONAI {mcfg.batch_size} x {list(mcfg.patch_size_xyz)} xyz)",
                     "ours": t["step_s"], "monai": td["step_s"], "ratio": _ratio(td["step_s"], t["step_s"]),
                     "ours_cuda_peak_mib": t["memory"].get("cuda_allocated_mib"),
                     "monai_cuda_peak_mib": td["memory"].get("cuda_allocated_mib")})
    win = time_monai_windows(tuple(w)[::-1], device=device, n_windows=steps, overrides=mo)
    rec.record["monai_window_s"] = win
    rec.log("training steps timed")
    return rows


def equal_steps_training(device: str, size: dict[str, Any], work: Path, rec: Recorder) -> tuple[dict[str, Any], Any, list[Any]]:
    """Step 2: both detectors, the same generated scans and the same number of optimiser steps."""
    from lidc_det.data.luna import LunaFinding
    from lidc_det.metrics.froc import evaluate_detections
    from stage1_detect.data import case_findings
    from stage1_detect.detector import Retina3DDetector
    from stage1_detect.monai_baseline import MonaiRetinaNetDetector
    from stage1_detect.toydata import random_sphere_cases

    kw = dict(shape_zyx=size["case_zyx"], spheres_per_case=2, diameter_range=size["diameter_range"])
    train = random_sphere_cases(size["n_train_cases"], seed=1, prefix="train", **kw)
    val = random_sphere_cases(max(1, size["n_test_cases"] // 2), seed=2, prefix="val", **kw)
    test = random_sphere_cases(size["n_test_cases"], seed=3, prefix="test", **kw)
    ann = [LunaFinding(c.series_uid, tuple(centre), d) for c in test for centre, d in case_findings(c)[0]]
    steps, spe = size["train_steps"], size["steps_per_epoch"]
    epochs = max(1, steps // spe)
    ours = Retina3DDetector(size["ours_config"], device=device, progress=False, epochs=epochs, steps_per_epoch=spe,
                            patch_size=list(size["ours_patch"]), batch_size=size["ours_batch"], num_workers=0,
                            warmup_steps=min(20, steps), checkpoint_every=spe)
    mo = dict(size["monai_overrides"])
    case_xyz = list(size["case_zyx"])[::-1]
    monai = MonaiRetinaNetDetector(device=device, progress=False, **{
        **mo, "spacing_xyz_mm": [1.0, 1.0, 1.0], "epochs": epochs, "steps_per_epoch": spe, "warmup_epochs": 0,
        "patch_size_xyz": list(size["monai_patch_xyz"]), "batch_size": size["monai_batch"],
        "val_patch_size_xyz": case_xyz, "checkpoint_every": spe})
    out: dict[str, Any] = {"synthetic": True, "steps": epochs * spe, "n_train_scans": len(train),
                           "n_test_scans": len(test), "n_test_nodules": len(ann)}
    for label, det in (("retina3d", ours), ("monai_retinanet", monai)):
        t0 = time.perf_counter()
        res = det.fit(train, val, work / label)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dets = [det.predict(c.image_hu, c.geometry, series_uid=c.series_uid) for c in test]
        pred_s = (time.perf_counter() - t0) / len(test)
        froc = evaluate_detections(ann, dets, n_bootstrap=200 if size is SIZES["full"] else 10)
        out[label] = {"fit_s": fit_s, "seconds_per_step": res.seconds_per_step, "predict_s_per_scan": pred_s,
                      "cpm": float(froc.cpm), "cpm_ci": [float(froc.cpm_ci_low), float(froc.cpm_ci_high)],
                      "best_val_metric": res.best_metric}
        rec.log(f"{label}: {epochs * spe} steps in {fit_s:.1f} s, test CPM {froc.cpm:.3f} (SYNTHETIC)")
    rec.record["training"] = out
    rec.save()
    return out, ours, test


def parity(device: str, det: Any, case: Any) -> dict[str, Any]:
    """Step 3: the same trained weights on the CPU (fp32) and on ``device`` (fp32, bf16 AMP)."""
    import numpy as np

    from stage1_detect.detector import Retina3DDetector

    ck = det.checkpoint

    def run(dev: str, amp: bool) -> Any:
        d = Retina3DDetector(checkpoint=ck, device=dev, progress=False, score_thresh=0.0)
        if dev.startswith("cuda") and not amp:
            import torch

            with torch.autocast("cuda", enabled=False):
                return _predict_fp32(d, case)
        return d.predict(case.image_hu, case.geometry, series_uid=case.series_uid)

    cpu = run("cpu", False)
    out: dict[str, Any] = {"n_cpu": len(cpu)}
    for tag, amp in (("fp32", False), ("bf16_amp", True)):
        if not device.startswith("cuda") and amp:
            continue
        other = run(device, amp)
        k = min(len(cpu), len(other), 20)
        a, b = cpu.top_k(k), other.top_k(k)
        dist = np.linalg.norm(a.centers_xyz_mm[:, None, :] - b.centers_xyz_mm[None, :, :], axis=2) if k else np.zeros((0, 0))
        matched = int((dist.min(axis=1) < 1.0).sum()) if k else 0
        out[tag] = {"n": len(other), "top_k": k, "top_k_matched_within_1mm": matched,
                    "max_abs_score_diff_top_k": float(np.max(np.abs(a.scores - b.scores))) if k else None,
                    "top1_centre_distance_mm": float(dist[0, 0]) if k else None}
    return out


def _predict_fp32(det: Any, case: Any) -> Any:
    """``det.predict`` with the CUDA autocast of :mod:`stage1_detect.inference` switched off."""
    import stage1_detect.inference as inf

    saved = inf._autocast
    inf._autocast = lambda device: None  # type: ignore[assignment]
    try:
        return det.predict(case.image_hu, case.geometry, series_uid=case.series_uid)
    finally:
        inf._autocast = saved


def run_check(out_dir: Path, *, smoke: bool = False, device: str | None = None) -> dict[str, Any]:
    """All three steps; returns the record (also ``out_dir/gpu_check.json``)."""
    block_absent_packages()
    import tempfile

    import torch

    from lidc_det.provenance import device_info, provenance

    dev = device or ("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if dev == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1) if smoke else (os.cpu_count() or 1))
    size = SIZES["smoke" if smoke else "full"]
    rec = Recorder(out_dir, {"kind": "gpu check", "smoke": smoke, "device": device_info(dev),
                             "provenance": provenance(), "sizes": {k: v for k, v in size.items()},
                             "blocked_packages": list(ABSENT_ON_GPU_MACHINE)})
    rec.log(f"device {dev}; torch {torch.__version__}")
    if dev.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    rec.save()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        rec.record["speed"] = speed_table(dev, size, rec)
        rec.save()
        _, ours, test = equal_steps_training(dev, size, Path(work), rec)
        rec.record["parity"] = parity(dev, ours, test[0])
        rec.log(f"parity: {json.dumps(rec.record['parity'])}")
    loaded = sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None})
    rec.record["imported_top_level_modules"] = loaded
    rec.save()
    rec.log(f"written {rec.path}")
    return rec.record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (seconds)")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    a = p.parse_args(argv)
    run_check(a.out, smoke=a.smoke, device=a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
