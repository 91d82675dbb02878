"""The leaderboard: ``leaderboard.json`` (rows appended by ``lidc-det bench``) and its
rendered ``leaderboard.md``.

A row is one detector (optionally with stage 2 / 3 figures) on one data set and split,
with everything needed to judge and reproduce it: CPM and the seven FROC
sensitivities with 95% CIs, Dice, AUC, train time, inference seconds per scan,
device (GPU name, CUDA/torch, AMP), git revision and config hash. Rows on synthetic
twin data say so in ``dataset`` and are rendered in their own table.

A row may carry a ``run_id`` (:func:`run_id`: one per run folder and config); a
later row with the same ``run_id`` and ``method`` replaces it, so a killed and
resumed (or repeated) run adds its rows once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lidc_det.atomic import remove_leftovers, write_json, write_text
from lidc_det.errors import LidcDetError

#: Keys every row has (others are allowed).
ROW_KEYS: tuple[str, ...] = (
    "method",
    "dataset",
    "synthetic",
    "split",
    "cpm",
    "cpm_ci",
    "sensitivity",
    "sensitivity_ci",
    "n_test_scans",
    "n_test_nodules",
    "train_seconds",
    "infer_seconds_per_scan",
    "device",
    "git_revision",
    "config",
    "config_hash",
    "created_utc",
)


class LeaderboardError(LidcDetError):
    """The leaderboard file is unreadable or a row lacks required keys."""


def froc_fields(froc: Any) -> dict[str, Any]:
    """The FROC part of a row from a :class:`lidc_det.metrics.froc.FrocResult`."""
    d = froc.to_dict()
    return {
        "cpm": round(float(d["cpm"]), 4),
        "cpm_ci": [round(float(d["cpm_ci_low"]), 4), round(float(d["cpm_ci_high"]), 4)],
        "operating_fps": [float(v) for v in d["operating_fps"]],
        "sensitivity": [round(float(v), 4) for v in d["operating_sensitivity"]],
        "sensitivity_ci": [[round(float(a), 4), round(float(b), 4)] for a, b in zip(d["ci_low"], d["ci_high"])],
        "n_test_scans": int(d["n_scans"]),
        "n_test_nodules": int(d["n_nodules"]),
    }


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of ``leaderboard.json`` (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LeaderboardError(f"{path}: not valid JSON ({err})") from err
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise LeaderboardError(f"{path}: expected an object with a 'rows' list")
    return rows


def run_id(out_dir: Path, config_hash: str, kind: str = "bench") -> str:
    """12 hex digits naming one run: its folder (resolved), its config hash and its kind
    (``"bench"``, ``"crossval"``); the same for a run and its resumption."""
    text = f"{kind}\n{Path(out_dir).resolve()}\n{config_hash}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def append_rows(leaderboard_dir: Path, rows: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """Append ``rows`` to ``<dir>/leaderboard.json`` and re-render ``<dir>/leaderboard.md``
    (both written atomically); returns both paths.

    A new row with a ``run_id`` replaces the earlier rows of the same ``run_id`` and
    ``method`` (a run killed between the two writes and resumed appends its rows once).
    Temp files of a killed earlier append are removed first (one writer at a time).
    """
    for r in rows:
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise LeaderboardError(f"leaderboard row for {r.get('method')!r} lacks {missing}")
    leaderboard_dir = Path(leaderboard_dir)
    leaderboard_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(leaderboard_dir, ["leaderboard.json", "leaderboard.md"])
    json_path = leaderboard_dir / "leaderboard.json"
    replaced = {(r["run_id"], r["method"]) for r in rows if r.get("run_id")}
    kept = [r for r in read_rows(json_path) if not r.get("run_id") or (r["run_id"], r.get("method")) not in replaced]
    all_rows = kept + list(rows)
    write_json(json_path, {"rows": all_rows})
    md_path = leaderboard_dir / "leaderboard.md"
    write_text(md_path, render_markdown(all_rows))
    return json_path, md_path


def _ci(v: Sequence[float] | None) -> str:
    return "" if not v else f"{v[0]:.2f}-{v[1]:.2f}"


def _opt(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _device(d: dict[str, Any]) -> str:
    name = d.get("device_name") or d.get("device", "?")
    extra = f", AMP {'on' if d.get('amp') else 'off'}" if d.get("device", "").startswith("cuda") else ""
    return f"{name}{extra}"


def render_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables, one per data set (synthetic and real kept apart), best CPM first."""
    out = [
        "# lidc-det leaderboard",
        "",
        "Rendered from `leaderboard.json` by `lidc-det bench`. CPM = mean sensitivity at "
        "1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per scan (LUNA16 protocol), 95% CI by "
        "bootstrapping test scans. **Rows on the LIDC twin are synthetic images** (real "
        "readers' contours painted into procedural anatomy): they are not LIDC-IDRI results and "
        "not comparable with published LUNA16 CPMs (MONAI RetinaNet 0.936, nnDetection 0.930, "
        "DeepLung 0.842 on the real 888 scans).",
        "",
    ]
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_dataset.setdefault(f"{r['dataset']} | split {r['split']}", []).append(r)
    for key in sorted(by_dataset):
        group = sorted(by_dataset[key], key=lambda r: -float(r["cpm"]))
        out += [f"## {key}", ""]
        out.append(
            "| method | CPM | 95% CI | 1/8 | 1/4 | 1/2 | 1 | 2 | 4 | 8 | CPM after stage 2 | CPM after second look | Dice | AUC "
            "| test scans / nodules | train s | infer s/scan | device | git | config | date |"
        )
        out.append("|" + "---|" * 21)
        for r in group:
            sens = " | ".join(f"{s:.3f}" for s in r["sensitivity"])
            git = (r.get("git_revision") or "?")[:12]
            out.append(
                f"| {r['method']} | **{r['cpm']:.3f}** | {_ci(r['cpm_ci'])} | {sens} "
                f"| {_opt(r.get('cpm_with_rejection'), '.3f')} | {_opt(r.get('cpm_second_look'), '.3f')} "
                f"| {_opt(r.get('dice'), '.3f')} "
                f"| {_opt(r.get('auc'), '.3f')} | {r['n_test_scans']} / {r['n_test_nodules']} | {r['train_seconds']:.0f} "
                f"| {r['infer_seconds_per_scan']:.2f} | {_device(r['device'])} | `{git}` | {r['config']} `{r['config_hash']}` "
                f"| {str(r['created_utc'])[:10]} |"
            )
        out.append("")
    return "\n".join(out)
