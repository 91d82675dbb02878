"""Does the stage-1 detector learn at all? A probe of its head towers over seeds and ``head_norm``.

``python -m benchmarks.head_probe [--config benchmarks/head_probe.yaml] [--out DIR]``

For every ``head_norm`` and seed of the config, the ``retina3d`` network of a built-in config
is trained for ``steps`` optimiser steps on patches of prepared scans (the training folds of
``twins`` plus every scan of ``semireal``: what ``lidc-det transfer`` writes under its
``--data-dir``) by :func:`stage1_detect.train.train_detector`, without validation cases (run
folders under ``<out>/runs/``; a finished run is resumed, not retrained). Then,
in eval mode, on ``probe_patches`` held-out patches of the same scans (other seed, no
augmentation, half of them holding a nodule):

* ``active_cls_tower`` / ``active_box_tower``: the share of the towers' ReLU outputs above 0
  (a dead tower is near 0: the head then scores every anchor alike);
* ``patch_auc``: ROC AUC of the patch's top anchor probability, nodule patches vs background;
* ``top_anchor_hit``: share of nodule patches whose top anchor's centre lies in a nodule box;
* ``final_cls`` / ``final_box``: mean focal and box loss of the last 100 steps.

These are diagnostics of learning on training scans, not a detection benchmark (no FROC,
no held-out patients). Writes ``<out>/head_probe.json`` and ``head_probe.md`` with the
config, provenance (git revision), device and wall time.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.atomic import write_json, write_text
from lidc_det.config import load_yaml_config, to_plain

DEFAULT_CONFIG = Path(__file__).resolve().parent / "head_probe.yaml"


@dataclass(frozen=True)
class HeadProbeConfig:
    """See the module docstring; paths relative to the current directory."""

    name: str = "head-probe"
    twins: str = "runs/transfer/data/twins/prepared"
    twin_train_folds: tuple[int, ...] = (2, 3)
    semireal: tuple[str, ...] = ()
    detector: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    head_norms: tuple[str, ...] = ("none", "batch")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 2400
    probe_patches: int = 120
    threads: int = 2


def _cases(cfg: HeadProbeConfig) -> list[Any]:
    from lidc_det.data.prepared import PreparedDataset

    twins = PreparedDataset(cfg.twins)
    cases = [twins.load_case(u) for u in twins.scans_in_folds(list(cfg.twin_train_folds))]
    for root in cfg.semireal:
        ds = PreparedDataset(root)
        cases += [ds.load_case(u) for u in ds.series_uids]
    return cases


def probe_one(cases: list[Any], cfg: HeadProbeConfig, head_norm: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """Train one network with :func:`stage1_detect.train.train_detector` in ``run_dir`` (no
    validation cases) and probe its last checkpoint (see the module docstring); one result row."""
    import csv

    import torch
    from sklearn.metrics import roc_auc_score

    from stage1_detect.anchors import flatten_head_outputs
    from stage1_detect.config import load_config
    from stage1_detect.data import PatchDataset
    from stage1_detect.model import Retina3D
    from stage1_detect.train import load_checkpoint, train_detector

    dcfg = load_config(cfg.detector).replace(
        **cfg.overrides, head_norm=head_norm, seed=seed, epochs=1, steps_per_epoch=cfg.steps
    )
    t0 = time.perf_counter()
    result = train_detector(dcfg, cases, [], run_dir, device="cpu", progress=False)
    train_s = time.perf_counter() - t0
    model = Retina3D(dcfg)
    model.load_state_dict(load_checkpoint(result.last_checkpoint)["model"])
    with open(run_dir / "train_log.csv", newline="") as f:
        losses = [(float(r["cls"]), float(r["box"])) for r in csv.DictReader(f)]

    active: dict[str, list[float]] = {"cls_tower": [], "box_tower": []}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: active[name].append(float((o > 0).float().mean())))
        for name in active
    ]
    probe = PatchDataset(cases, dcfg.replace(pos_fraction=0.5), seed=seed + 10_000, length=cfg.probe_patches, augment=False)
    scores, labels, hits = [], [], []
    model.eval()
    with torch.no_grad():
        for i in range(cfg.probe_patches):
            image, boxes, _ = probe.sample(i)
            cls, _ = model(torch.from_numpy(image)[None, None])
            logits = flatten_head_outputs(cls, 1)[0, :, 0]
            anchors, _ = model.anchors(image.shape)
            k = int(logits.argmax())
            scores.append(float(torch.sigmoid(logits[k])))
            labels.append(int(len(boxes) > 0))
            if len(boxes):
                centre = ((anchors[k, :3] + anchors[k, 3:]) / 2).numpy()
                hits.append(bool(np.any(np.all((centre >= boxes[:, :3]) & (centre < boxes[:, 3:]), axis=1))))
    for h in hooks:
        h.remove()
    tail = np.asarray(losses[-100:])
    return {
        "head_norm": head_norm,
        "seed": seed,
        "active_cls_tower": round(float(np.mean(active["cls_tower"])), 4),
        "active_box_tower": round(float(np.mean(active["box_tower"])), 4),
        "patch_auc": round(float(roc_auc_score(labels, scores)), 3) if 0 < sum(labels) < len(labels) else None,
        "top_anchor_hit": round(float(np.mean(hits)), 3) if hits else None,
        "median_top_p_nodule": round(float(np.median([s for s, y in zip(scores, labels) if y])), 3),
        "median_top_p_background": round(float(np.median([s for s, y in zip(scores, labels) if not y])), 3),
        "final_cls": round(float(tail[:, 0].mean()), 3),
        "final_box": round(float(tail[:, 1].mean()), 3),
        "train_seconds": round(train_s, 1),
    }


def run(cfg: HeadProbeConfig, out_dir: Path) -> dict[str, Any]:
    """Every (head_norm, seed) of ``cfg``; writes the JSON and Markdown records."""
    import torch

    from lidc_det.provenance import device_info, provenance

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = _cases(cfg)
    rows = []
    for head_norm in cfg.head_norms:
        for seed in cfg.seeds:
            rows.append(probe_one(cases, cfg, head_norm, seed, out_dir / "runs" / f"{head_norm}-seed{seed}"))
            print(f"[head_probe] {rows[-1]}", flush=True)
    rec = {
        "synthetic": "twins (SYNTHETIC) + semi-real scans (real backgrounds, inserted real-reader nodules)",
        "config": to_plain(cfg),
        "n_cases": len(cases),
        "rows": rows,
        "provenance": provenance(),
        "device": device_info("cpu"),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out_dir / "head_probe.json", rec)
    cols = ["head_norm", "seed", "active_cls_tower", "active_box_tower", "patch_auc", "top_anchor_hit",
            "median_top_p_nodule", "median_top_p_background", "final_cls", "final_box", "train_seconds"]
    lines = [f"# Stage-1 head probe ({cfg.steps} steps, {len(cases)} training scans; diagnostics on training scans)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", f"git {rec['provenance'].get('git_revision')}, {rec['device']['device_name']}, wall {rec['wall_seconds']} s"]
    write_text(out_dir / "head_probe.md", "\n".join(lines) + "\n")
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.head_probe", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/head_probe"))
    a = p.parse_args(argv)
    cfg = load_yaml_config(HeadProbeConfig, a.config)
    run(cfg, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
