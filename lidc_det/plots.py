"""Figures written to disk (PNG), drawn with matplotlib's object API on the Agg canvas.

matplotlib is imported inside the functions, and ``pyplot`` is never used, so
plotting neither slows ``import lidc_det`` nor changes the backend of a user's
interactive session. Files are written atomically.

Generic helpers (:func:`new_figure`, :func:`save_figure`) serve every plot;
:func:`plot_froc` draws a LUNA16 FROC curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lidc_det.metrics.froc import FrocResult

__all__ = ["new_figure", "plot_froc", "save_figure"]


def new_figure(width_in: float = 6.4, height_in: float = 4.8) -> tuple[Figure, Axes]:
    """A figure with one axes on an Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150, **kwargs: Any) -> Path:
    """Atomically write ``fig`` to ``path`` (format from the suffix, e.g. ``.png``)."""
    from lidc_det.atomic import atomic_path

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt, **kwargs)
    return path


def _fraction(v: float) -> str:
    return f"1/{round(1 / v)}" if v < 1 else f"{v:g}"


def plot_froc(
    result: FrocResult,
    path: str | Path,
    *,
    label: str = "CAD",
    title: str = "LUNA16 FROC",
    dpi: int = 150,
) -> Path:
    """FROC curve on a log2 FP/scan axis, the 7 operating points with their CIs,
    the bootstrap CI band, and the CPM (with CI) in the legend; written as PNG.

    The curve is drawn as the linear interpolation the CPM uses, sampled on a
    dense log grid, so what is seen is what is scored.
    """
    fig, ax = new_figure()
    x = 2.0 ** np.linspace(-4.0, 4.0, 400)
    y = np.interp(x, result.fps_per_scan, result.sensitivity)
    cpm = f"CPM {result.cpm:.3f}"
    if np.isfinite(result.cpm_ci_low) and np.isfinite(result.cpm_ci_high):
        cpm += f" [{result.cpm_ci_low:.3f}, {result.cpm_ci_high:.3f}]"
    ax.plot(x, y, lw=2, color="C0", label=f"{label} ({cpm})")
    band_ok = np.isfinite(result.band_low) & np.isfinite(result.band_high)
    if band_ok.any():
        ax.fill_between(
            result.band_fps[band_ok], result.band_low[band_ok], result.band_high[band_ok],
            color="C0", alpha=0.15, lw=0, label=f"{result.confidence * 100:g}% CI (bootstrap over scans)",
        )
    ops = np.asarray(result.operating_fps)
    sens = np.asarray(result.operating_sensitivity)
    lo, hi = np.asarray(result.ci_low), np.asarray(result.ci_high)
    if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)):
        yerr = np.vstack([np.clip(sens - lo, 0, None), np.clip(hi - sens, 0, None)])
        ax.errorbar(ops, sens, yerr=yerr, fmt="o", color="C1", capsize=3, label="operating points")
    else:
        ax.plot(ops, sens, "o", color="C1", label="operating points")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ops, [_fraction(v) for v in ops])
    ax.minorticks_off()
    ax.set_xlim(0.1, 10.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_yticks(np.linspace(0.0, 1.0, 11))
    ax.grid(True, alpha=0.4)
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(
        f"{title}\n{result.n_scans} scans, {result.n_nodules} nodules, {result.n_candidates} candidates",
        fontsize=10,
    )
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path, dpi=dpi)
