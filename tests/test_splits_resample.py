"""Patient-level folds, mask/image resampling, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from lidc_det.atomic import atomic_path, write_json
from lidc_det.data.splits import patient_folds, train_val_test
from lidc_det.geometry import VolumeGeometry
from lidc_det.resample import resample_image, resample_mask


def test_folds_are_patient_level_and_reproducible() -> None:
    patients = [f"P{i:03d}" for i in range(37)] + ["P001", "P001", "P005"]  # repeated scans
    a = patient_folds(patients, 10, seed=1)
    assert a == patient_folds(patients, 10, seed=1)
    assert a != patient_folds(patients, 10, seed=2)
    assert set(a) == set(patients) and set(a.values()) == set(range(10))
    counts = np.bincount([a[p] for p in patients])  # scans per fold are balanced
    assert counts.max() - counts.min() <= 2


def test_fewer_patients_than_folds() -> None:
    assert patient_folds(["A"], 10) == {"A": 0}
    f = patient_folds(["A", "B", "C"], 10, seed=0)
    assert sorted(f.values()) == [0, 1, 2]


def test_train_val_test_disjoint() -> None:
    folds = patient_folds([f"P{i}" for i in range(30)], 10, seed=0)
    train, val, test = train_val_test(folds, test_fold=3)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    assert len(train) + len(val) + len(test) == 30
    assert {folds[p] for p in val} == {4} and {folds[p] for p in test} == {3}
    with pytest.raises(ValueError):
        train_val_test(folds, test_fold=3, val_fold=3)


def test_resample_image_preserves_position() -> None:
    geom = VolumeGeometry((20, 40, 40), (2.5, 0.7, 0.7), (-10.0, 5.0, -50.0))
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in geom.shape_zyx], indexing="ij")
    world = geom.voxel_to_world(np.stack([zz, yy, xx], -1).reshape(-1, 3))
    hu = (world[:, 0] * 2 + world[:, 1] - world[:, 2]).reshape(geom.shape_zyx)  # linear in world
    out, g2 = resample_image(hu, geom, (1.0, 1.0, 1.0))
    assert g2.shape_zyx == (50, 28, 28) and g2.spacing_zyx == (1.0, 1.0, 1.0)
    # a linear field is reproduced exactly by linear interpolation inside the source
    p = np.array([[10, 10, 10], [30, 20, 5]], dtype=float)
    w = g2.voxel_to_world(p)
    expected = w[:, 0] * 2 + w[:, 1] - w[:, 2]
    got = out[tuple(p.astype(int).T)]
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_resample_mask_keeps_volume_and_place() -> None:
    geom = VolumeGeometry((40, 80, 80), (2.5, 0.7, 0.7), (0.0, 0.0, 0.0))
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in geom.shape_zyx], indexing="ij")
    w = geom.voxel_to_world(np.stack([zz, yy, xx], -1).reshape(-1, 3)).reshape(*geom.shape_zyx, 3)
    centre = np.array([25.0, 30.0, 50.0])
    mask = np.linalg.norm(w - centre, axis=-1) < 10.0  # 20 mm sphere
    target = geom.with_spacing((1.0, 1.0, 1.0))
    out = resample_mask(mask, geom, target)
    vol_in = mask.sum() * np.prod(geom.spacing_zyx)
    vol_out = out.sum() * np.prod(target.spacing_zyx)
    assert abs(vol_out - vol_in) / vol_in < 0.05
    assert abs(vol_out - 4 / 3 * np.pi * 1000) / (4 / 3 * np.pi * 1000) < 0.1
    c = target.voxel_to_world(np.argwhere(out).mean(axis=0))
    np.testing.assert_allclose(c, centre, atol=0.6)
    assert not resample_mask(np.zeros_like(mask), geom, target).any()


def test_atomic_write_leaves_no_partial_file(tmp_path) -> None:
    target = tmp_path / "x.json"
    write_json(target, {"a": np.float32(1.5)})
    assert target.read_text().strip().startswith("{")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert '"a": 1.5' in target.read_text()  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
