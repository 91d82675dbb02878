"""Synthetic CT: the LIDC twin (real LIDC geometry and reader contours, procedural anatomy).

Entry points (imported lazily so ``import lidc_det.synthetic`` stays cheap):
:func:`~lidc_det.synthetic.twin.generate_twin`,
:func:`~lidc_det.synthetic.twin.generate_twins`,
:func:`~lidc_det.synthetic.twin.render_twin`,
:func:`~lidc_det.synthetic.twin.scan_spec` and
:func:`~lidc_det.synthetic.calibrate.compare_real`. See docs/twin.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "ScanSpec": "lidc_det.synthetic.twin",
    "TwinBatch": "lidc_det.synthetic.twin",
    "TwinScan": "lidc_det.synthetic.twin",
    "TwinVolume": "lidc_det.synthetic.twin",
    "generate_twin": "lidc_det.synthetic.twin",
    "generate_twins": "lidc_det.synthetic.twin",
    "render_twin": "lidc_det.synthetic.twin",
    "scan_spec": "lidc_det.synthetic.twin",
    "compare_real": "lidc_det.synthetic.calibrate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lidc_det.synthetic' has no attribute {name!r}")
