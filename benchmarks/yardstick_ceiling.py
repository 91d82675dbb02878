"""How far blob-lgbm's candidates and features can go on one semi-real background: a DIAGNOSTIC.

The transfer targets ask for a semi-real yardstick CPM >= 0.80 from a detector that never saw the
yardstick's background. When round after round of training changes leaves it near 0.6, one question
decides what to change next: is it the *training data* (the detector has not seen real structures
like the background's) or the *candidates and features* (no model on them can tell the inserted
nodules from the background's real structures)?

This script answers it by breaking the protocol on purpose, in a record labelled so: it trains the
variant's LightGBM on the yardstick's own real background and scores the yardstick's copies. Fold by
fold over the copies (held-out detections pooled into one FROC), the model of each fold trains on

* ``background``: the other copies only;
* ``twins+background``: the variant's own training scans (the transfer protocol's) plus the other copies;

and, without folds (one model scores every copy):

* ``dense``: ``--dense-copies`` new copies of the same background (same region and placement rules) filled
  with nodules of the config's *training* patients, so none is a yardstick nodule: many positives of every
  kind on the very background scored, which the copies themselves (about 5 nodules each) cannot give;
* ``twins+dense``: the variant's training scans plus those copies.

If even these reach well below 0.80, the candidates and features are the ceiling and no change of
procedural training data can reach the target; if they reach it, training data is the lever. The
inserted nodules differ between copies (the record counts held-out ones also inserted into a
training copy), but the background's real structures are the same in every copy: that is the
point, and why no figure of this script is a transfer result.

Run: ``python -m benchmarks.yardstick_ceiling ABLATION_CONFIG --variant rm-jp-wb [--set yardstick]
[--folds 4] [--mode dense --dense-copies 24] [--scheduler local:2] [--out RESULT.json]``. It reads the ablation's cached candidates (run
:mod:`benchmarks.blob_ablation` first) and writes models under ``<work_dir>/ceiling/``. The record
holds the config, git revision, device and wall time.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lidc_det.config import ConfigFileError

MODES = ("background", "twins+background", "dense", "twins+dense")


def copy_folds(series_uids: list[str], n_folds: int, seed: int = 0) -> list[list[str]]:
    """The held-out copies of each fold: ``series_uids`` (sorted first) shuffled with ``seed`` and dealt into
    ``n_folds`` folds (2 <= n_folds <= number of copies)."""
    from sklearn.model_selection import KFold

    uids = sorted(series_uids)
    if not 2 <= n_folds <= len(uids):
        raise ConfigFileError(f"--folds must be between 2 and the {len(uids)} copies, got {n_folds}")
    return [[uids[i] for i in test] for _, test in KFold(n_folds, shuffle=True, random_state=seed).split(uids)]


def shared_sources(sources: dict[str, set[Any]], folds: list[list[str]]) -> int:
    """How many held-out inserted nodules (``sources``: the reader annotations inserted into each copy) were
    also inserted into a training copy of the same fold: positives the fold's model has seen."""
    n = 0
    for held in folds:
        seen = set().union(*(a for u, a in sources.items() if u not in held))
        n += sum(len(sources[u] & seen) for u in held)
    return n


def training_plan(mode: str, copies: dict[str, Any], folds: list[list[str]], twins: list[Any],
                  dense: list[Any]) -> list[tuple[list[str], list[Any]]]:
    """``(held-out copy UIDs, training scans)`` of each model of ``mode`` (:data:`MODES`): one per fold for the
    ``background`` modes (the other copies), one scoring every copy for the ``dense`` modes (the dense copies, never
    a yardstick copy); the ``twins+`` modes add ``twins``. ``copies``: the yardstick's cases by series UID."""
    if mode not in MODES:
        raise ConfigFileError(f"mode must be one of {MODES}, got {mode!r}")
    extra = list(twins) if mode.startswith("twins+") else []
    if mode.endswith("dense"):
        return [(list(copies), list(dense) + extra)]
    return [(held, [c for u, c in copies.items() if u not in held] + extra) for held in folds]


def run_ceiling(config_path: Path, variant: str, *, set_name: str = "yardstick", n_folds: int = 4,
                modes: tuple[str, ...] = MODES[:2], dense_copies: int = 24, progress: bool = True,
                scheduler: str = "serial") -> dict[str, Any]:
    """Train and score every mode (see the module docstring); return the record. ``dense_copies``: how many copies
    of the background the ``dense`` modes make. With a ``scheduler`` other than ``serial`` the candidates of every
    scan needed are first extracted in parallel (:func:`stage1_detect.blob.warm_candidate_cache`)."""
    from benchmarks.blob_ablation import load_ablation_config
    from benchmarks.transfer import (
        DEFAULT_DICOM_ROOT, _cached_predict, _findings_in, _froc_dict, _restrict, _yardstick_findings,
        load_transfer_config, prepare_transfer_data,
    )
    from benchmarks.yardstick_breakdown import breakdown, detection_rows, inserted_nodules
    from lidc_det.metrics.froc import evaluate_detections
    from lidc_det.provenance import device_info, provenance
    from stage1_detect.blob import BlobDetector, warm_candidate_cache

    t_start = time.perf_counter()
    cfg = load_ablation_config(config_path)
    by_name = {v.name: v for v in cfg.variants}
    if variant not in by_name:
        raise ConfigFileError(f"{config_path}: no variant {variant!r} (have {sorted(by_name)})")
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ConfigFileError(f"modes must be among {MODES}, got {list(modes)}")
    tcfg = load_transfer_config(cfg.transfer)
    data = prepare_transfer_data(tcfg, cfg.data_dir, cfg.dicom_root or DEFAULT_DICOM_ROOT, progress=progress)
    specs = [tcfg.yardstick, *tcfg.extra_yardsticks]
    yards = {"yardstick": (data.ds_yard, data.yardstick_region, specs[0]),
             **{b.name: (d, b.region, b) for b, d in zip(tcfg.extra_yardsticks, data.ds_extra)}}
    if set_name not in yards:
        raise ConfigFileError(f"{config_path}: no yardstick {set_name!r} (have {sorted(yards)})")
    ds, region, spec = yards[set_name]
    kwargs = {**tcfg.detector.kwargs, **by_name[variant].kwargs}
    cache = cfg.work_dir / "features"
    copies = {u: ds.load_case(u) for u in ds.series_uids}
    targets, excluded = _yardstick_findings(ds)
    targets = _findings_in(targets, region)
    sources = {u: {n["inserted"].get("annotation_id") for n in inserted_nodules(ds, u, "whole")} - {None}
               for u in copies}
    twins = data.train_cases() if any(m.startswith("twins+") for m in modes) else []
    dense = _dense_copies(tcfg, spec, dense_copies, cfg.work_dir, progress) if any("dense" in m for m in modes) else []
    folds = copy_folds(list(copies), n_folds)
    if scheduler != "serial":
        warm_candidate_cache(kwargs, [*copies.values(), *twins, *dense], cache, scheduler=scheduler, progress=progress)

    rows: dict[str, Any] = {}
    for mode in modes:
        t0 = time.perf_counter()
        dets: dict[str, Any] = {}
        models = training_plan(mode, copies, folds, twins, dense)
        for k, (held, train) in enumerate(models):
            det = BlobDetector(progress=False, **kwargs)
            det.fit(train, [], cfg.work_dir / "ceiling" / f"{variant}-{set_name}" / mode.replace("+", "_") / f"fold{k}",
                    cache_dir=cache)
            for u in held:
                dets[u] = _restrict(_cached_predict(det, copies[u], cache), region)
            if progress:
                print(f"[ceiling] {mode} model {k + 1}/{len(models)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        ordered = [dets[u] for u in ds.series_uids]
        froc = evaluate_detections(targets, ordered, excluded=excluded, n_bootstrap=tcfg.n_bootstrap, seed=tcfg.seed)
        kinds = breakdown(ds, ordered, region, excluded)
        scans = [(u, inserted_nodules(ds, u, region)) for u in ds.series_uids]
        late = [asdict(r) for r in detection_rows(ordered, scans, excluded)
                if r.fp_per_scan_above is None or r.fp_per_scan_above >= 1]
        rows[mode] = {**_froc_dict(froc), "n_models": len(models), "by_kind": kinds["summary"],
                      "fp_groups": kinds["fp_groups"], "not_found_below_1fp": late,
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[ceiling] {mode}: CPM {rows[mode]['cpm']:.3f} {rows[mode]['sensitivity']}", flush=True)
    return {
        "kind": "lidc-det blob-lgbm yardstick ceiling",
        "diagnostic": "DIAGNOSTIC, not a transfer result: the models are trained on the scored background (other "
                      "copies of it, or copies with other nodules; SYNTHETIC nodules on real CT), against the rule of "
                      "never scoring a trained region",
        "config_path": str(config_path),
        "variant": {"name": variant, "kwargs": by_name[variant].kwargs},
        "set": {"name": set_name, "region": region, "n_copies": len(copies), "n_nodules": len(targets)},
        "folds": folds,
        # the fold modes only (the dense copies hold nodules of the training patients, none of the yardstick's)
        "shared_source_nodules": shared_sources(sources, folds) if any("background" in m for m in modes) else None,
        "n_twin_training_scans": len(twins),
        "n_dense_copies": len(dense),
        "rows": rows,
        "provenance": provenance(),
        "device": device_info("cpu"),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def _dense_copies(tcfg: Any, spec: Any, n: int, work_dir: Path, progress: bool) -> list[Any]:
    """``n`` more copies of the yardstick's background (``spec``: its
    :class:`~benchmarks.transfer.BackgroundSpec`, same region and placement), filled with nodules of the config's
    training patients (``train_sources``, none of the yardstick's), made under ``work_dir/ceiling/dense`` (reused
    when there): the ``dense`` modes' training scans."""
    from dataclasses import replace

    from lidc_det.synthetic.semireal import make_semireal_dataset

    if tcfg.train_sources is None:
        raise ConfigFileError(f"{tcfg.name}: the dense modes need train_sources (the nodules to insert)")
    if n < 1:
        raise ConfigFileError(f"--dense-copies must be >= 1, got {n}")
    dense = replace(spec, name=f"{spec.name}-dense", copies=n)
    ds = make_semireal_dataset([dense.semireal(tcfg.train_sources, tcfg.seed + 3000, tcfg.twins.spacing_zyx)],
                               Path(work_dir) / "ceiling" / "dense" / dense.name, progress=progress)
    return [ds.load_case(u) for u in ds.series_uids]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.blob_ablation import load_ablation_config
    from benchmarks.yardstick_breakdown import summary_markdown
    from lidc_det.atomic import write_json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.yardstick_ceiling", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="blob ablation YAML (its cached candidates are reused)")
    ap.add_argument("--variant", required=True, help="the ablation variant whose detector kwargs are used")
    ap.add_argument("--set", default="yardstick", help="the yardstick: 'yardstick' or an extra yardstick's name")
    ap.add_argument("--folds", type=int, default=4, help="folds over the copies (default 4)")
    ap.add_argument("--mode", choices=MODES, action="append", default=None,
                    help="training set(s), repeatable (default: background and twins+background)")
    ap.add_argument("--dense-copies", type=int, default=24, help="copies of the background the dense modes make")
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON (default: <work_dir>/ceiling/<variant>-<set>.json)")
    ap.add_argument("--scheduler", default="serial",
                    help="extract the scans' candidates first as parallel tasks: local:N or a Dask address")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    rec = run_ceiling(a.config, a.variant, set_name=a.set, n_folds=a.folds, modes=tuple(a.mode or MODES[:2]),
                      dense_copies=a.dense_copies, progress=not a.no_progress, scheduler=a.scheduler)
    out = a.out or load_ablation_config(a.config).work_dir / "ceiling" / f"{a.variant}-{a.set}.json"
    write_json(out, rec)
    print(rec["diagnostic"])
    print(summary_markdown([(f"{a.variant} {m} ({r['cpm']:.3f})", {"summary": r["by_kind"]})
                            for m, r in rec["rows"].items()]))
    print(f"[ceiling] wrote {out} ({rec['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
