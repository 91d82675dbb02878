"""Speed of lidc-det beside MONAI RetinaNet (LUNA16 tutorial configuration), in one run.

``python -m benchmarks.speed --config benchmarks/speed.yaml --out benchmarks/results/speed``

Same machine, same inputs: the real LIDC-IDRI-0001 (read from DICOM, resampled by each
detector to its own grid) and a generated chest of LIDC size on the 1 mm grid
(:func:`benchmarks.timing.generated_chest`, 332 x 360 x 360). Every measurement runs in its
own fresh process (so its peak memory, ``ru_maxrss``, is its own), one after the other.

Rows:

* ``retina3d`` tiny and default, whole-scan inference at their own defaults (measured);
* ``retina3d`` and MONAI at **matched window and overlap** on the generated 1 mm volume
  (``matched.window_zyx`` with ``window_margin`` = ``overlap * window / 2``, MONAI with the
  same window, the same overlap and the 1 mm grid; the network is the tutorial's);
* MONAI at its **LUNA16 settings** (0.703 x 0.703 x 1.25 mm, 512 x 512 x 208 windows, 25 %
  overlap). On this CPU one such window takes longer than the whole benchmark may, so MONAI
  inference is **extrapolated**: a fixed number of windows of ``monai.timed_windows_xyz`` are
  timed (network + anchors + box selection, no inferer), the seconds per voxel of the largest
  is multiplied by the voxels MONAI's sliding-window inferer would run
  (:func:`benchmarks.timing.monai_window_count`), and the resampling is measured. Such rows
  say ``extrapolated``;
* training seconds per step of each detector at one equal patch and batch;
* stage 2 seconds per crop, stage 3 seconds per nodule, twin seconds per scan, prepare seconds
  per scan and the whole pipeline (DICOM -> P(malignant)) seconds per real scan.

All weights are untrained (seeded initialisation; stage 2 and 3 models trained for seconds):
these are timings only. Output: ``<out>/speed.json`` (config, provenance, device, load
averages before and after every measurement, wall time) and ``<out>/speed.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import write_json, write_text
from lidc_det.config import load_yaml_config, to_plain

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path(__file__).resolve().parent / "speed.yaml"


@dataclass(frozen=True)
class MatchedSpec:
    """Matched sliding window: ``window_zyx`` voxels (1 mm grid) with ``overlap`` for both detectors."""

    window_zyx: tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.25


@dataclass(frozen=True)
class MonaiSpec:
    """MONAI timing: windows timed (x, y, z; the largest gives the s/voxel), and the LUNA16 grid."""

    timed_windows_xyz: tuple[tuple[int, int, int], ...] = ((64, 64, 64), (128, 128, 128))
    train_steps: int = 1


@dataclass(frozen=True)
class PipelineSpec:
    """Stages 2 and 3, twin, prepare and the whole pipeline (see the module docstring)."""

    twin_series_uids: tuple[str, ...] = ()
    segmenter: dict[str, Any] = field(default_factory=dict)
    max_candidates_per_scan: int = 40
    min_volume_mm3: float = 30.0
    malignancy_features: tuple[str, ...] = ("shape", "radiomics", "embeddings")
    cnn_epochs: int = 2


@dataclass(frozen=True)
class SpeedConfig:
    """The speed benchmark (``benchmarks/speed.yaml``)."""

    dicom_dir: Path
    dicom_root: Path
    patient_id: str
    series_uid: str
    threads: int = 2
    repeats: int = 2
    ours: tuple[str, ...] = ("tiny", "default")
    matched: MatchedSpec = MatchedSpec()
    monai: MonaiSpec = MonaiSpec()
    train_patch_zyx: tuple[int, int, int] = (64, 96, 96)
    train_batch: int = 2
    train_steps: int = 3
    pipeline: PipelineSpec = PipelineSpec()
    seed: int = 0


def _resolve(path: Path) -> Path:
    return path if path.is_absolute() else REPO / path


def _init(threads: int) -> None:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ------------------------------------------------------------------ measurements (each in its own process)
def _input(cfg: SpeedConfig, which: str) -> tuple[Any, Any, str, float]:
    """(hu, geometry, series uid, seconds to read / generate) of ``real`` or ``generated``."""
    from benchmarks.timing import generated_chest

    t0 = time.perf_counter()
    if which == "real":
        from lidc_det.io.dicom import read_series

        vol = read_series(_resolve(cfg.dicom_dir), series_uid=cfg.series_uid)
        return vol.hu, vol.geometry, vol.series_uid, time.perf_counter() - t0
    case = generated_chest(seed=cfg.seed)
    return case.image_hu, case.geometry, case.series_uid, time.perf_counter() - t0


def m_ours_inference(cfg: SpeedConfig, config: str, which: str, matched: bool) -> dict[str, Any]:
    from benchmarks.timing import time_retina3d_inference

    _init(cfg.threads)
    hu, geom, uid, input_s = _input(cfg, which)
    overrides: dict[str, Any] = {"score_thresh": 0.0}  # untrained scores ~0.01: keep every box (worst case)
    if matched:
        w = cfg.matched.window_zyx
        margin = int(round(cfg.matched.overlap * min(w) / 2 / 16)) * 16
        overrides.update(window_zyx=list(w), window_margin=margin)
    r = time_retina3d_inference(config, hu, geom, device="cpu", repeats=cfg.repeats, overrides=overrides, series_uid=uid)
    r.pop("detections")
    r.update(input=which, input_s=input_s, measured="measured")
    return r


def m_monai_windows(cfg: SpeedConfig) -> dict[str, Any]:
    from benchmarks.timing import time_monai_windows

    _init(cfg.threads)
    return {"windows": [time_monai_windows(w, device="cpu", n_windows=1) for w in cfg.monai.timed_windows_xyz]}


def m_monai_resample(cfg: SpeedConfig) -> dict[str, Any]:
    """Seconds to resample the real scan and the generated one to the tutorial grid, and that grid's shape."""
    from lidc_det.resample import resample_image
    from stage1_detect.monai_baseline import MonaiRetinaNetConfig

    _init(cfg.threads)
    spacing_zyx = tuple(MonaiRetinaNetConfig().spacing_xyz_mm[::-1])
    out = {}
    for which in ("real", "generated"):
        hu, geom, _, _ = _input(cfg, which)
        t0 = time.perf_counter()
        res, g = resample_image(hu, geom, spacing_zyx)  # type: ignore[arg-type]
        out[which] = {"resample_s": time.perf_counter() - t0, "grid_shape_zyx": list(g.shape_zyx)}
    return out


def m_train(cfg: SpeedConfig, which: str) -> dict[str, Any]:
    from benchmarks.timing import time_monai_train_step, time_retina3d_train_step

    _init(cfg.threads)
    if which == "monai":
        return time_monai_train_step(tuple(cfg.train_patch_zyx)[::-1], cfg.train_batch, device="cpu",
                                     steps=cfg.monai.train_steps, seed=cfg.seed)
    return time_retina3d_train_step(which, cfg.train_patch_zyx, cfg.train_batch, device="cpu",
                                    steps=cfg.train_steps, seed=cfg.seed)


def _malignancy_training_samples(seed: int) -> list[Any]:
    """Generated labelled nodules (spheres in noise; malignant = diameter > 10 mm) to fit the
    stage-3 model for timing: 24 nodules of 12 patients."""
    from stage3_malignancy.samples import MalignancySample

    rng = np.random.default_rng(seed)
    out = []
    zz, yy, xx = np.ogrid[:48, :48, :48]
    for i in range(24):
        d = float(rng.uniform(4.0, 20.0))
        mask = (zz - 24) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2 <= (d / 2) ** 2
        img = rng.normal(-800.0, 40.0, (48, 48, 48)).astype(np.float32)
        img[mask] = rng.normal(30.0, 40.0, int(mask.sum()))
        out.append(MalignancySample(img, mask, (1.0, 1.0, 1.0), f"gen-{i}", f"p{i % 12}", (0.0, 0.0, 0.0),
                                    label=int(d > 10.0), nodule_id=f"gen-{i}:1"))
    return out


def m_pipeline(cfg: SpeedConfig, work: str) -> dict[str, Any]:
    """Twin, prepare, stage 2, stage 3 and the whole pipeline on the real scan (one process)."""
    import torch

    from lidc_det.data.prepare import PrepareConfig, prepare_dataset
    from lidc_det.data.prepared import PreparedDataset
    from lidc_det.io.dicom import read_series
    from lidc_det.resample import resample_image
    from lidc_det.synthetic.twin import generate_twins
    from stage1_detect.detector import Retina3DDetector
    from stage2_segment.config import SegmenterConfig
    from stage2_segment.segmenter import NnUnetSegmenter, reject_false_positives
    from stage3_malignancy.config import EmbeddingConfig, MalignancyModelConfig
    from stage3_malignancy.model import MalignancyModel
    from stage3_malignancy.samples import samples_from_nodule_masks, samples_from_volume

    _init(cfg.threads)
    p = cfg.pipeline
    root = Path(work)
    out: dict[str, Any] = {}
    # twin generation (synthetic DICOM), seconds per scan
    t0 = time.perf_counter()
    batch = generate_twins(list(p.twin_series_uids), root / "twin", seed=cfg.seed, workers=1)
    out["twin_s_per_scan"] = (time.perf_counter() - t0) / len(p.twin_series_uids)
    if batch.failed:
        raise RuntimeError(f"twin generation failed: {batch.failed}")
    # prepare: the real scan (seconds per scan) and the twins (stage-2 training data)
    t0 = time.perf_counter()
    prepare_dataset(PrepareConfig(_resolve(cfg.dicom_root), root / "prep_real", scans=(cfg.patient_id,), n_folds=1),
                    progress=False)
    out["prepare_s_per_scan"] = time.perf_counter() - t0
    prepare_dataset(PrepareConfig(root / "twin", root / "prep_twin", scans=tuple(p.twin_series_uids), n_folds=2),
                    progress=False)
    twins = PreparedDataset(root / "prep_twin")
    cases = [twins.load_case(u) for u in twins.series_uids]
    # stage 2: nnU-Net on crops, trained for a few iterations (timing only)
    seg_cfg = SegmenterConfig.from_dict({**p.segmenter, "rejection": {"min_volume_mm3": p.min_volume_mm3}})
    seg = NnUnetSegmenter(root / "stage2", seg_cfg)
    t0 = time.perf_counter()
    seg.fit(cases[:1], cases[1:], progress=False)
    out["stage2_fit_s"] = time.perf_counter() - t0
    # stage 3: fitted on generated nodules (timing only)
    mcfg = MalignancyModelConfig(features=tuple(p.malignancy_features),
                                 embedding=EmbeddingConfig(epochs=p.cnn_epochs, torch_threads=cfg.threads), seed=cfg.seed)
    model = MalignancyModel(mcfg).fit(_malignancy_training_samples(cfg.seed), progress=False)
    real = PreparedDataset(root / "prep_real")
    real_case = real.load_case(real.series_uids[0])
    pipes = []
    for name in cfg.ours:
        torch.manual_seed(cfg.seed)
        det = Retina3DDetector(name, device="cpu", progress=False, score_thresh=0.0)
        t = {}
        t0 = time.perf_counter()
        vol = read_series(_resolve(cfg.dicom_dir), series_uid=cfg.series_uid)
        t["read_dicom_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hu, geom = resample_image(vol.hu, vol.geometry, tuple(det.config.spacing_mm))  # type: ignore[arg-type]
        t["resample_1mm_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dets = det.predict(hu, geom, series_uid=vol.series_uid)
        t["detect_s"] = time.perf_counter() - t0
        top = dets.top_k(p.max_candidates_per_scan)
        t0 = time.perf_counter()
        masks = seg.segment(hu, geom, top)
        t["segment_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        kept = reject_false_positives(top, masks, p.min_volume_mm3)
        survivors = [m for m in masks if not m.empty and m.volume_mm3 >= p.min_volume_mm3]
        samples = samples_from_nodule_masks(hu, geom, survivors, patient_id=cfg.patient_id)
        probs = model.predict(samples) if samples else []
        t["reject_classify_s"] = time.perf_counter() - t0
        t["total_s"] = sum(t.values())
        pipes.append({"detector": name, "seconds": t, "n_candidates": len(dets), "n_crops": len(masks),
                      "n_nonempty_masks": sum(not m.empty for m in masks), "n_survivors": len(kept),
                      "n_classified": len(probs)})
    out["pipeline"] = pipes
    out["stage2_s_per_crop"] = float(np.median([q["seconds"]["segment_s"] / max(1, q["n_crops"]) for q in pipes]))
    # stage 3 per nodule: the real scan's reader-consensus nodule masks plus the non-empty stage-2 masks
    labels = np.asarray(real_case.labels)
    nodules = [n for n in real_case.nodules if n.label is not None]
    samples = samples_from_volume(np.asarray(real_case.image_hu, dtype=np.float32), real_case.geometry,
                                  [labels == n.label for n in nodules], series_uid=real_case.series_uid,
                                  patient_id=cfg.patient_id, nodule_ids=[n.nodule_id for n in nodules])
    samples = samples * max(1, 8 // max(1, len(samples)))  # >= 8 nodules for a stable per-nodule figure
    t0 = time.perf_counter()
    model.predict(samples)
    out["stage3_s_per_nodule"] = (time.perf_counter() - t0) / max(1, len(samples))
    out["stage3_n_nodules_timed"] = len(samples)
    return out


def m_pipeline_trained(cfg: SpeedConfig, models_dir: str) -> dict[str, Any]:
    """The whole pipeline with trained models (a ``lidc-det demo`` folder) on the real scan, twice.

    The untrained rows of :func:`m_pipeline` time each stage on masks of an untrained segmenter
    (every candidate kept); this is the pipeline as a user runs it (``lidc-det predict``).
    """
    from lidc_det.pipeline import Pipeline

    _init(cfg.threads)
    pipe = Pipeline.from_dir(Path(models_dir), device="cpu")
    runs = []
    for _ in range(2):  # the first includes one-off costs (imports, nnU-Net predictor set-up)
        t0 = time.perf_counter()
        result = pipe.run(_resolve(cfg.dicom_dir), series_uid=cfg.series_uid)
        runs.append({"total_s": time.perf_counter() - t0, "steps_s": dict(result.seconds),
                     "n_candidates": len(result.candidates), "n_kept": len(result.kept),
                     "n_malignancy": len(result.malignancy)})
    return {"models_dir": str(models_dir), "runs": runs}


# ------------------------------------------------------------------ the run
def _in_child(fn: Any, *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh spawned process; add its wall time, peak RSS and the load."""
    ctx = multiprocessing.get_context("spawn")
    load0 = _load()
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        r = pool.submit(_child, fn, *args).result()
    r["task_wall_s"] = time.perf_counter() - t0
    r["load_before_after"] = [load0, _load()]
    return r


def _child(fn: Any, *args: Any) -> dict[str, Any]:
    import resource

    r = fn(*args)
    r["child_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return r


def run_speed(config_path: Path = DEFAULT_CONFIG, out_dir: Path = REPO / "benchmarks/results/speed",
              *, only: tuple[str, ...] = (), models: Path | None = None) -> dict[str, Any]:
    """Run every measurement of the config (or the ``only`` groups), write and return the record.

    ``models``: a trained models folder (``lidc-det demo --out DIR``); adds the whole pipeline with
    those models on the real scan (group ``pipeline``).
    """
    cfg = load_yaml_config(SpeedConfig, config_path)
    if models is not None and not (Path(models) / "pipeline.json").is_file():
        raise SystemExit(f"--models {models}: no pipeline.json there (make one with `lidc-det demo --out DIR`)")
    t_start = time.perf_counter()
    record: dict[str, Any] = {"kind": "speed vs MONAI RetinaNet", "config": to_plain(cfg), "config_file": str(config_path),
                              "models": None if models is None else str(models), "only": list(only),
                              "command": " ".join(["python -m benchmarks.speed", "--config", str(config_path), "--out", str(out_dir),
                                                   *(["--only", *only] if only else []),
                                                   *(["--models", str(models)] if models is not None else [])]),
                              "load_at_start": _load(), "results": {}}
    res = record["results"]

    out_dir = Path(out_dir)

    def write() -> None:  # after every measurement: a run cut short keeps what it measured
        from lidc_det.provenance import device_info, provenance

        record["load_at_end"] = _load()
        record["wall_seconds"] = time.perf_counter() - t_start
        record["provenance"] = provenance()
        record["device"] = device_info("cpu")
        record["cpu_count"] = os.cpu_count()
        record["table"] = summary_rows(record)
        write_json(out_dir / "speed.json", record)
        write_text(out_dir / "speed.md", render_markdown(record))

    def step(key: str, group: str, fn: Any, *args: Any) -> None:
        if only and group not in only:
            return
        print(f"-- {key} (load {_load()})", flush=True)
        res[key] = _in_child(fn, cfg, *args)
        print(f"   {key}: {res[key]['task_wall_s']:.1f} s", flush=True)
        write()

    # most telling first: each detector's whole real scan, then what MONAI's rows need
    for name in cfg.ours:
        step(f"ours_{name}_real", "ours", m_ours_inference, name, "real", False)
    step("monai_resample", "monai", m_monai_resample)
    step("monai_windows", "monai", m_monai_windows)
    for name in cfg.ours:
        step(f"ours_{name}_generated", "ours", m_ours_inference, name, "generated", False)
        step(f"ours_{name}_matched", "ours", m_ours_inference, name, "generated", True)
    for name in cfg.ours:
        step(f"train_{name}", "train", m_train, name)
    step("train_monai", "train", m_train, "monai")
    with tempfile.TemporaryDirectory(prefix="lidc-speed-") as work:
        step("pipeline", "pipeline", m_pipeline, work)
    if models is not None:
        step("pipeline_trained", "pipeline", m_pipeline_trained, str(models))
    write()
    print(f"written {out_dir / 'speed.json'} and speed.md")
    return record


# ------------------------------------------------------------------ summary
def monai_extrapolation(record: dict[str, Any], grid_shape_zyx: Any, roi_xyz: Any, overlap: float) -> dict[str, Any]:
    """MONAI whole-scan inference seconds extrapolated from the largest timed window."""
    from benchmarks.timing import monai_window_count

    wins = record["results"]["monai_windows"]["windows"]
    w = max(wins, key=lambda x: int(np.prod(x["window_xyz"])))
    per_voxel = w["window_s"] / float(np.prod(w["window_xyz"]))
    shape_xyz = list(grid_shape_zyx)[::-1]
    n = monai_window_count(shape_xyz, roi_xyz, overlap)
    return {"windows": n, "window_xyz": list(roi_xyz), "s_per_voxel": per_voxel,
            "network_s": n * float(np.prod(roi_xyz)) * per_voxel, "from_window_xyz": w["window_xyz"]}


def summary_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: one row per figure with ours, MONAI and the ratio MONAI / ours where both exist."""
    from stage1_detect.monai_baseline import MonaiRetinaNetConfig

    r = record["results"]
    cfg = record["config"]
    rows: list[dict[str, Any]] = []
    mcfg = MonaiRetinaNetConfig()
    monai_mem = r.get("monai_windows", {}).get("child_peak_rss_mib")

    def row(what: str, ours: Any, monai: Any, unit: str, note: str = "", ours_mem: Any = None, monai_mem_: Any = None) -> None:
        ratio = (monai / ours) if (ours and monai) else None
        rows.append({"what": what, "ours": ours, "monai": monai, "ratio_monai_over_ours": ratio, "unit": unit,
                     "note": note, "ours_peak_rss_mib": ours_mem, "monai_peak_rss_mib": monai_mem_})

    if "monai_windows" in r and "monai_resample" in r:
        for which in ("real", "generated"):
            rs = r["monai_resample"][which]
            ex = monai_extrapolation(record, rs["grid_shape_zyx"], mcfg.val_patch_size_xyz, mcfg.sw_overlap)
            monai_s = rs["resample_s"] + ex["network_s"]
            for name in cfg["ours"]:
                o = r.get(f"ours_{name}_{which}")
                if o is None:
                    continue
                row(f"inference s/scan, {which} scan, each at its defaults: retina3d {name} vs MONAI LUNA16",
                    o["median_s"], monai_s, "s/scan",
                    f"ours measured ({o['windows']} windows of {o['window_zyx']}); MONAI EXTRAPOLATED "
                    f"({ex['windows']} windows of {ex['window_xyz']} x {ex['s_per_voxel'] * 1e6:.2f} us/voxel "
                    f"timed on {ex['from_window_xyz']}, + {rs['resample_s']:.1f} s resampling measured)",
                    o["child_peak_rss_mib"], monai_mem)
        m = cfg["matched"]
        roi_xyz = list(m["window_zyx"])[::-1]
        for name in cfg["ours"]:
            o = r.get(f"ours_{name}_matched")
            if o is None:
                continue
            ex = monai_extrapolation(record, o["grid_shape_zyx"], roi_xyz, m["overlap"])
            row(f"inference s/scan, generated 1 mm scan, matched window {m['window_zyx']} overlap {m['overlap']}: "
                f"retina3d {name} vs MONAI", o["median_s"], ex["network_s"], "s/scan",
                f"ours measured ({o['windows']} windows, margin {o['window_margin']}); MONAI EXTRAPOLATED "
                f"({ex['windows']} windows)", o["child_peak_rss_mib"], monai_mem)
    tm = r.get("train_monai")
    for name in cfg["ours"]:
        t = r.get(f"train_{name}")
        if t is None:
            continue
        row(f"training s/step, batch {cfg['train_batch']} x {cfg['train_patch_zyx']} (z, y, x): retina3d {name} vs MONAI",
            t["step_s"], tm["step_s"] if tm else None, "s/step", "measured", t["child_peak_rss_mib"],
            tm["child_peak_rss_mib"] if tm else None)
    pl = r.get("pipeline")
    if pl:
        row("stage 2 (nnU-Net crop, mirroring) s/crop", pl["stage2_s_per_crop"], None, "s/crop", "measured, real scan's candidates")
        row("stage 3 (shape + radiomics + CNN embeddings + LightGBM) s/nodule", pl["stage3_s_per_nodule"], None,
            "s/nodule", f"measured on {pl['stage3_n_nodules_timed']} nodules")
        row("twin generation s/scan (SYNTHETIC DICOM)", pl["twin_s_per_scan"], None, "s/scan", "measured")
        row("prepare s/scan (real DICOM + annotations -> 1 mm)", pl["prepare_s_per_scan"], None, "s/scan", "measured")
        for q in pl["pipeline"]:
            s = q["seconds"]
            row(f"whole pipeline s/scan (real DICOM -> P(malignant)), retina3d {q['detector']}", s["total_s"], None,
                "s/scan", f"read {s['read_dicom_s']:.1f} + 1 mm {s['resample_1mm_s']:.1f} + detect {s['detect_s']:.1f} + "
                f"segment {q['n_crops']} crops {s['segment_s']:.1f} + reject/classify {q['n_classified']} "
                f"{s['reject_classify_s']:.1f}", pl["child_peak_rss_mib"])
    pt = r.get("pipeline_trained")
    if pt:
        last = pt["runs"][-1]
        steps = " + ".join(f"{k} {v:.1f}" for k, v in last["steps_s"].items())
        row(f"whole pipeline s/scan, trained models ({pt['models_dir']}), real DICOM -> P(malignant)", last["total_s"], None,
            "s/scan", f"second of 2 runs (first {pt['runs'][0]['total_s']:.1f} s): {steps}; {last['n_candidates']} segmented, "
            f"{last['n_kept']} kept, {last['n_malignancy']} classified", pt["child_peak_rss_mib"])
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if v < 100 else f"{v:,.0f}"
    return str(v)


def render_markdown(record: dict[str, Any]) -> str:
    prov = record["provenance"]
    dev = record["device"]
    lines = [
        "# Speed: lidc-det beside MONAI RetinaNet (LUNA16 tutorial configuration)",
        "",
        f"`{record.get('command') or 'python -m benchmarks.speed --config benchmarks/speed.yaml --out benchmarks/results/speed'}`; "
        f"git {prov.get('git_revision')}, {prov.get('created_utc', '')}; "
        f"device {dev.get('name', dev.get('device', 'cpu'))}, {record.get('cpu_count')} CPU cores, "
        f"{record['config']['threads']} torch threads; wall {record['wall_seconds'] / 60:.1f} min; "
        f"load average (1, 5, 15 min) {record['load_at_start']} at the start, {record['load_at_end']} at the end "
        "(the machine is shared: timings are noisy, per-row loads are in speed.json).",
        "",
        ("Untrained weights (timing only) except the row with trained models. " if record.get("models") else
         "Untrained weights (timing only). ") + "Ratio = MONAI / ours (how many times faster ours is). "
        "EXTRAPOLATED rows time a fixed number of MONAI windows and scale by voxel count.",
        "",
        "| what | ours | MONAI | ratio | unit | peak RSS ours / MONAI (MiB) | how |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in record["table"]:
        mem = f"{_fmt(row['ours_peak_rss_mib'])} / {_fmt(row['monai_peak_rss_mib'])}".strip(" /")
        ratio = f"{row['ratio_monai_over_ours']:.1f}x" if row["ratio_monai_over_ours"] else ""
        lines.append(f"| {row['what']} | {_fmt(row['ours'])} | {_fmt(row['monai'])} | {ratio} | {row['unit']} | {mem} | {row['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/speed")
    p.add_argument("--only", nargs="*", default=(), choices=("ours", "monai", "train", "pipeline"),
                   help="run only these groups (the table then holds only their rows)")
    p.add_argument("--models", type=Path, default=None,
                   help="trained models folder (lidc-det demo --out DIR): adds the whole pipeline with them")
    a = p.parse_args(argv)
    run_speed(a.config, a.out, only=tuple(a.only), models=a.models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
