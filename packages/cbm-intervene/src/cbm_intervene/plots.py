"""Matplotlib figures of intervention curves (optional extra ``cbm-intervene[plot]``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

X_AXES = {
    "concepts_per_sample": "concepts revealed per sample",
    "cost_per_sample": "cost per sample",
}


def plot_grid(
    curves: dict[str, dict[str, Any]], path: str | Path, *, x: str = "concepts_per_sample", title: str = ""
) -> Path | None:
    """One panel per level, one line (mean, +/- std band) per criterion. Returns None without matplotlib."""
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; expected one of {list(X_AXES)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'cbm-intervene[plot]'); skipping %s", path)
        return None
    levels = list(curves)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.6), squeeze=False, sharey=True)
    for ax, level in zip(axes[0], levels, strict=True):
        for name, curve in curves[level].items():
            xs = np.asarray(curve[x])
            mean, std = np.asarray(curve["error_mean"]), np.asarray(curve["error_std"])
            (line,) = ax.plot(xs, mean, label=name, lw=1.4)
            if std.any():
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(level)
        ax.set_xlabel(X_AXES[x])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("task error")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
