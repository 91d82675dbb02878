"""Atomic file writes: write to a temporary file in the same folder, then rename.

A killed process leaves either the old file, the new file, or a hidden
``.<name>.tmp-*`` leftover that no reader mistakes for a finished file;
:func:`remove_leftovers` deletes those when the writer resumes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


TMP_MARK = ".tmp-"


def tmp_prefix(name: str) -> str:
    """Start of the temporary file names used while writing the file ``name``."""
    return f".{name}{TMP_MARK}"


def remove_leftovers(folder: Path, names: Iterable[str] | None = None, *, recursive: bool = False) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder``; returns them.

    Args:
        folder: the folder (a missing folder has no leftovers).
        names: only the leftovers of these final file names (e.g. ``["image.npy"]``);
            None: every ``.*.tmp-*`` file in ``folder``.
        recursive: also in every folder below ``folder`` (a run folder that a resumed
            run owns as a whole).

    Call it only when no other process is writing into ``folder``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    prefixes = None if names is None else tuple(tmp_prefix(n) for n in names)
    removed = []
    for p in folder.rglob(f".*{TMP_MARK}*") if recursive else folder.iterdir():
        name = p.name
        if not (name.startswith(".") and TMP_MARK in name) or not p.is_file():
            continue
        if prefixes is not None and not name.startswith(prefixes):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return sorted(removed)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary name keeps ``path``'s suffixes (so libraries that infer the
    format from the name, like SimpleITK with ``.nii.gz``, still work).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (indent 2, sorted keys off, NumPy scalars converted)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    write_text(path, json.dumps(obj, indent=2, default=default) + "\n")


def write_with(path: Path, writer: Callable[[Path], Any]) -> None:
    """Atomic write through a function that writes to the path it is given."""
    with atomic_path(path) as tmp:
        writer(tmp)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Atomic ``np.save`` (the file keeps its ``.npy`` name)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
