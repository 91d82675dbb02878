"""ONNX export of the retina3d network: raw-output and detection parity with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
import torch

from stage1_detect.detector import Retina3DDetector  # noqa: E402
from stage1_detect.export import OnnxDetector, OnnxExportError, compare_detections, export_onnx  # noqa: E402
from stage1_detect.toydata import random_sphere_cases  # noqa: E402


def _detector() -> Retina3DDetector:
    """A seeded, untrained tiny detector whose classification prior is lifted to 0.5, so that
    it emits many candidates with spread-out scores (a meaningful parity check)."""
    det = Retina3DDetector("tiny", device="cpu", progress=False, score_thresh=0.3, use_body_mask=False)
    with torch.no_grad():
        det.model.cls_out.bias.zero_()
        g = torch.Generator().manual_seed(1)
        det.model.cls_out.weight.copy_(torch.randn(det.model.cls_out.weight.shape, generator=g) * 0.2)
    det._prepare_for_inference()
    return det


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Retina3DDetector, Path]:
    det = _detector()
    return det, export_onnx(det, tmp_path_factory.mktemp("onnx") / "retina3d.onnx")


def test_raw_outputs_match_torch_for_other_shapes(exported: tuple[Retina3DDetector, Path]) -> None:
    from stage1_detect.export import OnnxRetina3D

    det, path = exported
    net = OnnxRetina3D(path, ["CPUExecutionProvider"])
    x = torch.randn((2, 1, 48, 80, 64), generator=torch.Generator().manual_seed(0))
    cls_o, box_o = net(x)
    with torch.no_grad():
        cls_t, box_t = det._inference_model(x)
    for a, b in zip(cls_o + box_o, cls_t + box_t):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) < 1e-4
    assert net.config == det.config  # the config travels inside the .onnx


def test_detections_match_torch_on_a_toy_scan(exported: tuple[Retina3DDetector, Path]) -> None:
    det, path = exported
    case = random_sphere_cases(1, shape_zyx=(64, 96, 80), seed=3)[0]
    ref = det.predict(case.image_hu, case.geometry, series_uid=case.series_uid)
    onnx_det = OnnxDetector(path, providers=["CPUExecutionProvider"], progress=False)
    got = onnx_det.predict(case.image_hu, case.geometry, series_uid=case.series_uid)
    assert len(ref) > 10  # the check is not vacuous
    stats = compare_detections(ref, got)
    assert stats["max_center_mm"] < 0.01 and stats["max_score"] < 1e-4


def test_compare_detections_flags_differences(exported: tuple[Retina3DDetector, Path]) -> None:
    det, _ = exported
    case = random_sphere_cases(1, shape_zyx=(64, 64, 64), seed=4)[0]
    ref = det.predict(case.image_hu, case.geometry, series_uid=case.series_uid)
    assert len(ref) > 1
    shifted = type(ref)(ref.series_uid, ref.centers_xyz_mm + 2.0, ref.diameters_mm, ref.scores)
    with pytest.raises(OnnxExportError, match="centres differ"):
        compare_detections(ref, shifted)
    with pytest.raises(OnnxExportError, match="detections"):
        compare_detections(ref, ref.top_k(1))


def test_onnx_file_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match="no such ONNX file"):
        OnnxDetector(tmp_path / "missing.onnx")
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Conv3d(1, 1, 1), (torch.zeros(1, 1, 16, 16, 16),), str(plain), dynamo=False, input_names=["image"])
    with pytest.raises(OnnxExportError, match="metadata"):
        OnnxDetector(plain, providers=["CPUExecutionProvider"])
