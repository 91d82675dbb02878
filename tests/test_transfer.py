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


# ------------------------------------------------------------------ blob-lgbm: candidate cache, --scheduler
def _blob_phantom_set(root: Path, prefix: str, n: int, seed: int, *, inserted: bool = False):
    """A prepared data set of ``n`` 48^3 phantoms (stored int16, as prepared scans are), each with one target
    sphere (named ``...:inserted`` for a yardstick) and a vessel-like tube."""
    import numpy as np

    from lidc_det.atomic import write_json
    from lidc_det.data.prepare import FORMAT_VERSION, write_scan
    from lidc_det.data.prepared import PreparedDataset
    from tests.test_stage1_blob import SHAPE, _phantom

    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in SHAPE], indexing="ij")
    scans = []
    for k in range(n):
        uid, d = f"{prefix}{k}", float(rng.uniform(6, 10))
        c = (float(rng.uniform(12, 36)), 34.0, float(rng.uniform(12, 36)))
        case = _phantom(uid, rng, [(c, d)], [(int(rng.integers(10, 38)), 12, 3.0)])
        mask = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= (d / 2) ** 2
        rec = {"nodule_id": f"{uid}-1" + (":inserted" if inserted else ""), "center_xyz_mm": [c[2], c[1], c[0]],
               "diameter_mm": d, "volume_mm3": float(mask.sum()), "n_readers": 4, "malignancy_median": 3.0}
        write_scan(root, uid, np.asarray(case.image_hu), case.geometry, [(rec, mask)],
                   {"series_uid": uid, "patient_id": f"P-{uid}", "irrelevant": []})
        scans.append({"series_uid": uid, "patient_id": f"P-{uid}", "fold": 0})
    write_json(root / "dataset.json", {"format_version": FORMAT_VERSION, "scans": scans})
    return PreparedDataset(root)


def test_blob_transfer_scores_from_the_candidate_cache_and_warms_it_with_a_scheduler(tmp_path: Path, monkeypatch) -> None:
    """A blob-lgbm transfer (data, protocol and real scan faked with phantoms): with a scheduler every scan it reads
    is extracted once, up front, into ``stage1/features``; training and every scored set (twin val/test, both
    yardsticks, the real scan) read it there, a serial rerun extracts nothing, and the detections are ``predict``'s."""
    from types import SimpleNamespace

    import numpy as np

    import benchmarks.transfer as tr
    import benchmarks.yardstick_breakdown as yb
    from benchmarks.data import Split
    from benchmarks.harness import DetectorSpec
    from stage1_detect import blob
    from stage1_detect.registry import build_detector
    from tests.test_stage1_blob import CFG

    twins = _blob_phantom_set(tmp_path / "twins", "tw", 6, 1)
    yard = _blob_phantom_set(tmp_path / "yard", "ya", 1, 2, inserted=True)
    extra = _blob_phantom_set(tmp_path / "extra", "ex", 1, 3, inserted=True)
    real = _blob_phantom_set(tmp_path / "real", "re", 1, 4).load_case("re0")
    vol = SimpleNamespace(series_uid="re0", patient_id="P-re0", hu=np.asarray(real.image_hu, np.float32),
                          geometry=real.geometry)
    uids = twins.series_uids
    split = Split(tuple(uids[:4]), (uids[4],), (uids[5],))
    base = load_transfer_config(SMOKE)
    cfg = dataclasses.replace(
        base, detector=DetectorSpec("blob-lgbm", kwargs=dict(CFG)), segmentation=None, n_bootstrap=10, n_fp_pngs=0,
        extra_yardsticks=(BackgroundSpec("other", REAL_0001, "whole"),))
    data = tr.TransferData(twins, split, [], [], None, [tr.EvalScan(tmp_path, "re0", "P-re0", "whole")], "whole",
                           {"label": "phantoms"}, [], yard, [extra])
    monkeypatch.setattr(tr, "load_transfer_config", lambda path: cfg)
    monkeypatch.setattr(tr, "prepare_transfer_data", lambda *a, **k: data)
    monkeypatch.setattr(tr, "read_real_scan", lambda e: (vol, [], [], []))
    monkeypatch.setattr(yb, "breakdown", lambda *a, **k: {})
    warmed: list[tuple[str, list[str]]] = []
    real_warm = blob.warm_candidate_cache

    def warm(kwargs, cases, cache_dir, *, scheduler, progress):  # in this process, whatever the scheduler
        warmed.append((scheduler, sorted(c.series_uid for c in cases)))
        return real_warm(kwargs, cases, cache_dir, scheduler="serial", progress=progress)

    extracted: list[int] = []
    real_candidates = blob.BlobDetector.candidates

    def candidates(self, hu, geometry):
        extracted.append(1)
        return real_candidates(self, hu, geometry)

    monkeypatch.setattr(blob, "warm_candidate_cache", warm)
    monkeypatch.setattr(blob.BlobDetector, "candidates", candidates)
    out = tmp_path / "run"
    every = sorted([*uids, "ya0", "ex0", "re0"])
    rec = tr.run_transfer(SMOKE, out, progress=False, scheduler="local:2")
    assert warmed == [("local:2", every)] and len(extracted) == len(every)  # the warm-up only: nothing extracted twice
    key = blob.BlobConfig(**CFG).candidate_key()
    files = sorted(p.name.rsplit("-", 1)[0] for p in (out / "stage1" / "features" / key).glob("*.npz"))
    assert files == every and rec["scheduler"] == "local:2" and "stage 1 candidates" in rec["seconds"]
    assert rec["twin_test"]["n_nodules"] == 1 and rec["extra_yardsticks"]["other"]["n_scans"] == 1

    # a serial rerun: no warm-up, nothing extracted (the model and every scan's candidates are cached), same figures
    again = tr.run_transfer(SMOKE, out, progress=False)
    assert len(warmed) == 1 and len(extracted) == len(every) and again["scheduler"] == "serial"
    for k in ("twin_test", "yardstick", "extra_yardsticks", "operating_point"):
        assert again[k] == rec[k]
    assert again["real"]["top_score"] == rec["real"]["top_score"]

    # the cached scoring gives predict's detections, to the bit (prepared scans are int16, predict gets float32)
    det = build_detector({"name": "blob-lgbm", "checkpoint": str(out / "stage1" / blob.MODEL_FILE), "progress": False})
    cache = tr._candidate_cache(det, out)
    assert cache == out / "stage1" / "features"
    for ds in (twins, yard):
        cached = tr._detect_prepared(det, ds, ds.series_uids, False, cache)
        plain = tr._detect_prepared(det, ds, ds.series_uids, False)
        assert cached[1:] == plain[1:]
        for a, b in zip(cached[0], plain[0]):
            assert a.series_uid == b.series_uid and len(a) > 0
            for f in ("centers_xyz_mm", "diameters_mm", "scores"):
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    a = tr._cached_predict(det, tr._real_case(vol), cache)
    b = det.predict(vol.hu, vol.geometry, series_uid="re0")
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.centers_xyz_mm, b.centers_xyz_mm)
    assert len(extracted) == len(every) + len(twins.series_uids) + len(yard.series_uids) + 1  # predict's own only


def test_cli_transfer_passes_the_scheduler(tmp_path: Path, monkeypatch) -> None:
    import benchmarks.transfer as tr
    from lidc_det.cli import main

    seen: list[dict] = []

    def fake(config, out, **kwargs):
        seen.append(kwargs)
        return {"real": {"nodules": []}, "yardstick": {"cpm": 0.5, "n_nodules": 2, "n_scans": 1},
                "twin_test": {"cpm": 0.4}, "wall_seconds": 1.0}

    monkeypatch.setattr(tr, "run_transfer", fake)
    assert main(["transfer", str(SMOKE), "--out", str(tmp_path), "--scheduler", "local:2", "--no-progress"]) == 0
    assert main(["transfer", str(SMOKE), "--out", str(tmp_path)]) == 0
    assert [k["scheduler"] for k in seen] == ["local:2", "serial"]
    # CNN detectors are not built with a cache: scored by predict as before
    assert tr._candidate_cache(object(), tmp_path) is None
