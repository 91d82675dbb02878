"""The transfer benchmark's protocol (what may be trained on and what is scored) and its run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.transfer import (
    BackgroundSpec,
    PatientRange,
    TransferProtocolError,
    load_transfer_config,
    plan_protocol,
    with_seeds,
)
from lidc_det.config import ConfigFileError
from tests.conftest import REAL_ROOT, REPO, requires_real

SMOKE = REPO / "benchmarks" / "transfer" / "smoke.yaml"
REAL_0001 = REAL_ROOT / "LIDC-IDRI-0001"
OTHER_CT = REAL_ROOT.parent / "other-ct" / "TCGA-DE-A4MA"


@pytest.fixture()
def cfg():
    c = load_transfer_config(SMOKE)
    # absolute paths, so the test does not depend on the working directory
    return dataclasses.replace(
        c,
        yardstick=dataclasses.replace(c.yardstick, dicom=REAL_0001),
        backgrounds=tuple(dataclasses.replace(b, dicom=REAL_0001) for b in c.backgrounds),
    )


def test_shipped_configs_load() -> None:
    for path in sorted((REPO / "benchmarks" / "transfer").glob("*.yaml")):
        c = load_transfer_config(path)
        assert c.yardstick.region in ("left", "right", "whole")


def test_variant_configs_differ_from_their_base_only_where_they_say() -> None:
    base = dataclasses.asdict(load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_demo.yaml"))
    more = dataclasses.asdict(load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_demo_more.yaml"))
    changed = {k for k in base if base[k] != more[k]}
    assert changed == {"name", "detector", "train_twins"}
    assert more["detector"]["kwargs"] == {**base["detector"]["kwargs"], "epochs": 16, "tta_flip_axes": [2]}
    assert len(more["train_twins"]["series_uids"]) == 24


def test_seeds_replace_only_their_own_field() -> None:
    tta = load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_demo_tta.yaml")
    acq = load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_demo_tta_s2acq.yaml")
    # the re-acquired stage 2 differs from its base in the augmentation only
    assert dataclasses.replace(acq.segmentation, augment=tta.segmentation.augment) == tta.segmentation
    assert acq.segmentation.augment.copies == 1 and tta.segmentation.augment.copies == 0
    seeded = with_seeds(acq, 7, 3)
    assert seeded.detector.kwargs == {**acq.detector.kwargs, "seed": 7}
    assert seeded.segmentation == dataclasses.replace(acq.segmentation, seed=3)
    assert dataclasses.replace(seeded, detector=acq.detector, segmentation=acq.segmentation) == acq
    assert with_seeds(acq, None, None) == acq
    with pytest.raises(ConfigFileError, match="stage-2 seed needs a segmentation"):
        with_seeds(dataclasses.replace(acq, segmentation=None), None, 1)


def test_second_look_needs_stage_2_and_twins() -> None:
    look = load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_demo_ens3_look.yaml")
    assert look.second_look is not None and look.detector.name == "retina3d-ensemble"
    with pytest.raises(ConfigFileError, match="second_look needs segmentation"):
        dataclasses.replace(look, segmentation=None)
    with pytest.raises(ConfigFileError, match="second_look needs segmentation"):
        dataclasses.replace(look, second_look=dataclasses.replace(
            look.second_look, data=dataclasses.replace(look.second_look.data, source="dicom", dicom_root=REAL_ROOT)))


@requires_real
def test_one_lung_background_restricts_scoring_to_the_other(cfg) -> None:
    evals, y_region, protocol = plan_protocol(cfg, REAL_ROOT, twin_patients=["LIDC-IDRI-0111"])
    assert [e.patient_id for e in evals] == ["LIDC-IDRI-0001"]
    assert evals[0].region == "left" and y_region == "left"
    assert "one lung: right" in protocol["label"]


@requires_real
def test_whole_background_of_an_evaluated_scan_is_refused(cfg) -> None:
    bad = dataclasses.replace(cfg, backgrounds=(BackgroundSpec("b", REAL_0001, "whole"),))
    with pytest.raises(TransferProtocolError, match="whole training background"):
        plan_protocol(bad, REAL_ROOT, twin_patients=[])


@requires_real
def test_yardstick_in_the_trained_lung_is_refused(cfg) -> None:
    bad = dataclasses.replace(cfg, yardstick=dataclasses.replace(cfg.yardstick, region="right"))
    with pytest.raises(TransferProtocolError, match="overlaps the trained region"):
        plan_protocol(bad, REAL_ROOT, twin_patients=[])


@requires_real
def test_extra_yardsticks_follow_the_same_rules(cfg) -> None:
    other = BackgroundSpec("other", OTHER_CT, "whole", crop_in_plane=False)
    _, _, protocol = plan_protocol(dataclasses.replace(cfg, extra_yardsticks=(other,)), REAL_ROOT, twin_patients=[])
    assert set(protocol["extra_yardsticks"]) == {"other"}
    assert protocol["extra_yardsticks"]["other"]["scored_region"] == "whole"
    # smoke.yaml trains on the right lung of 0001: a second yardstick there is refused, one on its left is not
    with pytest.raises(TransferProtocolError, match="overlaps the trained region"):
        plan_protocol(dataclasses.replace(cfg, extra_yardsticks=(BackgroundSpec("r", REAL_0001, "right"),)), REAL_ROOT, [])
    plan_protocol(dataclasses.replace(cfg, extra_yardsticks=(BackgroundSpec("l", REAL_0001, "left"),)), REAL_ROOT, [])
    with pytest.raises(ConfigFileError, match="yardstick names must be unique"):
        dataclasses.replace(cfg, extra_yardsticks=(dataclasses.replace(other, name=cfg.yardstick.name),))


@requires_real
def test_patient_overlaps_are_refused(cfg) -> None:
    with pytest.raises(TransferProtocolError, match="among the training twins"):
        plan_protocol(cfg, REAL_ROOT, twin_patients=["LIDC-IDRI-0001"])
    with pytest.raises(TransferProtocolError, match="training nodule sources"):
        plan_protocol(dataclasses.replace(cfg, train_sources=PatientRange("LIDC-IDRI-0001", "LIDC-IDRI-0002")), REAL_ROOT, [])
    with pytest.raises(TransferProtocolError, match="segmentation_twins share patients with the twins"):
        plan_protocol(cfg, REAL_ROOT, ["LIDC-IDRI-0111"], segmentation_patients=["LIDC-IDRI-0111"])
    with pytest.raises(TransferProtocolError, match="among the training twins"):  # stage-2 twins count as training
        plan_protocol(cfg, REAL_ROOT, ["LIDC-IDRI-0111"], segmentation_patients=["LIDC-IDRI-0001"])
    with pytest.raises(TransferProtocolError, match="yardstick sources .* overlap the training twins"):
        plan_protocol(cfg, REAL_ROOT, [], segmentation_patients=["LIDC-IDRI-0605"])
    _, _, protocol = plan_protocol(cfg, REAL_ROOT, ["LIDC-IDRI-0111"], segmentation_patients=["LIDC-IDRI-0126"])
    assert protocol["stage2_only_twin_patients"] == ["LIDC-IDRI-0126"]
    with pytest.raises(TransferProtocolError, match="train_twins share patients with the twins"):
        plan_protocol(cfg, REAL_ROOT, ["LIDC-IDRI-0111"], train_patients=["LIDC-IDRI-0111"])
    with pytest.raises(TransferProtocolError, match="segmentation_twins share patients with train_twins"):
        plan_protocol(cfg, REAL_ROOT, [], segmentation_patients=["LIDC-IDRI-0126"], train_patients=["LIDC-IDRI-0126"])
    with pytest.raises(TransferProtocolError, match="among the training twins"):  # extra training twins count too
        plan_protocol(cfg, REAL_ROOT, ["LIDC-IDRI-0111"], train_patients=["LIDC-IDRI-0001"])
    with pytest.raises(TransferProtocolError, match="yardstick sources .* overlap the training twins"):
        plan_protocol(cfg, REAL_ROOT, [], train_patients=["LIDC-IDRI-0605"])
    _, _, protocol = plan_protocol(cfg, REAL_ROOT, ["LIDC-IDRI-0111"], train_patients=["LIDC-IDRI-0127"])
    assert protocol["extra_training_twin_patients"] == ["LIDC-IDRI-0127"]
    with pytest.raises(TransferProtocolError, match="overlap the training sources"):
        plan_protocol(dataclasses.replace(cfg, yardstick_sources=PatientRange("LIDC-IDRI-0305", "LIDC-IDRI-0320")), REAL_ROOT, [])
    # the second look's pool twins follow the same rules: no twin, stage-2, training-twin, evaluation or
    # yardstick-source patient among them
    with pytest.raises(TransferProtocolError, match="second_look.data share patients with the twins"):
        plan_protocol(cfg, REAL_ROOT, ["LIDC-IDRI-0111"], second_look_patients=["LIDC-IDRI-0111"])
    with pytest.raises(TransferProtocolError, match="train_twins share patients with second_look.data"):
        plan_protocol(cfg, REAL_ROOT, [], train_patients=["LIDC-IDRI-0127"], second_look_patients=["LIDC-IDRI-0127"])
    with pytest.raises(TransferProtocolError, match="segmentation_twins share patients with second_look.data"):
        plan_protocol(cfg, REAL_ROOT, [], segmentation_patients=["LIDC-IDRI-0128"], second_look_patients=["LIDC-IDRI-0128"])
    with pytest.raises(TransferProtocolError, match="among the training twins"):
        plan_protocol(cfg, REAL_ROOT, [], second_look_patients=["LIDC-IDRI-0001"])
    with pytest.raises(TransferProtocolError, match="yardstick sources .* overlap the training twins"):
        plan_protocol(cfg, REAL_ROOT, [], second_look_patients=["LIDC-IDRI-0605"])
    _, _, protocol = plan_protocol(cfg, REAL_ROOT, ["LIDC-IDRI-0111"], second_look_patients=["LIDC-IDRI-0129"])
    assert protocol["second_look_pool_patients"] == ["LIDC-IDRI-0129"]


@pytest.mark.slow
@requires_real
def test_smoke_transfer_run_end_to_end(tmp_path: Path) -> None:
    """The smoke config through every step (minutes): twins, semi-real, stage 1 and 2, scoring, report."""
    from benchmarks.transfer import run_transfer

    rec = run_transfer(SMOKE, tmp_path / "run", dicom_root=REAL_ROOT, progress=False)
    assert rec["protocol"]["evaluation"][0]["scored_region"] == "left"
    (row,) = rec["real"]["nodules"]
    assert row["patient_id"] == "LIDC-IDRI-0001" and row["diameter_mm"] == pytest.approx(23.4, abs=0.2)
    assert rec["yardstick"]["n_nodules"] >= 3 and rec["twin_test"]["synthetic"] is True
    assert rec["n_train_scans"]["twin_inserted"] == 1  # one training twin with inserted nodules
    assert rec["stage2"]["real"][0]["true_centre"]["dice_human_loo"]  # readers' own leave-one-out beside the model
    saved = json.loads((tmp_path / "run" / "transfer.json").read_text())
    assert saved["config_hash"] == rec["config_hash"] and (tmp_path / "run" / "report.md").is_file()
    # the yardstick by kind counts every scored nodule, and the same from the run's candidate CSVs afterwards
    kinds = rec["yardstick"]["by_kind"]["summary"]
    assert kinds["all"]["n"] == rec["yardstick"]["n_nodules"]
    assert sum(v["n"] for k, v in kinds.items() if k in ("parenchymal", "juxtapleural", "juxtavascular")) == kinds["all"]["n"]
    assert "by kind" in (tmp_path / "run" / "report.md").read_text()
    from benchmarks.transfer import kinds_of_runs

    (name, again), = kinds_of_runs([tmp_path / "run"], tmp_path / "run")
    assert name == f"run: {rec['config']['yardstick']['name']}" and again["summary"] == kinds


def test_twin_backgrounds_need_sources_and_name_the_training_twins() -> None:
    from types import SimpleNamespace

    from benchmarks.transfer import TwinBackgroundSpec, _protocol_label, twin_background_specs

    c = load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_blob_60_jp.yaml")
    assert c.twin_backgrounds == TwinBackgroundSpec(20, 3, 5, (0.0, 0.6, 0.4)) and not c.backgrounds
    assert _protocol_label(c, {}).startswith("procedural only") and "inserted into twins" in _protocol_label(c, {})
    with pytest.raises(ConfigFileError, match="twin_backgrounds need train_sources"):
        dataclasses.replace(c, train_sources=None)
    with pytest.raises(ConfigFileError, match="placement_weights"):
        TwinBackgroundSpec(placement_weights=(0.0, 0.0, 0.0))

    def ds(pids: list[str]) -> SimpleNamespace:
        return SimpleNamespace(info={"scans": [{"series_uid": f"uid-{p}", "patient_id": p, "source_folder": f"twin/{p}/s"}
                                               for p in pids]})

    a, b = ds(["LIDC-IDRI-0003", "LIDC-IDRI-0005"]), ds(["LIDC-IDRI-0046", "LIDC-IDRI-0049"])
    sources = PatientRange("LIDC-IDRI-0300", "LIDC-IDRI-0310")
    specs = twin_background_specs(TwinBackgroundSpec(n_twins=3, copies=2, nodules_per_copy=4), sources,
                                  [(a, ["uid-LIDC-IDRI-0005", "uid-LIDC-IDRI-0003"]), (b, ["uid-LIDC-IDRI-0049", "uid-LIDC-IDRI-0046"])],
                                  7, (1.0, 1.0, 1.0))
    assert [s.name for s in specs] == ["twin-LIDC-IDRI-0005", "twin-LIDC-IDRI-0003", "twin-LIDC-IDRI-0049"]
    assert [str(s.dicom) for s in specs] == ["twin/LIDC-IDRI-0005/s", "twin/LIDC-IDRI-0003/s", "twin/LIDC-IDRI-0049/s"]
    assert {(s.copies, s.nodules_per_copy, s.placement_weights, s.seed, s.region) for s in specs} == {
        (2, 4, (0.0, 0.6, 0.4), 7, "whole")}
    assert specs[0].source_scans == tuple(sources.series_uids()) and len(specs[0].source_scans) > 0


def test_ablation_table_shows_the_second_look_beside_the_detector() -> None:
    """A committed record plus a second-look block: the table gets one more column with the second
    look's real rank, yardstick CPMs and twin test CPM; records without one show '-'."""
    from benchmarks.transfer import ablation_table

    path = REPO / "benchmarks" / "results" / "transfer" / "twins_demo_tta_v5_seed3" / "transfer.json"
    plain = json.loads(path.read_text())
    froc = {"cpm": 0.5, "cpm_ci": [0.4, 0.6], "n_nodules": 39}
    looked = dict(plain, second_look={
        "max_candidates_per_scan": 40,
        "twin_test": {"detector_top_k": dict(froc, cpm=0.211), "second_look": dict(froc, cpm=0.444)},
        "yardstick": {"detector_top_k": froc, "second_look": dict(froc, cpm=0.377)},
        "yardstick tcga": {"detector_top_k": froc, "second_look": dict(froc, cpm=0.391)},
        "real": {"nodules": [{"detector_top_k": {"rank": 8, "fps_above": 7}, "second_look": {"rank": 2, "fps_above": 1}}]},
    })
    lines = ablation_table([plain, looked]).splitlines()
    assert "second look" in lines[0] and lines[1].count("---") == lines[0].count("|") - 1
    assert "| 2 (1); 0.377 / 0.391; 0.444 |" in lines[3]
    assert lines[2].count("|") == lines[3].count("|") and "| - |" in lines[2]
    assert "8 (7)" in lines[2]  # the detector's own rank of the real nodule stays in its column
    assert "second look" not in ablation_table([plain]).splitlines()[0]
    assert "(train seed 3) |" in lines[2]  # stage-2 seed 0 (the config's) is not named
    reseeded = dict(plain, config=dict(plain["config"], segmentation=dict(plain["config"]["segmentation"], seed=2)))
    assert "(train seed 3, stage-2 seed 2) |" in ablation_table([reseeded]).splitlines()[2]


def test_froc_plot_of_records(tmp_path: Path) -> None:
    from benchmarks.transfer import main, plot_frocs

    def record(label: str, sens: float) -> dict:
        froc = {"cpm": sens, "sensitivity": {str(v): sens for v in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)}}
        return {"config": {"detector": {"name": "x", "label": label, "kwargs": {"seed": 1}}},
                "yardstick": froc, "twin_test": froc, "extra_yardsticks": {"tcga": froc}}

    out = plot_frocs([record("a", 0.5), record("b", 0.7)], tmp_path / "f.png", which="extra:tcga")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no record"):
        plot_frocs([record("a", 0.5)], tmp_path / "g.png", which="extra:other")
    with pytest.raises(ValueError, match="which must be"):
        plot_frocs([record("a", 0.5)], tmp_path / "g.png", which="real")
    (tmp_path / "r.json").write_text(json.dumps(record("c", 0.4)))
    assert main(["froc", str(tmp_path / "r.json"), "--out", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_second_look_pools_get_their_own_folders(tmp_path: Path) -> None:
    from benchmarks.transfer import second_look_pool_dir

    cnn = load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_demo_tta_look.yaml").second_look
    blob = load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_blob_60_look.yaml").second_look
    rm = load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_blob_60_rm_look.yaml").second_look
    assert cnn is not None and blob is not None and blob == rm
    assert second_look_pool_dir(tmp_path, blob.data) == second_look_pool_dir(tmp_path, rm.data)
    assert second_look_pool_dir(tmp_path, blob.data) != second_look_pool_dir(tmp_path, cnn.data)
    assert second_look_pool_dir(tmp_path, blob.data).parent == tmp_path / "second_look_pool"


@requires_real
def test_second_look_backgrounds_are_trained_regions_for_the_second_look_only() -> None:
    look = load_transfer_config(REPO / "benchmarks" / "transfer" / "twins_blob_60_look_real.yaml")
    tcga = BackgroundSpec("tcga", OTHER_CT, "whole", crop_in_plane=False)
    right = BackgroundSpec("r", REAL_0001, "right", other_side="mirror")
    cfg = dataclasses.replace(look, yardstick=dataclasses.replace(look.yardstick, dicom=REAL_0001),
                              second_look_backgrounds=(tcga, right))
    evals, y_region, protocol = plan_protocol(cfg, REAL_ROOT, twin_patients=[])
    assert [e.region for e in evals] == ["left"] and y_region == "left" and not cfg.backgrounds
    assert protocol["label"].startswith("stages 1-2 procedural only") and "second look: twins + real-background" in protocol["label"]
    # a yardstick on a second-look background is refused like one on a training background
    with pytest.raises(TransferProtocolError, match="overlaps the trained region"):
        plan_protocol(dataclasses.replace(cfg, extra_yardsticks=(dataclasses.replace(tcga, name="t"),)), REAL_ROOT, [])
    # both lungs of 0001 trained on (one by stage 1, the other by the second look): 0001 is no longer scored
    with pytest.raises(TransferProtocolError, match="whole training background"):
        plan_protocol(dataclasses.replace(cfg, backgrounds=(BackgroundSpec("l", REAL_0001, "left", other_side="cut"),)),
                      REAL_ROOT, [])
    with pytest.raises(ConfigFileError, match="need a second_look section"):
        dataclasses.replace(cfg, second_look=None, segmentation=None)
    with pytest.raises(ConfigFileError, match="need train_sources"):
        dataclasses.replace(cfg, train_sources=None)
    with pytest.raises(ConfigFileError, match="names of their own"):
        dataclasses.replace(cfg, backgrounds=(dataclasses.replace(tcga, dicom=REAL_0001, region="right", other_side="cut"),))
