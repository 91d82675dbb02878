"""Detector registry: names, duplicates, and a plug-in installed through an entry point
(a real ``*.dist-info`` folder on ``sys.path``) run through build_detector + predict + FROC."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lidc_det.data.luna import LunaFinding
from lidc_det.metrics.froc import evaluate_detections
from lidc_det.results import Detections
from stage1_detect import registry
from stage1_detect.registry import (
    ENTRY_POINT_GROUP,
    DetectorRegistryError,
    DuplicateDetectorError,
    UnknownDetectorError,
    build_detector,
    list_detectors,
    register_detector,
    unregister_detector,
)
from stage1_detect.toydata import random_sphere_cases

# The example plug-in of docs/plugins.md (kept identical: the test reads it from there).
DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def _plugin_source() -> str:
    text = DOCS.read_text()
    start = text.index("```python\n# blobdet/__init__.py") + len("```python\n")
    return text[start : text.index("```", start)]


def _install_plugin(root: Path, name: str = "blobs", package: str = "blobdet", dist: str = "blobdet") -> None:
    """Write ``package`` and its ``dist.dist-info`` (METADATA + entry_points.txt) under ``root``,
    exactly what ``pip install`` of a package declaring the entry point leaves in site-packages."""
    (root / package).mkdir(parents=True, exist_ok=True)
    (root / package / "__init__.py").write_text(_plugin_source())
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {package}:BlobDetector\n")


@pytest.fixture()
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for n in ("blobs", "blobs2"):
        unregister_detector(n)
    for mod in [m for m in sys.modules if m.startswith("blobdet")]:
        del sys.modules[mod]


def test_builtin_detectors_are_listed_and_unknown_names_fail() -> None:
    names = list_detectors()
    assert "retina3d" in names and "monai_retinanet" in names
    with pytest.raises(UnknownDetectorError, match="no-such-detector"):
        build_detector("no-such-detector")
    with pytest.raises(DetectorRegistryError, match="'name'"):
        build_detector({"config": "tiny"})


def test_duplicate_names_are_refused() -> None:
    @register_detector("dup-test")
    class A:
        def predict(self, hu, geometry, *, series_uid):  # pragma: no cover - never called
            raise AssertionError

    try:
        with pytest.raises(DuplicateDetectorError, match="dup-test"):
            register_detector("dup-test")(type("B", (), {}))
        with pytest.raises(DetectorRegistryError, match="no predict"):
            register_detector("no-predict")(lambda: object())
            build_detector("no-predict")
    finally:
        unregister_detector("dup-test")
        unregister_detector("no-predict")


def test_plugin_from_an_entry_point_runs_through_build_predict_and_froc(plugin_path: Path) -> None:
    _install_plugin(plugin_path)
    assert "blobs" in list_detectors()
    assert "blobdet" not in sys.modules  # entry points are imported only when built
    det = build_detector({"name": "blobs", "threshold_hu": -400.0})
    assert type(det).__module__ == "blobdet"
    cases = random_sphere_cases(3, shape_zyx=(48, 48, 48), spheres_per_case=2, diameter_range=(6.0, 10.0), seed=4)
    dets = [det.predict(c.image_hu, c.geometry, series_uid=c.series_uid) for c in cases]
    assert all(isinstance(d, Detections) for d in dets)
    from stage1_detect.data import case_findings

    annotations = [LunaFinding(c.series_uid, ctr, d) for c in cases for ctr, d in case_findings(c)[0]]
    res = evaluate_detections(annotations, dets, n_bootstrap=0)
    assert res.n_nodules == 6 and res.n_tp_nodules == 6 and res.cpm == pytest.approx(1.0)
    # built again (and listed again) after loading: no false duplicate with its own entry point
    assert "blobs" in list_detectors()
    assert type(build_detector("blobs")).__name__ == "BlobDetector"


def test_plugin_name_clashing_with_a_builtin_is_refused(plugin_path: Path) -> None:
    _install_plugin(plugin_path, name="retina3d")
    with pytest.raises(DuplicateDetectorError, match="retina3d.*blobdet"):
        list_detectors()


def test_plugin_that_fails_to_import_names_its_entry_point(plugin_path: Path) -> None:
    _install_plugin(plugin_path, name="blobs2", package="blobdet_broken", dist="broken")
    (plugin_path / "blobdet_broken" / "__init__.py").write_text("raise ImportError('missing dependency xyz')\n")
    with pytest.raises(DetectorRegistryError, match="blobs2.*xyz"):
        build_detector("blobs2")


def test_listing_detectors_does_not_import_torch() -> None:
    """``lidc-det --help`` and listing stay fast: built-in modules import torch/monai lazily."""
    import subprocess

    code = "import sys; from stage1_detect.registry import list_detectors; list_detectors(); print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_builtin_that_fails_to_import_is_reported_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A built-in module whose import fails raises a named error (its detector does not silently
    vanish from list_detectors), forgets what it registered, and is imported again next time."""
    (tmp_path / "flaky_builtin.py").write_text(
        "import os\n"
        "from stage1_detect.registry import register_detector\n\n"
        "@register_detector('flaky')\n"
        "class Flaky:\n"
        "    def predict(self, hu, geometry, *, series_uid):\n"
        "        raise NotImplementedError\n\n"
        "if os.environ.get('FLAKY_FAIL') == '1':\n"
        "    raise ImportError('a dependency is broken')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "BUILTIN_MODULES", (*registry.BUILTIN_MODULES, "flaky_builtin"))
    monkeypatch.setenv("FLAKY_FAIL", "1")
    try:
        for _ in range(2):  # not marked loaded after the failure: the second call imports it again
            with pytest.raises(DetectorRegistryError, match="flaky_builtin failed to import.*dependency is broken"):
                list_detectors()
            assert "flaky" not in registry._REGISTRY
            sys.modules.pop("flaky_builtin", None)
        monkeypatch.setenv("FLAKY_FAIL", "0")
        assert "flaky" in list_detectors() and "retina3d" in list_detectors()
        assert "flaky_builtin" in registry._loaded_builtins
    finally:
        unregister_detector("flaky")
        registry._loaded_builtins.discard("flaky_builtin")
        sys.modules.pop("flaky_builtin", None)
