"""Matplotlib figures of intervention curves (optional extra ``cbm-intervene[plot]``)."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from shin_common import import_pyplot

log = logging.getLogger(__name__)

X_AXES = {
    "concepts_per_sample": "concepts revealed per sample",
    "cost_per_sample": "cost per sample",
}
# Colour and line style both change from one criterion to the next, so lines stay apart in grey print
# and for colour-blind readers; 10 colours x 4 styles, paired so that no two of the first 40 repeat.
_COLOURS = [f"C{i}" for i in range(10)]
_LINE_STYLES = ["-", "--", "-.", ":"]


def series_styles(names: list[str]) -> dict[str, dict[str, str]]:
    """A distinct (colour, line style) per series name, the same in every panel of a figure."""
    pairs = [(_COLOURS[i % 10], _LINE_STYLES[(i + i // 10) % 4]) for i in range(len(names))]
    return {name: {"color": colour, "linestyle": style} for name, (colour, style) in zip(names, pairs, strict=True)}


def plot_grid(
    curves: dict[str, dict[str, Any]], path: str | Path, *, x: str = "concepts_per_sample", title: str = ""
) -> Path | None:
    """One panel per level, one line (mean, +/- std band) per criterion. Returns None without matplotlib.

    ``title`` should say what was intervened on (model, strategy, data); each panel names its level.
    """
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; expected one of {list(X_AXES)}")
    plt = import_pyplot()
    if plt is None:
        log.warning("matplotlib is not installed (pip install 'cbm-intervene[plot]'); skipping %s", path)
        return None
    levels = list(curves)
    names = list(dict.fromkeys(itertools.chain.from_iterable(curves[level] for level in levels)))
    styles = series_styles(names)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.8), squeeze=False, sharey=True)
    for ax, level in zip(axes[0], levels, strict=True):
        for name, curve in curves[level].items():
            xs = np.asarray(curve[x])
            mean, std = np.asarray(curve["error_mean"]), np.asarray(curve["error_std"])
            ax.plot(xs, mean, label=name, lw=1.4, **styles[name])
            if std.any():
                ax.fill_between(xs, mean - std, mean + std, color=styles[name]["color"], alpha=0.15, lw=0)
        ax.set_title(f"level {level}")
        ax.set_xlabel(X_AXES[x])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("task error")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
