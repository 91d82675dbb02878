"""Data sources: IDC manifest + download layout (offline), Lung-PET-CT-Dx VOC -> 3D boxes, label checks."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_PATIENT, REAL_ROOT, REAL_SERIES_DIR, REAL_SERIES_UID, requires_real

from lidc_det.cli import main
from lidc_det.data import idc
from lidc_det.data.checks import ERROR, OK, WARNING, LabelRecord, check_labels, check_records
from lidc_det.data.lung_pet_ct_dx import (
    LungPetCtDxPrepareConfig,
    SliceBox,
    VocFormatError,
    find_patients,
    group_boxes,
    load_patient,
    prepare_lung_pet_ct_dx,
    read_voc_xml,
)
from lidc_det.data.prepared import PreparedDataset
from lidc_det.geometry import VolumeGeometry
from lidc_det.io.dicom import find_series, read_series
from lidc_det.io.dicom_write import write_ct_series

# ----------------------------------------------------------------------------- IDC


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _series(uid: str = "1.2.3.4", n: int = 3, patient: str = "LIDC-IDRI-9001") -> idc.IdcSeries:
    return idc.IdcSeries("lidc_idri", patient, "1.2.3", uid, "CT", n, 1.5)


def test_idc_manifest_for_lidc_patients(tmp_path: Path) -> None:
    pytest.importorskip("idc_index_data")
    series = idc.select_series("lidc_idri", patients=["LIDC-IDRI-0003", REAL_PATIENT, "LIDC-IDRI-0002"])
    assert [s.patient_id for s in series] == [REAL_PATIENT, "LIDC-IDRI-0002", "LIDC-IDRI-0003"]
    first = series[0]
    # the IDC copy of the shared scan: same UIDs, same slice count, same TCIA-relative folder
    assert first.series_uid == REAL_SERIES_UID
    assert first.modality == "CT" and first.n_instances == 133
    assert first.relative_dir == REAL_SERIES_DIR.relative_to(REAL_ROOT)
    assert all(s.size_mb > 10 and s.series_aws_url.startswith("s3://") for s in series)
    assert idc.select_series("lidc_idri", limit=3) == series  # first 3 patients in PatientID order

    path = idc.write_manifest(tmp_path / "m.csv", series)
    assert idc.read_manifest(path) == series
    assert path.read_text().splitlines()[0].endswith(",relative_dir")
    assert "3 series, 3 patients" in idc.format_selection(series)


@requires_real
def test_idc_instance_count_matches_the_real_scan() -> None:
    pytest.importorskip("idc_index_data")
    (s,) = idc.select_series("lidc_idri", patients=[REAL_PATIENT])
    assert idc.is_complete(REAL_ROOT, s)  # the shared copy has the layout and file count IDC lists


def test_idc_selection_errors() -> None:
    pytest.importorskip("idc_index_data")
    with pytest.raises(idc.IdcSelectionError, match="did you mean lidc_idri"):
        idc.select_series("LIDC-IDRI")
    with pytest.raises(idc.IdcSelectionError, match="LIDC-IDRI-9999"):
        idc.select_series("lidc_idri", patients=[REAL_PATIENT, "LIDC-IDRI-9999"])
    with pytest.raises(idc.IdcSelectionError, match="limit"):
        idc.select_series("lidc_idri", limit=0)


def test_read_manifest_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(idc.IdcSelectionError, match="missing columns"):
        idc.read_manifest(bad)
    with pytest.raises(idc.IdcSelectionError, match="cannot read"):
        idc.read_manifest(tmp_path / "absent.csv")


def test_no_network_fails_fast_and_creates_nothing(tmp_path: Path) -> None:
    calls: list[str] = []
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(idc.NetworkUnavailableError, match="unreachable"):
        idc.download_series([_series()], tmp_path / "out", fetch=lambda s, d: calls.append(s.series_uid),
                            endpoint=endpoint, progress=False)
    assert time.perf_counter() - t0 < 5
    assert calls == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_network_probe_does_not_hang_on_a_silent_server() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts the TCP connection, never answers
    try:
        t0 = time.perf_counter()
        with pytest.raises(idc.NetworkUnavailableError):
            idc.check_network(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout_s=0.5)
        assert time.perf_counter() - t0 < 3
    finally:
        srv.close()


def test_network_probe_accepts_any_http_answer() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        idc.check_network(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout_s=2.0)  # 403 = reachable
    finally:
        t.join(3)
        srv.close()


def test_download_layout_atomic_and_resumable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "LIDC-IDRI"
    geom = VolumeGeometry((3, 4, 5), (2.0, 0.7, 0.7), (0.0, 0.0, 0.0))
    s = idc.IdcSeries("lidc_idri", "LIDC-IDRI-9001", "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.8",
                      "CT", 3, 0.1)

    def fetch_partial(series: idc.IdcSeries, folder: Path) -> None:  # network dropped after 2 files
        write_ct_series(np.zeros((2, 4, 5)), VolumeGeometry((2, 4, 5), (2.0, 0.7, 0.7), (0, 0, 0)), folder,
                        patient_id=series.patient_id, study_uid=series.study_uid, series_uid=series.series_uid,
                        file_name=lambda k: f"uuid-{k}.dcm")

    def fetch_all(series: idc.IdcSeries, folder: Path) -> None:
        write_ct_series(np.full((3, 4, 5), -500.0), geom, folder, patient_id=series.patient_id,
                        study_uid=series.study_uid, series_uid=series.series_uid,
                        file_name=lambda k: f"uuid-{k}.dcm")

    closed = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(idc.NetworkUnavailableError):  # nothing complete yet: the probe runs first
        idc.download_series([s], out, fetch=fetch_all, endpoint=closed, progress=False)
    with monkeypatch.context() as m:
        m.setattr(idc, "check_network", lambda *a, **k: None)  # "network up"
        with pytest.raises(idc.IdcDownloadError, match="2 of 3"):
            idc.download_series([s], out, fetch=fetch_partial, progress=False)
        assert not idc.series_dir(out, s).exists()  # no folder that looks complete
        assert len(list((out / idc.PARTIAL_DIR / s.series_uid).glob("*.dcm"))) == 2  # kept for the resume
        report = idc.download_series([s], out, fetch=fetch_all, progress=False)
        assert report.downloaded == (s.series_uid,) and report.skipped == ()
    final = out / "LIDC-IDRI-9001" / s.study_uid / s.series_uid
    assert idc.series_dir(out, s) == final and idc.is_complete(out, s)
    assert not (out / idc.PARTIAL_DIR).exists()
    # the layout our reader (and prepare) walks
    (found,) = find_series(out)
    assert found.folder == final and found.patient_id == "LIDC-IDRI-9001"
    assert read_series(out / "LIDC-IDRI-9001").hu.shape == (3, 4, 5)
    # resumed run: complete series skipped without probing the network or fetching
    report = idc.download_series([s], out, fetch=lambda *a: pytest.fail("fetched again"),
                                 endpoint=f"http://127.0.0.1:{_closed_port()}", progress=False)
    assert report.skipped == (s.series_uid,) and report.downloaded == ()


def test_download_wraps_downloader_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idc, "check_network", lambda *a, **k: None)

    def broken(series: idc.IdcSeries, folder: Path) -> None:
        raise OSError("No space left on device")

    with pytest.raises(idc.IdcDownloadError, match="No space left"):
        idc.download_series([_series()], tmp_path, fetch=broken, progress=False)
    assert not idc.series_dir(tmp_path, _series()).exists()


def test_download_refuses_foreign_incomplete_folder(tmp_path: Path) -> None:
    s = _series(n=3)
    folder = idc.series_dir(tmp_path, s)
    folder.mkdir(parents=True)
    (folder / "a.dcm").write_bytes(b"x")
    with pytest.raises(idc.IdcDownloadError, match="1 of 3"):
        idc.download_series([s], tmp_path, fetch=lambda *a: None, progress=False)


def test_cli_download_manifest_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("idc_index_data")
    rc = main(["download", "--patients", REAL_PATIENT, "--out", str(tmp_path), "--manifest-only"])
    assert rc == 0
    assert REAL_SERIES_UID in (tmp_path / "manifest_lidc_idri.csv").read_text()
    assert "1 series, 1 patients, 133 files" in capsys.readouterr().out


# ----------------------------------------------------------------- Lung-PET-CT-Dx
PREFIX = "1.2.826.0.1.3680043.8.498.5"  # slice k has SOP UID PREFIX.(k+1)
GEOM = VolumeGeometry((6, 16, 20), (2.5, 0.8, 0.7), (-100.0, 20.0, -10.0))


def _voc(folder: Path, uid: str, objects: list[tuple[str, int, int, int, int]]) -> Path:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for n, x0, y0, x1, y1 in objects
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uid}.xml"
    path.write_text(f"<annotation><folder>A0001</folder><filename>{uid}</filename>"
                    f"<size><width>20</width><height>16</height><depth>3</depth></size>{objs}</annotation>")
    return path


def _make_patient(root: Path, key: str = "A0001", label: str = "A") -> tuple[Path, Path]:
    """A CT (6 slices), a PET series to ignore, and VOC XML: lesion 1 on slices 1-3, lesion 2 on slice 4."""
    dicom = root / f"Lung_Dx-{key}"
    series = dicom / "04-04-2007-NA-Chest-07990" / "2.000000-5mm-40805"
    write_ct_series(np.full(GEOM.shape_zyx, -800.0), GEOM, series, patient_id=f"Lung_Dx-{key}",
                    study_uid=f"{PREFIX}.100", series_uid=f"{PREFIX}.200", sop_uid_prefix=PREFIX)
    write_ct_series(np.zeros((2, 4, 4)), VolumeGeometry((2, 4, 4), (4.0, 4.0, 4.0), (0, 0, 0)),
                    dicom / "04-04-2007-NA-Chest-07990" / "3.000000-PET-1", patient_id=f"Lung_Dx-{key}",
                    study_uid=f"{PREFIX}.100", series_uid=f"{PREFIX}.300", extra={"Modality": "PT"})
    xml = root / "Annotation" / key
    _voc(xml, f"{PREFIX}.2", [(label, 5, 4, 9, 8)])
    _voc(xml, f"{PREFIX}.3", [(label, 4, 3, 10, 9)])
    _voc(xml, f"{PREFIX}.4", [(label, 6, 5, 8, 7)])
    _voc(xml, f"{PREFIX}.5", [(label, 15, 12, 18, 14)])
    return dicom, xml


def test_voc_to_3d_box_hand_checked(tmp_path: Path) -> None:
    dicom, xml = _make_patient(tmp_path)
    _voc(xml, "1.2.3.999", [("A", 1, 1, 2, 2)])  # UID of no slice
    case = load_patient(dicom, xml)
    assert case.volume.series_uid == f"{PREFIX}.200"  # the PET series is ignored
    assert [v.sop_uid for v in case.unmatched] == ["1.2.3.999"]
    first, second = case.lesions
    # slices 1..3; rows min(4,3,5)..max(8,9,7) -> 3..10; columns min(5,4,6)..max(9,10,8) -> 4..11 (exclusive ends)
    assert first.box_voxel == (1.0, 3.0, 4.0, 4.0, 10.0, 11.0)
    assert first.slices == (1, 2, 3) and first.class_label == "A" and first.histology == "adenocarcinoma"
    assert first.lesion_id == "Lung_Dx-A0001-L1"
    # centre voxel (z, y, x) = (2, 6, 7): x = -100 + 7 * 0.7, y = 20 + 6 * 0.8, z = -10 + 2 * 2.5
    np.testing.assert_allclose(first.center_xyz_mm, (-95.1, 24.8, -5.0), atol=1e-9)
    np.testing.assert_allclose(first.size_xyz_mm, (7 * 0.7, 7 * 0.8, 3 * 2.5), atol=1e-9)
    assert first.diameter_mm == pytest.approx(6.0)
    assert second.box_voxel == (4.0, 12.0, 15.0, 5.0, 15.0, 19.0)


def test_group_boxes_rules() -> None:
    g = VolumeGeometry((10, 20, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    a0, a2 = SliceBox(0, "A", 0, 0, 5, 5, "u0"), SliceBox(2, "A", 1, 1, 6, 6, "u2")
    assert len(group_boxes([a0, a2], g)) == 1  # one unannotated slice inside a lesion is bridged
    assert len(group_boxes([a0, a2], g, max_slice_step=1)) == 2
    assert len(group_boxes([a0, SliceBox(1, "G", 1, 1, 6, 6, "u1")], g)) == 2  # another class: another lesion
    assert len(group_boxes([a0, SliceBox(1, "A", 10, 10, 15, 15, "u1")], g)) == 2  # no overlap in (y, x)
    assert len(group_boxes([a0, SliceBox(0, "A", 2, 2, 7, 7, "v0")], g)) == 2  # same slice: two lesions


def test_voc_format_errors(tmp_path: Path) -> None:
    bad = tmp_path / "1.2.xml"
    bad.write_text("<annotation><object><name>A</name><bndbox><xmin>5</xmin><ymin>1</ymin>"
                   "<xmax>2</xmax><ymax>3</ymax></bndbox></object></annotation>")
    with pytest.raises(VocFormatError, match="1.2.xml: empty box"):
        read_voc_xml(bad)
    bad.write_text("<annotation><object><bndbox/></object></annotation>")
    with pytest.raises(VocFormatError, match="no <name>"):
        read_voc_xml(bad)
    bad.write_text("<annotation>")
    with pytest.raises(VocFormatError, match="not readable"):
        read_voc_xml(bad)


def test_prepare_lung_pet_ct_dx_same_interface_as_lidc(tmp_path: Path) -> None:
    root = tmp_path / "Lung-PET-CT-Dx"
    _make_patient(root)
    assert [p.key for p in find_patients(root)] == ["A0001"]
    cfg = LungPetCtDxPrepareConfig(root=root, out_dir=tmp_path / "prep", n_folds=2)
    report = prepare_lung_pet_ct_dx(cfg, progress=False)
    assert report.done == ("A0001",) and not report.failed
    ds = PreparedDataset(cfg.out_dir)
    case = ds.load_case(ds.resolve_scan("Lung_Dx-A0001"))
    assert case.geometry.spacing_zyx == (1.0, 1.0, 1.0)
    first = case.nodules[0]
    np.testing.assert_allclose(first.center_xyz_mm, (-95.1, 24.8, -5.0), atol=1e-9)
    # the box spans world x [-97.55, -92.65], y [22.0, 27.6], z [-8.75, -1.25] (edges at voxel +-0.5);
    # 1 mm voxel centres inside: x -97..-93 (idx 3..7), y 22..27 (2..7), z -8..-2 (2..8)
    assert first.box_voxel == (2.0, 2.0, 3.0, 9.0, 8.0, 8.0)
    lab = np.asarray(case.labels)
    assert lab[2:9, 2:8, 3:8].min() == 1 and (lab == 1).sum() == 7 * 6 * 5
    assert np.array_equal(case.nodule_mask(first), lab == 1)
    from stage1_detect.data import case_boxes, case_findings  # stage 1 reads it like a LIDC case

    np.testing.assert_array_equal(case_boxes(case), [n.box_voxel for n in case.nodules])
    assert len(case_findings(case)[0]) == 2
    ann = (cfg.out_dir / "annotations.csv").read_text().splitlines()
    assert len(ann) == 3 and ann[1].startswith(f"{PREFIX}.200,")
    assert "class_label" in (cfg.out_dir / "nodules.csv").read_text().splitlines()[0]
    again = prepare_lung_pet_ct_dx(cfg, progress=False)  # resumable
    assert again.skipped == ("A0001",) and again.done == ()
    # the prepared set passes the checks (2 lesions: identical class only warns)
    rep = check_labels(cfg.out_dir, progress=False)
    assert rep.ok, rep.table()


# --------------------------------------------------------------------- checks
G1 = VolumeGeometry((20, 30, 30), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def _rec(i: int, label: str | None = "A", box: tuple[float, ...] | None = (2, 2, 2, 6, 6, 6),
         diameter: float | None = None, center: tuple[float, float, float] | None = None,
         expected: str | None = None) -> LabelRecord:
    return LabelRecord("case", f"n{i}", label, box, G1, center or (3.5, 3.5, 3.5),
                       4.0 + i * 0.1 if diameter is None else diameter, expected)


def _by_name(records: list[LabelRecord], **kw: object) -> dict[str, tuple[str, int]]:
    _, results = check_records(records, **kw)  # type: ignore[arg-type]
    return {r.name: (r.severity, r.n_bad) for r in results}


def test_check_clean_records_pass() -> None:
    recs = [_rec(i, label="AG"[i % 2]) for i in range(12)]
    res = _by_name(recs, known_classes={"A", "G"})
    assert all(sev == OK for sev, _ in res.values()), res


def test_check_identical_labels() -> None:
    assert _by_name([_rec(i) for i in range(12)])["identical labels"] == (ERROR, 12)
    assert _by_name([_rec(i) for i in range(3)])["identical labels"][0] == WARNING  # few findings: warn
    same_size = [_rec(i, label="AG"[i % 2], diameter=5.0) for i in range(12)]
    assert _by_name(same_size)["identical labels"][0] == ERROR


def test_check_class_balance_and_unknown_and_patient_letter() -> None:
    recs = [_rec(i, label="A") for i in range(22)] + [_rec(99, label="G")]
    assert _by_name(recs)["class balance"] == (WARNING, 1)
    res = _by_name([_rec(0, "A"), _rec(1, "X")], known_classes={"A", "G"})
    assert res["unknown class"] == (ERROR, 1)
    res = _by_name([_rec(0, "A", expected="A"), _rec(1, "G", expected="A")])
    assert res["class vs patient id"] == (WARNING, 1)


def test_check_boxes_outside_volume() -> None:
    recs = [_rec(0), _rec(1, box=(18, 2, 2, 22, 6, 6)), _rec(2, box=(-1, 2, 2, 3, 6, 6)),
            _rec(3, box=(2, 2, 2, 2, 6, 6)), _rec(4, box=None, center=(3.0, 3.0, 40.0))]
    _, results = check_records(recs)
    (r,) = [r for r in results if r.name == "outside volume"]
    assert (r.severity, r.n_bad) == (ERROR, 4)
    assert any("empty box" in e for e in r.examples) and any("centre" in e for e in r.examples)


def test_check_unmatched_uids_and_unreadable() -> None:
    res = _by_name([_rec(0), _rec(1, "G")], unmatched=["A0001: 1.2.3.xml matches no CT slice"], n_cases=2,
                   unreadable=["A0002: MissingSlicesError"])
    assert res["unmatched UID"] == (ERROR, 1) and res["unreadable"] == (ERROR, 1)


def test_check_smaller_than_voxel() -> None:
    coarse = VolumeGeometry((20, 30, 30), (2.5, 0.7, 0.7), (0.0, 0.0, 0.0))
    recs = [_rec(0), _rec(1, diameter=0.6), _rec(2, box=None),
            LabelRecord("c", "n3", "A", (1, 1, 1, 2, 4, 4), coarse, (1.0, 1.0, 2.5), 2.0)]
    assert _by_name(recs)["smaller than voxel"] == (ERROR, 3)


def test_check_labels_on_lung_pet_ct_dx_folder_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "Lung-PET-CT-Dx"
    _make_patient(root)
    clean = check_labels(root, progress=False)
    assert clean.ok and clean.n_findings == 2 and clean.class_counts == {"A": 2}
    assert main(["check-labels", str(root)]) == 0
    _voc(root / "Annotation" / "A0001", "1.2.3.999", [("A", 1, 1, 2, 2)])  # UID of no slice
    _voc(root / "Annotation" / "A0001", f"{PREFIX}.1", [("A", 15, 12, 25, 14)])  # past the 20 columns
    report = check_labels(root, progress=False)
    bad = {r.name: r.n_bad for r in report.errors}
    assert bad == {"unmatched UID": 1, "outside volume": 1}, report.table()
    assert main(["check-labels", str(root)]) == 1
    out = capsys.readouterr().out
    assert "unmatched UID" in out and "FAILED: 2 check(s)" in out


def test_check_labels_prepared_lidc_style(tmp_path: Path) -> None:
    """A prepared LIDC-style set (no class_label): classes from malignancy; a stray annotations.csv row."""
    import json

    from lidc_det.data.prepare import FORMAT_VERSION

    uid = "1.2.3.4"
    (tmp_path / "scans" / uid).mkdir(parents=True)
    nod = [{"nodule_id": f"n{i}", "label": i + 1, "center_xyz_mm": [5.0, 5.0, 5.0], "diameter_mm": 4.0 + i,
            "volume_mm3": 30.0, "n_readers": 4, "malignancy_median": m, "characteristics": {},
            "box_voxel": [3, 3, 3, 7, 7, 7]} for i, m in enumerate([1.0, 3.0, 5.0])]
    meta = {"series_uid": uid, "patient_id": "P1", "geometry": G1.to_dict(), "nodules": nod, "irrelevant": []}
    (tmp_path / "scans" / uid / "meta.json").write_text(json.dumps(meta))
    # arrays that agree with meta.json (the "scan arrays" check loads them)
    labels = np.zeros(G1.shape_zyx, dtype=np.uint8)
    for label, (z0, z1) in ((1, (3, 5)), (2, (5, 6)), (3, (6, 7))):
        labels[z0:z1, 3:7, 3:7] = label
    np.save(tmp_path / "scans" / uid / "labels.npy", labels)
    np.save(tmp_path / "scans" / uid / "image.npy", np.zeros(G1.shape_zyx, dtype=np.int16))
    np.savez(tmp_path / "scans" / uid / "masks.npz", **{f"mask_{i}": np.ones((4, 4, 4), bool) for i in (1, 2, 3)})
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "scans": [{"series_uid": uid, "patient_id": "P1", "fold": 0}]}))
    (tmp_path / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3.4,5,5,5,4\n9.9.9,1,1,1,5\n")
    report = check_labels(tmp_path, progress=False)
    assert report.class_counts == {"benign": 1, "indeterminate": 1, "malignant": 1}
    assert [r.name for r in report.errors] == ["unmatched UID"]
    assert "9.9.9" in report.table()
