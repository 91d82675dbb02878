"""Config loading, leaderboard rows and rendering, data split checks, and (slow) the smoke benchmark."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from benchmarks.data import DataSpec, Split, split_dataset
from benchmarks.harness import BenchConfig, load_bench_config
from benchmarks.leaderboard import ROW_KEYS, LeaderboardError, append_rows, froc_fields, read_rows, render_markdown
from lidc_det.config import ConfigFileError, config_hash, from_mapping, load_yaml_config, to_plain
from lidc_det.data.luna import LunaFinding
from lidc_det.errors import DatasetError
from lidc_det.metrics.froc import evaluate_detections
from lidc_det.results import Detections

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class _Inner:
    a: int
    b: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class _Outer:
    name: str
    inner: _Inner
    path: Path | None = None
    items: tuple[str, ...] = ()
    extra: dict[str, int] = field(default_factory=dict)


def test_from_mapping_builds_nested_types() -> None:
    cfg = from_mapping(_Outer, {"name": "x", "inner": {"a": 3, "b": [2, 5]}, "path": "/tmp/p", "items": ["u", "v"]})
    assert cfg.inner == _Inner(3, (2.0, 5.0))
    assert isinstance(cfg.inner.b[0], float)
    assert cfg.path == Path("/tmp/p")
    assert cfg.items == ("u", "v")
    assert to_plain(cfg) == {"name": "x", "inner": {"a": 3, "b": [2.0, 5.0]}, "path": "/tmp/p", "items": ["u", "v"], "extra": {}}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "inner": {"a": 1}, "typo": 1}, "unknown keys ['typo']"),
        ({"name": "x"}, "missing keys ['inner']"),
        ({"name": "x", "inner": {"a": "one"}}, "expected int"),
        ({"name": "x", "inner": {"a": 1, "b": [1, 2, 3]}}, "expected 2 values"),
        ({"name": "x", "inner": [1]}, "expected a mapping"),
    ],
)
def test_from_mapping_rejects_bad_configs(data: dict, message: str) -> None:
    with pytest.raises(ConfigFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_mapping(_Outer, data, "cfg.yaml")


def test_config_hash_changes_with_content_only() -> None:
    a = _Outer("x", _Inner(1))
    assert config_hash(a) == config_hash(_Outer("x", _Inner(1)))
    assert config_hash(a) != config_hash(_Outer("x", _Inner(2)))
    assert len(config_hash(a)) == 12


def test_load_yaml_config_reports_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="no such config file"):
        load_yaml_config(_Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigFileError, match="not valid YAML"):
        load_yaml_config(_Outer, bad)


@pytest.mark.parametrize("name", ["smoke.yaml", "cpu.yaml", "full.yaml", "demo.yaml", "demo_gpu.yaml"])
def test_shipped_benchmark_configs_load(name: str) -> None:
    path = REPO / "benchmarks" / name
    if name == "demo.yaml":
        from benchmarks.demo import load_demo_config

        cfg = load_demo_config(path)
        assert cfg.data.synthetic and len(cfg.data.series_uids) >= cfg.data.n_folds
        seg = cfg.segmentation
        assert seg is not None and seg.segmenter.train.optimizer == "adamw"
        assert seg.segmenter.plan_base_features == 8 and seg.segmenter.crop.size_mm == 32.0
    elif name == "demo_gpu.yaml":
        from benchmarks.demo import load_demo_config

        cfg = load_demo_config(path)
        assert cfg.data.n_scans >= 6 * cfg.data.n_folds
        assert cfg.segmentation is not None and cfg.segmentation.segmenter.train.device == "cuda"
    else:
        cfg = load_bench_config(path)
        assert cfg.detectors and cfg.data.n_folds >= 3


def test_data_spec_checks() -> None:
    with pytest.raises(DatasetError, match="needs series_uids"):
        DataSpec(source="twin")
    with pytest.raises(DatasetError, match="needs dicom_root"):
        DataSpec(source="dicom")
    with pytest.raises(DatasetError, match="must differ"):
        DataSpec(series_uids=("1.2",), test_fold=1, val_fold=1)
    with pytest.raises(DatasetError, match=">= 3"):
        DataSpec(series_uids=("1.2",), n_folds=2)


def test_bench_config_needs_unique_labels() -> None:
    with pytest.raises(ConfigFileError, match="unique"):
        from_mapping(
            BenchConfig,
            {"name": "b", "data": {"series_uids": ["1.2"]}, "detectors": [{"name": "retina3d"}, {"name": "retina3d"}]},
        )


class _FakeDataset:
    """The part of PreparedDataset that split_dataset uses."""

    def __init__(self, folds: dict[str, int]) -> None:
        self.root = Path("fake")
        self._folds = folds
        self.info = {"n_folds": max(folds.values()) + 1}

    @property
    def series_uids(self) -> list[str]:
        return list(self._folds)

    def scans_in_folds(self, folds: list[int]) -> list[str]:
        return [u for u, f in self._folds.items() if f in folds]


def test_split_dataset_uses_folds_and_keeps_roles_apart() -> None:
    ds = _FakeDataset({"a": 0, "b": 1, "c": 2, "d": 2, "e": 0})
    split = split_dataset(ds, DataSpec(series_uids=("x",), n_folds=3, test_fold=0, val_fold=1))
    assert split == Split(train=("c", "d"), val=("b",), test=("a", "e"))
    assert split.role("a") == "test" and split.role("b") == "val" and split.role("d") == "train"
    with pytest.raises(DatasetError, match="needs >= 3 patients"):
        split_dataset(_FakeDataset({"a": 0, "b": 1}), DataSpec(series_uids=("x",)))


def _row(method: str, cpm_scale: float) -> dict:
    anns = [LunaFinding("s1", (0.0, 0.0, 0.0), 10.0), LunaFinding("s2", (50.0, 0.0, 0.0), 8.0)]
    dets = [
        Detections("s1", np.array([[1.0, 0.0, 0.0], [40.0, 40.0, 40.0]]), np.array([10.0, 5.0]), np.array([0.9, 0.8])),
        Detections("s2", np.array([[90.0, 0.0, 0.0]]), np.array([5.0]), np.array([0.7 * cpm_scale])),
    ]
    froc = evaluate_detections(anns, dets, n_bootstrap=50, seed=0)
    row = {
        "method": method, "dataset": "LIDC twin (synthetic) test", "synthetic": True, "split": "folds 3",
        **froc_fields(froc), "train_seconds": 1.0, "infer_seconds_per_scan": 0.5,
        "device": {"device": "cpu", "device_name": "x86_64"}, "git_revision": "abc", "config": "t",
        "config_hash": "0123456789ab", "created_utc": "2026-11-23T00:00:00+00:00",
    }
    assert set(ROW_KEYS) <= set(row)
    return row


def test_froc_fields_from_a_hand_example() -> None:
    row = _row("m", 1.0)
    # s1: the 0.9 candidate hits the nodule; 0.8 is a FP; s2: 0.7 misses -> 1 of 2 nodules found,
    # at 1.0 FP/scan (2 FPs over 2 scans) and beyond, 0.5 sensitivity; below 1 FP/scan only the hit.
    assert row["n_test_scans"] == 2 and row["n_test_nodules"] == 2
    assert row["sensitivity"][-1] == pytest.approx(0.5)
    assert len(row["sensitivity"]) == 7 and len(row["sensitivity_ci"]) == 7


def test_append_rows_accumulates_and_renders(tmp_path: Path) -> None:
    append_rows(tmp_path, [_row("first", 1.0)])
    json_path, md_path = append_rows(tmp_path, [_row("second", 1.0)])
    rows = read_rows(json_path)
    assert [r["method"] for r in rows] == ["first", "second"]
    md = md_path.read_text()
    assert "| first |" in md and "| second |" in md and "synthetic" in md
    with pytest.raises(LeaderboardError, match="lacks"):
        append_rows(tmp_path, [{"method": "broken"}])
    assert len(read_rows(json_path)) == 2  # the bad row was not written
    json_path.write_text("{not json")
    with pytest.raises(LeaderboardError, match="not valid JSON"):
        read_rows(json_path)


def test_render_markdown_sorts_by_cpm_within_a_dataset() -> None:
    low, high = _row("low", 1.0), _row("high", 1.0)
    high["cpm"], low["cpm"] = 0.9, 0.1
    md = render_markdown([low, high])
    assert md.index("| high |") < md.index("| low |")


@pytest.mark.slow
def test_smoke_benchmark_end_to_end(tmp_path: Path) -> None:
    """The shipped smoke config through the CLI: twin -> prepare -> train -> detect -> FROC -> leaderboard."""
    from lidc_det.cli import main

    out, board = tmp_path / "run", tmp_path / "board"
    rc = main(["bench", str(REPO / "benchmarks" / "smoke.yaml"), "--out", str(out), "--leaderboard-dir", str(board), "--no-progress"])
    assert rc == 0
    record = json.loads((out / "bench.json").read_text())
    rows = read_rows(board / "leaderboard.json")
    cfg = load_bench_config(REPO / "benchmarks" / "smoke.yaml")
    assert [r["method"] for r in rows] == [d.display for d in cfg.detectors]
    for r in rows:
        assert r["synthetic"] is True and "synthetic" in r["dataset"]
        assert 0.0 <= r["cpm"] <= 1.0 and r["n_test_scans"] == len(record["split"]["test"])
        assert r["config_hash"] == record["config_hash"] and r["train_seconds"] > 0
        assert (out / r["method"] / "froc" / "froc.png").is_file()
        # stage 2 ran on this detector's candidates with the one shared segmenter
        assert r["dice"] is not None and 0.0 <= r["dice"] <= 1.0
        assert r["cpm_with_rejection"] is not None and 0.0 <= r["cpm_with_rejection"] <= 1.0
        assert (out / r["method"] / "stage2" / "stage2.json").is_file()
    assert len(list((out / "stage2_model" / "nnunet" / "nnUNet_results").glob("*/*/fold_0/checkpoint_final.pth"))) == 1
    assert set(record["split"]["test"]).isdisjoint(record["split"]["train"])


def test_default_leaderboard_is_never_inside_an_installed_package(tmp_path: Path) -> None:
    from benchmarks.harness import DEFAULT_LEADERBOARD_DIR, default_leaderboard_dir

    installed = tmp_path / "site-packages" / "benchmarks"
    installed.mkdir(parents=True)
    assert default_leaderboard_dir(installed, cwd=tmp_path / "work") == tmp_path / "work" / "lidc-det-leaderboard"
    checkout = tmp_path / "clone"
    (checkout / "benchmarks").mkdir(parents=True)
    (checkout / "setup.cfg").write_text("[metadata]\n")
    (checkout / ".git").mkdir()
    assert default_leaderboard_dir(checkout / "benchmarks") == checkout / "benchmarks" / "results"
    # this repository runs from its checkout: the committed leaderboard
    assert DEFAULT_LEADERBOARD_DIR == Path(__file__).resolve().parents[1] / "benchmarks" / "results"
