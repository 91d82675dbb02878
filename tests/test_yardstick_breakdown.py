"""The yardstick breakdown by nodule kind, from any detector's final detections."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.yardstick_breakdown import breakdown, detection_rows, summary, summary_markdown
from lidc_det.data.luna import LunaFinding
from lidc_det.results import Detections


def _nodule(x: float, d: float, placement: str, texture: int) -> dict:
    return {"nodule_id": f"n{x:g}:inserted", "center_xyz_mm": [x, 0.0, 0.0], "diameter_mm": d,
            "inserted": {"placement": placement, "texture": texture, "core_hu": 0.0}}


def _dets(uid: str, xs: list[float], scores: list[float]) -> Detections:
    c = np.array([[x, 0.0, 0.0] for x in xs], float).reshape(-1, 3)
    return Detections(uid, c, np.full(len(xs), 5.0), np.asarray(scores, float))


# two copies; a: a solid 8 mm nodule at x=10 (hit at 0.9), a ground-glass 5 mm one at x=50 (hit at 0.2),
# an irrelevant finding at x=-40 (its 0.95 detection is neither hit nor FP), FPs 0.5 and 0.1;
# b: a juxtapleural 4 mm nodule at x=20 not hit at all, FP 0.6
A = [_nodule(10, 8, "parenchymal", 5), _nodule(50, 5, "juxtavascular", 1)]
B = [_nodule(20, 4, "juxtapleural", 4)]
DETS = [_dets("a", [10.5, 50.0, 100.0, 200.0, -40.0], [0.9, 0.2, 0.5, 0.1, 0.95]), _dets("b", [300.0], [0.6])]
EXCLUDED = [LunaFinding("a", (-40.0, 0.0, 0.0), 6.0)]


def test_rows_count_the_false_positives_above_each_nodule() -> None:
    rows = detection_rows(DETS, [("a", A), ("b", B)], EXCLUDED)
    by = {r.placement: r for r in rows}
    assert by["parenchymal"].score == 0.9 and by["parenchymal"].fp_per_scan_above == 0.0
    # FPs 0.5 and 0.6 (not the irrelevant finding's 0.95) lie above the 0.2 hit: 2 FPs over 2 scans
    assert by["juxtavascular"].score == 0.2 and by["juxtavascular"].fp_per_scan_above == 1.0
    assert not by["juxtapleural"].proposed and by["juxtapleural"].fp_per_scan_above is None
    s = summary(rows)
    assert s["all"] == {"n": 3, "not_proposed": 1, "below_1fp": 1, "below_8fp": 2}
    assert s["subsolid (texture <= 2)"] == {"n": 1, "not_proposed": 0, "below_1fp": 0, "below_8fp": 1}
    assert s["<=6mm"]["n"] == 2 and s[">6mm"]["below_1fp"] == 1


def test_breakdown_reads_the_inserted_nodules_of_the_scored_region(tmp_path: Path) -> None:
    for uid, nods in (("a", A + [_nodule(-70, 6, "parenchymal", 5)]), ("b", B)):
        folder = tmp_path / "scans" / uid
        folder.mkdir(parents=True)
        real = {"nodule_id": "real-1", "center_xyz_mm": [-40.0, 0.0, 0.0], "diameter_mm": 6.0}  # not inserted
        (folder / "meta.json").write_text(json.dumps({"nodules": nods + [real]}))
    ds = SimpleNamespace(root=tmp_path, series_uids=["a", "b"])
    # region "left" (world x > 0): the x=-70 nodule of a is outside and not counted
    b = breakdown(ds, DETS, "left", EXCLUDED)
    assert b["summary"]["all"]["n"] == 3 and b["synthetic_nodules"]
    assert b["fp_groups"][0]["best_score"] == 0.6 and b["fp_groups"][0]["n_scans"] == 1
    table = summary_markdown([("run x", b), ("run y", b)])
    header, *_, last = table.splitlines()
    assert header.startswith("| found below 1 / 8 FP/scan / n | all |") and "juxtapleural" in header
    assert last.startswith("| run y | 1 / 2 / 3 | ")
