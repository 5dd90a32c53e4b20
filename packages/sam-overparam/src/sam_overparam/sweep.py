"""Sweeps that scale out: a grid of training runs sharded over processes, one results store, figures.

:func:`sweep_configs` expands a :class:`SweepConfig` (width x optimizer x rho x seed x label noise
x sparsity x model family) into :class:`TrainConfig` runs in a fixed order. :func:`run_sweep_share`
trains this process's share of them (``shin_common.shard``: every ``world_size``-th run from
``rank``, read from ``RANK``/``WORLD_SIZE`` as torchrun and ``accelerate launch`` set them) and
appends each finished run, with its provenance, to one ``shin_common.JsonlStore``; the appends are
locked, so N processes share one file. A run already in the store is never trained again, so a
killed sweep reruns only what is missing, and the shares of a grid are disjoint whatever was
finished before. The processes never talk to each other: each trains whole runs on its own.

:func:`summarize_store` pairs every optimizer's runs with the baseline's (SGD) by seed and cell,
and :func:`plot_store` draws the standard figures (Shin et al., arXiv 2311.17539, Fig. 1 and the
best-rho panel): the gain against the parameter count with bands over seeds, at each rho and at
the best rho per width, and the best rho against the width.
"""

from __future__ import annotations

import itertools
import logging
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sam_overparam import budget
from sam_overparam.config import PlotConfig, SweepConfig, TrainConfig
from sam_overparam.optim import SAM
from sam_overparam.plots import plot_best_rho, plot_sweep_gain
from sam_overparam.registries import OPTIMIZERS
from sam_overparam.runs import Outcome
from sam_overparam.train import TOOL, train
from shin_common import JsonlStore, RunDirectory, config_to_dict, import_pyplot, provenance, require_extra, shard
from shin_common.rundir import check_output_path

log = logging.getLogger(__name__)

__all__ = ["ShareReport", "plot_store", "run_sweep_share", "summarize_store", "sweep_configs"]

GAIN_PLOT_NAME = "gain_vs_params.png"
BEST_RHO_PLOT_NAME = "best_rho_vs_width.png"


def _uses_rho(optimizer: str) -> bool:
    """Whether the registered optimizer is SAM-type (so rho matters): built once on a 1-parameter model."""
    return isinstance(OPTIMIZERS.get(optimizer)(TrainConfig(optimizer=optimizer), nn.Linear(1, 1)), SAM)


def _grid_widths(sweep: SweepConfig, model: str, sparsity: float) -> list[int]:
    if not sweep.param_budgets:
        return list(sweep.widths)
    shape = {"blocks": sweep.train.get("blocks", TrainConfig().blocks)}
    method = sweep.train.get("sparsity_method", "random")
    return [
        budget.width_for_budget(b, model=model, sparsity=sparsity, method=method, **shape) for b in sweep.param_budgets
    ]


def sweep_configs(sweep: SweepConfig) -> list[TrainConfig]:
    """Every run of the grid, in a fixed order (so every process of a sharded sweep sees the same list)."""
    configs = []
    for model, sparsity in itertools.product(sweep.models, sweep.sparsity):
        for width, noise, optimizer in itertools.product(
            _grid_widths(sweep, model, sparsity), sweep.label_noise, sweep.optimizers
        ):
            size = {"widths": budget.mlp_widths(width)} if model == "mlp" else {"filters": width}
            cell = dict(model=model, sparsity=sparsity, label_noise=noise, optimizer=optimizer)
            for rho, seed in itertools.product(sweep.rhos if _uses_rho(optimizer) else [0.0], sweep.seeds):
                configs.append(TrainConfig(**sweep.train, **size, **cell, rho=rho, seed=seed))
    return configs


@dataclass(frozen=True)
class ShareReport:
    """What one process did: its rank, its share of the grid, how much was finished before, what it trained."""

    rank: int
    world_size: int
    share: int
    finished_before: int
    trained: int
    seconds: float


def check_store_path(path: str | Path) -> Path:
    """A store is a file; its directory must be one a run may create and write."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"store {str(path)!r} is a directory; expected a .jsonl file (new or from a sweep)")
    check_output_path(path.parent if str(path.parent) not in ("", ".") else Path.cwd() / "_")
    return path


def run_sweep_share(
    sweep: SweepConfig, store_path: str | Path, *, rank: int | None = None, world_size: int | None = None
) -> ShareReport:
    """Train this process's share of the grid that is not yet in the store; see the module docstring."""
    configs = sweep_configs(sweep)  # builds (and so checks) every run before any work
    store = JsonlStore(check_store_path(store_path))
    rank = rank if rank is not None else _environment_int("RANK", 0)
    world_size = world_size if world_size is not None else _environment_int("WORLD_SIZE", 1)
    mine = shard(configs, rank=rank, world_size=world_size)
    finished_before = sum(store.is_complete(config_to_dict(c)) for c in mine)
    started, trained = time.perf_counter(), 0
    for config in mine:
        key = config_to_dict(config)
        if store.is_complete(key):
            continue
        _, metrics = train(config)
        record = {"metrics": metrics, "provenance": provenance(seed=config.seed, package=TOOL)}
        store.append(key, {**record, "shard": {"rank": rank, "world_size": world_size}})
        trained += 1
        log.info(
            "rank %d: %s %s rho=%g seed=%d: best %.4f",
            rank,
            config.optimizer,
            config.widths if config.model == "mlp" else config.filters,
            config.rho,
            config.seed,
            metrics["best_test"],
        )
    return ShareReport(rank, world_size, len(mine), finished_before, trained, time.perf_counter() - started)


def _environment_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={text!r}: expected an integer (set by torchrun/accelerate)"
        ) from None


# ----------------------------------------------------------------------------- summary and figures


def _width(config: dict[str, Any]) -> int:
    return config["widths"][0] if config["model"] == "mlp" else config["filters"]


def summarize_store(records: list[dict[str, Any]], settings: PlotConfig) -> dict[str, list[dict[str, Any]]]:
    """``gains``: per cell (model, label noise, sparsity, width), optimizer and rho, the gain over the
    baseline in points of test accuracy, paired by seed (mean, std, min, max); ``best_rho``: per
    cell and optimizer, the rho of the largest mean gain."""
    by_cell: dict[tuple, dict[tuple[str, float], dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    params: dict[tuple, tuple[int, int]] = {}
    for record in records:
        config, metrics = record["config"], record["metrics"]
        cell = (config["model"], config["label_noise"], config["sparsity"], _width(config))
        by_cell[cell][(config["optimizer"], config["rho"])][config["seed"]] = metrics[settings.metric]
        params[cell] = (metrics["num_params"], metrics["num_effective_params"])
    gains, best = [], []
    for cell in sorted(by_cell):
        runs = by_cell[cell]
        baseline = next((seeds for (name, _), seeds in runs.items() if name == settings.baseline), None)
        if baseline is None:
            continue
        rows = []
        for (optimizer, rho), seeds in sorted(runs.items()):
            paired = sorted(set(seeds) & set(baseline))
            if optimizer == settings.baseline or not paired:
                continue
            points = [100 * (seeds[s] - baseline[s]) for s in paired]
            rows.append(
                {
                    "model": cell[0],
                    "label_noise": cell[1],
                    "sparsity": cell[2],
                    "width": cell[3],
                    "num_params": params[cell][0],
                    "num_effective_params": params[cell][1],
                    "optimizer": optimizer,
                    "rho": rho,
                    "seeds": len(paired),
                    "baseline_mean": statistics.fmean(baseline[s] for s in paired),
                    "optimizer_mean": statistics.fmean(seeds[s] for s in paired),
                    "gain_points_mean": statistics.fmean(points),
                    "gain_points_std": statistics.stdev(points) if len(points) > 1 else 0.0,
                    "gain_points_min": min(points),
                    "gain_points_max": max(points),
                }
            )
        gains += rows
        for optimizer in sorted({r["optimizer"] for r in rows}):
            top = max((r for r in rows if r["optimizer"] == optimizer), key=lambda r: r["gain_points_mean"])
            best.append({**top, "best_rho": top["rho"], "rhos_tried": sum(r["optimizer"] == optimizer for r in rows)})
    return {"gains": gains, "best_rho": best}


def plot_store(store_path: str | Path, output_dir: str | Path, settings: PlotConfig) -> Outcome:
    """Draw the figures of the store into ``output_dir`` (always redrawn: a store grows) with ``results.json``."""
    require_extra("matplotlib", install="pip install 'sam-overparam[plot]'", purpose="the sweep figures")
    path = Path(store_path)
    if not path.is_file():
        raise FileNotFoundError(f"store {str(path)!r} does not exist; expected the .jsonl file of `{TOOL} sweep`")
    records = JsonlStore(path).records()
    summary = summarize_store(records, settings)
    run = RunDirectory(
        output_dir,
        tool=TOOL,
        config={"store": str(path.resolve()), **config_to_dict(settings)},
        overwrite=True,
        command="plot",
    )
    run.begin()
    plt = import_pyplot()
    plot_sweep_gain(plt, summary, run.file(GAIN_PLOT_NAME), baseline=settings.baseline, metric=settings.metric)
    plot_best_rho(plt, summary, run.file(BEST_RHO_PLOT_NAME), baseline=settings.baseline)
    metrics = {"records": len(records), **summary, "figures": [GAIN_PLOT_NAME, BEST_RHO_PLOT_NAME]}
    run.finish(metrics=metrics, config=settings)
    return Outcome(metrics, run.path)
