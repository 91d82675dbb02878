"""lidc_det.cluster on a real Dask LocalCluster (2 worker processes, reached by its tcp address
like an existing cluster): twins and predict on small twins give the same files as a serial
run, a failing task is retried and reported while the others finish, predict resumes."""

from __future__ import annotations

import dataclasses
import filecmp
from pathlib import Path

import numpy as np
import pytest

from lidc_det.cluster import SchedulerError, parse_scheduler, run_tasks
from lidc_det.synthetic.twin import generate_twins, scan_spec

PATIENTS = ("LIDC-IDRI-0078", "LIDC-IDRI-0003", "LIDC-IDRI-0005")
COMPARED = ("candidates.csv", "stage1_candidates.csv", "findings.csv", "malignancy.csv")


def _small(key: str, n: int = 6):  # noqa: ANN202
    """A real LIDC scan's geometry cut to ``n`` slices, no nodules: a cheap twin."""
    spec = scan_spec(key)
    k = spec.n_slices // 2
    return dataclasses.replace(spec, z_positions_mm=spec.z_positions_mm[k:k + n], nodules=())


@pytest.fixture(scope="module")
def address():  # noqa: ANN201
    import logging

    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.CRITICAL)
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-1-only models folder: the tiny detector after 2 training steps on toy spheres,
    every score kept (score_thresh 0) so that predict writes candidates."""
    from lidc_det.pipeline import write_manifest
    from stage1_detect.config import load_config
    from stage1_detect.toydata import random_sphere_cases
    from stage1_detect.train import train_detector

    out = tmp_path_factory.mktemp("models")
    cfg = load_config("tiny").replace(epochs=1, steps_per_epoch=2, score_thresh=0.0, max_detections=20)
    res = train_detector(cfg, random_sphere_cases(2, shape_zyx=(48, 48, 48), seed=0), [], out / "stage1",
                         device="cpu", progress=False)
    write_manifest(out, detector=res.last_checkpoint, segmenter=None, malignancy=None, max_candidates=10)
    return out


def test_parse_scheduler() -> None:
    assert parse_scheduler("local") == ("local", None) and parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://h:8786") == ("address", None) and parse_scheduler("serial") == ("serial", None)
    for bad in ("local:0", "locall", "8786"):
        with pytest.raises(SchedulerError):
            parse_scheduler(bad)


def test_failing_task_is_reported_while_others_finish(address: str) -> None:
    # parse_scheduler raises SchedulerError on a bad value: a real task that fails (twice)
    items = [("good", ("local:2",)), ("bad", ("nonsense",)), ("also-good", ("serial",))]
    run = run_tasks(parse_scheduler, items, scheduler=address, progress=False)
    assert run.n_workers == 2
    assert run.values == {"good": ("local", 2), "also-good": ("serial", None)}
    assert list(run.failed) == ["bad"] and run.failed["bad"].startswith("SchedulerError: --scheduler 'nonsense'")
    ok = [o for o in run.outcomes if o.ok]
    assert all(o.peak_rss_mb > 10 and o.worker.startswith("tcp://") for o in ok)


def test_twins_and_predict_on_the_cluster_equal_serial(address: str, toy_models: Path, tmp_path: Path) -> None:
    from lidc_det.io.dicom import read_series
    from lidc_det.predict import PredictOptions, predict_collection

    specs = [_small(p) for p in PATIENTS]
    dist = generate_twins(specs, tmp_path / "twin_dist", seed=3, scheduler=address, progress=False)
    ser = generate_twins(specs, tmp_path / "twin_serial", seed=3, scheduler="serial", progress=False)
    assert not dist.failed and len(dist.scans) == 3
    for a, b in zip(dist.scans, ser.scans):
        np.testing.assert_array_equal(read_series(a.folder).hu, read_series(b.folder).hu)

    opts = PredictOptions(n_overlays=1, torch_threads=1)
    rd = predict_collection(toy_models, tmp_path / "twin_dist", tmp_path / "pred_dist", scheduler=address,
                            options=opts, progress=False)
    predict_collection(toy_models, tmp_path / "twin_dist", tmp_path / "pred_serial", scheduler="serial",
                       options=opts, progress=False)
    assert not rd.failed and [r["status"] for r in rd.rows] == ["done"] * 3
    assert all(t["worker"].startswith("tcp://") and t["peak_rss_mb"] > 10 for t in rd.run["tasks"])
    for spec in specs:
        d1, d2 = (tmp_path / p / "scans" / spec.series_uid for p in ("pred_dist", "pred_serial"))
        for name in COMPARED:
            assert filecmp.cmp(d1 / name, d2 / name, shallow=False), name
        assert len((d1 / "candidates.csv").read_text().splitlines()) > 1  # candidates were written
        assert sorted(p.name for p in (d1 / "overlays").iterdir()) == ["candidate001.png"]
    assert (tmp_path / "pred_dist" / "index.html").is_file()
    assert len((tmp_path / "pred_dist" / "summary.csv").read_text().splitlines()) == 4

    # resumable: a re-run skips every finished scan; a scan whose done marker is gone is redone
    (tmp_path / "pred_dist" / "scans" / specs[0].series_uid / "done.json").unlink()
    again = predict_collection(toy_models, tmp_path / "twin_dist", tmp_path / "pred_dist", scheduler="serial",
                               options=opts, progress=False)
    status = {r["series_uid"]: r["status"] for r in again.rows}
    assert status == {specs[0].series_uid: "done", specs[1].series_uid: "skipped", specs[2].series_uid: "skipped"}


def test_predict_writes_lung_fields_when_asked(toy_models: Path, tmp_path: Path) -> None:
    """--lungs: a label map with both lungs, the PNGs and a render per scan, linked from index.html;
    without it, no lungs/ folder."""
    from lidc_det.io.nifti import read_nifti
    from lidc_det.predict import PredictOptions, predict_collection

    spec = _small(PATIENTS[0], n=8)
    generate_twins([spec], tmp_path / "twin", seed=3, scheduler="serial", progress=False)
    rep = predict_collection(toy_models, tmp_path / "twin", tmp_path / "pred", scheduler="serial",
                             options=PredictOptions(n_overlays=0, torch_threads=1, lungs=True), progress=False)
    assert not rep.failed
    d = tmp_path / "pred" / "scans" / spec.series_uid / "lungs"
    labels, _ = read_nifti(d / "lungs.nii.gz")
    assert {1, 2} <= set(np.unique(labels).tolist())
    assert (d / "lungs_render.png").read_bytes()[:4] == b"\x89PNG"
    assert "lungs/lungs_render.png" in (tmp_path / "pred" / "index.html").read_text()
    plain = predict_collection(toy_models, tmp_path / "twin", tmp_path / "plain", scheduler="serial",
                               options=PredictOptions(n_overlays=0, torch_threads=1), progress=False)
    assert not plain.failed
    assert not (tmp_path / "plain" / "scans" / spec.series_uid / "lungs").exists()


@pytest.mark.slow
def test_predict_survives_a_killed_worker_with_the_serial_outputs(toy_models: Path, tmp_path: Path) -> None:
    # benchmarks.scale's kill run, small: SIGKILL one of two worker processes once a scan is done;
    # the nanny restarts it, its task is rescheduled, and every scan's files equal a serial run's
    from benchmarks.scale import compare_outputs, predict_with_kill
    from lidc_det.predict import PredictOptions, predict_collection

    specs = [_small(p, n=16) for p in (*PATIENTS, "LIDC-IDRI-0008")]
    assert not generate_twins(specs, tmp_path / "twin", seed=3, scheduler="serial", progress=False).failed
    opts = PredictOptions(n_overlays=1, torch_threads=1)
    uids = [s.series_uid for s in specs]
    predict_collection(toy_models, tmp_path / "twin", tmp_path / "serial", scheduler="serial", options=opts,
                       progress=False)
    k = predict_with_kill(toy_models, tmp_path / "twin", tmp_path / "killed", uids, opts, kill_after=1)
    assert k["killed"]["pid"] and k["killed"]["after_done"] >= 1
    assert not k["report"].failed and [r["status"] for r in k["report"].rows] == ["done"] * 4
    compared, diffs = compare_outputs(tmp_path / "killed", tmp_path / "serial", uids)
    assert diffs == [] and {c.split("/")[0] for c in compared} == set(uids)
    # and the comparison does see a difference
    (tmp_path / "killed" / "scans" / uids[0] / "findings.csv").write_text("edited\n")
    assert compare_outputs(tmp_path / "killed", tmp_path / "serial", uids)[1] == [f"{uids[0]}/findings.csv"]
