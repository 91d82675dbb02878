"""Safe reading of torch checkpoint files (``.pt``) that this process did not just write.

Every checkpoint a user can hand us (``lidc-det detect --model FILE``, a ``best.pt``
to fine-tune from, a ``last.pt`` to resume, a saved malignancy model) is read with
``torch.load(weights_only=True)``: torch's restricted unpickler, which builds only
tensors, containers (dict, list, tuple, OrderedDict) and plain values (str, int,
float, bool, None) and refuses every other Python global. A pickle whose
``__reduce__`` would call a function (the classic way to run code on load) is
refused with :class:`~lidc_det.errors.UnsafeCheckpointError` before anything runs.

So our checkpoints hold only those types: model / optimiser / scheduler / grad-scaler
state dicts, the config as a plain dict, step logs as lists of dicts of numbers.

A third-party checkpoint may need a few more globals, allowed by name per call
(``allow_globals``) and nowhere else: nnU-Net's ``checkpoint_final.pth`` holds its
training log as numpy scalars (:func:`numpy_scalar_globals`) and a ``torch.device``
(allowed by torch itself).

>>> state = load_checkpoint("runs/x/best.pt", formats=("stage1_detect.retina3d/",))  # doctest: +SKIP
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lidc_det.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load_checkpoint", "numpy_scalar_globals"]


def load_checkpoint(
    path: str | Path,
    *,
    map_location: Any = "cpu",
    formats: Sequence[str] | None = None,
    kind: str = "checkpoint",
    allow_globals: Sequence[Any] = (),
) -> dict[str, Any]:
    """Read the dict saved in ``path`` with torch's weights-only unpickler.

    Args:
        path: the ``.pt`` file.
        map_location: passed to ``torch.load`` ("cpu", a ``torch.device``, ...).
        formats: accepted prefixes of the dict's ``"format"`` entry (e.g.
            ``("stage1_detect.retina3d/",)``); None accepts any dict.
        kind: what the file should be, for messages ("stage-1 detector checkpoint").
        allow_globals: classes / functions the unpickler may build besides torch's own
            allow-list, for this call only (e.g. :func:`numpy_scalar_globals`).

    Raises:
        CheckpointError: no such file, unreadable or truncated file, not a dict, wrong format.
        UnsafeCheckpointError: the file holds Python objects that are not tensors or plain
            types (it is not unpickled).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, f"no such {kind} file")
    try:
        with torch.serialization.safe_globals(list(allow_globals)):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" in text.lower():
            found = re.search(r"GLOBAL (\S+)", text)
            what = f"the Python global {found.group(1)!r}" if found else "a Python object"
            raise UnsafeCheckpointError(
                path,
                f"refused to load: it holds {what}, not only tensors and plain types, and unpickling it could "
                "run code. Load such a file only if you trust its source, and re-save it as a dict of tensors "
                "and plain values",
            ) from None
        raise CheckpointError(path, f"unreadable {kind} ({type(err).__name__}: {err})") from err
    except Exception as err:  # noqa: BLE001 - torch raises many types for truncated or foreign files
        raise CheckpointError(path, f"unreadable {kind} ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(path, f"not a {kind} (holds a {type(state).__name__}, expected a dict)")
    if formats is not None:
        fmt = state.get("format")
        if not isinstance(fmt, str) or not any(fmt.startswith(f) for f in formats):
            raise CheckpointError(path, f"not a {kind} (format {fmt!r}; expected {' or '.join(repr(f + '*') for f in formats)})")
    return state


def numpy_scalar_globals() -> list[Any]:
    """What a pickled numpy scalar (``np.float64(0.5)``, ``np.float32``, ints, bools) needs to load.

    numpy's scalar reconstructor (``numpy._core.multiarray.scalar``), ``numpy.dtype``
    and the numeric dtype classes: they rebuild a number from its dtype and raw bytes
    and call nothing else, so allowing them runs no code (an object-dtype "scalar"
    only hands back an object the restricted unpickler already built).
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return [scalar, np.dtype, *{type(np.dtype(k)) for k in kinds}]
