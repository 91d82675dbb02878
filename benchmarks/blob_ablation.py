"""Ablations of blob-lgbm's scoring (LightGBM settings, feature sets) on cached candidates.

A transfer run spends nearly all its time on candidates and features (11-15 s per scan on one
core); the LightGBM model on top trains in seconds. This script extracts (or reuses) the
candidates of every scan a transfer config trains and scores on, once, and then trains and
scores one model per *variant* on them. Each row holds the figures of ``lidc-det transfer``'s
stage 1: the twin validation and test CPM (SYNTHETIC), each semi-real yardstick's CPM, and the
rank of each real nodule with the false positives above it, under the transfer config's
protocol (:func:`benchmarks.transfer.plan_protocol`: nothing scored was trained on).

Choose among variants on figures that are not the ones you report (for example on the TCGA
yardstick, which a procedural-only config never trains on, and report the 0001 yardstick), or
the table is tuned to its test set.

Config (YAML)::

    transfer: benchmarks/transfer/twins_blob_60_br5.yaml   # data, protocol, base detector kwargs
    data_dir: runs/transfer/data_v5                         # as lidc-det transfer --data-dir
    work_dir: runs/blob_ablation/twins_blob_60              # cached features + one model per variant
    variants:
      - {name: base}
      - {name: relative-hu, kwargs: {lgbm_relative_hu: true}}

Run: ``python -m benchmarks.blob_ablation CONFIG [--out RESULT.json]``. The record holds the
config, git revision, device and wall time; a rerun reuses features and trained models.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from lidc_det.config import ConfigFileError


@dataclass(frozen=True)
class Variant:
    """One row: ``kwargs`` override the transfer config's detector kwargs (``lgbm_*`` and ``train_*``
    fields, ``seed``, ``nms_radius_factor``, ``max_detections``: the cached candidates must stay valid)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AblationConfig:
    """An ablation YAML (see the module docstring): the transfer config whose data and protocol it
    uses, where that data lies, where features and models go, and the variants."""

    transfer: Path
    data_dir: Path
    work_dir: Path
    variants: tuple[Variant, ...]
    dicom_root: Path | None = None


def load_ablation_config(path: Path) -> AblationConfig:
    """Read and check an ablation YAML (see the module docstring).

    Raises:
        ConfigFileError: a missing key, a duplicate variant name, or a variant that changes a
            candidate-defining field.
    """
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    for key in ("transfer", "data_dir", "work_dir", "variants"):
        if key not in raw:
            raise ConfigFileError(f"{path}: missing key {key!r}")
    variants = tuple(Variant(str(v["name"]), dict(v.get("kwargs") or {})) for v in raw["variants"])
    names = [v.name for v in variants]
    if not variants or len(set(names)) != len(names):
        raise ConfigFileError(f"{path}: variants need distinct names, got {names}")
    for v in variants:
        bad = sorted(k for k in v.kwargs
                     if not k.startswith(("lgbm_", "train_")) and k not in ("seed", "nms_radius_factor", "max_detections"))
        if bad:
            raise ConfigFileError(f"{path}: variant {v.name!r} changes {bad}, which define the cached candidates")
    return AblationConfig(Path(raw["transfer"]), Path(raw["data_dir"]), Path(raw["work_dir"]), variants,
                          None if raw.get("dicom_root") is None else Path(raw["dicom_root"]))


@dataclass
class _ScoredSet:
    """A set of scans scored alike: cached candidates, targets and excluded findings, scored region."""

    name: str
    candidates: list[tuple[str, Any]]  # (series uid, BlobCandidates)
    targets: list[Any]
    excluded: list[Any]
    region: str
    synthetic: bool
    dataset: Any = None  # a semi-real yardstick's prepared data set (its inserted nodules), else None
    cases: list[Any] = field(default_factory=list)  # the scans (``image_hu``, ``geometry``), in ``candidates``' order


def _collect(detector: Any, name: str, cases: list[Any], findings: tuple[list[Any], list[Any]] | None,
             region: str, synthetic: bool, cache: Path, progress: bool, dataset: Any = None) -> _ScoredSet:
    from tqdm.auto import tqdm

    from benchmarks.transfer import _findings_in

    cands, targets, excluded = [], [], []
    for case in tqdm(cases, desc=f"{name}: candidates", unit="scan", disable=not progress):
        cands.append((case.series_uid, detector.cached_candidates(case, cache)))
        if findings is None:
            t, e = case.luna_findings()
            targets += t
            excluded += e
    if findings is not None:
        targets, excluded = findings
    return _ScoredSet(name, cands, _findings_in(list(targets), region), list(excluded), region, synthetic, dataset,
                      list(cases))


@dataclass
class ScoredSets:
    """What an ablation config scores and trains on (:func:`scored_sets`).

    Attributes:
        data: the transfer config's :class:`~benchmarks.transfer.TransferData`.
        cache: the candidate cache folder (``work_dir/features``).
        train_cases, val_cases: stage 1's training scans and the twin validation scans.
        sets: twin validation, twin test and each yardstick, with their cached candidates.
        real: per real evaluation scan ``(eval scan, case, candidates, targets, irrelevant)``.
    """

    data: Any
    cache: Path
    train_cases: list[Any]
    val_cases: list[Any]
    sets: list[_ScoredSet]
    real: list[tuple[Any, Any, Any, list[Any], list[Any]]]


def scored_sets(cfg: AblationConfig, tcfg: Any, *, progress: bool = True, scheduler: str = "serial") -> ScoredSets:
    """Prepare (or reuse) the transfer config's data, and load every scored scan's cached candidates (extracted
    first in parallel unless ``scheduler`` is ``serial``; see :func:`run_ablation`).

    Raises:
        ConfigFileError: the transfer config's detector is not blob-lgbm.
    """
    from benchmarks.transfer import (
        DEFAULT_DICOM_ROOT, _real_case, _yardstick_findings, prepare_transfer_data, read_real_scan,
        warm_transfer_cache,
    )
    from stage1_detect.blob import BlobDetector

    if tcfg.detector.name != "blob-lgbm":
        raise ConfigFileError(f"{cfg.transfer}: the ablation needs a blob-lgbm detector, not {tcfg.detector.name!r}")
    data = prepare_transfer_data(tcfg, cfg.data_dir, cfg.dicom_root or DEFAULT_DICOM_ROOT, progress=progress)
    cache = cfg.work_dir / "features"
    base = BlobDetector(progress=progress, **tcfg.detector.kwargs)
    # -- every scan, loaded once: scored (twin validation and test, yardsticks, real) and training
    val_cases = [data.ds_twin.load_case(u) for u in data.split.val]
    test_cases = [data.ds_twin.load_case(u) for u in data.split.test]
    yards = [(name, ds, region, [ds.load_case(u) for u in ds.series_uids])
             for name, ds, region in [("yardstick", data.ds_yard, data.yardstick_region),
                                      *((b.name, d, b.region) for b, d in zip(tcfg.extra_yardsticks, data.ds_extra))]]
    train_cases = data.train_cases()
    if scheduler != "serial":  # the scans a transfer run reads (real ones by their worker), as the transfer warms them
        warm_transfer_cache(base, data, cache, scheduler=scheduler, progress=progress)
    sets = [
        _collect(base, "twin_val", val_cases, None, "whole", True, cache, progress),
        _collect(base, "twin_test", test_cases, None, "whole", True, cache, progress),
        *(_collect(base, name, cases, _yardstick_findings(ds), region, False, cache, progress, dataset=ds)
          for name, ds, region, cases in yards),
    ]
    real = []
    for e in data.evals:
        vol, _, tg, ir = read_real_scan(e)
        case = _real_case(vol)
        real.append((e, case, base.cached_candidates(case, cache), tg, ir))
    return ScoredSets(data, cache, train_cases, val_cases, sets, real)


def set_figures(s: _ScoredSet, dets: list[Any], n_bootstrap: int, seed: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The FROC figures of a set's detections (one per scan, restricted to ``s.region``), labelled synthetic or
    semi-real, and for a yardstick its breakdown by kind (:func:`benchmarks.yardstick_breakdown.breakdown`; else None)."""
    from benchmarks.transfer import _froc_dict
    from benchmarks.yardstick_breakdown import breakdown
    from lidc_det.metrics.froc import evaluate_detections

    froc = evaluate_detections(s.targets, dets, excluded=s.excluded, n_bootstrap=n_bootstrap, seed=seed)
    figures = {**_froc_dict(froc), ("synthetic" if s.synthetic else "semi_real"): True, "region": s.region}
    return figures, None if s.dataset is None else breakdown(s.dataset, dets, s.region, s.excluded)


def real_rank_rows(e: Any, dets: Any, targets: list[Any], irrelevant: list[Any]) -> list[dict[str, Any]]:
    """One row per real nodule of eval scan ``e``: its first-hit rank and the false positives above it in ``dets``
    (already restricted to ``e.region`` and cut to the scored candidates)."""
    from lidc_det.metrics.ranks import nodule_ranks

    return [{"patient_id": e.patient_id, "region": e.region, "diameter_mm": round(r.diameter_mm, 1), "rank": r.rank,
             "fps_above": r.fps_above, "score": None if r.score is None else round(r.score, 4)}
            for r in nodule_ranks(dets, targets, irrelevant)]


def run_ablation(config_path: Path, *, progress: bool = True, scheduler: str = "serial") -> dict[str, Any]:
    """Extract (or reuse) the candidates of the transfer config's scans and score every variant.
    With a ``scheduler`` other than ``serial`` (``local:N`` or a Dask address) the candidates of every scan, scored
    and training, are first extracted in parallel (:func:`benchmarks.transfer.warm_transfer_cache`).
    Returns the record (see :func:`main` for where it is written)."""
    from benchmarks.transfer import _restrict, load_transfer_config
    from lidc_det.config import to_plain
    from lidc_det.metrics.ranks import score_at_sensitivity
    from lidc_det.provenance import device_info, provenance
    from stage1_detect.blob import BlobDetector

    t_start = time.perf_counter()
    cfg = load_ablation_config(config_path)
    tcfg = load_transfer_config(cfg.transfer)
    sc = scored_sets(cfg, tcfg, progress=progress, scheduler=scheduler)
    train_cases, val_cases, sets = sc.train_cases, sc.val_cases, sc.sets
    real = [(e, cand, tg, ir) for e, _case, cand, tg, ir in sc.real]

    # -- one model per variant
    rows: list[dict[str, Any]] = []
    for v in cfg.variants:
        t0 = time.perf_counter()
        det = BlobDetector(progress=False, **{**tcfg.detector.kwargs, **v.kwargs})
        meta = det.fit(train_cases, val_cases, cfg.work_dir / "models" / v.name, cache_dir=sc.cache)
        row: dict[str, Any] = {"name": v.name, "kwargs": v.kwargs, "n_candidates": meta["n_candidates"],
                               "n_positive_candidates": meta["n_positive_candidates"]}
        for s in sets:
            dets = [_restrict(det.score_candidates(c, series_uid=uid), s.region) for uid, c in s.candidates]
            row[s.name], kinds = set_figures(s, dets, tcfg.n_bootstrap, tcfg.seed)
            if kinds is not None:
                row[s.name]["by_kind"] = kinds["summary"]
            if s.name == "twin_val":
                thr, reached = score_at_sensitivity(dets, s.targets, tcfg.operating_sensitivity)
                row["operating_point"] = {"threshold": None if thr is None else round(thr, 4),
                                          "twin_val_sensitivity_reached": round(reached, 3)}
        row["real"] = []
        for e, cand, tg, ir in real:
            d = _restrict(det.score_candidates(cand, series_uid=e.series_uid), e.region).top_k(100)
            row["real"] += real_rank_rows(e, d, tg, ir)
        row["top_features"] = dict(list(det.feature_importance().items())[:8])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(_row_text(row, sets), flush=True)
    return {
        "kind": "lidc-det blob-lgbm ablation",
        "config_path": str(config_path),
        "config": {"transfer": str(cfg.transfer), "data_dir": str(cfg.data_dir), "work_dir": str(cfg.work_dir),
                   "variants": [{"name": v.name, "kwargs": v.kwargs} for v in cfg.variants], "scheduler": scheduler},
        "transfer_config": to_plain(tcfg),
        "protocol": sc.data.protocol,
        "provenance": provenance(),
        "device": device_info("cpu"),
        "sets": [{"name": s.name, "n_scans": len(s.candidates), "n_nodules": len(s.targets), "region": s.region,
                  "synthetic": s.synthetic} for s in sets],
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def _row_text(row: dict[str, Any], sets: list[_ScoredSet]) -> str:
    cells = [f"{s.name} {row[s.name]['cpm']:.3f}" for s in sets]
    ranks = ", ".join(f"{r['patient_id']} {r['rank']}({r['fps_above']})" for r in row["real"])
    return f"[ablation] {row['name']}: " + " | ".join(cells) + f" | real {ranks} | {row['seconds']:.0f} s"


def table(record: dict[str, Any]) -> str:
    """Markdown table of an ablation record: one row per variant."""
    names = [s["name"] for s in record["sets"]]
    head = ["variant", "kwargs"] + [
        f"{n} CPM ({s['n_nodules']}{', SYNTHETIC' if s['synthetic'] else ''})" for n, s in zip(names, record["sets"])
    ] + ["real nodule rank (FPs above)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["rows"]:
        ranks = ", ".join(f"{x['patient_id']} {x['rank']} ({x['fps_above']})" for x in r["real"])
        kw = ", ".join(f"{k}: {v}" for k, v in r["kwargs"].items()) or "-"
        lines.append("| " + " | ".join([r["name"], kw] + [f"{r[n]['cpm']:.3f}" for n in names] + [ranks]) + " |")
    return "\n".join(lines)


def kinds_table(record: dict[str, Any]) -> str:
    """Markdown table of the yardsticks' nodules found by kind (:mod:`benchmarks.yardstick_breakdown`), one row
    per variant and yardstick; empty for records written before ``by_kind`` existed."""
    from benchmarks.yardstick_breakdown import summary_markdown

    named = [(f"{r['name']}: {s['name']}", {"summary": r[s["name"]]["by_kind"]})
             for r in record["rows"] for s in record["sets"] if "by_kind" in r[s["name"]]]
    return summary_markdown(named) if named else ""


def main(argv: list[str] | None = None) -> int:
    from lidc_det.atomic import write_json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.blob_ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="ablation YAML")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: <work_dir>/ablation.json)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--scheduler", default="serial",
                    help="extract the scans' candidates first as parallel tasks: local:N (N processes) or a Dask "
                         "address; serial (default): one after the other while scoring")
    args = ap.parse_args(argv)
    rec = run_ablation(args.config, progress=not args.no_progress, scheduler=args.scheduler)
    out = args.out or Path(rec["config"]["work_dir"]) / "ablation.json"
    write_json(out, rec)
    print(table(rec))
    print("\nSYNTHETIC nodules on real backgrounds, by kind:\n" + kinds_table(rec))
    print(f"[ablation] wrote {out} ({rec['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
