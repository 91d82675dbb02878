"""The patch CNN (:mod:`stage1_detect.patch_cnn`) behind one blob-lgbm ablation variant, scored as the ablation is.

Trains (or reuses) the variant's LightGBM model on the ablation config's cached candidates, takes the top
candidates (after suppression) of every training scan, cuts labelled patches (:func:`~stage1_detect.patch_cnn.
training_patches`), trains the CNN, and scores every set the ablation scores (twin validation and test, SYNTHETIC;
each semi-real yardstick, SYNTHETIC nodules on real CT; each real nodule's rank) five ways on the same candidates:
the detector's score, the CNN's probability alone, and their product (what :meth:`PatchRescorer.rescore` gives),
the last two also with flip test-time augmentation (``+flips``).
The CNN trains on exactly the detector's training scans, so the transfer config's protocol holds for it too.

Run::

    python -m benchmarks.patch_rescore benchmarks/blob_ablation/insert_blob_mirror24_jp_rm_wb.yaml \\
        --variant rm-jp-wb-real24 [--cnn patch_cnn.yaml] [--out RESULT.json]

``--cnn``: a YAML of :class:`~stage1_detect.patch_cnn.PatchCNNConfig` fields (default: its defaults); given more
than once, each CNN is trained and their probabilities are averaged (an ensemble, e.g. of seeds). Each trained CNN
is kept under ``<work_dir>/patch_cnn/<variant>/<key>/`` (a rerun reuses it). The record holds the configs, git
revision, device and wall time.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.config import ConfigFileError

SCORINGS = ("detector", "cnn", "product", "cnn+flips", "product+flips", "mean+flips")


def load_cnn_config(path: Path | None) -> Any:
    """A :class:`~stage1_detect.patch_cnn.PatchCNNConfig` from a YAML of its fields (None: the defaults).

    Raises:
        ConfigFileError: an unknown field.
    """
    import yaml

    from lidc_det.errors import ConfigError
    from stage1_detect.blob_cnn import cnn_config

    try:
        return cnn_config(None if path is None else yaml.safe_load(Path(path).read_text()))
    except ConfigError as err:
        raise ConfigFileError(f"{path}: {err}") from err


def _with_scores(dets: Any, scores: np.ndarray) -> Any:
    from lidc_det.results import Detections

    return Detections(dets.series_uid, dets.centers_xyz_mm, dets.diameters_mm, scores)


def scorings(dets: Any, prob: np.ndarray, prob_flips: np.ndarray) -> dict[str, Any]:
    """The same candidates scored the ways of :data:`SCORINGS` (``prob``, ``prob_flips``: the CNN's, one per
    candidate, without and with flip test-time augmentation): the detector's score, the CNN's probability, their
    product, and (``mean+flips``) their mean, which keeps a candidate that either scores high."""
    return {"detector": dets, "cnn": _with_scores(dets, prob), "product": _with_scores(dets, dets.scores * prob),
            "cnn+flips": _with_scores(dets, prob_flips), "product+flips": _with_scores(dets, dets.scores * prob_flips),
            "mean+flips": _with_scores(dets, (dets.scores + prob_flips) / 2)}


def _probs(rescorers: list[Any], hu: np.ndarray, geometry: Any, dets: Any) -> list[np.ndarray]:
    """The ensemble's mean probability for each candidate of ``dets``, without and with flips."""
    from stage1_detect.blob_cnn import ensemble_probabilities

    return ensemble_probabilities(rescorers, hu, geometry, dets.centers_xyz_mm, flips=(False, True))


def run_patch_rescore(config_path: Path, variant: str, *, cnn_configs: list[Path] | None = None, progress: bool = True,
                      scheduler: str = "serial", score_top: int | None = None) -> dict[str, Any]:
    """Train and score (see the module docstring); return the record. With several ``cnn_configs`` each CNN is
    trained (or reused) and their probabilities are averaged (an ensemble, e.g. of seeds). ``score_top``: how many
    of the detector's best candidates per scan are scored (default: its ``max_detections``, 100); the CNNs always
    train on the candidates of the detector's own setting, so a rerun with another ``score_top`` reuses them."""
    from tqdm.auto import tqdm

    from benchmarks.blob_ablation import load_ablation_config, real_rank_rows, scored_sets, set_figures
    from benchmarks.transfer import _restrict, load_transfer_config
    from lidc_det.config import to_plain
    from lidc_det.provenance import device_info, provenance
    from stage1_detect.blob import BlobDetector
    from stage1_detect.blob_cnn import cnn_key, train_cnn

    t_start = time.perf_counter()
    if score_top is not None and score_top < 1:
        raise ConfigFileError(f"score_top must be >= 1, got {score_top}")
    cfg = load_ablation_config(config_path)
    by_name = {v.name: v for v in cfg.variants}
    if variant not in by_name:
        raise ConfigFileError(f"{config_path}: no variant {variant!r} (have {sorted(by_name)})")
    paths: list[Path | None] = list(cnn_configs) if cnn_configs else [None]
    ccfgs = [load_cnn_config(p) for p in paths]
    tcfg = load_transfer_config(cfg.transfer)
    sc = scored_sets(cfg, tcfg, progress=progress, scheduler=scheduler)
    det = BlobDetector(progress=progress, **{**tcfg.detector.kwargs, **by_name[variant].kwargs})
    det.fit(sc.train_cases, sc.val_cases, cfg.work_dir / "models" / variant, cache_dir=sc.cache)

    # -- training patches and each CNN, kept under a key of everything they depend on
    rescorers, members = [], []
    for path, ccfg in zip(paths, ccfgs):
        folder = cfg.work_dir / "patch_cnn" / variant / cnn_key(det, ccfg)
        t0 = time.perf_counter()
        rescorer = train_cnn(det, sc.train_cases, sc.cache, ccfg, folder / "patch_cnn.pt", progress=progress)
        rescorers.append(rescorer)
        members.append({"config_path": None if path is None else str(path), "config": asdict(ccfg), "folder": str(folder),
                        "training": {k: v for k, v in rescorer.meta.items() if k != "train_series_uids"},
                        "train_seconds_this_run": round(time.perf_counter() - t0, 1)})

    # -- every scored set, each scoring on the same candidates
    rows: dict[str, dict[str, Any]] = {s: {} for s in SCORINGS}
    nodules: dict[str, list[dict[str, Any]]] = {}
    for s in sc.sets:
        by: dict[str, list[Any]] = {k: [] for k in SCORINGS}
        for (uid, cand), case in tqdm(list(zip(s.candidates, s.cases)), desc=f"{s.name}: patch CNN", unit="scan",
                                      disable=not progress):
            dets = det.score_candidates(cand, series_uid=uid, top=score_top)
            for k, d in scorings(dets, *_probs(rescorers, case.image_hu, case.geometry, dets)).items():
                by[k].append(_restrict(d, s.region))
        for k in SCORINGS:
            rows[k][s.name], kinds = set_figures(s, by[k], tcfg.n_bootstrap, tcfg.seed)
            if kinds is not None:
                rows[k][s.name]["by_kind"] = kinds["summary"]
                rows[k][s.name]["fp_groups"] = kinds["fp_groups"]
        if s.dataset is not None:
            nodules[s.name] = nodule_table(s, by)
    for k in SCORINGS:
        rows[k]["real"] = []
    for e, case, cand, tg, ir in sc.real:
        dets = _restrict(det.score_candidates(cand, series_uid=e.series_uid, top=score_top), e.region)
        for k, d in scorings(dets, *_probs(rescorers, case.image_hu, case.geometry, dets)).items():
            rows[k]["real"] += real_rank_rows(e, d.top_k(100), tg, ir)
    for k in SCORINGS:
        print(_row_text(k, rows[k], [s.name for s in sc.sets]), flush=True)
    return {
        "kind": "lidc-det patch-CNN rescoring of blob-lgbm",
        "config_path": str(config_path),
        "variant": {"name": variant, "kwargs": by_name[variant].kwargs},
        "score_top": score_top or det.config.max_detections,  # candidates scored per scan
        # one entry per CNN; several are an ensemble (their probabilities averaged)
        "cnns": members,
        "transfer_config": to_plain(tcfg),
        "protocol": sc.data.protocol,
        "sets": [{"name": s.name, "n_scans": len(s.candidates), "n_nodules": len(s.targets), "region": s.region,
                  "synthetic": s.synthetic} for s in sc.sets],
        "rows": rows,
        # per inserted nodule of each yardstick: false positives per scan above it under each scoring
        "nodules": nodules,
        "provenance": provenance(),
        "device": device_info("cpu"),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def nodule_table(s: Any, by: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One row per inserted nodule of the yardstick ``s`` (a :class:`benchmarks.blob_ablation._ScoredSet` with its
    data set): what the insertion recorded and, under each scoring of ``by`` (its detections per scan, in
    ``s.candidates``' order), the best score of a detection on it and the set's false positives per scan above that
    (None: no scored candidate hits it). Where the CNN and the detector disagree about a nodule shows here."""
    from benchmarks.yardstick_breakdown import detection_rows, inserted_nodules

    scans = [(uid, inserted_nodules(s.dataset, uid, s.region)) for uid, _ in s.candidates]
    per = {k: detection_rows(dets, scans, s.excluded) for k, dets in by.items()}
    first = next(iter(per.values()))
    return [{"series_uid": r.series_uid, "diameter_mm": r.diameter_mm, "texture": r.texture, "placement": r.placement,
             "score": {k: per[k][i].score for k in per},
             "fp_per_scan_above": {k: per[k][i].fp_per_scan_above for k in per}} for i, r in enumerate(first)]


def _row_text(scoring: str, row: dict[str, Any], names: list[str]) -> str:
    cells = [f"{n} {row[n]['cpm']:.3f}" for n in names]
    ranks = ", ".join(f"{r['patient_id']} {r['rank']}({r['fps_above']})" for r in row["real"])
    return f"[patch-cnn] {scoring}: " + " | ".join(cells) + f" | real {ranks}"


def table(record: dict[str, Any]) -> str:
    """Markdown table of a record: one row per scoring."""
    sets = record["sets"]
    head = ["scoring"] + [f"{s['name']} CPM ({s['n_nodules']}{', SYNTHETIC' if s['synthetic'] else ''})" for s in sets] + [
        "real nodule rank (FPs above)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, row in record["rows"].items():
        ranks = ", ".join(f"{x['patient_id']} {x['rank']} ({x['fps_above']})" for x in row["real"])
        lines.append("| " + " | ".join([k] + [f"{row[s['name']]['cpm']:.3f}" for s in sets] + [ranks]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lidc_det.atomic import write_json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.patch_rescore", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="blob-lgbm ablation YAML (benchmarks/blob_ablation/)")
    ap.add_argument("--variant", required=True, help="the ablation variant whose LightGBM model proposes candidates")
    ap.add_argument("--cnn", type=Path, action="append", default=None,
                    help="YAML of PatchCNNConfig fields (default: its defaults); give it again for an ensemble whose "
                         "probabilities are averaged (e.g. two seeds)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: <first CNN's folder>/patch_rescore.json)")
    ap.add_argument("--scheduler", default="serial", help="extract missing candidates first: local:N or a Dask address")
    ap.add_argument("--score-top", type=int, default=None,
                    help="score the detector's best K candidates per scan (default: its max_detections, 100)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    rec = run_patch_rescore(args.config, args.variant, cnn_configs=args.cnn, progress=not args.no_progress,
                            scheduler=args.scheduler, score_top=args.score_top)
    out = args.out or Path(rec["cnns"][0]["folder"]) / "patch_rescore.json"
    write_json(out, rec)
    print(table(rec))
    print(f"[patch-cnn] wrote {out} ({rec['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
