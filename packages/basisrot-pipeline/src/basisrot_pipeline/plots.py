"""Figures of the experiments (matplotlib through :func:`shin_common.import_pyplot`, an optional extra)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Colour-blind-safe colours (Okabe-Ito) and line styles, paired so that each series differs from
# every other in both: the curves stay apart in greyscale print too.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
LINE_STYLES = ("-", "--", "-.", ":")


def series_styles(count: int) -> list[dict[str, str]]:
    """``count`` distinct (colour, line style) pairs for ``ax.plot(**style)``."""
    styles = itertools.cycle(LINE_STYLES)
    return [{"color": COLOURS[i % len(COLOURS)], "linestyle": next(styles)} for i in range(count)]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def plot_loss_curves(
    plt: Any, results: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str, window: int = 10
) -> None:
    """Training loss per minibatch (``window``-step mean) of each run in ``results`` (name -> metrics).

    ``plt`` is ``matplotlib.pyplot`` (from ``import_pyplot()``); ``title`` names the model, the data
    and the pipeline setting.
    """
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, metrics), style in zip(results.items(), series_styles(len(results)), strict=True):
        smooth = moving_average(metrics["train_losses"], window)
        ax.plot(smooth, label=f"{name} (val {metrics['val_loss']:.3f})", **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # minibatch indices
    ax.set_xlabel("minibatch")
    ax.set_ylabel(f"train loss (nats/byte, {window}-step mean)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
