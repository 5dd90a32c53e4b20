"""Figures of the demo and the Hessian analysis (matplotlib, the optional extra ``plot``).

Each function takes the ``pyplot`` module from ``shin_common.import_pyplot()`` (callers skip the
figure when it is None) and writes one PNG. Every series has its own colour and line style, so
the figures read in greyscale too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_density", "plot_gain"]


def plot_gain(plt: Any, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """SAM's gain over SGD (points of best test accuracy) against the parameter count, one row per width."""
    xs = [r["num_params"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.fill_between(
        xs,
        [r["gain_points_min"] for r in rows],
        [r["gain_points_max"] for r in rows],
        color="tab:orange",
        alpha=0.25,
        linestyle="--",
        edgecolor="tab:orange",
        label="seed range (min to max)",
    )
    ax.errorbar(
        xs,
        [r["gain_points_mean"] for r in rows],
        yerr=[r["gain_points_std"] for r in rows],
        color="tab:blue",
        linestyle="-",
        marker="o",
        capsize=3,
        label="mean +- std over seeds",
    )
    ax.axhline(0.0, color="grey", lw=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("number of parameters")
    ax.set_ylabel("SAM - SGD best test acc. (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_density(plt: Any, density: Any, path: Path, title: str) -> None:
    """The SLQ spectral density of the Hessian (Gaussian-smoothed, log scale)."""
    nodes = torch.cat(density.nodes)
    spread = float(nodes.max() - nodes.min()) or 1.0
    grid = torch.linspace(float(nodes.min()) - 0.05 * spread, float(nodes.max()) + 0.05 * spread, 1000)
    values = density.evaluate(grid, sigma=spread / 200)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(grid.numpy(), values.clamp_min(1e-8).numpy(), color="tab:blue", linestyle="-")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
