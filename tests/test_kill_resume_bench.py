"""``lidc-det bench`` killed with SIGKILL at chosen writes resumes to the same output, with no temp file left
and no leaderboard row twice; plus the pieces that make it so (fast): the recursive leftover clean-up, the
idempotent leaderboard append, nnU-Net's checkpoints written atomically.

The slow test (about 6 minutes on 2 cores) runs a small stage-1 bench (three LIDC twins prepared at 2 mm, the
tiny detector for 4 steps).
Stage 2 stays out of the output comparison: nnU-Net seeds nothing (its augmentation draws from the global
RNG and its checkpoints keep no RNG state), so two uninterrupted runs already differ; what stage 2 needs
to resume (atomic checkpoints, their leftovers removed) is tested on its own below.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO

SCANS = (  # LIDC-IDRI-0003, -0005, -0078 (twinned: synthetic images, the real readers' nodules)
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264",
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.129007566048223160327836686225",
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.303494235102183795724852353824",
)

CONFIG = {
    "name": "kill-resume",
    "data": {"source": "twin", "series_uids": list(SCANS), "spacing_zyx": [2.0, 2.0, 2.0], "n_folds": 3,
             "test_fold": 0, "val_fold": 1, "seed": 0, "workers": 1},
    "detectors": [{"name": "retina3d", "label": "tiny", "kwargs": {
        "config": "tiny", "spacing_mm": [2.0, 2.0, 2.0], "patch_size": [32, 32, 32], "epochs": 1,
        "steps_per_epoch": 4, "warmup_steps": 1, "checkpoint_every": 2, "window_zyx": [128, 128, 128]}}],
    "n_bootstrap": 50,
    "seed": 0,
}

#: The child: ``bench`` with ``os.replace`` hooked to SIGKILL itself at the k-th rename onto a file of one
#: name, just before (the temp file is complete, the rename not done) or just after it.
CHILD = r"""
import os, signal, sys
name, kill_at, when, config, out, board = sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:7]
seen = [0]
real_replace = os.replace

def replace(src, dst, **kw):
    hit = False
    if os.path.basename(str(dst)) == name:
        seen[0] += 1
        hit = seen[0] == kill_at
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, **kw)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
from lidc_det.cli import main
sys.exit(main(["bench", config, "--out", out, "--leaderboard-dir", board, "--no-progress"]))
"""

#: Values that differ between two identical runs: wall times, provenance, the run folder's id.
VOLATILE_KEYS = {"seconds", "provenance", "created", "created_utc", "time", "wall_s", "wall_seconds", "data_seconds",
                 "train_seconds", "infer_seconds_per_scan", "seconds_per_step", "run_id", "out_dir", "resumed_from_step"}


def _bench(name: str, kill_at: int, when: str, config: Path, out: Path, board: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", CHILD, name, str(kill_at), when, str(config), str(out), str(board)],
                          capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)


def _leftovers(*folders: Path) -> list[str]:
    return sorted(str(p) for f in folders for p in f.rglob("*") if ".tmp-" in p.name or p.name == ".twin-tmp")


def _clean(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items() if k not in VOLATILE_KEYS}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


def _csv_without_timings(text: str) -> list[list[str]]:
    rows = [line.split(",") for line in text.splitlines()]
    keep = [i for i, h in enumerate(rows[0]) if h != "seconds" and not h.endswith(("_seconds", "_s"))] if rows else []
    return [[r[i] for i in keep] for r in rows]


def _assert_same_run(a: Path, b: Path) -> None:
    """Same files; checkpoints with equal weights, losses and steps; JSON and CSV equal apart from wall times and
    provenance; every other file (candidates, PNGs, DICOM, arrays) byte for byte. TensorBoard's event files are
    left out: one per training session by design (a resumed run adds one), named by time and process id."""
    from lidc_det.checkpoint import load_checkpoint

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and not p.name.startswith("events.out.tfevents."))

    files_a, files_b = files(a), files(b)
    assert files_a == files_b
    for rel in files_a:
        pa, pb = a / rel, b / rel
        if rel.endswith((".json", ".csv")):  # the run folder's own path (a DICOM root, a model file) as "<run>"
            ta, tb = pa.read_text().replace(str(a), "<run>"), pb.read_text().replace(str(b), "<run>")
        if rel.endswith(".json"):
            assert _clean(json.loads(ta)) == _clean(json.loads(tb)), rel
        elif rel.endswith(".csv"):
            assert _csv_without_timings(ta) == _csv_without_timings(tb), rel
        elif rel.endswith(".pt"):
            sa, sb = load_checkpoint(pa), load_checkpoint(pb)
            assert sa["step"] == sb["step"], rel
            assert all(torch.equal(v, sb["model"][k]) for k, v in sa["model"].items()), rel
            assert [r["loss"] for r in sa["step_log"]] == [r["loss"] for r in sb["step_log"]], rel
        elif rel.endswith((".txt", ".log")):
            continue  # free-text logs with wall times
        else:
            assert pa.read_bytes() == pb.read_bytes(), rel


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The config file and a run folder whose data (twins, prepared scans) is done: every run starts from a copy,
    so that the kills land in the bench's own steps (data resume has its own tests)."""
    from benchmarks.data import DataSpec, materialize
    from lidc_det.config import from_mapping

    root = tmp_path_factory.mktemp("bench")
    config = root / "bench.yaml"
    config.write_text(json.dumps(CONFIG))  # JSON is YAML
    materialize(from_mapping(DataSpec, CONFIG["data"]), root / "data", progress=False)
    return config, root / "data"


def _fresh(data: Path, out: Path) -> Path:
    for sub in ("twin", "prepared"):
        shutil.copytree(data / sub, out / sub, symlinks=True)
    return out


@pytest.fixture(scope="module")
def bench_reference(bench_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    config, data = bench_data
    root = tmp_path_factory.mktemp("reference")
    out, board = _fresh(data, root / "out"), root / "board"
    done = _bench("-", 0, "before", config, out, board)  # never killed
    assert done.returncode == 0, done.stderr[-3000:]
    return out, board


# (file name, k-th rename onto it, when, the temp file the kill leaves): inside stage 1's second checkpoint
# write; between the candidates and the FROC report; inside the FROC JSON write (a folder only the bench's
# clean-up reaches); inside bench.json; between leaderboard.json and leaderboard.md (no row twice)
KILLS = [
    ("last.pt", 2, "before", ".last.pt.tmp-"),
    ("candidates.csv", 1, "after", None),
    ("froc.json", 1, "before", ".froc.json.tmp-"),
    ("bench.json", 1, "before", ".bench.json.tmp-"),
    ("leaderboard.json", 1, "after", None),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kill_at", "when", "left"), KILLS, ids=[f"{k[0]}-{k[1]}-{k[2]}" for k in KILLS])
def test_bench_killed_then_resumed(
    name: str, kill_at: int, when: str, left: str | None, bench_data: tuple[Path, Path],
    bench_reference: tuple[Path, Path], tmp_path: Path,
) -> None:
    config, data = bench_data
    ref_out, ref_board = bench_reference
    out, board = _fresh(data, tmp_path / "out"), tmp_path / "board"
    killed = _bench(name, kill_at, when, config, out, board)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    if left is not None:  # the kill hit the write it was aimed at
        assert [Path(p).name.startswith(left) for p in _leftovers(out, board)] == [True], _leftovers(out, board)
    resumed = _bench("-", 0, "before", config, out, board)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _leftovers(out, board) == []
    _assert_same_run(out, ref_out)
    from benchmarks.leaderboard import read_rows, render_markdown

    rows = read_rows(board / "leaderboard.json")
    assert len(rows) == len(CONFIG["detectors"])  # one row per detector, not two
    assert _clean(rows) == _clean(read_rows(ref_board / "leaderboard.json"))
    assert (board / "leaderboard.md").read_text() == render_markdown(rows)  # rendered from the final rows
    assert sorted(p.name for p in board.iterdir()) == ["leaderboard.json", "leaderboard.md"]


# ------------------------------------------------------------------ the pieces (fast)
def test_remove_leftovers_recursive(tmp_path: Path) -> None:
    from lidc_det.atomic import remove_leftovers

    (tmp_path / "a" / "b").mkdir(parents=True)
    stale = [tmp_path / ".x.json.tmp-1", tmp_path / "a" / "b" / ".froc.png.tmp-abc.png"]
    keep = [tmp_path / "x.json", tmp_path / "a" / "b" / "froc.png", tmp_path / "a" / "tmp-not-hidden"]
    for p in stale + keep:
        p.write_text("x")
    assert remove_leftovers(tmp_path) == [stale[0]]  # one folder by default
    stale[0].write_text("x")
    assert remove_leftovers(tmp_path, recursive=True) == sorted(stale)
    assert all(p.is_file() for p in keep) and not any(p.exists() for p in stale)


def test_leaderboard_rows_of_one_run_are_appended_once(tmp_path: Path) -> None:
    from benchmarks.leaderboard import append_rows, read_rows, run_id
    from test_bench_harness import _row

    rid = run_id(tmp_path / "run", "0123456789ab")
    assert rid == run_id(tmp_path / "run", "0123456789ab") != run_id(tmp_path / "other", "0123456789ab")
    assert rid != run_id(tmp_path / "run", "0123456789ab", "crossval") and len(rid) == 12
    append_rows(tmp_path, [_row("old", 1.0)])  # a row without run_id (older leaderboards) stays
    append_rows(tmp_path, [{**_row("a", 1.0), "run_id": rid}, {**_row("b", 1.0), "run_id": rid}])
    (tmp_path / ".leaderboard.md.tmp-xyz").write_text("half")  # a killed append's temp file
    json_path, _ = append_rows(tmp_path, [{**_row("a", 1.0), "run_id": rid, "cpm": 0.5}])  # the resumed run
    rows = read_rows(json_path)
    assert [r["method"] for r in rows] == ["old", "b", "a"] and rows[-1]["cpm"] == 0.5  # "a" replaced, not twice
    append_rows(tmp_path, [{**_row("a", 1.0), "run_id": run_id(tmp_path / "other", "0123456789ab")}])
    assert [r["method"] for r in read_rows(json_path)] == ["old", "b", "a", "a"]  # another run: a new row
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_nnunet_checkpoints_are_written_atomically(tmp_path: Path) -> None:
    from stage2_segment.trainer import CHECKPOINT_NAMES, atomic_save_checkpoint

    final = tmp_path / "checkpoint_latest.pth"
    torch.save({"epoch": 1}, final)

    def dies_halfway(filename: str) -> None:
        Path(filename).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process is stopped in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        atomic_save_checkpoint(dies_halfway)(str(final))
    assert torch.load(final, weights_only=True) == {"epoch": 1} and not list(tmp_path.glob(".*"))
    atomic_save_checkpoint(lambda f: torch.save({"epoch": 2}, f))(str(final))
    assert torch.load(final, weights_only=True) == {"epoch": 2} and not list(tmp_path.glob(".*"))
    atomic_save_checkpoint(lambda f: None)(str(tmp_path / "checkpoint_best.pth"))  # nnU-Net wrote nothing
    assert not (tmp_path / "checkpoint_best.pth").exists()
    # SIGKILL in the middle: the old checkpoint stays, a hidden temp file is left for train() to remove
    child = (
        "import os, signal, sys\n"
        "from stage2_segment.trainer import atomic_save_checkpoint\n"
        "def save(f):\n"
        "    open(f, 'wb').write(b'PK half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_save_checkpoint(save)(sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rc = subprocess.run([sys.executable, "-c", child, str(final)], env=env, cwd=REPO, timeout=300).returncode
    assert rc == -signal.SIGKILL and torch.load(final, weights_only=True) == {"epoch": 2}
    left = list(tmp_path.glob(".checkpoint_latest.pth.tmp-*"))
    assert len(left) == 1
    from lidc_det.atomic import remove_leftovers

    assert remove_leftovers(tmp_path, CHECKPOINT_NAMES) == left and not left[0].exists()
