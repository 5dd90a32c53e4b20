"""Figures of the demo and the Hessian analysis (matplotlib, the optional extra ``plot``).

Each function takes the ``pyplot`` module from ``shin_common.import_pyplot()`` (callers skip the
figure when it is None) and writes one PNG. Every series has its own colour and line style, so
the figures read in greyscale too.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_best_rho", "plot_density", "plot_gain", "plot_sweep_gain"]


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


# ----------------------------------------------------------------------------- sweep figures
_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
_STYLES = ["-", "--", "-.", ":"]


def _series(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[dict[str, Any]]]:
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[k] for k in keys)].append(row)
    return {k: sorted(v, key=lambda r: r["num_params"]) for k, v in sorted(grouped.items())}


def _label(key: tuple, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else str(v) for k, v in zip(keys, key, strict=True))


_CELL = ("label_noise", "sparsity", "optimizer")


def plot_sweep_gain(plt: Any, summary: dict[str, Any], path: Path, *, baseline: str, metric: str) -> None:
    """Each optimizer's gain over ``baseline`` against the dense parameter count, one panel per model
    family: a line per (label noise, sparsity, optimizer, rho) with a mean +- std band over seeds,
    and, where several rhos were tried, a dotted black line at the best rho per width."""
    models = sorted({r["model"] for r in summary["gains"]}) or ["(no pairs)"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in summary["gains"] if r["model"] == model]
        for index, (key, series) in enumerate(_series(rows, (*_CELL, "rho")).items()):
            xs = [r["num_params"] for r in series]
            mean = [r["gain_points_mean"] for r in series]
            low = [r["gain_points_mean"] - r["gain_points_std"] for r in series]
            high = [r["gain_points_mean"] + r["gain_points_std"] for r in series]
            colour, style = _COLOURS[index % len(_COLOURS)], _STYLES[(index // len(_COLOURS)) % len(_STYLES)]
            ax.plot(xs, mean, color=colour, linestyle=style, marker="o", label=_label(key, (*_CELL, "rho")))
            ax.fill_between(xs, low, high, color=colour, alpha=0.15)
        best = [r for r in summary["best_rho"] if r["model"] == model]
        for key, series in _series(best, _CELL).items():
            if max(r["rhos_tried"] for r in series) > 1:  # with one rho the best-rho line is that rho's
                xs, ys = [r["num_params"] for r in series], [r["gain_points_mean"] for r in series]
                ax.plot(xs, ys, color="black", linestyle=":", marker="*", label=_label(key, _CELL) + ", best rho")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("number of parameters (dense)")
        ax.set_ylabel(f"gain over {baseline}, {metric} acc. (points)")
        ax.set_title(f"{model} on mnist1d: mean +- std over seeds", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_best_rho(plt: Any, summary: dict[str, Any], path: Path, *, baseline: str) -> None:
    """The rho of the largest mean gain over ``baseline`` against the width, one panel per model family."""
    models = sorted({r["model"] for r in summary["best_rho"]}) or ["(no pairs)"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        best = [r for r in summary["best_rho"] if r["model"] == model]
        for index, (key, series) in enumerate(_series(best, _CELL).items()):
            colour, style = _COLOURS[index % len(_COLOURS)], _STYLES[(index // len(_COLOURS)) % len(_STYLES)]
            xs, ys = [r["width"] for r in series], [r["best_rho"] for r in series]
            ax.plot(xs, ys, color=colour, linestyle=style, marker="o", label=_label(key, _CELL))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width (mlp: first hidden layer; resnet: first-stage filters)")
        ax.set_ylabel(f"best rho (largest mean gain over {baseline})")
        ax.set_title(f"{model} on mnist1d: best rho per width", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
