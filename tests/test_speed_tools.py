"""The speed benchmark's pieces: sparse decoding equals full decoding, MONAI's window count,
the generated chest, the container recipe's install steps (README), the GPU check's wheels."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _full_decode(cls_maps, box_maps, core_start, plan, config):  # the pre-optimisation implementation
    from stage1_detect.anchors import decode_boxes, level_anchors
    from stage1_detect.config import LEVEL_STRIDES

    scores_all, codes_all, anchors_all = [], [], []
    offset = torch.tensor([*core_start, *core_start], dtype=torch.float32)
    for cls, box, stride, sizes in zip(cls_maps, box_maps, LEVEL_STRIDES, config.anchor_sizes_mm):
        lo = plan.margin // stride
        core = [s // stride for s in plan.step_zyx]
        a = cls.shape[0]
        c = cls[:, lo : lo + core[0], lo : lo + core[1], lo : lo + core[2]].float()
        b = box[:, lo : lo + core[0], lo : lo + core[1], lo : lo + core[2]].float()
        scores_all.append(torch.sigmoid(c).permute(1, 2, 3, 0).reshape(-1))
        codes_all.append(b.reshape(a, 6, *core).permute(2, 3, 4, 0, 1).reshape(-1, 6))
        anchors_all.append(level_anchors(core, stride, sizes) + offset)
    scores = torch.cat(scores_all)
    keep = torch.nonzero(scores >= config.score_thresh).flatten()
    if keep.numel() > config.pre_nms_topk:
        keep = keep[torch.topk(scores[keep], config.pre_nms_topk).indices]
    return scores[keep], decode_boxes(torch.cat(codes_all)[keep], torch.cat(anchors_all)[keep])


@pytest.mark.parametrize("thresh, topk", [(0.0, 1000), (0.5, 1000), (0.0, 50), (2.0, 10)])
def test_sparse_decoding_equals_full_decoding(thresh: float, topk: int) -> None:
    from stage1_detect.config import load_config
    from stage1_detect.inference import _core_candidates, plan_windows

    cfg = load_config("tiny").replace(score_thresh=thresh, pre_nms_topk=topk)
    plan = plan_windows((80, 96, 112), (64, 64, 80), 16)
    g = torch.Generator().manual_seed(0)
    a = cfg.anchors_per_location
    shapes = [[w // s for w in plan.window_zyx] for s in (4, 8, 16)]
    cls = [torch.randn(a, *s, generator=g) for s in shapes]
    box = [torch.randn(a * 6, *s, generator=g) * 0.5 for s in shapes]
    start = (32, 0, 48)
    s_new, b_new = _core_candidates(cls, box, start, plan, cfg)
    s_ref, b_ref = _full_decode(cls, box, start, plan, cfg)
    assert torch.equal(s_new, s_ref)
    assert torch.equal(b_new, b_ref)
    assert b_new.shape == (s_new.numel(), 6)


def test_monai_window_count_matches_monai() -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from benchmarks.timing import monai_window_count

    for shape, roi, overlap in [((512, 512, 266), (512, 512, 208), 0.25), ((360, 360, 332), (128, 128, 128), 0.25),
                                ((100, 90, 40), (128, 128, 64), 0.5), ((300, 200, 150), (96, 64, 80), 0.1)]:
        padded = [max(s, r) for s, r in zip(shape, roi)]
        interval = _get_scan_interval(padded, roi, 3, (overlap,) * 3)
        assert monai_window_count(shape, roi, overlap) == len(dense_patch_slices(padded, roi, interval))


def test_generated_chest_boxes_sit_on_the_nodules() -> None:
    from benchmarks.timing import generated_chest

    case = generated_chest((64, 80, 80), (1.25, 1.0, 1.0), seed=3, n_nodules=2)
    assert case.image_hu.shape == (64, 80, 80) and case.geometry.spacing_zyx == (1.25, 1.0, 1.0)
    for b in case.boxes_voxel:
        c = np.floor((b[:3] + b[3:]) / 2).astype(int)
        assert case.image_hu[tuple(c)] > -400  # a solid nodule voxel (lung is -850, sd 30)


def _readme_install() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)\n```", text, re.S)
    assert block, "README has no Quick start bash block"
    first = block.group(1).strip().splitlines()[0]
    return first.split(" && lidc-det demo")[0]


def test_dockerfile_installs_with_the_readme_commands() -> None:
    docker = (REPO / "Dockerfile").read_text()
    froms = [ln for ln in docker.splitlines() if ln.startswith("FROM ")]
    assert len(froms) == 1 and froms[0].startswith("FROM nvcr.io/nvidia/pytorch:")
    install = _readme_install()
    assert "pip install -e ." in install
    runs = [ln[len("RUN "):].strip() for ln in docker.splitlines() if ln.startswith("RUN ")]
    assert install in runs, f"the Dockerfile must RUN the README's install {install!r}"
    assert "COPY . ." in docker
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", ".gpu_wheels", "runs"):
        assert path in ignored


def test_gpu_wheels_are_ignored_and_used_by_the_launcher() -> None:
    gitignore = (REPO / ".gitignore").read_text().split()
    assert "/.gpu_wheels/" in gitignore
    assert ".gpu_wheels/*.whl" in (REPO / "benchmarks/gpu_check.sh").read_text()
    assert "-d .gpu_wheels" in (REPO / "benchmarks/gpu_wheels.sh").read_text()


def test_trained_pipeline_row_reports_the_second_run() -> None:
    """--models: the whole-pipeline row with trained models is the second of its two runs (the first
    pays one-off set-up), with the step times and counts in its note."""
    from benchmarks.speed import render_markdown, summary_rows

    runs = [{"total_s": 40.0, "steps_s": {"detect": 9.0}, "n_candidates": 40, "n_kept": 7, "n_malignancy": 5},
            {"total_s": 21.5, "steps_s": {"detect": 4.0, "segment": 9.5}, "n_candidates": 40, "n_kept": 7, "n_malignancy": 5}]
    record = {"config": {"ours": [], "threads": 2}, "models": "runs/demo", "results": {"pipeline_trained": {"models_dir": "runs/demo", "runs": runs, "child_peak_rss_mib": 3000.0}}}
    (row,) = summary_rows(record)
    assert row["ours"] == 21.5 and row["unit"] == "s/scan" and row["ours_peak_rss_mib"] == 3000.0
    assert "first 40.0 s" in row["note"] and "detect 4.0 + segment 9.5" in row["note"] and "7 kept" in row["note"]
    assert "runs/demo" in row["what"]
    assert "21.5" in render_markdown({**record, "table": [row], "provenance": {}, "device": {}, "wall_seconds": 1.0,
                                      "load_at_start": [0, 0, 0], "load_at_end": [0, 0, 0], "config_file": "x"})
