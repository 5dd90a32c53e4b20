"""Plots of a pruning run: the reconstruction error per decoder block (matplotlib, the ``plot`` extra).

Every series gets its own colour and line style (the demo draws 11 lines, more than a colour cycle
tells apart in print), block indices are integer ticks, and the title names model, sparsity and data.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from shin_common import RunDirectory, import_pyplot

log = logging.getLogger(__name__)

PLOT_NAME = "error_per_block.png"
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def block_error_title(model: str, sparsity: str, data: str) -> str:
    """``"<model>, <sparsity>; calibration: <data>"``, the title every block-error plot carries."""
    return f"{model}, {sparsity}; calibration: {data}"


def plot_block_errors(errors: dict[str, list[float | None]], path: Path, title: str) -> Path | None:
    """Line plot of the per-block error (log scale), one line per run; None without matplotlib."""
    plt = import_pyplot()
    if plt is None:
        log.info("matplotlib is not installed (pip install 'recon-prune[plot]'); skipping %s", path.name)
        return None
    from matplotlib.ticker import MaxNLocator

    colours = plt.get_cmap("tab20" if len(errors) > 10 else "tab10").colors
    # tab20 gives up to 20 distinct colours; line style and marker vary as well, for print and colour blindness.
    styles = zip(itertools.cycle(colours), itertools.cycle(_LINE_STYLES), itertools.cycle(_MARKERS))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for (label, values), (colour, style, marker) in zip(errors.items(), styles, strict=False):  # styles never run out
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[i] for i in xs], color=colour, linestyle=style, marker=marker, label=label)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("MSE(sparse path, dense path)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the lines, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_into_run(run: RunDirectory, errors: dict[str, list[float | None]], title: str) -> Path | None:
    """The error plot as a file of ``run`` (recorded only when matplotlib can draw it)."""
    if import_pyplot() is None:
        log.info("matplotlib is not installed (pip install 'recon-prune[plot]'); skipping %s", PLOT_NAME)
        return None
    return plot_block_errors(errors, run.file(PLOT_NAME), title=title)
