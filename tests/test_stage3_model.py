"""Image-based malignancy model: samples, radiomics, embeddings, LightGBM, save/load, classify CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stage3_malignancy.config import ConfigError, EmbeddingConfig, MalignancyModelConfig
from stage3_malignancy.model import MalignancyModel, ModelError
from stage3_malignancy.samples import MalignancySample, SampleError, samples_from_volume

SPACING = (1.5, 0.8, 0.8)


def _blob(r_mm: float, rng: np.random.Generator, shape: tuple[int, int, int] = (20, 40, 40)) -> np.ndarray:
    c = [(n - 1) / 2 for n in shape]
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - ci) * s for n, ci, s in zip(shape, c, SPACING)], indexing="ij")
    wob = 1 + 0.1 * rng.normal()
    return (zz / (r_mm * wob)) ** 2 + (yy / r_mm) ** 2 + (xx / r_mm) ** 2 <= 1


def _samples(n: int = 16, seed: int = 0) -> list[MalignancySample]:
    """Malignant = large and solid, benign = small and fainter; 2 nodules per patient."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lab = i % 2
        m = _blob(rng.uniform(6, 9) if lab else rng.uniform(2.5, 4.5), rng)
        img = rng.normal(-800, 30, m.shape).astype(np.float32)
        img[m] = rng.normal(30 if lab else -300, 30, int(m.sum()))
        out.append(MalignancySample(img, m, SPACING, f"S{i}", f"P{i // 2}", (1.0, 2.0, 3.0), lab, f"S{i}:0"))
    return out


def test_sample_validation() -> None:
    img = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(SampleError, match="empty"):
        MalignancySample(img, np.zeros((4, 4, 4), bool), (1, 1, 1), "s", "p", (0, 0, 0))
    with pytest.raises(SampleError, match="same 3D shape"):
        MalignancySample(img, np.ones((4, 4, 3), bool), (1, 1, 1), "s", "p", (0, 0, 0))
    with pytest.raises(SampleError, match="label"):
        MalignancySample(img, np.ones((4, 4, 4), bool), (1, 1, 1), "s", "p", (0, 0, 0), label=3)


def test_samples_from_volume_crops_and_centres() -> None:
    from lidc_det.geometry import VolumeGeometry

    geom = VolumeGeometry((40, 100, 100), (2.0, 0.5, 0.5), (-10.0, -20.0, -30.0), tuple(np.eye(3).ravel()))
    vol = np.full(geom.shape_zyx, -1000, np.float32)
    m = np.zeros(geom.shape_zyx, bool)
    m[20:22, 50:54, 60:64] = True
    vol[m] = 50
    (s,) = samples_from_volume(vol, geom, [m], series_uid="U", patient_id="P", margin_mm=4, min_half_mm=5)
    assert s.mask.sum() == m.sum() and s.image_hu[s.mask].min() == 50
    assert s.mask.shape[0] < 40 and s.mask.shape[1] < 100  # a crop, not the volume
    x, y, z = s.center_xyz_mm  # voxel centroid (20.5, 51.5, 61.5)
    assert (x, y, z) == pytest.approx((-10 + 61.5 * 0.5, -20 + 51.5 * 0.5, -30 + 20.5 * 2.0))


def test_fit_predict_save_load_shape_only(tmp_path: Path) -> None:
    samples = _samples()
    cfg = MalignancyModelConfig(features=("diameter", "shape"))
    m = MalignancyModel(cfg).fit(samples, progress=False)
    scores = m.predict(samples)
    assert len(scores) == len(samples)
    assert all(0.0 <= s.probability <= 1.0 and s.model == "lightgbm[diameter+shape]" for s in scores)
    assert scores[0].nodule_id == "S0:0" and scores[0].center_xyz_mm == (1.0, 2.0, 3.0)
    p = np.array([s.probability for s in scores])
    y = np.array([s.label for s in samples])
    assert p[y == 1].mean() > p[y == 0].mean()
    contrib = m.contributions(samples)
    assert list(contrib.columns[-1:]) == ["bias"] and contrib.shape[1] == len(m.feature_names) + 1
    raw = m.predict_proba(samples, calibrated=False)
    assert np.allclose(contrib.sum(axis=1), np.log(raw / (1 - raw)), atol=1e-6)
    m.save(tmp_path / "model")
    m2 = MalignancyModel.load(tmp_path / "model")
    assert np.allclose(m2.predict_proba(samples), m.predict_proba(samples))
    assert m2.feature_names == m.feature_names


def test_fit_errors(tmp_path: Path) -> None:
    s = _samples(6)
    with pytest.raises(ModelError, match="both classes"):
        MalignancyModel(MalignancyModelConfig(features=("shape",))).fit([x for x in s if x.label == 1])
    from dataclasses import replace

    with pytest.raises(ModelError, match="labelled"):
        MalignancyModel(MalignancyModelConfig(features=("shape",))).fit([replace(s[0], label=None), *s[1:]])
    with pytest.raises(ModelError, match="not fitted"):
        MalignancyModel().predict(s)
    with pytest.raises(ModelError, match="not a saved"):
        MalignancyModel.load(tmp_path)
    with pytest.raises(ConfigError, match="features"):
        MalignancyModelConfig(features=("texture",))


def test_radiomics_features_and_cache(tmp_path: Path) -> None:
    from stage3_malignancy.radiomics_features import extract_radiomics

    s = _samples(2)
    t1 = extract_radiomics(s, cache_dir=tmp_path, progress=False)
    assert t1.table.shape[0] == 2 and t1.table.shape[1] > 90 and t1.computed == 2
    assert not any(t1.errors)
    vol = float(s[1].mask.sum()) * float(np.prod(SPACING))
    # resampled to 1 mm, so the mesh volume is near, not equal to, the voxel volume
    assert t1.table["shape_MeshVolume"][1] == pytest.approx(vol, rel=0.15)
    assert t1.table["firstorder_Mean"][1] > t1.table["firstorder_Mean"][0]  # solid vs faint
    t2 = extract_radiomics(s, cache_dir=tmp_path, progress=False)
    assert t2.computed == 0 and t2.table.equals(t1.table)


def test_pooled_embeddings_any_module_and_hook() -> None:
    import torch

    from stage3_malignancy.embeddings import nodule_cubes, pooled_embeddings

    ec = EmbeddingConfig(cube_voxels=16, voxel_mm=1.5)
    cubes = nodule_cubes(_samples(3), ec)
    assert cubes.shape == (3, 2, 16, 16, 16)
    assert cubes[:, 1].sum(axis=(1, 2, 3)).min() > 0  # the mask is in every cube
    assert 0.0 <= cubes[:, 0].min() and cubes[:, 0].max() <= 1.0
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 5, 3), torch.nn.ReLU(), torch.nn.Conv3d(5, 7, 3))
    e = pooled_embeddings(net, cubes, device="cpu", channels=[0])
    assert e.shape == (3, 7)
    e_hook = pooled_embeddings(net, cubes, device="cpu", channels=[0], layer="1")
    assert e_hook.shape == (3, 5) and (e_hook >= 0).all()  # pooled ReLU output


def test_fit_with_embeddings_round_trip(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    samples = _samples(12)
    cfg = MalignancyModelConfig(
        features=("shape", "embeddings"),
        embedding=EmbeddingConfig(cube_voxels=16, voxel_mm=1.5, width=4, epochs=2, device="cpu"),
    )
    m = MalignancyModel(cfg).fit(samples, progress=False)
    assert any(n.startswith("emb_") for n in m.feature_names) and m.fit_info["cnn"]["epochs"] == 2
    m.save(tmp_path / "m")
    assert (tmp_path / "m" / "cnn.pt").is_file()
    m2 = MalignancyModel.load(tmp_path / "m")
    assert np.allclose(m2.predict_proba(samples), m.predict_proba(samples), atol=1e-6)


def test_samples_from_prepared(tmp_path: Path) -> None:
    """A hand-written prepared data set in the documented layout (lidc_det.data.prepare)."""
    from lidc_det.data.prepare import FORMAT_VERSION
    from lidc_det.data.prepared import PreparedDataset
    from lidc_det.geometry import VolumeGeometry
    from stage3_malignancy.samples import samples_from_prepared

    geom = VolumeGeometry((30, 60, 60), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    uid = "1.2.3"
    folder = tmp_path / "scans" / uid
    folder.mkdir(parents=True)
    img = np.full(geom.shape_zyx, -900, np.int16)
    labels = np.zeros(geom.shape_zyx, np.uint8)
    masks = {}
    nods = []
    for lab, (z, med) in enumerate([(8, 4.5), (20, 1.5), (14, 3.0)], start=1):
        box = np.array([z - 2, 20, 20, z + 2, 25, 25])
        labels[z - 2:z + 2, 20:25, 20:25] = lab
        img[z - 2:z + 2, 20:25, 20:25] = 40
        masks[f"mask_{lab}"] = np.ones((4, 5, 5), bool)
        masks[f"box_{lab}"] = box
        nods.append({"nodule_id": f"{uid}:{lab}", "label": lab, "n_readers": 4, "center_xyz_mm": [22.0, 22.0, z],
                     "diameter_mm": 5.0, "reader_mean_diameter_mm": 6.0 + lab, "volume_mm3": 100.0,
                     "malignancy_median": med, "characteristics": {}, "box_voxel": box.tolist()})
    np.save(folder / "image.npy", img)
    np.save(folder / "labels.npy", labels)
    np.savez_compressed(folder / "masks.npz", **masks)
    (folder / "meta.json").write_text(json.dumps({"patient_id": "LIDC-X", "geometry": geom.to_dict(),
                                                  "nodules": nods, "irrelevant": []}))
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "scans": [{"series_uid": uid, "patient_id": "LIDC-X", "fold": 0}]}))
    ds = PreparedDataset(tmp_path)
    s = samples_from_prepared(ds)
    assert [x.label for x in s] == [1, 0]  # median 3 dropped
    assert [x.diameter_mm for x in s] == [7.0, 8.0]
    assert all(x.mask.sum() == 100 and (x.image_hu[x.mask] == 40).all() for x in s)
    assert len(samples_from_prepared(ds, keep_unlabelled=True)) == 3


def test_classify_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lidc_det.cli import main
    from lidc_det.geometry import VolumeGeometry
    from lidc_det.io.nifti import write_nifti

    samples = _samples()
    MalignancyModel(MalignancyModelConfig(features=("shape",))).fit(samples, progress=False).save(tmp_path / "m")
    big, small = samples[1], samples[0]  # malignant-like, benign-like
    shape = (20, 80, 40)
    vol = np.full(shape, -800, np.float32)
    lab = np.zeros(shape, np.uint8)
    vol[:, :40], vol[:, 40:] = big.image_hu, small.image_hu
    lab[:, :40][big.mask], lab[:, 40:][small.mask] = 1, 2
    geom = VolumeGeometry(shape, SPACING, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    write_nifti(vol, geom, tmp_path / "ct.nii.gz")
    write_nifti(lab, geom, tmp_path / "nodules.nii.gz")
    rc = main(["classify", "--image", str(tmp_path / "ct.nii.gz"), "--masks", str(tmp_path / "nodules.nii.gz"),
               "--model", str(tmp_path / "m"), "--out", str(tmp_path / "scores.json")])
    assert rc == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert [s["nodule_id"] for s in scores] == ["nodules:1", "nodules:2"]
    assert scores[0]["probability"] > scores[1]["probability"]
    assert "P(malignant)" in capsys.readouterr().out
    write_nifti(np.zeros((3, 3, 3), np.uint8), VolumeGeometry((3, 3, 3), (1, 1, 1), (0, 0, 0),
                tuple(np.eye(3).ravel())), tmp_path / "bad.nii.gz")
    rc = main(["classify", "--image", str(tmp_path / "ct.nii.gz"), "--masks", str(tmp_path / "bad.nii.gz"),
               "--model", str(tmp_path / "m")])
    assert rc == 2 and "mask shape" in capsys.readouterr().err


def test_samples_from_nodule_masks() -> None:
    from lidc_det.geometry import VolumeGeometry
    from lidc_det.results import NoduleMask
    from stage3_malignancy.samples import samples_from_nodule_masks

    geom = VolumeGeometry((20, 50, 50), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    vol = np.full(geom.shape_zyx, -900, np.float32)
    vol[8:12, 20:26, 30:36] = 60
    nm = NoduleMask(series_uid="U", box_voxel=np.array([8, 20, 30, 12, 26, 36]), mask=np.ones((4, 6, 6), bool),
                    spacing_zyx_mm=(1.0, 1.0, 1.0), center_xyz_mm=(33.0, 23.0, 10.0), volume_mm3=144.0,
                    max_diameter_mm=8.5, mean_hu=60.0)
    empty = NoduleMask(series_uid="U", box_voxel=np.array([0, 0, 0, 2, 2, 2]), mask=np.zeros((2, 2, 2), bool),
                       spacing_zyx_mm=(1.0, 1.0, 1.0), center_xyz_mm=(1.0, 1.0, 1.0), volume_mm3=0.0,
                       max_diameter_mm=0.0, mean_hu=-900.0)
    (s,) = samples_from_nodule_masks(vol, geom, [nm, empty], patient_id="P")
    assert s.mask.sum() == 144 and (s.image_hu[s.mask] == 60).all()
    assert s.center_xyz_mm == (33.0, 23.0, 10.0) and s.patient_id == "P" and s.label is None
