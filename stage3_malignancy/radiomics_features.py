"""pyradiomics features of nodule samples (image HU + mask), parallel and cached.

The extraction settings live in one committed YAML parameter file,
:data:`DEFAULT_PARAMS` (``stage3_malignancy/params/radiomics_ct.yaml``):
resampling to 1 mm isotropic (B-spline image, nearest mask), fixed bin width
25 HU, no intensity normalisation, the original image, and the shape,
first-order, GLCM, GLRLM, GLSZM, GLDM and NGTDM classes (107 features).

Caching: one JSON per sample under ``<cache_dir>/radiomics/<key>.json``, where
``key`` hashes the image and mask bytes, the spacing, the parameter file's
text and the pyradiomics version, so a change to any of them recomputes.
Writes are atomic; a killed run resumes.

pyradiomics is imported lazily (package ``pyradiomics-bhklab``, import name ``radiomics``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_det.errors import LidcDetError
from stage3_malignancy.samples import MalignancySample

__all__ = ["DEFAULT_PARAMS", "RadiomicsError", "RadiomicsTable", "extract_radiomics", "radiomics_features"]

#: The committed parameter file (CT nodules).
DEFAULT_PARAMS = Path(__file__).resolve().parent / "params" / "radiomics_ct.yaml"

_EXTRACTORS: dict[str, Any] = {}


class RadiomicsError(LidcDetError):
    """pyradiomics failed on a sample or the parameter file is unusable (names which)."""


def _extractor(params_path: str) -> Any:
    """A cached ``RadiomicsFeatureExtractor`` per parameter file (per process)."""
    if params_path not in _EXTRACTORS:
        import logging

        try:
            import radiomics
            from radiomics import featureextractor
        except ImportError as err:  # pragma: no cover - environment
            raise RadiomicsError(f"pyradiomics is not installed (pip install pyradiomics-bhklab): {err}") from err
        radiomics.setVerbosity(logging.ERROR)
        logging.getLogger("radiomics").setLevel(logging.ERROR)  # its INFO lines reach a root handler otherwise
        try:
            _EXTRACTORS[params_path] = featureextractor.RadiomicsFeatureExtractor(params_path)
        except Exception as err:  # pyradiomics raises plain Exceptions on bad files
            raise RadiomicsError(f"{params_path}: not a usable pyradiomics parameter file: {err}") from err
    return _EXTRACTORS[params_path]


def radiomics_features(
    image_hu: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float], params: str | Path = DEFAULT_PARAMS
) -> dict[str, float]:
    """pyradiomics features of one nodule.

    Args:
        image_hu: ``[z, y, x]`` HU crop.
        mask: bool ``[z, y, x]`` nodule mask, same shape.
        spacing_zyx: voxel size (mm).
        params: pyradiomics YAML parameter file.

    Returns:
        ``{name: value}`` without the ``diagnostics_`` entries; names drop the
        ``original_`` image-type prefix (``shape_Sphericity``, ``glcm_Contrast``, ...).

    Raises:
        RadiomicsError: pyradiomics failed (message names the reason).
    """
    import SimpleITK as sitk

    ext = _extractor(str(params))
    sx = tuple(float(s) for s in spacing_zyx)[::-1]
    img = sitk.GetImageFromArray(np.asarray(image_hu, dtype=np.float32))
    img.SetSpacing(sx)
    msk = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
    msk.SetSpacing(sx)
    try:
        res = ext.execute(img, msk, label=1)
    except Exception as err:  # pyradiomics raises ValueError / plain Exception
        raise RadiomicsError(f"pyradiomics failed: {err}") from err
    out = {}
    for k, v in res.items():
        if k.startswith("diagnostics_"):
            continue
        name = k[len("original_"):] if k.startswith("original_") else k
        out[name] = float(np.asarray(v))
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("pyradiomics-bhklab", "pyradiomics"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def sample_key(sample: MalignancySample, params_text: str, version: str) -> str:
    """Content hash of what a sample's radiomics depend on (24 hex characters)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(sample.image_hu, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(sample.mask, dtype=np.uint8).tobytes())
    h.update(json.dumps([list(sample.image_hu.shape), list(sample.spacing_zyx_mm), params_text, version]).encode())
    return h.hexdigest()[:24]


def _job(args: tuple[np.ndarray, np.ndarray, tuple[float, float, float], str]) -> tuple[dict[str, float], float, str]:
    """Worker entry: ``(features, seconds, error)``; errors are returned, not raised."""
    image, mask, spacing, params = args
    t0 = time.perf_counter()
    try:
        return radiomics_features(image, mask, spacing, params), time.perf_counter() - t0, ""
    except RadiomicsError as err:
        return {}, time.perf_counter() - t0, str(err)


@dataclass(frozen=True, eq=False)
class RadiomicsTable:
    """Features of many samples.

    Attributes:
        table: ``pandas.DataFrame``, one row per sample (input order), one column per feature
            (NaN where a sample failed).
        seconds: ``(N,)`` extraction time per sample (as measured when computed; cached rows keep theirs).
        errors: ``(N,)`` error message per sample ("" when fine).
        computed: samples computed in this call (the rest came from the cache).
        wall_seconds: wall time of the call.
    """

    table: Any
    seconds: np.ndarray
    errors: tuple[str, ...]
    computed: int
    wall_seconds: float


def extract_radiomics(
    samples: Sequence[MalignancySample],
    *,
    params: str | Path = DEFAULT_PARAMS,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> RadiomicsTable:
    """pyradiomics features of every sample, in parallel, with a progress bar and a cache.

    Args:
        samples: nodules (image + mask).
        params: pyradiomics parameter file.
        cache_dir: cache root (None = no cache).
        workers: processes (spawned); 1 = in this process.
        progress: show a tqdm bar.

    Returns:
        :class:`RadiomicsTable`. A sample pyradiomics rejects gets NaN features and its error.

    Raises:
        RadiomicsError: the parameter file does not exist.
    """
    import pandas as pd
    from tqdm import tqdm

    from lidc_det.atomic import write_json

    t0 = time.perf_counter()
    params = Path(params)
    if not params.is_file():
        raise RadiomicsError(f"{params}: pyradiomics parameter file not found")
    text = params.read_text()
    version = _version()
    root = None if cache_dir is None else Path(cache_dir).expanduser() / "radiomics"
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    results: list[tuple[dict[str, float], float, str] | None] = [None] * len(samples)
    keys = [sample_key(s, text, version) for s in samples] if root is not None else [""] * len(samples)
    for i, k in enumerate(keys):
        if root is not None and (root / f"{k}.json").is_file():
            rec = json.loads((root / f"{k}.json").read_text())
            results[i] = (rec["features"], float(rec["seconds"]), rec["error"])
    todo = [i for i, r in enumerate(results) if r is None]
    jobs = [(samples[i].image_hu, samples[i].mask, samples[i].spacing_zyx_mm, str(params)) for i in todo]

    def store(i: int, res: tuple[dict[str, float], float, str]) -> None:
        results[i] = res
        if root is not None:
            write_json(root / f"{keys[i]}.json", {"features": res[0], "seconds": res[1], "error": res[2],
                                                  "nodule_id": samples[i].nodule_id, "pyradiomics": version})

    bar = tqdm(total=len(todo), desc="radiomics", unit="nodule", disable=not progress or not todo)
    if workers <= 1 or len(todo) <= 1:
        for i, job in zip(todo, jobs):
            store(i, _job(job))
            bar.update()
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("spawn")) as ex:
            for i, res in zip(todo, ex.map(_job, jobs, chunksize=1)):
                store(i, res)
                bar.update()
    bar.close()
    done = [r for r in results if r is not None]
    columns: list[str] = []
    for feats, _, _ in done:
        for k in feats:
            if k not in columns:
                columns.append(k)
    table = pd.DataFrame([r[0] for r in done], columns=columns, dtype=np.float64)
    return RadiomicsTable(
        table=table,
        seconds=np.array([r[1] for r in done]),
        errors=tuple(r[2] for r in done),
        computed=len(todo),
        wall_seconds=time.perf_counter() - t0,
    )
