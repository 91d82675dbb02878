"""Stage 2 crops and the nnU-Net raw data set: geometry round trips, labels, spacing in NIfTI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lidc_det.data.prepared import PreparedCase, PreparedNodule
from lidc_det.geometry import VolumeGeometry
from lidc_det.results import Detections
from stage2_segment.crops import CropConfig, crop_box, detection_crops, extract, negative_crops, nodule_crops

# an oblique-free but non-trivial geometry: flipped y axis, anisotropic spacing, offset origin
GEOM = VolumeGeometry((40, 50, 60), (2.0, 0.8, 0.7), (-100.0, 50.0, -300.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))


def _case(rng: np.random.Generator) -> PreparedCase:
    geom = VolumeGeometry((60, 64, 64), (1.0, 1.0, 1.0), (-30.0, -40.0, -50.0))
    hu = np.full(geom.shape_zyx, -800, dtype=np.int16)
    hu[:, :, 40:44] = 50  # a dense "wall" for negatives
    labels = np.zeros(geom.shape_zyx, dtype=np.uint8)
    zz, yy, xx = np.ogrid[:60, :64, :64]
    ball = (zz - 20) ** 2 + (yy - 30) ** 2 + (xx - 20) ** 2 <= 16
    labels[ball] = 1
    hu[ball] = 30
    center = geom.voxel_to_world(np.array([20.0, 30.0, 20.0]))
    nod = PreparedNodule("n:0", 1, tuple(center), 8.0, 268.0, 4, 3.0, {}, (16, 26, 16, 25, 35, 25))
    return PreparedCase("1.2.3", "P1", 0, geom, hu, labels, (nod,), (), Path("."))


def test_crop_box_centres_the_nearest_voxel_and_maps_back_to_world() -> None:
    cfg = CropConfig(size_mm=16.0)
    size = cfg.size_voxels(GEOM.spacing_zyx)
    assert size == (8, 20, 23)
    world = GEOM.voxel_to_world(np.array([12.2, 30.6, 17.4]))
    box = crop_box(world, GEOM, size)
    np.testing.assert_array_equal(box[3:] - box[:3], size)
    np.testing.assert_array_equal(box[:3] + np.asarray(size) // 2, [12, 31, 17])
    # the crop's own geometry puts every crop voxel at the world position of the full-volume voxel
    hu = np.zeros(GEOM.shape_zyx, dtype=np.float32)
    det = Detections("1.2.3", world[None], np.zeros(1), np.ones(1))
    crop = detection_crops(hu, GEOM, det, cfg)[0]
    g = crop.geometry
    for v in ([0, 0, 0], [3, 7, 11], [7, 19, 22]):
        np.testing.assert_allclose(g.voxel_to_world(np.array(v, float)), GEOM.voxel_to_world(box[:3] + v), atol=1e-9)
    centre_world = g.voxel_to_world(np.asarray(size, float) // 2)
    assert np.linalg.norm(centre_world - world) <= 0.5 * np.linalg.norm(GEOM.spacing_xyz) + 1e-9


def test_extract_pads_outside_the_volume() -> None:
    vol = np.arange(27, dtype=np.int16).reshape(3, 3, 3)
    out = extract(vol, np.array([-1, 0, 1, 2, 3, 4]), -5)
    assert out.shape == (3, 3, 3)
    assert (out[0] == -5).all() and (out[:, :, 2] == -5).all()
    np.testing.assert_array_equal(out[1:, :, :2], vol[:2, :, 1:3])


def test_nodule_crops_carry_the_label_and_negatives_avoid_it() -> None:
    rng = np.random.default_rng(0)
    case = _case(rng)
    cfg = CropConfig(size_mm=24.0, jitter_mm=3.0, negatives_per_scan=3)
    crops = nodule_crops(case, cfg, rng)
    assert len(crops) == 1 and crops[0].kind == "nodule"
    c = crops[0]
    assert c.image.shape == (24, 24, 24) and c.label is not None
    assert int(c.label.sum()) == int(case.labels.sum())  # the whole ball is inside the crop
    assert np.all(np.abs(np.asarray(c.center_xyz_mm) - case.nodules[0].center_xyz_mm) <= 3.0)
    negs = negative_crops(case, cfg, rng)
    assert 1 <= len(negs) <= 3
    for n in negs:
        assert n.kind == "negative" and n.label is not None and not n.label.any()
        centre = np.rint(case.geometry.world_to_voxel(np.asarray(n.center_xyz_mm))).astype(int)
        assert case.image_hu[tuple(centre)] >= cfg.negative_min_hu
        q = 24 // 4  # the central half-size cube is mostly lung
        core = case.image_hu[tuple(slice(c - q, c + q + 1) for c in centre)]
        assert core.mean() <= cfg.negative_max_mean_hu


def test_negatives_in_solid_tissue_only_when_allowed() -> None:
    """A scan that is all soft tissue: no negative is surrounded by lung, unless the condition is off."""
    rng = np.random.default_rng(1)
    case = _case(rng)
    solid = np.asarray(case.image_hu).copy()
    solid[solid < 0] = 40
    case = PreparedCase(case.series_uid, case.patient_id, 0, case.geometry, solid, case.labels, case.nodules, (),
                        Path("."))
    assert negative_crops(case, CropConfig(size_mm=24.0, negatives_per_scan=2), rng) == []
    anywhere = CropConfig(size_mm=24.0, negatives_per_scan=2, negative_max_mean_hu=None)
    assert len(negative_crops(case, anywhere, rng)) == 2


def test_raw_dataset_json_and_nifti_spacing(tmp_path: Path) -> None:
    from lidc_det.io.nifti import read_nifti
    from stage2_segment.nnunet_dataset import (
        NnUnetDatasetError,
        NnUnetPaths,
        nnunet_environment,
        write_raw_dataset,
        write_splits,
    )

    rng = np.random.default_rng(1)
    case = _case(rng)
    cfg = CropConfig(size_mm=24.0, negatives_per_scan=1)
    crops = nodule_crops(case, cfg, rng) + negative_crops(case, cfg, rng)
    paths = NnUnetPaths(tmp_path)
    folder = write_raw_dataset(crops, paths, 7, "t", progress=False)
    assert folder.name == "Dataset007_t"
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0, "nodule": 1}
    assert dj["numTraining"] == len(crops) and dj["file_ending"] == ".nii.gz"
    img, g = read_nifti(folder / "imagesTr" / "crop_00000_0000.nii.gz")
    lab, gl = read_nifti(folder / "labelsTr" / "crop_00000.nii.gz")
    assert img.shape == lab.shape == (24, 24, 24)
    np.testing.assert_allclose(g.spacing_zyx, case.geometry.spacing_zyx)
    np.testing.assert_allclose(g.origin_xyz, crops[0].geometry.origin_xyz, atol=1e-4)
    np.testing.assert_array_equal(lab, crops[0].label)
    # splits: one scan cannot be both; a side without crops is an error
    with pytest.raises(NnUnetDatasetError):
        write_splits(paths, 7, "t", ["1.2.3"], [])
    # rewriting other crops into the same data set is refused
    with pytest.raises(NnUnetDatasetError):
        write_raw_dataset(crops[:1], paths, 7, "t", progress=False)
    import os

    before = os.environ.get("nnUNet_raw")
    with nnunet_environment(paths):
        assert os.environ["nnUNet_raw"] == str(paths.raw)
        assert os.environ["nnUNet_extTrainer"].split(os.pathsep)[0].endswith("nnunet_ext")
    assert os.environ.get("nnUNet_raw") == before


def test_narrowed_architecture_scales_features_and_keeps_the_rest() -> None:
    from stage2_segment.nnunet_dataset import narrowed_architecture

    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5},
        "_kw_requires_import": ["conv_op"],
    }
    narrow = narrowed_architecture(arch, 8)
    assert narrow["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64, 128, 256]
    assert narrowed_architecture(arch, 64)["arch_kwargs"]["features_per_stage"] == [64, 128, 256, 320, 320, 320]
    assert narrow["arch_kwargs"]["strides"] == arch["arch_kwargs"]["strides"]
    assert arch["arch_kwargs"]["features_per_stage"][0] == 32  # the input is not modified
    with pytest.raises(ValueError):
        narrowed_architecture(arch, 0)


def test_segmenter_config_checks_optimizer_and_builds_from_yaml_dict() -> None:
    from stage2_segment.config import SegmenterConfig, TrainConfig

    cfg = SegmenterConfig.from_dict({"plan_base_features": 8, "train": {"optimizer": "adamw", "initial_lr": 1e-3}})
    assert cfg.plan_base_features == 8 and cfg.train.schedule()["optimizer"] == "adamw"
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="unknown keys"):
        SegmenterConfig.from_dict({"train": {"optimiser": "sgd"}})
