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

>>> state = load_checkpoint("runs/x/best.pt", formats=("stage1_detect.retina3d/",))  # doctest: +SKIP
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lidc_det.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load_checkpoint"]


def load_checkpoint(
    path: str | Path,
    *,
    map_location: Any = "cpu",
    formats: Sequence[str] | None = None,
    kind: str = "checkpoint",
) -> dict[str, Any]:
    """Read the dict saved in ``path`` with torch's weights-only unpickler.

    Args:
        path: the ``.pt`` file.
        map_location: passed to ``torch.load`` ("cpu", a ``torch.device``, ...).
        formats: accepted prefixes of the dict's ``"format"`` entry (e.g.
            ``("stage1_detect.retina3d/",)``); None accepts any dict.
        kind: what the file should be, for messages ("stage-1 detector checkpoint").

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
