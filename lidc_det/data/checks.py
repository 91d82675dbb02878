"""Label sanity checks (``lidc-det check-labels DATASET``).

DATASET is a prepared data set (``dataset.json``, written by ``lidc-det
prepare`` or :func:`lidc_det.data.lung_pet_ct_dx.prepare_lung_pet_ct_dx`) or a
raw Lung-PET-CT-Dx folder (patient folders + ``Annotation/``). Both are turned
into one list of :class:`LabelRecord` (one per finding) and checked:

=====================  ========  ==============================================================
check                  severity  fails when
=====================  ========  ==============================================================
class balance          warning   the rarest class has < 1/``imbalance_ratio`` of the commonest
identical labels       error     every finding has the same class (or the same diameter), with
                                 >= ``min_findings`` findings (fewer: warning) -- the classic
                                 silent bug of a label column read as a constant
unknown class          error     a Lung-PET-CT-Dx class letter is not A/B/E/G
class vs patient id    warning   a Lung-PET-CT-Dx class differs from the patient id's letter
outside volume         error     a box reaches outside the array, is empty, or a centre lies
                                 outside the volume
unmatched UID          error     an annotation names a SOP Instance UID (or a scan) that no
                                 slice (scan) of the data set has
smaller than voxel     error     a finding is smaller than the largest voxel side, or its box
                                 vanished on the (prepared) grid
unreadable             error     a patient's CT or XML could not be read
scan arrays            error     (prepared data sets) a scan's ``image.npy`` / ``labels.npy`` /
                                 ``masks.npz`` is missing, cut short or unloadable, has the wrong
                                 shape or dtype for its ``meta.json``, or the label map disagrees
                                 with the nodules (unknown label, a nodule's label absent, outside
                                 its box, or more voxels than its mask)
=====================  ========  ==============================================================

Classes: Lung-PET-CT-Dx letters; for LIDC, the median malignancy rating
(``> 3`` malignant, ``< 3`` benign, ``= 3`` indeterminate).
:func:`check_labels` returns a :class:`CheckReport`; ``report.ok`` is False when
an error was found, and ``report.table()`` prints it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lidc_det.errors import DatasetError
from lidc_det.geometry import VolumeGeometry

__all__ = [
    "CheckReport",
    "CheckResult",
    "LabelRecord",
    "check_labels",
    "check_records",
    "records_from_prepared",
    "scan_array_problems",
]

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass(frozen=True)
class LabelRecord:
    """One finding as the checks see it.

    Attributes:
        case: scan or patient the finding belongs to.
        finding_id: its id.
        class_label: class (None = unrated).
        box_voxel: ``(z0, y0, x0, z1, y1, x1)`` on ``geometry`` (None = no box, e.g. vanished).
        geometry: the grid of ``box_voxel``.
        center_xyz_mm: world centre (LPS mm).
        diameter_mm: size in mm.
        expected_class: class implied elsewhere (Lung-PET-CT-Dx patient id letter), or None.
    """

    case: str
    finding_id: str
    class_label: str | None
    box_voxel: tuple[float, ...] | None
    geometry: VolumeGeometry
    center_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    expected_class: str | None = None


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check: ``n_bad`` of ``n_checked`` items failed; ``examples`` names a few."""

    name: str
    severity: str  # "ok", "warning" or "error"
    n_bad: int
    n_checked: int
    message: str
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckReport:
    """All checks of one data set."""

    dataset: Path
    kind: str
    n_cases: int
    n_findings: int
    class_counts: dict[str, int]
    results: tuple[CheckResult, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when no check is an error (warnings allowed)."""
        return all(r.severity != ERROR for r in self.results)

    @property
    def errors(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if r.severity == ERROR)

    def table(self) -> str:
        """Plain-text report: class balance, then one row per check."""
        lines = [f"label checks of {self.dataset} ({self.kind}): {self.n_cases} cases, {self.n_findings} findings", ""]
        total = sum(self.class_counts.values()) or 1
        lines.append(f"{'class':<24} {'findings':>8} {'share':>7}")
        for name, n in sorted(self.class_counts.items(), key=lambda t: (-t[1], t[0])):
            lines.append(f"{name:<24} {n:>8} {100 * n / total:>6.1f}%")
        lines += ["", f"{'check':<22} {'result':<8} {'bad':>6} {'of':>6}  details"]
        for r in self.results:
            lines.append(f"{r.name:<22} {r.severity.upper():<8} {r.n_bad:>6} {r.n_checked:>6}  {r.message}")
            lines += [f"{'':<46}- {e}" for e in r.examples]
        lines += [f"note: {n}" for n in self.notes]
        n_err = len(self.errors)
        lines += ["", "OK: no errors" if n_err == 0 else f"FAILED: {n_err} check(s) with errors"]
        return "\n".join(lines)


# ---------------------------------------------------------------- the checks
def _result(name: str, bad: Sequence[str], n_checked: int, severity: str, ok_msg: str, bad_msg: str) -> CheckResult:
    if not bad:
        return CheckResult(name, OK, 0, n_checked, ok_msg)
    return CheckResult(name, severity, len(bad), n_checked, bad_msg, tuple(bad[:5]))


def _check_balance(records: Sequence[LabelRecord], imbalance_ratio: float) -> CheckResult:
    counts = Counter(r.class_label for r in records if r.class_label is not None)
    if len(counts) < 2:
        return CheckResult("class balance", OK, 0, sum(counts.values()), f"{len(counts)} class(es); see identical labels")
    (top, n_top), (low, n_low) = counts.most_common()[0], counts.most_common()[-1]
    if n_top > imbalance_ratio * n_low:
        return CheckResult(
            "class balance", WARNING, n_low, sum(counts.values()),
            f"{low!r} has {n_low} findings, {n_top / n_low:.0f}x fewer than {top!r} ({n_top})",
        )
    return CheckResult("class balance", OK, 0, sum(counts.values()), f"{len(counts)} classes, max/min {n_top / n_low:.1f}")


def _check_identical(records: Sequence[LabelRecord], min_findings: int) -> CheckResult:
    classes = [r.class_label for r in records if r.class_label is not None]
    diameters = [round(r.diameter_mm, 6) for r in records if math.isfinite(r.diameter_mm)]
    problems = []
    if len(classes) >= 2 and len(set(classes)) == 1:
        problems.append(f"all {len(classes)} classes are {classes[0]!r}")
    if len(diameters) >= 2 and len(set(diameters)) == 1:
        problems.append(f"all {len(diameters)} diameters are {diameters[0]:g} mm")
    if not problems:
        msg = "classes and diameters vary" if len(records) >= 2 else "fewer than 2 findings: nothing to compare"
        return CheckResult("identical labels", OK, 0, len(records), msg)
    severity = ERROR if len(records) >= min_findings else WARNING
    why = "" if severity == ERROR else f" (only {len(records)} findings: a warning below {min_findings})"
    return CheckResult("identical labels", severity, len(records), len(records), "; ".join(problems) + why)


def _check_unknown_class(records: Sequence[LabelRecord], known: set[str]) -> CheckResult:
    bad = [f"{r.finding_id}: class {r.class_label!r}" for r in records if r.class_label not in known]
    return _result("unknown class", bad, len(records), ERROR, f"all in {sorted(known)}", f"class not in {sorted(known)}")


def _check_expected(records: Sequence[LabelRecord]) -> CheckResult:
    checked = [r for r in records if r.expected_class is not None]
    bad = [f"{r.finding_id}: class {r.class_label!r}, patient id says {r.expected_class!r}"
           for r in checked if r.class_label != r.expected_class]
    return _result("class vs patient id", bad, len(checked), WARNING, "agree", "class differs from the patient id's letter")


def _check_outside(records: Sequence[LabelRecord]) -> CheckResult:
    bad = []
    for r in records:
        shape = np.asarray(r.geometry.shape_zyx, dtype=float)
        if r.box_voxel is not None:
            b = np.asarray(r.box_voxel, dtype=float)
            if np.any(b[3:] <= b[:3]):
                bad.append(f"{r.finding_id}: empty box {tuple(round(v, 1) for v in b)}")
                continue
            if np.any(b[:3] < 0) or np.any(b[3:] > shape):
                bad.append(f"{r.finding_id}: box {tuple(round(v, 1) for v in b)} outside array {r.geometry.shape_zyx}")
                continue
        centre = r.geometry.world_to_voxel(np.asarray(r.center_xyz_mm))
        if not bool(r.geometry.contains_voxel(centre)[0]):
            bad.append(f"{r.finding_id}: centre {tuple(round(v, 1) for v in r.center_xyz_mm)} mm outside the volume")
    return _result("outside volume", bad, len(records), ERROR, "all boxes and centres inside", "boxes/centres outside the volume")


def _check_small(records: Sequence[LabelRecord]) -> CheckResult:
    bad = []
    for r in records:
        voxel = max(r.geometry.spacing_zyx)
        if r.box_voxel is None:
            bad.append(f"{r.finding_id}: no box on the grid (vanished at spacing {r.geometry.spacing_zyx} mm)")
        elif r.diameter_mm < voxel:
            bad.append(f"{r.finding_id}: {r.diameter_mm:.2f} mm < voxel side {voxel:g} mm")
    return _result("smaller than voxel", bad, len(records), ERROR, "all larger than a voxel", "findings smaller than a voxel")


def check_records(
    records: Sequence[LabelRecord],
    *,
    unmatched: Sequence[str] = (),
    n_annotations: int | None = None,
    unreadable: Sequence[str] = (),
    n_cases: int = 0,
    known_classes: set[str] | None = None,
    min_findings: int = 10,
    imbalance_ratio: float = 10.0,
) -> tuple[dict[str, int], tuple[CheckResult, ...]]:
    """Run every check on ``records``.

    Args:
        records: the findings.
        unmatched: descriptions of annotations that match no slice / scan.
        n_annotations: how many annotations were matched against slices (for the table).
        unreadable: descriptions of cases that could not be read.
        n_cases: number of cases (for the table).
        known_classes: valid class labels (adds the "unknown class" check).
        min_findings: below this many findings, identical labels are a warning only.
        imbalance_ratio: commonest / rarest class count that triggers the balance warning.

    Returns:
        (class counts, results).
    """
    counts = dict(Counter(r.class_label if r.class_label is not None else "(none)" for r in records))
    results = [_check_balance(records, imbalance_ratio), _check_identical(records, min_findings)]
    if known_classes is not None:
        results.append(_check_unknown_class(records, known_classes))
    if any(r.expected_class is not None for r in records):
        results.append(_check_expected(records))
    results.append(_check_outside(records))
    n_ann = n_annotations if n_annotations is not None else len(records) + len(unmatched)
    results.append(
        _result("unmatched UID", list(unmatched), n_ann, ERROR, "every annotation matches a slice/scan",
                "annotations whose UID matches no slice/scan")
    )
    results.append(_check_small(records))
    results.append(_result("unreadable", list(unreadable), n_cases, ERROR, "all cases read", "cases that could not be read"))
    return counts, tuple(results)


def scan_array_problems(folder: Path, meta: dict) -> list[str]:
    """What is wrong with one prepared scan's arrays, checked against its ``meta.json`` content.

    Loads ``labels.npy`` and ``masks.npz`` fully and ``image.npy`` memory-mapped (its
    header, shape, dtype and length are checked; its values are not read).

    Returns:
        One line per problem (``[]`` when the arrays are sound).
    """
    uid = meta.get("series_uid", folder.name)
    shape = tuple(int(v) for v in meta["geometry"]["shape_zyx"])
    problems: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for name, dtype in (("image.npy", np.int16), ("labels.npy", np.uint8)):
        path = folder / name
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            problems.append(f"{uid}/{name}: cannot be loaded ({err})")
            continue
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            problems.append(
                f"{uid}/{name}: {arr.dtype} {tuple(arr.shape)}, meta.json says {np.dtype(dtype)} {shape}"
            )
            continue
        arrays[name] = arr
    nodules = [n for n in meta.get("nodules", []) if n.get("label") is not None]
    try:
        with np.load(folder / "masks.npz") as z:
            masks = {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001 - zip / CRC / pickle errors all mean "re-run prepare"
        problems.append(f"{uid}/masks.npz: cannot be loaded ({type(err).__name__}: {err})")
        masks = None
    labels = arrays.get("labels.npy")
    if labels is None:
        return problems
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel(), minlength=256)
    known = {int(n["label"]) for n in nodules}
    unknown = [v for v in np.flatnonzero(counts[1:]) + 1 if int(v) not in known]
    if unknown:
        problems.append(f"{uid}/labels.npy: label values {[int(v) for v in unknown]} belong to no nodule of meta.json")
    for n in nodules:
        label, box = int(n["label"]), n.get("box_voxel")
        if box is None:
            if counts[label]:
                problems.append(f"{uid}/labels.npy: label {label} has {counts[label]} voxels but no box in meta.json")
            continue
        lo, hi = [int(v) for v in box[:3]], [int(v) for v in box[3:]]
        inside = int(np.count_nonzero(labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == label))
        if inside == 0:
            problems.append(f"{uid}/labels.npy: nodule {n['nodule_id']} (label {label}) has no voxel in its box {box}")
        elif inside != counts[label]:
            problems.append(f"{uid}/labels.npy: label {label} has {counts[label] - inside} voxels outside its box {box}")
        if counts[label] > int(n.get("mask_voxels", counts[label])):
            problems.append(
                f"{uid}/labels.npy: label {label} has {counts[label]} voxels, more than its mask's {n['mask_voxels']}"
            )
        if masks is not None:
            mask = masks.get(f"mask_{label}")
            if mask is None:
                problems.append(f"{uid}/masks.npz: no mask_{label} for nodule {n['nodule_id']}")
            elif tuple(mask.shape) != tuple(h - low for low, h in zip(lo, hi, strict=True)):
                problems.append(f"{uid}/masks.npz: mask_{label} is {tuple(mask.shape)}, its box {box}")
    return problems


def _check_prepared_arrays(root: Path) -> CheckResult:
    """The "scan arrays" check of every scan of a prepared data set."""
    info = json.loads((root / "dataset.json").read_text())
    bad: list[str] = []
    uids = [s["series_uid"] for s in info.get("scans", [])]
    for uid in uids:
        folder = root / "scans" / uid
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            bad.append(f"{uid}/meta.json: unreadable ({err})")
            continue
        bad += scan_array_problems(folder, meta)
    return _result("scan arrays", bad, len(uids), ERROR, "arrays load and agree with meta.json",
                   "scan arrays missing, cut short or disagreeing with meta.json (re-run prepare)")


# --------------------------------------------------------------- data sources
def _lidc_class(malignancy: float) -> str | None:
    if not math.isfinite(malignancy):
        return None
    return "malignant" if malignancy > 3 else "benign" if malignancy < 3 else "indeterminate"


def records_from_prepared(root: Path) -> tuple[list[LabelRecord], list[str], int, int, str]:
    """(records, unmatched, n_annotations, n_cases, source) of a prepared data set (meta.json files;
    :func:`scan_array_problems` checks the arrays)."""
    from lidc_det.data.luna import read_annotations

    path = root / "dataset.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: unreadable ({err})") from err
    source = str(info.get("source", "lidc-idri"))
    scans = {s["series_uid"]: s for s in info.get("scans", [])}
    records: list[LabelRecord] = []
    unmatched: list[str] = []
    n_ann = 0
    for uid in scans:
        meta_path = root / "scans" / uid / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetError(f"{meta_path}: unreadable ({err}); re-run prepare") from err
        geom = VolumeGeometry.from_dict(meta["geometry"])
        for n in meta.get("nodules", []):
            label = n.get("class_label")
            if label is None:
                label = _lidc_class(float(n.get("malignancy_median", float("nan"))))
            box = n.get("box_voxel")
            records.append(
                LabelRecord(
                    case=uid,
                    finding_id=f"{meta.get('patient_id', uid)}/{n['nodule_id']}",
                    class_label=label,
                    box_voxel=None if box is None else tuple(box),
                    geometry=geom,
                    center_xyz_mm=tuple(n["center_xyz_mm"]),  # type: ignore[arg-type]
                    diameter_mm=float(n["diameter_mm"]),
                )
            )
        lost = meta.get("unmatched_sop_uids", [])
        n_ann += len(meta.get("nodules", [])) + len(lost)
        unmatched += [f"{meta.get('patient_id', uid)}: SOP UID {u} matches no slice" for u in lost]
    ann_path = root / "annotations.csv"
    if ann_path.is_file():
        findings = read_annotations(ann_path)
        n_ann += len(findings)
        unmatched += [
            f"annotations.csv: series {f.series_uid} is not a scan of the data set"
            for f in findings
            if f.series_uid not in scans
        ]
    return records, unmatched, n_ann, len(scans), source


def _records_from_lung_pet_ct_dx(
    root: Path, annotation_root: Path | None, progress: bool
) -> tuple[list[LabelRecord], list[str], int, list[str], int]:
    from tqdm import tqdm

    from lidc_det.data.lung_pet_ct_dx import find_patients, load_patient

    patients = find_patients(root, annotation_root)
    records: list[LabelRecord] = []
    unmatched: list[str] = []
    unreadable: list[str] = []
    n_ann = 0
    for p in tqdm(patients, desc="check-labels", unit="patient", disable=not progress):
        if p.xml_dir is None:
            continue  # a patient without annotations: nothing to check
        if not p.dicom_dir.is_dir():
            n_xml = len(list(p.xml_dir.glob("*.xml")))
            n_ann += n_xml
            unmatched.append(f"{p.xml_dir}: {n_xml} annotation files, but no patient folder {p.dicom_dir.name}")
            continue
        try:
            case = load_patient(p.dicom_dir, p.xml_dir)
        except Exception as err:  # noqa: BLE001 - reported per patient
            unreadable.append(f"{p.key}: {type(err).__name__}: {err}")
            continue
        n_ann += len(case.slice_boxes) + len(case.unmatched)
        unmatched += [f"{p.key}: {v.source.name} (class {v.label}) matches no CT slice" for v in case.unmatched]
        expected = p.key[0].upper() if p.key[:1].isalpha() else None
        for les in case.lesions:
            records.append(
                LabelRecord(
                    case=p.key,
                    finding_id=les.lesion_id,
                    class_label=les.class_label,
                    box_voxel=les.box_voxel,
                    geometry=case.volume.geometry,
                    center_xyz_mm=les.center_xyz_mm,
                    diameter_mm=les.diameter_mm,
                    expected_class=expected,
                )
            )
    return records, unmatched, n_ann, unreadable, sum(p.xml_dir is not None for p in patients)


def check_labels(
    dataset: str | Path,
    *,
    annotation_root: str | Path | None = None,
    min_findings: int = 10,
    imbalance_ratio: float = 10.0,
    progress: bool = True,
) -> CheckReport:
    """Check the labels of a prepared data set or a raw Lung-PET-CT-Dx folder (see module docstring).

    Raises:
        DatasetError: DATASET is neither (no ``dataset.json``, no ``Annotation/`` folder).
    """
    from lidc_det.data.lung_pet_ct_dx import CLASS_NAMES

    root = Path(dataset)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    notes: list[str] = []
    if (root / "dataset.json").is_file():
        records, unmatched, n_ann, n_cases, source = records_from_prepared(root)
        unreadable: list[str] = []
        kind = f"prepared data set, source {source}"
        known = set(CLASS_NAMES) if source == "lung-pet-ct-dx" else None
        if source != "lung-pet-ct-dx":
            notes.append("LIDC classes from the median malignancy rating: >3 malignant, <3 benign, =3 indeterminate")
    else:
        try:
            records, unmatched, n_ann, unreadable, n_cases = _records_from_lung_pet_ct_dx(
                root, None if annotation_root is None else Path(annotation_root), progress
            )
        except DatasetError as err:
            raise DatasetError(
                f"{root}: neither a prepared data set (no dataset.json) nor a Lung-PET-CT-Dx folder ({err})"
            ) from err
        kind = "Lung-PET-CT-Dx folder"
        known = set(CLASS_NAMES)
    counts, results = check_records(
        records,
        unmatched=unmatched,
        n_annotations=n_ann,
        unreadable=unreadable,
        n_cases=n_cases,
        known_classes=known,
        min_findings=min_findings,
        imbalance_ratio=imbalance_ratio,
    )
    if (root / "dataset.json").is_file():
        results = (*results, _check_prepared_arrays(root))
    return CheckReport(root, kind, n_cases, len(records), counts, results, tuple(notes))
