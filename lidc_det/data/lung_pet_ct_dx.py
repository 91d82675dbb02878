"""Lung-PET-CT-Dx (TCIA): CT series + Pascal-VOC boxes -> 3D lesion boxes and a prepared data set.

The collection ships, per patient, DICOM series (CT, PET, fused) in the TCIA
layout and, separately, a folder of Pascal-VOC XML files, one per annotated CT
slice, each **named by the slice's SOP Instance UID**::

    Lung-PET-CT-Dx/Lung_Dx-A0001/<study>/<series>/*.dcm
    Annotation/A0001/<SOPInstanceUID>.xml      <object><name>A</name><bndbox>xmin..</bndbox></object>

The ``<name>`` of each object is the histology class: ``A`` adenocarcinoma,
``B`` small cell carcinoma, ``E`` large cell carcinoma, ``G`` squamous cell
carcinoma (:data:`CLASS_NAMES`).

Conversion (:func:`load_patient`):

1. Every XML is mapped to its slice by SOP Instance UID. The CT series chosen
   is the one holding most of the patient's annotated UIDs; XML files whose
   UID matches no slice of it are kept in ``unmatched`` (never dropped silently).
2. VOC pixel coordinates are 0-based column (x) / row (y) indices with
   inclusive max (what TCIA's own viewer draws), so a VOC box becomes the 2D
   box ``y0 = ymin, x0 = xmin, y1 = ymax + 1, x1 = xmax + 1`` (exclusive ends).
3. Per-slice boxes of one lesion are merged into a 3D box (:func:`group_boxes`):
   two boxes are the same lesion when they carry the same class, lie on slices
   at most ``max_slice_step`` apart and overlap in the (y, x) plane; a lesion
   is a connected group. Its voxel box (:mod:`lidc_det.boxes` format,
   ``z0, y0, x0, z1, y1, x1``, exclusive ends, on the original CT grid) is the
   union of its slices' boxes; centre and size in world mm follow from the
   geometry (:func:`lidc_det.boxes.boxes_to_world`). ``diameter_mm`` is the
   mean of the three world sizes (the convention of stage 1's box findings).

:func:`prepare_lung_pet_ct_dx` writes the same folder layout as
``lidc-det prepare`` (see :mod:`lidc_det.data.prepare`), so
:class:`lidc_det.data.prepared.PreparedDataset` and stage 1 read it unchanged;
each lesion's "mask" is its box, moved to the prepared grid by
:func:`box_on_grid` (the voxels whose centres lie inside the box). Fields without a meaning here are filled
honestly: ``n_readers = 1`` (one annotation per lesion), ``malignancy_median
= NaN`` (not rated; every lesion is a biopsy-proven cancer),
``characteristics = {}``; the class is in ``class_label`` / ``histology``
(meta.json records and ``nodules.csv``).
"""

from __future__ import annotations

import json
import math
import re
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lidc_det.data.prepare import PrepareReport, hash_settings
from lidc_det.errors import DatasetError, LidcDetError
from lidc_det.geometry import VolumeGeometry

if TYPE_CHECKING:
    from lidc_det.io.dicom import CTVolume

__all__ = [
    "CLASS_NAMES",
    "Lesion",
    "LungPetCtDxCase",
    "LungPetCtDxPrepareConfig",
    "PatientFolders",
    "SliceBox",
    "box_on_grid",
    "VocBox",
    "VocFormatError",
    "find_patients",
    "group_boxes",
    "load_patient",
    "prepare_lung_pet_ct_dx",
    "read_voc_folder",
    "read_voc_xml",
]

#: Histology of the class letters used in the collection's XML files.
CLASS_NAMES: dict[str, str] = {
    "A": "adenocarcinoma",
    "B": "small cell carcinoma",
    "E": "large cell carcinoma",
    "G": "squamous cell carcinoma",
}

SOURCE = "lung-pet-ct-dx"


class VocFormatError(LidcDetError):
    """A VOC XML file cannot be read (``"<file>: <reason>"``)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        return (type(self), (self.path, self.reason))


# ------------------------------------------------------------------- VOC XML
@dataclass(frozen=True)
class VocBox:
    """One ``<object>`` of a VOC file: class and pixel box (0-based, inclusive max).

    Attributes:
        sop_uid: SOP Instance UID of the slice (the XML file name without ``.xml``).
        label: the object's ``<name>`` (class letter), stripped.
        xmin, ymin, xmax, ymax: column / row pixel indices, inclusive.
        source: the XML file.
    """

    sop_uid: str
    label: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int
    source: Path


def _int_field(box: ET.Element, tag: str, path: Path) -> int:
    node = box.find(tag)
    if node is None or node.text is None or not node.text.strip():
        raise VocFormatError(path, f"<bndbox> has no <{tag}>")
    try:
        value = float(node.text.strip())
    except ValueError:
        raise VocFormatError(path, f"<{tag}> is not a number: {node.text.strip()!r}") from None
    if not math.isfinite(value):
        raise VocFormatError(path, f"<{tag}> is not finite: {node.text.strip()!r}")
    return int(round(value))


def read_voc_xml(path: str | Path) -> list[VocBox]:
    """The boxes of one VOC XML file (may be empty: a file without ``<object>``).

    Raises:
        VocFormatError: unreadable or malformed XML, missing ``<name>`` or
            coordinates, or ``xmax < xmin`` / ``ymax < ymin``.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise VocFormatError(path, f"not readable VOC XML ({err})") from None
    if root.tag != "annotation":
        raise VocFormatError(path, f"root element is <{root.tag}>, expected <annotation>")
    out = []
    for obj in root.iter("object"):
        name = obj.findtext("name")
        if name is None or not name.strip():
            raise VocFormatError(path, "an <object> has no <name> (class label)")
        box = obj.find("bndbox")
        if box is None:
            raise VocFormatError(path, f"object {name.strip()!r} has no <bndbox>")
        x0, y0, x1, y1 = (_int_field(box, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        if x1 < x0 or y1 < y0:
            raise VocFormatError(path, f"empty box: xmin {x0} xmax {x1} ymin {y0} ymax {y1}")
        out.append(VocBox(path.stem, name.strip(), x0, y0, x1, y1, path))
    return out


def read_voc_folder(folder: str | Path) -> list[VocBox]:
    """All boxes of the ``*.xml`` files in ``folder`` (recursive), in file-name order.

    Raises:
        VocFormatError: the folder does not exist, or a file is malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VocFormatError(folder, "annotation folder does not exist")
    out: list[VocBox] = []
    for p in sorted(folder.rglob("*.xml")):
        if not p.name.startswith("."):
            out.extend(read_voc_xml(p))
    return out


# ----------------------------------------------------------------- grouping
@dataclass(frozen=True)
class SliceBox:
    """A VOC box placed on the CT grid: slice ``z`` and the (y, x) box with exclusive ends."""

    z: int
    label: str
    y0: int
    x0: int
    y1: int
    x1: int
    sop_uid: str


@dataclass(frozen=True)
class Lesion:
    """One lesion: per-slice boxes merged into a 3D box.

    Attributes:
        lesion_id: ``<patient>-L<k>`` (k from 1, lesions ordered by z0, y0, x0).
        class_label: class letter (``A``/``B``/``E``/``G``, or as written).
        histology: :data:`CLASS_NAMES` entry, ``"unknown"`` for another letter.
        box_voxel: ``(z0, y0, x0, z1, y1, x1)`` on the CT grid, exclusive ends
            (not clipped: a box outside the volume stays visible to the checks).
        center_xyz_mm: world LPS centre of the box (x, y, z mm).
        size_xyz_mm: world box size (x, y, z mm).
        diameter_mm: mean of ``size_xyz_mm``.
        slices: the annotated slice indices (sorted; gaps possible).
        sop_uids: the annotated slices' SOP Instance UIDs (same order).
    """

    lesion_id: str
    class_label: str
    histology: str
    box_voxel: tuple[float, float, float, float, float, float]
    center_xyz_mm: tuple[float, float, float]
    size_xyz_mm: tuple[float, float, float]
    diameter_mm: float
    slices: tuple[int, ...]
    sop_uids: tuple[str, ...]


def _overlap_yx(a: SliceBox, b: SliceBox) -> bool:
    return min(a.y1, b.y1) > max(a.y0, b.y0) and min(a.x1, b.x1) > max(a.x0, b.x0)


def group_boxes(
    boxes: Sequence[SliceBox], geometry: VolumeGeometry, *, patient_id: str = "", max_slice_step: int = 2
) -> list[Lesion]:
    """Merge per-slice boxes into 3D lesions (connected groups, see module docstring).

    Args:
        boxes: per-slice boxes on the CT grid of ``geometry``.
        geometry: the CT geometry (axis-aligned), for world centres and sizes.
        patient_id: prefix of the lesion ids.
        max_slice_step: boxes on slices up to this many indices apart can link
            (2 tolerates one unannotated slice inside a lesion).

    Returns:
        Lesions sorted by (z0, y0, x0, class).
    """
    from lidc_det.boxes import boxes_to_world

    if max_slice_step < 1:
        raise ValueError(f"max_slice_step must be >= 1, got {max_slice_step}")
    n = len(boxes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    order = sorted(range(n), key=lambda i: boxes[i].z)
    for a_pos, i in enumerate(order):
        for j in order[a_pos + 1 :]:
            dz = boxes[j].z - boxes[i].z
            if dz > max_slice_step:
                break
            if dz >= 1 and boxes[i].label == boxes[j].label and _overlap_yx(boxes[i], boxes[j]):
                parent[find(j)] = find(i)
    groups: dict[int, list[SliceBox]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(boxes[i])
    merged = []
    for members in groups.values():
        z = [b.z for b in members]
        box = (
            float(min(z)),
            float(min(b.y0 for b in members)),
            float(min(b.x0 for b in members)),
            float(max(z) + 1),
            float(max(b.y1 for b in members)),
            float(max(b.x1 for b in members)),
        )
        by_z = sorted(members, key=lambda b: b.z)
        merged.append((box, members[0].label, tuple(b.z for b in by_z), tuple(b.sop_uid for b in by_z)))
    merged.sort(key=lambda t: (t[0][:3], t[1]))
    out = []
    for k, (box, label, slices, uids) in enumerate(merged, start=1):
        centre, size = boxes_to_world(np.asarray(box), geometry)
        size_mm = tuple(float(abs(v)) for v in size[0])
        out.append(
            Lesion(
                lesion_id=f"{patient_id}-L{k}" if patient_id else f"L{k}",
                class_label=label,
                histology=CLASS_NAMES.get(label.upper(), "unknown"),
                box_voxel=box,
                center_xyz_mm=tuple(float(v) for v in centre[0]),  # type: ignore[arg-type]
                size_xyz_mm=size_mm,  # type: ignore[arg-type]
                diameter_mm=float(np.mean(size_mm)),
                slices=slices,
                sop_uids=uids,
            )
        )
    return out


# ------------------------------------------------------------------ patients
@dataclass(frozen=True)
class PatientFolders:
    """Where one patient's data lies: ``key`` is the annotation folder name (``A0001``)."""

    key: str
    dicom_dir: Path
    xml_dir: Path | None


@dataclass(frozen=True, eq=False)
class LungPetCtDxCase:
    """One patient read by :func:`load_patient`.

    Attributes:
        patient_id: DICOM PatientID of the CT (e.g. ``Lung_Dx-A0001``).
        volume: the CT (:class:`lidc_det.io.dicom.CTVolume`, HU ``[z, y, x]``).
        lesions: 3D lesions on ``volume.geometry``.
        slice_boxes: the matched per-slice boxes.
        unmatched: VOC boxes whose SOP UID matches no slice of the CT.
        xml_dir: the annotation folder.
    """

    patient_id: str
    volume: CTVolume
    lesions: tuple[Lesion, ...]
    slice_boxes: tuple[SliceBox, ...]
    unmatched: tuple[VocBox, ...]
    xml_dir: Path


def find_patients(root: str | Path, annotation_root: str | Path | None = None) -> list[PatientFolders]:
    """Patient folders under ``root`` paired with their annotation folders.

    A patient folder is a sub-folder of ``root`` other than the annotation root;
    its annotation folder is ``annotation_root/<key>`` where the folder name
    equals the patient folder's name or its part after the last ``-`` / ``_``
    (``Lung_Dx-A0001`` -> ``A0001``). ``annotation_root`` defaults to
    ``root/Annotation`` (or ``root/annotation``). Annotation folders without a
    patient folder are listed with ``dicom_dir`` = ``root/<key>`` (absent), so
    the checks can report them.

    Raises:
        DatasetError: ``root`` or ``annotation_root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: Lung-PET-CT-Dx root is not a folder")
    if annotation_root is None:
        candidates = [root / "Annotation", root / "annotation", root / "Annotations"]
        annotation_root = next((c for c in candidates if c.is_dir()), None)
        if annotation_root is None:
            raise DatasetError(f"{root}: no Annotation/ folder; pass the VOC annotation root explicitly")
    ann = Path(annotation_root)
    if not ann.is_dir():
        raise DatasetError(f"{ann}: annotation root is not a folder")
    xml_dirs = {p.name: p for p in ann.iterdir() if p.is_dir() and not p.name.startswith(".")}
    out: list[PatientFolders] = []
    used: set[str] = set()
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.resolve() == ann.resolve():
            continue
        key = d.name if d.name in xml_dirs else re.split(r"[-_]", d.name)[-1]
        xml_dir = xml_dirs.get(key)
        if xml_dir is not None:
            used.add(key)
        out.append(PatientFolders(key, d, xml_dir))
    for key in sorted(set(xml_dirs) - used):
        out.append(PatientFolders(key, root / key, xml_dirs[key]))
    return out


def _series_sop_uids(files: Sequence[Path]) -> dict[str, Path]:
    import pydicom

    out = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except Exception:  # noqa: BLE001 - find_series already read this file; skip oddities
            continue
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if uid:
            out[uid] = f
    return out


def load_patient(
    dicom_dir: str | Path,
    xml_dir: str | Path,
    *,
    series_uid: str | None = None,
    max_slice_step: int = 2,
) -> LungPetCtDxCase:
    """Read a patient's CT and VOC folder and build its 3D lesions.

    Args:
        dicom_dir: the patient's DICOM folder (any depth; PET/fused series are ignored).
        xml_dir: the patient's VOC XML folder (files named by SOP Instance UID).
        series_uid: CT series to use; default the CT series holding most of the
            annotated SOP UIDs.
        max_slice_step: see :func:`group_boxes`.

    Raises:
        DatasetError: no CT series in ``dicom_dir``, or ``series_uid`` not among them.
        VocFormatError: a malformed XML file.
        InvalidSeriesError (and subclasses): the CT cannot be read.
    """
    from lidc_det.io.dicom import find_series, read_series

    dicom_dir, xml_dir = Path(dicom_dir), Path(xml_dir)
    vocs = read_voc_folder(xml_dir)
    cts = [s for s in find_series(dicom_dir) if s.modality == "CT"] if dicom_dir.is_dir() else []
    if not cts:
        raise DatasetError(f"{dicom_dir}: no CT series")
    wanted = {v.sop_uid for v in vocs}
    if series_uid is not None:
        chosen = [s for s in cts if s.series_uid == series_uid]
        if not chosen:
            raise DatasetError(f"{dicom_dir}: no CT series {series_uid}; found {', '.join(s.series_uid for s in cts)}")
        info = chosen[0]
    elif len(cts) == 1:
        info = cts[0]
    else:
        hits = [(len(wanted & set(_series_sop_uids(s.files))), -len(s.files), s.series_uid, s) for s in cts]
        info = max(hits, key=lambda t: t[:3])[3]
    vol = read_series(info.folder, series_uid=info.series_uid)
    z_of = {uid: k for k, uid in enumerate(vol.sop_uids)}
    matched: list[SliceBox] = []
    unmatched: list[VocBox] = []
    for v in vocs:
        z = z_of.get(v.sop_uid)
        if z is None:
            unmatched.append(v)
        else:
            matched.append(SliceBox(z, v.label, v.ymin, v.xmin, v.ymax + 1, v.xmax + 1, v.sop_uid))
    lesions = group_boxes(matched, vol.geometry, patient_id=vol.patient_id, max_slice_step=max_slice_step)
    return LungPetCtDxCase(vol.patient_id, vol, tuple(lesions), tuple(matched), tuple(unmatched), xml_dir)


# ------------------------------------------------------------------- prepare
@dataclass(frozen=True)
class LungPetCtDxPrepareConfig:
    """Everything that defines a prepared Lung-PET-CT-Dx data set.

    Attributes:
        root: folder with the patient folders (``Lung_Dx-*``).
        out_dir: output folder (the :mod:`lidc_det.data.prepare` layout).
        annotation_root: VOC root (``<key>/<SOPInstanceUID>.xml``); default ``root/Annotation``.
        patients: patient keys (``A0001``) or folder names to keep; None = all with annotations.
        spacing_zyx: target voxel size in mm.
        max_slice_step: see :func:`group_boxes`.
        n_folds, seed: patient-level folds.
    """

    root: Path
    out_dir: Path
    annotation_root: Path | None = None
    patients: tuple[str, ...] | None = None
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    max_slice_step: int = 2
    n_folds: int = 10
    seed: int = 0

    def scan_settings(self) -> dict[str, Any]:
        from lidc_det.data.prepare import FORMAT_VERSION

        return {
            "format_version": FORMAT_VERSION,
            "source": SOURCE,
            "spacing_zyx": [float(s) for s in self.spacing_zyx],
            "max_slice_step": int(self.max_slice_step),
        }

    def settings_hash(self) -> str:
        return hash_settings(self.scan_settings())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("root", "out_dir", "annotation_root"):
            d[k] = None if d[k] is None else str(d[k])
        return d


def box_on_grid(box_voxel: np.ndarray, source: VolumeGeometry, target: VolumeGeometry) -> np.ndarray | None:
    """A voxel box on ``source`` moved to the grid of ``target`` (both axis-aligned).

    The box's physical extent (voxel edges, ``z0 - 0.5 .. z1 - 0.5``) is mapped
    to world mm and back; the result covers exactly the ``target`` voxels whose
    centres lie inside it (a centre on an edge counts as inside), clipped to the
    array. Returns ``(6,)`` float or None when no voxel centre is inside.
    """
    b = np.asarray(box_voxel, dtype=np.float64).reshape(6)
    corners = np.array([[z, y, x] for z in (b[0], b[3]) for y in (b[1], b[4]) for x in (b[2], b[5])]) - 0.5
    t = target.world_to_voxel(source.voxel_to_world(corners))
    lo = np.ceil(t.min(axis=0) - 1e-6)
    hi = np.floor(t.max(axis=0) + 1e-6) + 1
    shape = np.asarray(target.shape_zyx, dtype=np.float64)
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    if np.any(hi <= lo):
        return None
    return np.concatenate([lo, hi])


def _prepare_case(case: LungPetCtDxCase, cfg: LungPetCtDxPrepareConfig, t0: float) -> dict[str, Any]:
    """Resample one case, write its scan folder (meta.json last); returns the meta."""
    from lidc_det.atomic import save_npy, write_json, write_with
    from lidc_det.boxes import box_volume
    from lidc_det.data.prepare import scan_dir
    from lidc_det.resample import resample_image

    vol = case.volume
    image, geom = resample_image(vol.hu, vol.geometry, cfg.spacing_zyx)
    labels = np.zeros(geom.shape_zyx, dtype=np.uint8)
    if len(case.lesions) > 254:
        raise DatasetError(f"{case.xml_dir}: {len(case.lesions)} lesions do not fit a uint8 label map")
    voxel_mm3 = float(np.prod(vol.geometry.spacing_zyx))
    masks: dict[str, np.ndarray] = {}
    nodules = []
    shape = np.asarray(vol.geometry.shape_zyx)
    for label, lesion in enumerate(case.lesions, start=1):
        b = np.asarray(lesion.box_voxel, dtype=int)
        lo, hi = np.clip(b[:3], 0, shape), np.clip(b[3:], 0, shape)
        rec: dict[str, Any] = {
            "nodule_id": lesion.lesion_id,
            "label": label,
            "n_readers": 1,
            "center_xyz_mm": list(lesion.center_xyz_mm),
            "diameter_mm": lesion.diameter_mm,
            "reader_mean_diameter_mm": lesion.diameter_mm,
            "volume_mm3": float(box_volume(np.asarray(lesion.box_voxel))[0]) * voxel_mm3,
            "malignancy_median": float("nan"),
            "characteristics": {},
            "class_label": lesion.class_label,
            "histology": lesion.histology,
            "size_xyz_mm": list(lesion.size_xyz_mm),
            "box_voxel_original": list(lesion.box_voxel),
            "annotated_slices": list(lesion.slices),
            "box_voxel": None,
            "mask_voxels": 0,
        }
        if np.all(hi > lo):
            box = box_on_grid(np.concatenate([lo, hi]).astype(float), vol.geometry, geom)
            if box is not None:
                plo, phi = box[:3].astype(int), box[3:].astype(int)
                crop = np.ones(tuple(phi - plo), dtype=bool)
                labels[plo[0] : phi[0], plo[1] : phi[1], plo[2] : phi[2]] = label
                masks[f"mask_{label}"] = crop
                masks[f"box_{label}"] = box
                rec["box_voxel"] = box.tolist()
                rec["mask_voxels"] = int(crop.sum())
        nodules.append(rec)
    out = scan_dir(cfg.out_dir, vol.series_uid)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "image.npy", np.clip(np.rint(image), -32768, 32767).astype(np.int16))
    save_npy(out / "labels.npy", labels)
    write_with(out / "masks.npz", lambda p: np.savez_compressed(p, **masks))
    meta = {
        "source": SOURCE,
        "series_uid": vol.series_uid,
        "patient_id": vol.patient_id,
        "study_uid": vol.study_uid,
        "source_folder": str(vol.source),
        "annotation_folder": str(case.xml_dir),
        "slice_thickness_mm": vol.slice_thickness_mm,
        "original_geometry": vol.geometry.to_dict(),
        "geometry": geom.to_dict(),
        "settings": cfg.scan_settings(),
        "settings_hash": cfg.settings_hash(),
        "nodules": nodules,
        "irrelevant": [],
        "unmatched_sop_uids": sorted({v.sop_uid for v in case.unmatched}),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(out / "meta.json", meta)  # last: marks the scan finished
    return meta


def _done_index(out_dir: Path) -> dict[str, str]:
    """``{xml folder: series_uid}`` of the scans already written (from their meta.json)."""
    out: dict[str, str] = {}
    scans = Path(out_dir) / "scans"
    if scans.is_dir():
        for meta_path in scans.glob("*/meta.json"):
            try:
                meta = json.loads(meta_path.read_text())
                out[str(meta["annotation_folder"])] = str(meta["series_uid"])
            except (OSError, ValueError, KeyError):
                continue
    return out


def prepare_lung_pet_ct_dx(cfg: LungPetCtDxPrepareConfig, *, progress: bool = True) -> PrepareReport:
    """Prepare every annotated patient into the ``lidc-det prepare`` layout (resumable).

    A patient whose scan folder is finished with the same settings is skipped;
    a failing patient is recorded in ``dataset.json["failed"]`` and the report.

    Raises:
        DatasetError: bad root, unknown patients, or no annotated patient.
    """
    from tqdm import tqdm

    from lidc_det.data.prepare import read_finished_meta, remove_temp_leftovers

    t0 = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    patients = [p for p in find_patients(cfg.root, cfg.annotation_root) if p.xml_dir is not None]
    if cfg.patients:
        wanted = set(cfg.patients)
        patients = [p for p in patients if p.key in wanted or p.dicom_dir.name in wanted]
        missing = wanted - {p.key for p in patients} - {p.dicom_dir.name for p in patients}
        if missing:
            raise DatasetError(f"{cfg.root}: no annotated patient {', '.join(sorted(missing))}")
    if not patients:
        raise DatasetError(f"{cfg.root}: no patient folder with an annotation folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_leftovers(out_dir)  # what a killed run left
    h = cfg.settings_hash()
    done_index = _done_index(out_dir)
    metas: dict[str, dict[str, Any]] = {}
    done: list[str] = []
    skipped: list[str] = []
    failed: dict[str, str] = {}
    for p in tqdm(patients, desc="prepare Lung-PET-CT-Dx", unit="patient", disable=not progress):
        uid = done_index.get(str(p.xml_dir))
        meta = read_finished_meta(out_dir, uid, h) if uid else None
        if meta is not None:
            metas[uid] = meta  # type: ignore[index]
            skipped.append(p.key)
            continue
        t1 = time.perf_counter()
        try:
            case = load_patient(p.dicom_dir, p.xml_dir, max_slice_step=cfg.max_slice_step)  # type: ignore[arg-type]
            if not case.lesions:
                raise DatasetError(
                    f"{p.xml_dir}: none of the {len(case.unmatched)} annotated SOP UIDs matches a CT slice"
                )
            meta = _prepare_case(case, cfg, t1)
            metas[meta["series_uid"]] = meta
            done.append(p.key)
        except Exception as err:  # recorded per patient, reported at the end
            tb = traceback.extract_tb(err.__traceback__)
            where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
            failed[p.key] = f"{type(err).__name__}: {err}{where}"
    _write_dataset_files(cfg, metas, failed)
    return PrepareReport(out_dir, tuple(done), tuple(skipped), failed, time.perf_counter() - t0)


def _write_dataset_files(
    cfg: LungPetCtDxPrepareConfig, metas: dict[str, dict[str, Any]], failed: dict[str, str]
) -> None:
    """dataset.json, nodules.csv, annotations.csv and an empty excluded.csv (as ``lidc-det prepare``)."""
    import pandas as pd

    from lidc_det.atomic import write_json, write_with
    from lidc_det.data.luna import LunaFinding, write_annotations
    from lidc_det.data.prepare import FORMAT_VERSION
    from lidc_det.data.splits import patient_folds
    from lidc_det.provenance import provenance

    out_dir = Path(cfg.out_dir)
    scans = sorted(metas.values(), key=lambda m: (m["patient_id"], m["series_uid"]))
    folds = patient_folds([m["patient_id"] for m in scans], cfg.n_folds, cfg.seed) if scans else {}
    columns = ["nodule_id", "seriesuid", "patient_id", "fold", "target", "label", "class_label", "histology",
               "coordX", "coordY", "coordZ", "diameter_mm", "volume_mm3", "n_readers"]
    rows = []
    for m in scans:
        for n in m["nodules"]:
            x, y, z = n["center_xyz_mm"]
            rows.append([n["nodule_id"], m["series_uid"], m["patient_id"], folds[m["patient_id"]], True, n["label"],
                         n["class_label"], n["histology"], x, y, z, n["diameter_mm"], n["volume_mm3"], n["n_readers"]])
    table = pd.DataFrame(rows, columns=columns)
    write_with(out_dir / "nodules.csv", lambda p: table.to_csv(p, index=False))
    write_annotations(
        out_dir / "annotations.csv", [LunaFinding(r[1], (r[8], r[9], r[10]), r[11]) for r in rows]
    )
    write_annotations(out_dir / "excluded.csv", [])
    write_json(
        out_dir / "dataset.json",
        {
            "format_version": FORMAT_VERSION,
            "kind": "lidc-det prepared data set",
            "source": SOURCE,
            "config": cfg.to_dict(),
            "settings_hash": cfg.settings_hash(),
            "provenance": provenance(),
            "class_names": CLASS_NAMES,
            "n_folds": (max(folds.values()) + 1) if folds else 0,
            "scans": [
                {
                    "series_uid": m["series_uid"],
                    "patient_id": m["patient_id"],
                    "fold": folds[m["patient_id"]],
                    "n_nodules": len(m["nodules"]),
                    "n_irrelevant": 0,
                    "geometry": m["geometry"],
                    "original_geometry": m["original_geometry"],
                    "slice_thickness_mm": m["slice_thickness_mm"],
                    "source_folder": m["source_folder"],
                }
                for m in scans
            ],
            "failed": failed,
        },
    )
