"""The paper's width sweep at CPU scale (Shin et al., Fig. 1): SGD against SAM on mnist1d MLPs.

:func:`run_demo` trains every width x seed x {SGD, SAM} run of a :class:`DemoConfig` into one
output directory (``sweep.jsonl``, resumable), summarises SAM's gain paired by seed
(:func:`summarize_sweep`) into ``results.json`` and plots it against the parameter count
(``gain_vs_params.png``, when matplotlib is installed).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from sam_overparam.config import DemoConfig, TrainConfig
from sam_overparam.plots import plot_gain
from sam_overparam.runs import Outcome, finished_results
from sam_overparam.train import TOOL, run_sweep
from shin_common import RunDirectory, config_to_dict, import_pyplot

log = logging.getLogger(__name__)

__all__ = ["demo_configs", "run_demo", "summarize_sweep"]

SWEEP_NAME = "sweep.jsonl"
GAIN_PLOT_NAME = "gain_vs_params.png"


def demo_configs(demo: DemoConfig) -> list[TrainConfig]:
    """Every run of the sweep: MLP ``[w, w // 3]`` for each width, seed and optimizer (SGD, SAM)."""
    return [
        TrainConfig(
            widths=[width, max(1, width // 3)],
            optimizer=optimizer,
            rho=demo.rho,
            epochs=demo.epochs,
            num_train=demo.num_train,
            num_test=demo.num_test,
            label_noise=demo.label_noise,
            seed=seed,
        )
        for width in demo.widths
        for seed in range(demo.seeds)
        for optimizer in ("sgd", "sam")
    ]


def summarize_sweep(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per width: SAM - SGD best test accuracy, paired by seed, mean and spread over seeds."""
    by_key: dict[tuple[tuple[int, ...], int], dict[str, float]] = {}
    params: dict[tuple[int, ...], int] = {}
    for record in records:
        config, metrics = record["config"], record["metrics"]
        widths = tuple(config["widths"])
        by_key.setdefault((widths, config["seed"]), {})[config["optimizer"]] = metrics["best_test"]
        params[widths] = metrics["num_params"]
    rows = []
    for widths in sorted(params, key=params.get):
        pairs = [v for (w, _), v in by_key.items() if w == widths and {"sgd", "sam"} <= v.keys()]
        if not pairs:
            continue
        gains = [100 * (p["sam"] - p["sgd"]) for p in pairs]
        rows.append(
            {
                "widths": list(widths),
                "num_params": params[widths],
                "seeds": len(pairs),
                "sgd_best": statistics.fmean(p["sgd"] for p in pairs),
                "sam_best": statistics.fmean(p["sam"] for p in pairs),
                "gain_points_mean": statistics.fmean(gains),
                "gain_points_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                "gain_points_min": min(gains),
                "gain_points_max": max(gains),
            }
        )
    return rows


def gain_title(demo: DemoConfig) -> str:
    """The plot title: model, data and setting."""
    noise = f", {demo.label_noise:g} label noise" if demo.label_noise else ""
    return (
        f"MLP [w, w/3] on mnist1d ({demo.num_train} train{noise}), SAM rho={demo.rho:g} vs SGD, "
        f"{demo.epochs} epochs, {demo.seeds} seeds"
    )


def run_demo(demo: DemoConfig, output_dir: str | Path, *, overwrite: bool = False) -> Outcome:
    """Run (or resume, or report) the sweep of ``demo`` in ``output_dir``; metrics hold ``rows``."""
    configs = demo_configs(demo)  # builds (and so checks) every run's TrainConfig before anything is written
    run = RunDirectory(output_dir, tool=TOOL, config=config_to_dict(demo), overwrite=overwrite, command="demo")
    if run.finished:
        return Outcome(finished_results(run)["metrics"], run.path, reported=True)
    plt = import_pyplot()
    run.begin()
    started = time.perf_counter()
    # an interrupted sweep resumes: finished runs are in sweep.jsonl and are not trained again
    records = run_sweep(configs, run.file(SWEEP_NAME))
    wanted = {json.dumps(config_to_dict(c), sort_keys=True) for c in configs}
    records = [r for r in records if json.dumps(r["config"], sort_keys=True) in wanted]
    rows = summarize_sweep(records)
    seconds = time.perf_counter() - started
    if plt is None:
        log.info("matplotlib not installed (extra 'plot'); skipping the gain plot")
    else:
        plot_gain(plt, rows, run.file(GAIN_PLOT_NAME), gain_title(demo))
    metrics = {"rows": rows, "seconds": seconds, "runs": len(records)}
    run.finish(metrics=metrics, config=demo, extra={"plot": plt is not None})
    return Outcome(metrics, run.path)
