"""blob-lgbm: scale-space candidates, labels, LightGBM training, model files (stage1_detect/blob.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lidc_det.errors import ConfigError
from lidc_det.geometry import VolumeGeometry
from stage1_detect.blob import (
    META_FILE,
    MODEL_FILE,
    BlobConfig,
    BlobDetector,
    BlobModelError,
    candidate_labels,
    feature_names,
    scan_candidates,
)
from stage1_detect.data import InMemoryCase
from stage1_detect.registry import build_detector, list_detectors

SHAPE = (48, 48, 48)


def _phantom(uid: str, rng: np.random.Generator, spheres: list[tuple[tuple[float, float, float], float]],
             tubes: list[tuple[int, int, float]]) -> InMemoryCase:
    """Lung-like background (-850 HU + noise) with bright spheres (targets) and x-running tubes (vessels)."""
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    hu = -850.0 + 15.0 * rng.standard_normal(SHAPE).astype(np.float32)
    for z, y, r in tubes:
        hu[(zz - z) ** 2 + (yy - y) ** 2 <= r**2] = 30.0
    boxes = []
    for c, d in spheres:
        hu[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= (d / 2) ** 2] = 30.0
        lo = np.asarray(c) - d / 2 + 0.5
        boxes.append(np.concatenate([lo, lo + d]))
    return InMemoryCase(uid, hu, VolumeGeometry(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), np.asarray(boxes).reshape(-1, 6))


def _cases(n: int, seed: int) -> list[InMemoryCase]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d = float(rng.uniform(6, 10))
        sphere = ((float(rng.uniform(12, 36)), 34.0, float(rng.uniform(12, 36))), d)
        out.append(_phantom(f"ph{seed}-{i}", rng, [sphere], [(int(rng.integers(10, 38)), 12, float(rng.uniform(2.5, 4.0)))]))
    return out


def _hits(centre_xyz: np.ndarray, case: InMemoryCase) -> bool:
    lab, _, _ = candidate_labels(np.asarray(centre_xyz).reshape(1, 3), case)
    return bool(lab[0] == 1)


CFG = {"restrict_to_lungs": False, "lgbm_rounds": 60, "lgbm_min_data_in_leaf": 3}


def test_candidates_rank_a_sphere_above_a_tube_of_the_same_calibre() -> None:
    case = _phantom("one", np.random.default_rng(0), [((24.0, 34.0, 24.0), 7.0)], [(24, 12, 3.5)])
    cfg = BlobConfig(restrict_to_lungs=False, branch_features=True)
    names = feature_names(cfg)
    cand = scan_candidates(case.image_hu, case.geometry, cfg)
    assert cand.features.shape == (len(cand), len(names))
    dot = cand.features[:, names.index("dot")]
    best = int(np.argmax(dot))
    assert _hits(cand.centers_xyz_mm[best], case)
    # the best candidate on the tube's axis has a far lower dot response than the sphere's
    on_tube = np.abs(cand.centers_xyz_mm[:, 1] - 12) < 2
    assert on_tube.any() and dot[on_tube].max() < 0.5 * dot[best]
    # its object runs out of the cube (on_faces), the sphere's does not
    faces = cand.features[:, names.index("obj_on_faces")]
    assert faces[best] == 0.0 and faces[on_tube].max() > 0.05
    # the tube sends two branches through the cube's faces, the sphere none
    crossings = cand.features[:, names.index("obj_face_crossings")]
    assert crossings[best] == 0.0 and 2.0 in set(crossings[on_tube].tolist())
    assert cand.features[best, names.index("obj_core_fraction")] > 0.2


def test_candidate_labels_target_irrelevant_and_false_positive() -> None:
    geom = VolumeGeometry((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    case = InMemoryCase("c", np.zeros((40, 40, 40), np.float32), geom,
                        np.array([[10, 10, 10, 16, 16, 16]], float), np.array([[30, 30, 30, 34, 34, 34]], float))
    # world = voxel (x, y, z) here; target centre 12.5, radius 3; irrelevant centre 31.5, radius 2
    pts = np.array([[12.5, 12.5, 14.0], [12.5, 12.5, 16.0], [31.5, 31.5, 31.5], [5.0, 5.0, 5.0]])
    lab, which, n = candidate_labels(pts, case)
    assert lab.tolist() == [1, 0, -1, 0] and which.tolist() == [0, -1, -1, -1] and n == 1


def test_fit_predict_roundtrip_and_resume(tmp_path: Path) -> None:
    train, test = _cases(6, 1), _cases(2, 2)
    det = BlobDetector(progress=False, **CFG)
    meta = det.fit(train, test, tmp_path)
    assert meta["candidate_recall"]["train"]["recall"] == 1.0 and meta["n_positive_candidates"] >= 6
    for case in test:
        d = det.predict(case.image_hu, case.geometry, series_uid=case.series_uid)
        assert len(d) <= BlobConfig().max_detections and np.all(np.diff(d.scores) <= 0)
        assert _hits(d.centers_xyz_mm[0], case), "the best candidate is the sphere"
    # a model file is read back to the same scores, through the registry
    loaded = build_detector({"name": "blob-lgbm", "checkpoint": str(tmp_path / MODEL_FILE), "progress": False})
    case = test[0]
    a = det.predict(case.image_hu, case.geometry, series_uid="x")
    b = loaded.predict(case.image_hu, case.geometry, series_uid="x")
    np.testing.assert_allclose(a.scores, b.scores)
    np.testing.assert_allclose(a.centers_xyz_mm, b.centers_xyz_mm)
    # a second fit on the same scans reuses the model; other scans retrain from the cached features
    stamp = (tmp_path / MODEL_FILE).stat().st_mtime_ns
    assert BlobDetector(progress=False, **CFG).fit(train, test, tmp_path)["data_key"] == meta["data_key"]
    assert (tmp_path / MODEL_FILE).stat().st_mtime_ns == stamp
    meta2 = BlobDetector(progress=False, **CFG).fit(train[:5], test, tmp_path)
    assert meta2["data_key"] != meta["data_key"] and meta2["train_series_uids"] == sorted(c.series_uid for c in train[:5])


def test_model_errors(tmp_path: Path) -> None:
    assert "blob-lgbm" in list_detectors()
    case = _cases(1, 3)[0]
    with pytest.raises(BlobModelError, match="not trained"):
        BlobDetector(progress=False).predict(case.image_hu, case.geometry, series_uid="x")
    with pytest.raises(BlobModelError, match="no such"):
        BlobDetector(checkpoint=tmp_path / "nothing.txt")
    with pytest.raises(ConfigError, match="unknown settings"):
        BlobDetector(sigma=2.0)
    with pytest.raises(ConfigError, match="increasing"):
        BlobConfig(sigmas_mm=(2.0, 1.0))
    BlobDetector(progress=False, **CFG).fit(_cases(4, 4), [], tmp_path)
    with pytest.raises(ConfigError, match="cannot change"):
        BlobDetector(checkpoint=tmp_path, min_response=10.0)
    assert BlobDetector(checkpoint=tmp_path, max_detections=5).config.max_detections == 5
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["feature_names"] = meta["feature_names"][:-1]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BlobModelError, match="differ"):
        BlobDetector(checkpoint=tmp_path)
    (tmp_path / MODEL_FILE).write_text("not a model")
    with pytest.raises(BlobModelError, match="not a readable"):
        BlobDetector(checkpoint=tmp_path)


def test_cli_loader_takes_a_blob_model(tmp_path: Path) -> None:
    from stage1_detect.cli import checkpoint_format, load_detector

    BlobDetector(progress=False, **CFG).fit(_cases(4, 5), [], tmp_path)
    assert checkpoint_format(tmp_path / MODEL_FILE) == "blob-lgbm"
    det = load_detector(tmp_path / MODEL_FILE, progress=False)
    assert isinstance(det, BlobDetector) and det.trained


def test_subsolid_weights_and_models_without_branch_features(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from stage1_detect.blob import _subsolid_weights

    case = SimpleNamespace(nodules=[SimpleNamespace(characteristics={"texture": 5.0}),
                                    SimpleNamespace(characteristics={"texture": 1.0})])
    assert _subsolid_weights(case, np.array([0, 1, -1, 1]), 4.0).tolist() == [1.0, 4.0, 1.0, 4.0]
    assert _subsolid_weights(_cases(1, 6)[0], np.array([0, -1]), 4.0).tolist() == [1.0, 1.0]
    # a model written before branch_features existed (its config lacks the key) loads with the old features
    BlobDetector(progress=False, branch_features=False, **CFG).fit(_cases(4, 7), [], tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    del meta["config"]["branch_features"]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    det = BlobDetector(checkpoint=tmp_path)
    assert det.config.branch_features is False and "obj_face_crossings" not in feature_names(det.config)


def test_bags_average_boosters_of_other_seeds(tmp_path: Path) -> None:
    import lightgbm as lgb

    from stage1_detect.blob import scan_candidates

    det = BlobDetector(progress=False, lgbm_bags=3, **CFG)
    meta = det.fit(_cases(5, 8), [], tmp_path)
    assert meta["model_files"] == [MODEL_FILE, "blob_model.bag1.txt", "blob_model.bag2.txt"]
    case = _cases(1, 9)[0]
    x = scan_candidates(case.image_hu, case.geometry, det.config).features
    each = [lgb.Booster(model_file=str(tmp_path / f)).predict(x) for f in meta["model_files"]]
    assert not np.allclose(each[0], each[1])  # other seeds, other boosters
    np.testing.assert_allclose(det._booster.predict(x), np.mean(each, axis=0))
    loaded = BlobDetector(checkpoint=tmp_path)
    np.testing.assert_allclose(loaded._booster.predict(x), np.mean(each, axis=0))
    (tmp_path / "blob_model.bag2.txt").unlink()
    with pytest.raises(BlobModelError, match="not a readable"):
        BlobDetector(checkpoint=tmp_path)
    with pytest.raises(ConfigError, match="lgbm_bags"):
        BlobConfig(lgbm_bags=0)


def test_feature_cache_follows_the_pixels(tmp_path: Path) -> None:
    from stage1_detect.blob import scan_fingerprint

    cases = _cases(4, 10)
    det = BlobDetector(progress=False, **CFG)
    first = det.fit(cases, [], tmp_path)
    # the same UID with other pixels: a new feature file and a new model, not the cached ones
    changed = InMemoryCase(cases[0].series_uid, cases[0].image_hu + 5.0, cases[0].geometry, cases[0].boxes_voxel)
    assert scan_fingerprint(changed) != scan_fingerprint(cases[0])
    second = BlobDetector(progress=False, **CFG).fit([changed, *cases[1:]], [], tmp_path)
    assert second["data_key"] != first["data_key"]
    assert len(list((tmp_path / "features").rglob(f"{cases[0].series_uid}-*.npz"))) == 2


def test_a_blob_model_runs_in_the_pipeline(tmp_path: Path) -> None:
    from lidc_det.pipeline import Pipeline, write_manifest

    BlobDetector(progress=False, **CFG).fit(_cases(5, 11), [], tmp_path / "stage1")
    write_manifest(tmp_path, detector=tmp_path / "stage1" / MODEL_FILE, segmenter=None, malignancy=None)
    pipe = Pipeline.from_dir(tmp_path)
    assert isinstance(pipe.detector, BlobDetector)
    case = _cases(1, 12)[0]
    result = pipe.run_volume(case.image_hu, case.geometry, series_uid=case.series_uid)
    best = max(result.candidates, key=lambda c: c.score)
    assert _hits(np.asarray(best.center_xyz_mm), case)


def test_relative_hu_and_dropped_features_shape_the_model(tmp_path: Path) -> None:
    from stage1_detect.blob import RELATIVE_HU, model_matrix

    cfg = BlobConfig(restrict_to_lungs=False, lgbm_relative_hu=True, lgbm_drop_features=("hu_centre", "lung_bg_hu"))
    names = feature_names(cfg)
    x = np.arange(2 * len(names), dtype=np.float32).reshape(2, len(names))
    m, cols = model_matrix(x, cfg)
    assert "hu_centre" not in cols and "lung_bg_hu" not in cols and cols[-len(RELATIVE_HU):] == list(RELATIVE_HU)
    assert m.shape == (2, len(names) + len(RELATIVE_HU) - 2)
    bg = x[:, names.index("lung_bg_hu")]
    np.testing.assert_allclose(m[:, cols.index("hu_centre_rel")], x[:, names.index("hu_centre")] - bg)
    np.testing.assert_allclose(m[:, cols.index("obj_threshold_rel")], x[:, names.index("obj_threshold_hu")] - bg)
    assert model_matrix(x, BlobConfig())[1] == names  # the defaults leave the columns alone
    with pytest.raises(ConfigError, match="not features"):
        BlobConfig(lgbm_drop_features=("hu_centre_rel",))  # a relative column needs lgbm_relative_hu
    # trained and read back with the same columns; the feature cache is shared with the plain model
    kw = {**CFG, "lgbm_relative_hu": True, "lgbm_drop_features": ["hu_centre", "lung_bg_hu"]}
    cases = _cases(5, 12)
    det = BlobDetector(progress=False, **kw)
    meta = det.fit(cases, [], tmp_path / "rel", cache_dir=tmp_path / "cache")
    assert meta["feature_names"] == cols and set(det.feature_importance()) == set(cols)
    loaded = BlobDetector(checkpoint=tmp_path / "rel")
    assert loaded.config.lgbm_drop_features == ("hu_centre", "lung_bg_hu")
    case = _cases(1, 13)[0]
    a = det.predict(case.image_hu, case.geometry, series_uid="x")
    np.testing.assert_allclose(a.scores, loaded.predict(case.image_hu, case.geometry, series_uid="x").scores)
    assert _hits(a.centers_xyz_mm[0], case)
    # score_candidates on cached candidates gives what predict gives
    cand = det.cached_candidates(case, tmp_path / "cache")
    np.testing.assert_allclose(det.score_candidates(cand, series_uid="x").scores, a.scores)
    BlobDetector(progress=False, **CFG).fit(cases, [], tmp_path / "plain", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "plain" / "features").exists()
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == len(cases) + 1


def test_ablation_config_refuses_candidate_fields(tmp_path: Path) -> None:
    from benchmarks.blob_ablation import kinds_table, load_ablation_config, table
    from lidc_det.config import ConfigFileError

    p = tmp_path / "a.yaml"
    p.write_text("transfer: t.yaml\ndata_dir: d\nwork_dir: w\nvariants:\n  - {name: base}\n"
                 "  - {name: r, kwargs: {lgbm_relative_hu: true}}\n")
    cfg = load_ablation_config(p)
    assert [v.name for v in cfg.variants] == ["base", "r"] and cfg.variants[1].kwargs == {"lgbm_relative_hu": True}
    p.write_text("transfer: t.yaml\ndata_dir: d\nwork_dir: w\nvariants:\n  - {name: s, kwargs: {min_response: 10}}\n")
    with pytest.raises(ConfigFileError, match="define the cached candidates"):
        load_ablation_config(p)
    p.write_text("transfer: t.yaml\ndata_dir: d\nwork_dir: w\nvariants:\n  - {name: a}\n  - {name: a}\n")
    with pytest.raises(ConfigFileError, match="distinct"):
        load_ablation_config(p)
    p.write_text("transfer: t.yaml\nvariants: []\n")
    with pytest.raises(ConfigFileError, match="data_dir"):
        load_ablation_config(p)
    rec = {"sets": [{"name": "twin_test", "n_nodules": 8, "synthetic": True}, {"name": "yardstick", "n_nodules": 39, "synthetic": False}],
           "rows": [{"name": "base", "kwargs": {}, "twin_test": {"cpm": 0.5}, "yardstick": {"cpm": 0.625},
                     "real": [{"patient_id": "LIDC-IDRI-0001", "rank": 1, "fps_above": 0}]}]}
    text = table(rec)
    assert "twin_test CPM (8, SYNTHETIC)" in text and "| base | - | 0.500 | 0.625 | LIDC-IDRI-0001 1 (0) |" in text
    assert kinds_table(rec) == ""  # records written before by_kind
    rec["rows"][0]["yardstick"]["by_kind"] = {"all": {"n": 39, "not_proposed": 2, "below_1fp": 23, "below_8fp": 27},
                                              "juxtapleural": {"n": 12, "not_proposed": 2, "below_1fp": 4, "below_8fp": 5}}
    kinds = kinds_table(rec).splitlines()
    assert kinds[0] == "| found below 1 / 8 FP/scan / n | all | juxtapleural |"
    assert kinds[2] == "| base: yardstick | 23 / 27 / 39 | 4 / 5 / 12 |" and len(kinds) == 3


def test_blurred_training_copies(tmp_path: Path) -> None:
    from stage1_detect.blob import BlurredCase, scan_fingerprint

    cases = _cases(4, 14)
    cfg = BlobConfig(restrict_to_lungs=False, train_blur_copies=1, train_blur_sigma_z_mm=(1.0, 1.5))
    copy = BlurredCase(cases[0], 1, cfg, scan_fingerprint(cases[0]))
    assert 1.0 <= copy.sigma_z_mm <= 1.5 and 0.0 <= copy.sigma_xy_mm <= 0.5
    assert copy.geometry is cases[0].geometry and copy.boxes_voxel is cases[0].boxes_voxel
    # blurred along z more than in plane: a sphere's peak falls, its z profile widens
    assert copy.image_hu.max() < cases[0].image_hu.max() and copy.image_hu.shape == cases[0].image_hu.shape
    again = BlurredCase(cases[0], 1, cfg, scan_fingerprint(cases[0]))
    assert (again.sigma_z_mm, again.fingerprint) == (copy.sigma_z_mm, copy.fingerprint)  # deterministic
    assert BlurredCase(cases[0], 2, cfg, scan_fingerprint(cases[0])).fingerprint != copy.fingerprint
    # fit trains on the scans and their copies; the copies' features are cached beside the scans'
    kw = {**CFG, "train_blur_copies": 1, "train_blur_sigma_z_mm": [1.0, 1.5]}
    meta = BlobDetector(progress=False, **kw).fit(cases, [], tmp_path)
    plain = BlobDetector(progress=False, **CFG).fit(cases, [], tmp_path / "plain", cache_dir=tmp_path / "features")
    assert meta["n_candidates"] > plain["n_candidates"] and meta["data_key"] != plain["data_key"]
    assert len(list((tmp_path / "features").rglob("*~blur1-*.npz"))) == len(cases)
    assert BlobConfig().candidate_key() == BlobConfig(train_blur_copies=2).candidate_key()
    assert BlobDetector(checkpoint=tmp_path).config.train_blur_sigma_z_mm == (1.0, 1.5)
    with pytest.raises(ConfigError, match="train_blur_sigma_z_mm"):
        BlobConfig(train_blur_sigma_z_mm=(1.0, 0.5))


def test_ray_features_tell_a_nodule_a_vessel_and_a_juxtapleural_bulge_apart() -> None:
    from stage1_detect.blob import RAY_FEATURES, _ray_features

    zz, yy, xx = np.mgrid[:60, :60, :60].astype(np.float64)
    img = np.full((60, 60, 60), -850.0)
    img[(zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 15) ** 2 <= 16] = 0.0  # nodule, radius 4
    img[(zz - 45) ** 2 + (yy - 15) ** 2 <= 4] = 0.0  # vessel along x, radius 2
    img[:, :, 50:] = 40.0  # chest wall
    img[(zz - 30) ** 2 + (yy - 45) ** 2 + (xx - 48) ** 2 <= 16] = 0.0  # nodule against it
    pts = np.array([[15, 15, 15], [45, 15, 30], [30, 45, 48]])
    f = _ray_features(img, pts, np.array([4.0, 2.0, 4.0]), np.full(3, -425.0), 1.0)
    assert f.shape == (3, len(RAY_FEATURES))
    nodule, vessel, wall = f
    assert nodule[0] == 0.0 and 0.9 <= nodule[1] <= 1.2 and nodule[3] < 0.2
    assert 0.05 < vessel[0] < 0.15  # the two rays along the vessel (of 26) stay inside
    assert wall[0] > 0.25 and 0.9 <= wall[1] <= 1.2  # the rays into the wall stay inside, the rest end at the edge


def test_ray_features_extend_the_table_and_keep_old_cache_keys() -> None:
    from stage1_detect.blob import RAY_FEATURES

    assert BlobConfig().candidate_key() == "2d396bd95f86"  # the key of caches written before ray_features existed
    cfg = BlobConfig(restrict_to_lungs=False, ray_features=True)
    assert cfg.candidate_key() != BlobConfig(restrict_to_lungs=False).candidate_key()
    assert feature_names(cfg)[-len(RAY_FEATURES):] == list(RAY_FEATURES)
    case = _phantom("ray", np.random.default_rng(0), [((24.0, 34.0, 24.0), 7.0)], [(24, 12, 3.5)])
    cand = scan_candidates(case.image_hu, case.geometry, cfg)
    plain = scan_candidates(case.image_hu, case.geometry, BlobConfig(restrict_to_lungs=False))
    np.testing.assert_array_equal(cand.features[:, : plain.features.shape[1]], plain.features)
    names = feature_names(cfg)
    best = int(np.argmax(cand.features[:, names.index("dot")]))
    assert _hits(cand.centers_xyz_mm[best], case)
    assert cand.features[best, names.index("ray_open_fraction")] == 0.0
    on_tube = np.abs(cand.centers_xyz_mm[:, 1] - 12) < 2
    assert cand.features[on_tube, names.index("ray_open_fraction")].max() > 0.05


def test_miss_table_and_false_positive_groups(tmp_path: Path) -> None:
    from benchmarks.blob_misses import nodule_rows
    from benchmarks.yardstick_breakdown import fp_groups, summary

    det = BlobDetector(progress=False, **CFG)
    det.fit(_cases(6, 1), _cases(2, 2), tmp_path)
    # two copies of one background (same pixels): its false positives recur in both, at the same place
    copies = [_phantom(f"copy{k}", np.random.default_rng(5), [((24.0, 34.0, 24.0), 7.0)], [(24, 12, 3.5)]) for k in range(2)]
    sphere = {"center_xyz_mm": [24.0, 34.0, 24.0], "diameter_mm": 7.0,
              "inserted": {"placement": "parenchymal", "texture": 5, "core_hu": 30.0}}
    nothing = {"center_xyz_mm": [40.0, 40.0, 40.0], "diameter_mm": 3.0,
               "inserted": {"placement": "juxtapleural", "texture": 1, "core_hu": -600.0}}
    scans = [(c.series_uid, det.candidates(c.image_hu, c.geometry), [sphere] if k else [sphere, nothing])
             for k, c in enumerate(copies)]
    rows, dets = nodule_rows(det, scans, "whole", [], ("dot", "obj_on_faces"))
    assert len(rows) == 3 and len(dets) == 2
    found = [r for r in rows if r.placement == "parenchymal"]
    assert all(r.proposed and r.score is not None and r.fp_per_scan_above == 0.0 for r in found)
    assert set(found[0].features) == {"dot", "obj_on_faces"} and found[0].features["obj_on_faces"] == 0.0
    (missed,) = [r for r in rows if r.placement == "juxtapleural"]
    assert not missed.proposed and missed.score is None and missed.fp_per_scan_above is None
    groups = fp_groups(dets, [(uid, nods) for uid, _, nods in scans], [], top=10)
    assert groups and groups[0]["n_scans"] == 2 and groups[0]["n_fp"] >= 2  # the best FP is in both copies
    assert sum(g["n_fp"] for g in groups) == 10  # the ten best false positives, each in one group
    assert all(g["best_score"] >= g["lowest_score"] for g in groups)
    s = summary(rows)
    assert s["all"] == {"n": 3, "not_proposed": 1, "below_1fp": 2, "below_8fp": 2}
    assert s["juxtapleural"]["not_proposed"] == 1 and s["subsolid (texture <= 2)"]["n"] == 1


def test_masked_scale_space_makes_a_juxtapleural_nodule_a_blob_again() -> None:
    from scipy import ndimage as ndi

    from stage1_detect.blob import (
        MASKED_FEATURES, OPEN_FEATURES, _dot, _hessian_at, _object_again, _object_features, _wall_masked, _with_masked_peaks,
    )

    zz, yy, xx = np.mgrid[:48, :48, :48].astype(np.float64)
    sub = np.full((48, 48, 48), -850.0, dtype=np.float32)
    sub[:, :, 36:] = 40.0  # chest wall
    nodule = (zz - 24) ** 2 + (yy - 24) ** 2 + (xx - 34) ** 2 <= 16  # radius 4, its centre 2 mm from the wall
    sub[nodule] = 0.0
    field = (xx < 36) | nodule  # the lung field holds juxtapleural nodules (lidc_det.lungs closes over them)
    cfg = BlobConfig(masked_features=True, max_masked_candidates=50)
    k = 1  # sigma 1.5 mm ~ radius 4 / sqrt(3) * 0.65
    smoothed = [ndi.gaussian_filter(sub, s, truncate=3.0) for s in cfg.sigmas_mm]
    responses = [-(s**2) * ndi.laplace(g) for s, g in zip(cfg.sigmas_mm, smoothed)]
    centre = np.array([[24, 24, 34]])
    plain_dot = _dot(np.linalg.eigvalsh(_hessian_at(smoothed[k], centre, 1.0) * cfg.sigmas_mm[k] ** 2))
    sub_m = _wall_masked(sub, field)
    assert np.all(sub_m[~field] == -850.0) and np.array_equal(sub_m[field], sub[field])
    pts, resp, dot, kidx, masked = _with_masked_peaks(
        sub_m, field, centre, responses[k][24, 24, 34:35], plain_dot, np.array([k]), smoothed, responses, cfg)
    assert masked.shape == (len(pts), len(MASKED_FEATURES)) and len(pts) == len(resp) == len(dot) == len(kidx) > 1
    assert masked[0, 1] > 3 * max(plain_dot[0], 1.0)  # with the wall masked, the nodule is a blob
    # the masked scale space finds a maximum on the nodule; nothing inside the wall
    new = pts[1:]
    assert np.min(np.linalg.norm(new - centre, axis=1)) <= 2.0 and not np.any(new[:, 2] >= 38)
    assert cfg.candidate_key() != BlobConfig().candidate_key() and feature_names(cfg)[-2:] == list(MASKED_FEATURES)
    # the object: merged with the wall in the scan, compact and closed in the wall-masked scan
    radius = 4.0
    plain_obj = dict(zip(feature_names(cfg), [0.0] * (5 + 6 * len(cfg.sigmas_mm)) + _object_features(sub, field, centre[0], radius, 0.0, cfg)))
    thr, vol = plain_obj["obj_threshold_hu"], plain_obj["obj_volume_mm3"]
    again = dict(zip(OPEN_FEATURES, _object_again(sub_m, centre, np.array([radius]), np.array([thr]), np.array([vol]), cfg)[0]))
    assert plain_obj["obj_face_crossings"] >= 1 and plain_obj["obj_diam_over_blob"] > 2.0
    assert again["face_crossings"] == 0 and 0.6 < again["diam_over_blob"] < 1.3 and again["volume_fraction"] < 0.2
    mcfg = BlobConfig(masked_features=True, masked_object_features=True)
    assert feature_names(mcfg)[-5:] == [f"masked_obj_{n}" for n in OPEN_FEATURES]
    assert mcfg.candidate_key() != cfg.candidate_key()


@pytest.mark.parametrize("field", ["lgbm_semireal_weight", "lgbm_twin_weight"])
def test_scan_weights_scale_only_their_scans(tmp_path: Path, field: str) -> None:
    """``lgbm_semireal_weight`` weighs the semi-real training scans (series UID ``semireal-...``), ``lgbm_twin_weight``
    the others: on scans of the other kind alone a weight changes nothing but the model key, on a mix it changes the
    model; at its default it stays out of the model key."""
    import dataclasses

    train, val = _cases(6, 1), _cases(2, 2)
    probe = val[0]

    def relabel(n_semireal: int) -> list[InMemoryCase]:
        return [dataclasses.replace(c, series_uid=f"semireal-x-{k:03d}") if k < n_semireal else c
                for k, c in enumerate(train)]

    def scores(cases: list[InMemoryCase], weight: float, out: str) -> tuple[np.ndarray, str]:
        det = BlobDetector(progress=False, **CFG, **{field: weight})
        meta = det.fit(cases, val, tmp_path / out, cache_dir=tmp_path / "features")
        return det.predict(probe.image_hu, probe.geometry, series_uid="p").scores, meta["data_key"]

    other_kind = relabel(len(train) if field == "lgbm_twin_weight" else 0)
    base, key = scores(other_kind, 1.0, "a")
    same, key_w = scores(other_kind, 0.2, "b")
    np.testing.assert_allclose(base, same)
    assert key_w != key
    a, _ = scores(relabel(3), 1.0, "c")
    b, _ = scores(relabel(3), 0.2, "d")
    assert a.shape != b.shape or not np.allclose(a, b)
    assert field not in BlobConfig().model_settings()
    with pytest.raises(ConfigError, match=field):
        BlobConfig(**{field: 0.0})


def test_model_settings_of_default_config_match_models_trained_before_later_fields() -> None:
    # the fields of a blob_model.json written in the tenth round (before relative HU, dropped features, blur
    # copies, semi-real weight, ray and masked features existed): such a model must keep its data_key
    tenth_round = {"branch_features", "cube_radius_factor", "hu_clip", "lgbm_bags", "lgbm_learning_rate",
                   "lgbm_min_data_in_leaf", "lgbm_neg_per_pos", "lgbm_num_leaves", "lgbm_rounds", "lgbm_subsolid_weight",
                   "lung_margin_mm", "max_candidates", "max_cube_mm", "max_response_candidates", "merge_mm", "min_cube_mm",
                   "min_response", "restrict_to_lungs", "seed", "sigmas_mm", "spacing_mm"}
    assert set(BlobConfig().model_settings()) == tenth_round
    assert {"ray_features", "masked_features", "max_masked_candidates"} <= set(
        BlobConfig(ray_features=True, masked_features=True).model_settings())
    assert BlobConfig(lgbm_semireal_weight=0.3).model_settings()["lgbm_semireal_weight"] == 0.3
    # the lung field's closing radius defines candidates: another radius is another cache and another model
    assert BlobConfig(lung_close_mm=22.0).candidate_key() not in (BlobConfig().candidate_key(),
                                                                  BlobConfig(lung_close_mm=16.0).candidate_key())
    assert BlobConfig(lung_close_mm=22.0).model_settings()["lung_close_mm"] == 22.0


def test_opened_objects_cut_a_nodule_off_its_vessel() -> None:
    # a 9 mm nodule with a 2.4 mm vessel running through it, and the same vessel alone elsewhere
    case = _phantom("open", np.random.default_rng(1), [((24.0, 24.0, 24.0), 9.0)], [(24, 24, 1.2), (10, 38, 1.2)])
    plain_cfg = BlobConfig(restrict_to_lungs=False)
    cfg = BlobConfig(restrict_to_lungs=False, open_radii_mm=(2.0,))
    assert plain_cfg.candidate_key() == BlobConfig(restrict_to_lungs=False, open_radii_mm=()).candidate_key()
    names = feature_names(cfg)
    assert names[-5:] == ["open20_hu_centre", "open20_volume_fraction", "open20_diam_over_blob",
                          "open20_face_crossings", "open20_axis_min"]
    cand = scan_candidates(case.image_hu, case.geometry, cfg)
    plain = scan_candidates(case.image_hu, case.geometry, plain_cfg)
    np.testing.assert_array_equal(cand.features[:, : plain.features.shape[1]], plain.features)
    f = {n: cand.features[:, k] for k, n in enumerate(names)}
    at_nodule = np.linalg.norm(cand.centers_xyz_mm - 24.0, axis=1) < 2.0
    assert at_nodule.any()
    k = int(np.flatnonzero(at_nodule)[np.argmax(f["dot"][at_nodule])])
    assert f["obj_face_crossings"][k] == 2  # with the vessel: one object leaving the cube twice
    assert f["open20_face_crossings"][k] == 0 and f["open20_volume_fraction"][k] < 0.9
    assert 0.5 < f["open20_diam_over_blob"][k] < 2.0 and f["open20_hu_centre"][k] > -100
    on_vessel = (np.abs(cand.centers_xyz_mm[:, 2] - 10) < 1.5) & (np.abs(cand.centers_xyz_mm[:, 1] - 38) < 1.5)
    assert on_vessel.any()
    assert np.all(f["open20_volume_fraction"][on_vessel] == 0.0)  # the opening removes the vessel
    assert np.all(f["open20_hu_centre"][on_vessel] < -700)


@pytest.mark.parametrize("radii", [(2.0, 1.5), (0.5,), (1.0, 1.02)])
def test_open_radii_must_be_increasing_distinct_and_at_least_a_voxel(radii: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="open_radii_mm"):
        BlobConfig(open_radii_mm=radii)
    assert BlobConfig(open_radii_mm=[1.0, 1.5]).open_radii_mm == (1.0, 1.5)


def test_warm_candidate_cache_fills_the_cache_the_detector_reads(tmp_path: Path) -> None:
    from lidc_det.data.prepared import PreparedDataset
    from stage1_detect.blob import LazyCase, warm_candidate_cache

    ds_root = _prepared_phantoms(tmp_path / "ds", 2)
    ds = PreparedDataset(ds_root)
    cases = [ds.load_case(u) for u in ds.series_uids]
    extra = _phantom("mem", np.random.default_rng(3), [((24.0, 24.0, 24.0), 8.0)], [])
    kwargs = {"restrict_to_lungs": False}
    report = warm_candidate_cache(kwargs, [*cases, extra, cases[0]], tmp_path / "cache", scheduler="serial", progress=False)
    assert [o.key for o in report.outcomes] == [*ds.series_uids, "mem"] and all(o.ok for o in report.outcomes)
    det = BlobDetector(progress=False, **kwargs)
    files = sorted((tmp_path / "cache" / det.config.candidate_key()).glob("*.npz"))
    assert len(files) == 3
    mtimes = [p.stat().st_mtime_ns for p in files]
    cand = det.cached_candidates(cases[1], tmp_path / "cache")  # read, not extracted again
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert report.outcomes[1].value == len(cand) > 0
    # a LazyCase is loaded by its task, once, and cached under its UID like any other scan
    loads: list[str] = []
    lazy = LazyCase("lazy", lambda: loads.append("lazy") or _phantom("lazy", np.random.default_rng(5),
                                                                      [((20.0, 24.0, 26.0), 7.0)], []))
    report = warm_candidate_cache(kwargs, [lazy, cases[0]], tmp_path / "cache", scheduler="serial", progress=False)
    assert loads == ["lazy"] and [o.key for o in report.outcomes] == ["lazy", ds.series_uids[0]]
    assert len(list((tmp_path / "cache" / det.config.candidate_key()).glob("lazy-*.npz"))) == 1
    assert report.outcomes[0].value == len(det.cached_candidates(lazy.load(), tmp_path / "cache")) > 0
    with pytest.raises(BlobModelError, match="failed candidate extraction"):
        bad = _phantom("bad", np.random.default_rng(4), [], [])
        broken = SimpleNamespace(series_uid="bad", image_hu=bad.image_hu[:-1], geometry=bad.geometry)
        warm_candidate_cache(kwargs, [broken], tmp_path / "cache", scheduler="serial", progress=False)


def _prepared_phantoms(root: Path, n: int) -> Path:
    """A minimal prepared data set (``dataset.json`` + scans in the prepared layout) of ``n`` phantoms."""
    from lidc_det.atomic import write_json
    from lidc_det.data.prepare import FORMAT_VERSION, write_scan

    scans = []
    for k, case in enumerate(_cases(n, seed=11)):
        write_scan(root, case.series_uid, np.asarray(case.image_hu), case.geometry, [],
                   {"series_uid": case.series_uid, "patient_id": f"P{k}", "irrelevant": []})
        scans.append({"series_uid": case.series_uid, "patient_id": f"P{k}", "fold": 0})
    write_json(root / "dataset.json", {"format_version": FORMAT_VERSION, "scans": scans})
    return root


def test_regularisation_options_reach_the_boosters_and_their_keys(tmp_path: Path) -> None:
    det = BlobDetector(progress=False, lgbm_feature_fraction=0.3, lgbm_lambda_l2=10.0, lgbm_extra_trees=True, **CFG)
    det.fit(_cases(5, 8), [], tmp_path)
    text = (tmp_path / MODEL_FILE).read_text()
    assert "[feature_fraction: 0.3]" in text and "[lambda_l2: 10]" in text and "[extra_trees: 1]" in text
    settings = det.config.model_settings()
    assert (settings["lgbm_feature_fraction"], settings["lgbm_lambda_l2"], settings["lgbm_extra_trees"]) == (0.3, 10.0, True)
    assert not {"lgbm_feature_fraction", "lgbm_lambda_l2", "lgbm_extra_trees"} & set(BlobConfig().model_settings())
    assert det.config.candidate_key() == BlobConfig(**CFG).candidate_key()  # model-only: same cached features
    for bad in ({"lgbm_feature_fraction": 0.0}, {"lgbm_feature_fraction": 1.5}, {"lgbm_lambda_l2": -1.0}):
        with pytest.raises(ConfigError, match="lgbm_feature_fraction"):
            BlobConfig(**bad)


def test_all_maxima_from_mm_keeps_a_faint_large_blob_that_loses_both_cuts() -> None:
    """A 14 mm ground-glass-like sphere (-650 HU in -850 HU lung) beside four small solid ones: with the cuts at 3
    candidates by dot and 3 by response it is not a candidate; every maximum from 5 mm up brings it back, at a
    coarse scale, and keeps the small ones."""
    small = [((10.0, 10.0, 10.0), 5.0), ((10.0, 38.0, 10.0), 5.0), ((38.0, 10.0, 38.0), 5.0), ((38.0, 38.0, 10.0), 5.0)]
    case = _phantom("ggn", np.random.default_rng(7), small, [])
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    centre = np.asarray([26.0, 26.0, 30.0])  # z, y, x voxels = mm (origin 0, spacing 1)
    hu = np.asarray(case.image_hu).copy()
    hu[(zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= 7.0**2] += 200.0
    base = {"restrict_to_lungs": False, "max_candidates": 3, "max_response_candidates": 3}

    def near(cfg: BlobConfig) -> np.ndarray:
        cand = scan_candidates(hu, case.geometry, cfg)
        hit = np.linalg.norm(cand.centers_xyz_mm - centre[::-1], axis=1) < 7.0
        return cand.scales_mm[hit]

    assert len(near(BlobConfig(**base))) == 0
    kept = near(BlobConfig(**base, all_maxima_from_mm=5.0))
    assert len(kept) > 0 and kept.min() >= 5.0
    with pytest.raises(ConfigError, match="all_maxima_from_mm"):
        BlobConfig(all_maxima_from_mm=-1.0)
    assert BlobConfig(**base).candidate_key() != BlobConfig(**base, all_maxima_from_mm=5.0).candidate_key()
