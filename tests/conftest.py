"""Shared test fixtures and markers. Real-data tests skip (with the reason) when ../shared is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_ROOT = REPO.parent / "shared" / "data" / "lidc-idri"
REAL_PATIENT = "LIDC-IDRI-0001"
REAL_SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
REAL_SERIES_DIR = (
    REAL_ROOT
    / REAL_PATIENT
    / "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
    / REAL_SERIES_UID
)

requires_real = pytest.mark.skipif(
    not REAL_SERIES_DIR.is_dir(),
    reason=f"real LIDC-IDRI scan not found at {REAL_SERIES_DIR} (../shared/data beside the repo)",
)
