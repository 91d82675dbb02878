"""``lidc-det bench CONFIG``: every listed detector through the same data, split and
evaluator; rows appended to the leaderboard.

A config (YAML, see ``benchmarks/smoke.yaml`` and ``benchmarks/full.yaml``)::

    name: smoke
    data: {source: twin, series_uids: [...], n_folds: 3, test_fold: 0, val_fold: 1}
    detectors:
      - {name: retina3d, label: retina3d-tiny, kwargs: {config: tiny, epochs: 1}}
      - {name: monai_retinanet, label: monai-retinanet, kwargs: {...}}
    segmentation: {segmenter: {...}, max_candidates_per_scan: 40}   # optional stage 2
    second_look: {data: {...}, model: {...}}                         # optional, needs stage 2
    n_bootstrap: 1000
    seed: 0

Detectors are built by registry name (:func:`stage1_detect.registry.build_detector`),
so installed plug-ins take part like the built-ins. Each run folder holds
``<label>/candidates.csv``, ``<label>/froc/``, ``bench.json`` (config, git revision,
device, wall times) and the leaderboard rows are appended to
``<leaderboard_dir>/leaderboard.json`` + ``leaderboard.md``.

With a ``segmentation`` section, one nnU-Net crop segmenter is trained (in
``stage2_model/``, shared by every detector) and each detector's candidates go
through it: the row gets the stage-2 Dice (median, ground-truth crops, vs reader
consensus) and the CPM after FP rejection tuned on that detector's validation
candidates (``<label>/stage2/``). With a ``second_look`` section too, the second look
(:mod:`benchmarks.second_look`, trained on the pool twins of ``second_look.data``) rescores
them and the row gets the CPM after it (``<label>/second_look/``).

Detectors pick their device themselves (CUDA when visible); each row records it.

**Resume.** Run the same command into the same ``--out`` folder again after a kill:
finished twins, prepared scans, detector checkpoints (``last.pt``) and the nnU-Net
model are reused, the temp files of writes the kill interrupted are removed first
(every write is atomic: temp file, then rename), the rest is recomputed alike
(seeded), and the leaderboard rows carry the run's ``run_id`` so they replace,
not duplicate, rows an interrupted append had already written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.data import DataSpec, materialize
from benchmarks.second_look import SecondLookStepConfig
from benchmarks.segmentation import SegmentationStepConfig
from lidc_det.atomic import write_json
from lidc_det.config import ConfigFileError, config_hash, load_yaml_config, to_plain


def default_leaderboard_dir(package_dir: Path | None = None, cwd: Path | None = None) -> Path:
    """Where ``lidc-det bench`` appends its leaderboard rows by default: ``benchmarks/results``
    of the source checkout when this package runs from one (the committed leaderboard; the
    checkout has ``setup.cfg`` and ``.git`` beside ``benchmarks/``), else ``lidc-det-leaderboard``
    in the current folder, never inside an installed package's folder (site-packages)."""
    package_dir = Path(package_dir or Path(__file__).resolve().parent)
    root = package_dir.parent
    if (root / "setup.cfg").is_file() and (root / ".git").exists():
        return package_dir / "results"
    return Path(cwd or Path.cwd()) / "lidc-det-leaderboard"


DEFAULT_LEADERBOARD_DIR = default_leaderboard_dir()


@dataclass(frozen=True)
class DetectorSpec:
    """One leaderboard entry: registry ``name``, display ``label`` and factory ``kwargs``."""

    name: str
    label: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark: data, detectors and evaluation settings (one YAML file)."""

    name: str
    data: DataSpec
    detectors: tuple[DetectorSpec, ...]
    segmentation: SegmentationStepConfig | None = None
    second_look: SecondLookStepConfig | None = None
    n_bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        labels = [d.display for d in self.detectors]
        if not labels:
            raise ConfigFileError("a benchmark needs at least one detector")
        if len(set(labels)) != len(labels):
            raise ConfigFileError(f"detector labels must be unique, got {labels}")
        if self.second_look is not None and self.segmentation is None:
            raise ConfigFileError("second_look needs a segmentation section (it rescores stage 2's candidates)")


def load_bench_config(path: Path) -> BenchConfig:
    """Read and check a benchmark YAML."""
    return load_yaml_config(BenchConfig, path)


def _amp(detector: Any, device: dict[str, Any]) -> bool:
    cfg = getattr(detector, "config", None)
    return bool(device.get("device", "").startswith("cuda") and getattr(cfg, "amp", False))


def _quiet(spec: DetectorSpec, progress: bool) -> dict[str, Any]:
    """The spec's kwargs, plus ``progress=False`` when bars are off and the factory takes it."""
    import inspect

    from stage1_detect.registry import get_detector_factory

    kwargs = dict(spec.kwargs)
    if not progress and "progress" in inspect.signature(get_detector_factory(spec.name)).parameters:
        kwargs.setdefault("progress", False)
    return kwargs


def run_bench(
    config_path: Path,
    out_dir: Path,
    *,
    leaderboard_dir: Path | None = DEFAULT_LEADERBOARD_DIR,
    only: tuple[str, ...] = (),
    progress: bool = True,
    folds: str | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark of ``config_path`` into ``out_dir``; append its rows to the
    leaderboard in ``leaderboard_dir`` (None: do not) and return the ``bench.json`` record.

    ``only`` restricts the run to detectors with these labels. ``folds="all"``: LUNA16-style
    cross-validation over every patient fold (:mod:`benchmarks.crossval`; each fold one task on
    ``scheduler``, default serial) instead of the config's one test fold.
    """
    if folds is not None:
        if folds != "all":
            raise ConfigFileError(f"--folds {folds!r}: only 'all' is supported (default: the config's test fold)")
        from benchmarks.crossval import run_cross_validation

        return run_cross_validation(config_path, out_dir, leaderboard_dir=leaderboard_dir, only=only,
                                    scheduler=scheduler or "serial", progress=progress)
    from benchmarks.detection import train_and_score
    from benchmarks.leaderboard import append_rows, froc_fields, run_id
    from lidc_det.atomic import remove_leftovers
    from lidc_det.provenance import device_info, provenance
    from stage1_detect.registry import build_detector

    cfg = load_bench_config(config_path)
    specs = [d for d in cfg.detectors if not only or d.display in only]
    if only and len(specs) != len(only):
        known = [d.display for d in cfg.detectors]
        raise ConfigFileError(f"--only {list(only)}: the config's detectors are {known}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_leftovers(out_dir, recursive=True)  # a killed run's half-written files; this run owns out_dir
    if removed:
        print(f"resuming in {out_dir}: removed {len(removed)} temp file(s) of a killed run", flush=True)
    t_start = time.perf_counter()
    plain_cfg = to_plain(cfg)
    chash = config_hash(cfg)
    rid = run_id(out_dir, chash)
    prov = provenance()

    print(f"== data ({cfg.data.label()})", flush=True)
    t0 = time.perf_counter()
    ds, split = materialize(cfg.data, out_dir, progress=progress)
    data_seconds = round(time.perf_counter() - t0, 1)
    print(f"split: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test scans", flush=True)

    rows: list[dict[str, Any]] = []
    for spec in specs:
        print(f"\n== detector {spec.display} ({spec.name})", flush=True)
        detector = build_detector({"name": spec.name, **_quiet(spec, progress)})
        run = train_and_score(
            spec.display, detector, ds, split, out_dir / spec.display,
            n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, progress=progress,
        )
        dice = cpm_rejection = cpm_second_look = None
        if cfg.segmentation is not None:
            from benchmarks.segmentation import run_segmentation_step

            seg_run = run_segmentation_step(
                ds, split, detector, list(run.detections), out_dir / spec.display / "stage2", cfg.segmentation,
                synthetic=cfg.data.synthetic, n_bootstrap=cfg.n_bootstrap, progress=progress,
                work_dir=out_dir / "stage2_model",
            )
            summary = seg_run.record["summary"]
            gt_dice = summary["gt_crop_dice_consensus"]
            dice = gt_dice["median"] if gt_dice["n"] else None
            cpm_rejection = summary.get("froc_with_rejection", {}).get("cpm")
            if cfg.second_look is not None:
                from benchmarks.second_look import run_second_look_step

                sl = run_second_look_step(ds, split, detector, seg_run, out_dir / spec.display / "second_look",
                                          cfg.second_look, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                                          progress=progress, data_dir=out_dir / "second_look_data")
                cpm_second_look = sl["test"]["arms"]["second look"]["cpm"]
        dev = device_info(str(getattr(detector, "device", "")) or None)
        dev["amp"] = _amp(detector, dev)
        row = {
            "method": spec.display,
            "detector": spec.name,
            "dataset": cfg.data.label(),
            "synthetic": cfg.data.synthetic,
            "split": f"patient folds {cfg.data.n_folds}, test fold {cfg.data.test_fold}, val fold {cfg.data.val_fold}, seed {cfg.data.seed}",
            **froc_fields(run.froc),
            "dice": dice,
            "cpm_with_rejection": cpm_rejection,
            "cpm_second_look": cpm_second_look,
            "auc": None,
            "train_seconds": run.train_seconds,
            "infer_seconds_per_scan": run.infer_seconds_per_scan,
            "device": dev,
            "git_revision": prov["git_revision"],
            "config": cfg.name,
            "config_hash": chash,
            "run_id": rid,
            "created_utc": prov["created_utc"],
        }
        rows.append(row)
        print(
            f"{spec.display}: CPM {row['cpm']:.3f} (95% CI {row['cpm_ci'][0]:.2f}-{row['cpm_ci'][1]:.2f}); "
            f"train {run.train_seconds:.0f} s, {run.infer_seconds_per_scan:.2f} s/scan",
            flush=True,
        )

    record = {
        "kind": "lidc-det bench",
        "config_path": str(config_path),
        "config": plain_cfg,
        "config_hash": chash,
        "run_id": rid,
        "provenance": prov,
        "device": device_info(),
        "split": split.to_dict(),
        "data_seconds": data_seconds,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(out_dir / "bench.json", record)
    if leaderboard_dir is not None:
        json_path, md_path = append_rows(leaderboard_dir, rows)
        print(f"\nleaderboard: {md_path} ({json_path})", flush=True)
    return record
