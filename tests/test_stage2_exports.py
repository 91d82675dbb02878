"""Stage 2 exports: merged label NIfTI + JSON, and DICOM SEG (highdicom) on a small written series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lidc_det.geometry import VolumeGeometry
from lidc_det.results import NoduleMask
from stage2_segment.exports import export_masks, merged_label_map

GEOM = VolumeGeometry((12, 20, 20), (2.0, 1.0, 1.0), (-10.0, -10.0, 30.0))


def _mask(box: list[int], score: float) -> NoduleMask:
    b = np.asarray(box)
    m = np.ones(tuple(b[3:] - b[:3]), dtype=bool)
    return NoduleMask("1.2.3", b, m, GEOM.spacing_zyx, (0.0, 0.0, 0.0), float(m.sum()) * 2.0, 3.0, 10.0, score)


def test_merged_label_map_first_mask_wins_and_files(tmp_path: Path) -> None:
    from lidc_det.io.nifti import read_nifti

    a = _mask([2, 2, 2, 5, 6, 6], 0.9)
    b = _mask([4, 4, 4, 7, 8, 8], 0.5)  # overlaps a at z=4, y/x 4..5
    empty = NoduleMask("1.2.3", np.array([0, 0, 0, 0, 0, 0]), np.zeros((0, 0, 0), bool), GEOM.spacing_zyx,
                       (0.0, 0.0, 0.0), 0.0, 0.0, float("nan"), 0.1)
    lab = merged_label_map([a, b, empty], GEOM.shape_zyx)
    assert lab[4, 4, 4] == 1 and lab[6, 7, 7] == 2 and lab[2, 2, 2] == 1
    assert (lab == 1).sum() == a.mask.sum() and (lab == 2).sum() == b.mask.sum() - 2 * 2 * 1
    nii, js = export_masks([a, b, empty], GEOM, tmp_path, stem="s")
    arr, g = read_nifti(nii)
    np.testing.assert_array_equal(arr, lab)
    np.testing.assert_allclose(g.spacing_zyx, GEOM.spacing_zyx)
    rec = json.loads(js.read_text())
    assert [m["label"] for m in rec["masks"]] == [1, 2, 3] and rec["masks"][2]["empty"] and rec["masks"][2]["mean_hu"] is None


def test_dicom_seg_roundtrip(tmp_path: Path) -> None:
    import highdicom as hd

    from lidc_det.io.dicom_write import write_ct_series
    from stage2_segment.exports import export_dicom_seg

    hu = np.full(GEOM.shape_zyx, -1000.0)
    write_ct_series(hu, GEOM, tmp_path / "ct", patient_id="P1", study_uid="1.2.826.0.1.3680043.8.498.1",
                    series_uid="1.2.826.0.1.3680043.8.498.2")
    a = _mask([2, 2, 2, 5, 6, 6], 0.9)
    out = export_dicom_seg([a], GEOM, tmp_path / "ct", tmp_path / "seg.dcm")
    seg = hd.seg.segread(out)
    assert seg.number_of_segments == 1
    vol = seg.get_volume(combine_segments=True)
    arr = np.asarray(vol.array)
    assert int(arr.astype(bool).sum()) == int(a.mask.sum())
    # the segment sits where the mask is in the patient (highdicom's affine maps array index -> LPS mm)
    idx = np.argwhere(arr.astype(bool)).mean(axis=0)
    world = (np.asarray(vol.affine) @ np.append(idx, 1.0))[:3]
    expected = GEOM.voxel_to_world(np.argwhere(a.full_mask(GEOM.shape_zyx)).mean(axis=0))
    np.testing.assert_allclose(world, expected, atol=1e-3)
