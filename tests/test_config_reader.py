"""One config reader (lidc_det.config) and one ConfigError for every YAML-to-dataclass config:
shipped configs load, a bad key is named with its file, and the CLI prints one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lidc_det.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _readers() -> dict[str, tuple[Callable[[Path], Any], str]]:
    """name -> (reader of a YAML path, a valid YAML body to add a wrong key to)."""
    from benchmarks.harness import load_bench_config as bench_config
    from stage1_detect.config import load_config as detector_config
    from stage1_detect.monai_baseline import monai_config_from_dict
    from stage2_segment.config import SegmenterConfig
    from stage3_malignancy.config import MalignancyModelConfig
    from stage3_malignancy.cv import CVConfig
    from stage3_malignancy.labels import LabelProtocol
    from stage3_malignancy.real_benchmark import load_config as real_config
    from stage3_malignancy.twin_benchmark import load_image_benchmark_config

    from lidc_det.config import read_yaml_mapping

    return {
        "detector": (detector_config, "epochs: 1\n"),
        "monai": (lambda p: monai_config_from_dict(read_yaml_mapping(p), source=str(p)), "epochs: 1\n"),
        "segmenter": (SegmenterConfig.from_yaml, "seed: 1\n"),
        "malignancy": (MalignancyModelConfig.from_yaml, "seed: 1\n"),
        "cv": (lambda p: CVConfig.from_dict(read_yaml_mapping(p), str(p)), "seed: 1\n"),
        "labels": (lambda p: LabelProtocol.from_dict(read_yaml_mapping(p), str(p)), "min_readers: 3\n"),
        "real-benchmark": (real_config, "name: x\n"),
        "twin-benchmark": (load_image_benchmark_config, "name: x\n"),
        "bench": (bench_config, (REPO / "benchmarks" / "smoke.yaml").read_text()),
    }


@pytest.mark.parametrize(
    "name", ["detector", "monai", "segmenter", "malignancy", "cv", "labels", "real-benchmark", "twin-benchmark", "bench"]
)
def test_every_reader_names_the_file_and_key_with_one_error(tmp_path: Path, name: str) -> None:
    read, body = _readers()[name]
    good = tmp_path / "good.yaml"
    good.write_text(body)
    read(good)
    bad = tmp_path / "bad.yaml"
    bad.write_text(body + "no_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key") as err:
        read(bad)
    assert str(err.value).startswith(str(bad))
    with pytest.raises(ConfigError, match="not valid YAML"):
        (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
        read(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="no such config file"):
        read(tmp_path / "missing.yaml")


def test_wrong_types_and_bad_values_are_config_errors(tmp_path: Path) -> None:
    from stage2_segment.config import SegmenterConfig
    from stage3_malignancy.config import MalignancyModelConfig

    from lidc_det.config import from_mapping
    from stage1_detect.config import DetectorConfig

    with pytest.raises(ConfigError, match=r"cfg\.yaml\.batch_size: expected int, got True"):
        from_mapping(DetectorConfig, {"batch_size": True}, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"cfg\.yaml\.amp: expected bool"):
        from_mapping(DetectorConfig, {"amp": 1}, "cfg.yaml")
    assert from_mapping(DetectorConfig, {"epochs": 3.0}, "cfg.yaml").epochs == 3  # YAML 3.0 is an integer
    with pytest.raises(ConfigError, match=r"cfg\.yaml: invalid DetectorConfig: patch_size"):
        from_mapping(DetectorConfig, {"patch_size": [30, 32, 32]}, "cfg.yaml")
    bad = tmp_path / "seg.yaml"
    bad.write_text("train: {optimizer: adam}\n")  # a ValueError of the dataclass itself
    with pytest.raises(ConfigError, match=r"seg\.yaml\.train: .*optimizer"):
        SegmenterConfig.from_yaml(bad)
    bad.write_text("model: {features: [colour]}\n")
    with pytest.raises(ConfigError, match=r"seg\.yaml\.model: features"):
        MalignancyModelConfig.from_yaml(bad, "model")


def test_the_old_error_names_are_the_one_config_error() -> None:
    import lidc_det.config
    import stage1_detect.config
    import stage1_detect.monai_baseline
    import stage3_malignancy.config
    import stage3_malignancy.real_benchmark

    for cls in (lidc_det.config.ConfigFileError, stage1_detect.config.ConfigError, stage1_detect.monai_baseline.MonaiConfigError,
                stage3_malignancy.config.ConfigError, stage3_malignancy.real_benchmark.BenchmarkConfigError):
        assert cls is ConfigError


def test_segment_with_a_bad_config_prints_one_named_line(tmp_path: Path, capsys) -> None:
    from lidc_det.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {num_epochs: 2, optimiser: sgd}\n")
    rc = main(["segment", str(tmp_path / "ds"), "scan", "--work-dir", str(tmp_path / "w"), "--config", str(bad),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(bad) in err and "optimiser" in err


def test_base_key_lays_a_file_over_its_base(tmp_path: Path) -> None:
    from lidc_det.config import read_yaml_mapping

    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("name: a\ndet: {epochs: 8, lr: 0.1, axes: [0, 1]}\nkeep: 1\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nname: b\ndet: {epochs: 16}\n")
    (tmp_path / "top.yaml").write_text("base: sub/mid.yaml\ndet: {axes: [2]}\nextra: null\n")
    assert read_yaml_mapping(tmp_path / "top.yaml") == {
        "name": "b", "det": {"epochs": 16, "lr": 0.1, "axes": [2]}, "keep": 1, "extra": None,
    }


def test_base_key_errors_name_the_file(tmp_path: Path) -> None:
    from lidc_det.config import read_yaml_mapping

    (tmp_path / "a.yaml").write_text("base: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ny: 2\n")
    with pytest.raises(ConfigError, match="cycle"):
        read_yaml_mapping(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: no such config file"):
        read_yaml_mapping(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="base must be a file name"):
        read_yaml_mapping(tmp_path / "d.yaml")
