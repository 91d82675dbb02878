"""Malignancy figures (PNG): ROC curves, feature-importance bars, reliability diagram.

Drawn with :func:`lidc_det.plots.new_figure` / :func:`lidc_det.plots.save_figure`
(matplotlib object API on the Agg canvas, atomic writes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_bars", "plot_reliability", "plot_roc"]


def plot_roc(
    y: np.ndarray,
    scores: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    title: str,
    subtitle: str = "",
    dpi: int = 150,
) -> Path:
    """ROC curves of several scores on the same labels; legend labels are the mapping keys
    (put the AUC and its interval in them)."""
    from sklearn.metrics import roc_curve

    from lidc_det.plots import new_figure, save_figure

    fig, ax = new_figure(6.4, 6.0)
    for i, (label, s) in enumerate(scores.items()):
        fpr, tpr, _ = roc_curve(np.asarray(y).astype(int), np.asarray(s, dtype=np.float64))
        ax.plot(fpr, tpr, lw=2 if i == 0 else 1.5, color=f"C{i}", label=label)
    ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    ax.legend(loc="lower right", fontsize=7.5)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=dpi)


def plot_bars(
    names: Sequence[str],
    values: np.ndarray,
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    top: int = 25,
    dpi: int = 150,
) -> Path:
    """Horizontal bar chart of the ``top`` largest values, largest on top."""
    from lidc_det.plots import new_figure, save_figure

    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values, kind="stable")[:top]
    fig, ax = new_figure(6.4, 0.6 + 0.28 * len(order))
    ax.barh(np.arange(len(order))[::-1], values[order], color="C0")
    ax.set_yticks(np.arange(len(order))[::-1], [names[i] for i in order], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path, dpi=dpi)


def plot_reliability(
    y: np.ndarray,
    probs: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    title: str,
    n_bins: int = 10,
    dpi: int = 150,
) -> Path:
    """Reliability diagram (observed malignant fraction against mean predicted probability,
    equal-count bins)."""
    from sklearn.calibration import calibration_curve

    from lidc_det.plots import new_figure, save_figure

    fig, ax = new_figure(6.0, 6.0)
    for i, (label, p) in enumerate(probs.items()):
        frac, mean = calibration_curve(np.asarray(y).astype(int), np.asarray(p), n_bins=n_bins, strategy="quantile")
        ax.plot(mean, frac, marker="o", ms=3, color=f"C{i}", label=label)
    ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed malignant fraction")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=7.5)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=dpi)
