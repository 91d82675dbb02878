"""Scale benchmark: LIDC twins through generate -> prepare -> predict on a Dask LocalCluster.

    python -m benchmarks.scale --models MODELS_DIR --out runs/scale --scans 100 --predict-scans 100 \
        --single-worker-scans 20 --kill --kill-scans 20

Steps (each a Dask task per scan; timings are wall clock on this machine, load recorded):

1. ``generate``: twins of the first ``--scans`` LIDC scans with slice thickness <= 2.5 mm
   (SYNTHETIC images), on ``local:<max workers>``;
2. ``prepare``: the twins to 1 mm, same cluster size;
3. ``predict`` on the first ``--predict-scans`` twins with each of ``--workers`` (each into its own
   folder; the 1-worker run on the first ``--single-worker-scans`` only, when given): scans per
   minute, peak RSS per worker (max over its tasks), disk per scan;
4. ``--kill``: predict the first ``--kill-scans`` twins again on 2 workers and ``kill -9`` one worker
   process once a third of them are done; the run must complete, and its per-scan outputs must
   equal those of a run that did one scan at a time, byte for byte: the 1-worker run of step 3 when
   it covers these scans, else a ``serial`` run (``done.json``/timings are not compared).

Resumable: ``scale.json`` is written after every step, and a re-run with the same ``--out`` and
``--scans`` keeps the steps recorded there without failures (their figures are those of the run
that made them; each step records when it ran).

Writes ``scale.json``, ``scale.md`` and ``scale.png`` into ``--out`` (``--results`` copies them).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lidc_det.atomic import write_json, write_text

COMPARED = ("candidates.csv", "stage1_candidates.csv", "findings.csv", "malignancy.csv", "masks.nii.gz",
            "masks.json")


def _du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _per_worker_peak(run: dict[str, Any]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for t in run["tasks"]:
        if t["ok"]:
            peaks[t["worker"]] = max(peaks.get(t["worker"], 0.0), t["peak_rss_mb"])
    return peaks


def compare_outputs(a: Path, b: Path, uids: list[str]) -> tuple[list[str], list[str]]:
    """Compare the per-scan outputs of two predict folders.

    Returns ``(compared, differing)``: every ``uid/name`` looked at (the ``COMPARED`` files present
    in either folder, and the overlay PNGs of either), and those that are missing from one folder or
    differ byte for byte.
    """
    compared: list[str] = []
    diffs: list[str] = []
    for uid in uids:
        da, db = a / "scans" / uid, b / "scans" / uid
        names = [n for n in COMPARED if (da / n).exists() or (db / n).exists()]
        names += sorted({p.relative_to(da).as_posix() for p in da.glob("overlays/*.png")}
                        | {p.relative_to(db).as_posix() for p in db.glob("overlays/*.png")})
        compared += [f"{uid}/{n}" for n in names]
        for n in names:
            if not ((da / n).is_file() and (db / n).is_file() and filecmp.cmp(da / n, db / n, shallow=False)):
                diffs.append(f"{uid}/{n}")
    return compared, diffs


def predict_with_kill(models: Path, dicom_root: Path, out: Path, scans: list[str], opts: Any,
                      kill_after: int) -> dict[str, Any]:
    """``predict`` on a 2-worker LocalCluster; SIGKILL one worker process once ``kill_after`` scans
    have their done marker. Returns the report, the killed pid and when."""
    import logging

    from distributed import Client, LocalCluster

    from lidc_det.predict import predict_collection

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.CRITICAL)
    client = Client(cluster)
    pids = list(client.run(os.getpid).values())
    killed: dict[str, Any] = {}

    def killer() -> None:
        while True:
            n = len(list((out / "scans").glob("*/done.json"))) if (out / "scans").is_dir() else 0
            if n >= kill_after:
                os.kill(pids[0], signal.SIGKILL)
                killed.update(pid=pids[0], after_done=n, t=time.time())
                return
            time.sleep(0.2)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    t0 = time.time()
    try:
        report = predict_collection(models, dicom_root, out, scheduler=cluster.scheduler_address, options=opts,
                                    scans=scans, progress=False)
    finally:
        client.close()
        cluster.close()
    return {"report": report, "killed": killed, "seconds": time.time() - t0}


def _predict_record(rep: Any, seconds: float, n: int, folder: Path, load0: list[float]) -> dict[str, Any]:
    ok = n - len(rep.failed)
    task_secs = sum(t["seconds"] for t in rep.run["tasks"] if t["ok"])
    return {
        "scans": n, "failed": len(rep.failed), "seconds": round(seconds, 1),
        "scans_per_minute": round(60 * ok / seconds, 2), "task_seconds_mean": round(task_secs / max(1, ok), 1),
        "peak_rss_mb_per_worker": {k: round(v) for k, v in _per_worker_peak(rep.run).items()},
        "disk_mb_per_scan": round(_du_mb(folder / "scans") / max(1, n), 2),
        "load_before": load0, "load_after": _load(),
    }


def main(argv: list[str] | None = None) -> int:
    import json

    from lidc_det.data.lidc import list_scans
    from lidc_det.data.prepare import PrepareConfig, prepare_dataset
    from lidc_det.predict import PredictOptions, predict_collection
    from lidc_det.provenance import provenance
    from lidc_det.synthetic.twin import generate_twins

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scans", type=int, default=100, help="twins generated and prepared")
    ap.add_argument("--predict-scans", type=int, default=100, help="of those, predicted per run")
    ap.add_argument("--single-worker-scans", type=int, default=None,
                    help="scans of the 1-worker predict run (default --predict-scans)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kill", action="store_true", help="the kill -9 run, compared with a one-scan-at-a-time run")
    ap.add_argument("--kill-scans", type=int, default=None, help="scans of the kill run (default --predict-scans)")
    ap.add_argument("--results", type=Path, default=None, help="copy scale.json/.md/.png here")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    wmax = max(a.workers)
    rec: dict[str, Any] = {"kind": "lidc-det scale benchmark (SYNTHETIC twins)", "cpu_count": os.cpu_count(),
                           "args": {k: str(v) for k, v in vars(a).items()}, "steps": {}}
    old = json.loads((out / "scale.json").read_text()) if (out / "scale.json").is_file() else {}
    if old.get("args", {}).get("scans") == str(a.scans):
        rec["steps"] = {k: v for k, v in old.get("steps", {}).items() if not v.get("failed")}
    rec["command"] = "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    rec["provenance"] = provenance()

    def done(name: str, scans: int) -> bool:
        r = rec["steps"].get(name)
        if r is not None and r.get("scans") == scans:
            print(f"{name}: kept from {out / 'scale.json'} (ran {r.get('finished_at', '?')})", flush=True)
            return True
        return False

    def record(name: str, r: dict[str, Any]) -> None:
        r["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        rec["steps"][name] = r
        print(name, r, flush=True)
        write_json(out / "scale.json", rec)

    uids = [u for _, u in list_scans(max_slice_thickness_mm=2.5)[: a.scans]]

    if not done("generate", len(uids)):
        load0, t0 = _load(), time.time()
        batch = generate_twins(uids, out / "twin", seed=0, scheduler=f"local:{wmax}", progress=False)
        record("generate", {"scans": len(uids), "failed": len(batch.failed), "seconds": round(time.time() - t0, 1),
                            "load_before": load0, "load_after": _load(),
                            "disk_mb_per_scan": round(_du_mb(out / "twin") / max(1, len(batch.scans)), 1)})

    if not done("prepare", len(uids)):
        load0, t0 = _load(), time.time()
        prep = prepare_dataset(PrepareConfig(dicom_root=out / "twin", out_dir=out / "prepared", scans=tuple(uids)),
                               progress=False, scheduler=f"local:{wmax}")
        record("prepare", {"scans": len(prep.done) + len(prep.skipped), "failed": len(prep.failed),
                           "seconds": round(time.time() - t0, 1), "load_before": load0, "load_after": _load(),
                           "disk_mb_per_scan": round(_du_mb(out / "prepared" / "scans") / max(1, len(uids)), 1)})

    opts = PredictOptions(n_overlays=1, torch_threads=1)
    for w in a.workers:
        n = a.single_worker_scans if w == 1 and a.single_worker_scans else a.predict_scans
        pscans = uids[:n]
        d = out / f"predict_w{w}"
        if done(f"predict_{w}_workers", len(pscans)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        load0, t0 = _load(), time.time()
        rep = predict_collection(a.models, out / "twin", d, scheduler=f"local:{w}", options=opts, scans=pscans,
                                 progress=False)
        record(f"predict_{w}_workers", _predict_record(rep, time.time() - t0, len(pscans), d, load0))

    if a.kill:
        kscans = uids[: a.kill_scans or a.predict_scans]
        one = rec["steps"].get("predict_1_workers")
        if one is not None and one["scans"] >= len(kscans) and not one["failed"]:
            ref, reference = out / "predict_w1", "the 1-worker predict run"
        else:
            ref, reference = out / "predict_serial", "a serial run"
            shutil.rmtree(ref, ignore_errors=True)
            t0 = time.time()
            predict_collection(a.models, out / "twin", ref, scheduler="serial", options=opts, scans=kscans,
                               progress=False)
            reference += f" ({time.time() - t0:.1f} s)"
        d = out / "predict_kill"
        shutil.rmtree(d, ignore_errors=True)
        load0 = _load()
        k = predict_with_kill(a.models, out / "twin", d, kscans, opts, kill_after=max(1, len(kscans) // 3))
        compared, diffs = compare_outputs(d, ref, kscans)
        rep = k["report"]
        record("kill", {
            "scans": len(kscans), "failed": len(rep.failed), "seconds": round(k["seconds"], 1),
            "reference": reference, "killed_pid": k["killed"].get("pid"),
            "killed_after_done_scans": k["killed"].get("after_done"),
            "workers_seen": sorted({t["worker"] for t in rep.run["tasks"] if t["ok"]}),
            "files_compared": len(compared),
            "files_differing_from_reference": diffs, "identical_to_reference": not diffs and not rep.failed,
            "load_before": load0, "load_after": _load(),
        })

    write_json(out / "scale.json", rec)
    _report(rec, out)
    if a.results is not None:
        a.results.mkdir(parents=True, exist_ok=True)
        for n in ("scale.json", "scale.md", "scale.png"):
            if (out / n).is_file():
                shutil.copy2(out / n, a.results / n)
    return 0


def _report(rec: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rec["steps"]
    prov = rec.get("provenance") or {}
    lines = ["# Scale benchmark (LIDC twins: SYNTHETIC images)", "",
             f"`{rec.get('command', 'python -m benchmarks.scale')}`; git {prov.get('git_revision')}.", "",
             f"Machine: {rec['cpu_count']} CPU cores, shared; load average (1, 5, 15 min) before/after each step "
             "is listed: timings on a loaded machine are noisy.", "",
             "| step | scans | failed | wall s | scans/min | peak RSS per worker (MiB) | disk per scan (MiB) | load before -> after |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in s.items():
        if name == "kill":
            continue
        spm = r.get("scans_per_minute", round(60 * r["scans"] / max(r["seconds"], 1e-9), 2))
        rss = ", ".join(str(v) for v in r.get("peak_rss_mb_per_worker", {}).values()) or "-"
        lines.append(f"| {name} | {r['scans']} | {r['failed']} | {r['seconds']} | {spm} | {rss} | "
                     f"{r.get('disk_mb_per_scan', '-')} | {r['load_before']} -> {r['load_after']} |")
    if "kill" in s:
        k = s["kill"]
        lines += ["", f"**kill -9**: a worker (pid {k['killed_pid']}) was killed after {k['killed_after_done_scans']} "
                  f"of {k['scans']} scans were done; the run finished in {k['seconds']} s with {k['failed']} failed "
                  f"scans; outputs identical to {k['reference']}: "
                  f"**{k['identical_to_reference']}** (differing files: {k['files_differing_from_reference'] or 'none'})."]
    write_text(out / "scale.md", "\n".join(lines) + "\n")
    runs = [(n, r) for n, r in s.items() if n.startswith("predict_")]
    if runs:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        axes[0].bar([n.split("_")[1] for n, _ in runs], [r["scans_per_minute"] for _, r in runs], color="tab:blue")
        axes[0].set_xlabel("workers")
        axes[0].set_ylabel("predict: scans / minute")
        axes[1].bar([n.split("_")[1] for n, _ in runs],
                    [max(r["peak_rss_mb_per_worker"].values() or [0]) for _, r in runs], color="tab:orange")
        axes[1].set_xlabel("workers")
        axes[1].set_ylabel("peak RSS per worker (MiB)")
        fig.suptitle(f"predict on {runs[0][1]['scans']} twins (SYNTHETIC), {rec['cpu_count']}-core shared CPU", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "scale.png", dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
