"""Hessian analysis of a trained model: what ``sam-overparam analyze`` computes and where it writes it.

:func:`hessian_analysis` computes, on a model and its training data: the top Hessian eigenvalues
(Lanczos), ``tr(H^k)`` for k = 1..4 (Hutchinson), the moment non-uniformity ``E_B[H_B^k]`` vs
``H^k``, the SGD and SAM linear-stability values at the lr of the run's last epoch and its rho
(taken as USAM's unnormalised rho, see ``stability_rho_note``), with a verdict that keeps the
sharpness condition apart from negative curvature, and the SLQ spectral density. :func:`analyze_run` does it for a finished ``train`` run directory: attached to that run
(``analysis.json`` and ``spectral_density.png`` join its manifest; its own ``results.json`` is the
training record) or into a separate output directory (``results.json``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sam_overparam import hessian
from sam_overparam.config import AnalysisConfig, TrainConfig
from sam_overparam.data import Split, batches
from sam_overparam.plots import plot_density
from sam_overparam.registries import model_inputs
from sam_overparam.runs import MODEL_NAME, Outcome, finished_results, finished_train_run, load_model_weights
from sam_overparam.train import TOOL, build_model, final_lr, load_split, loss_fn_for
from shin_common import (
    CorruptFileError,
    RunDirectory,
    check_output_path,
    config_differences,
    config_to_dict,
    import_pyplot,
    load_json,
    write_run_record,
)
from shin_common.rundir import RESULTS_NAME

__all__ = ["ANALYSIS_NAME", "DENSITY_PLOT_NAME", "analyze_run", "hessian_analysis", "load_trained_model"]

# the record of an analysis attached to a train run, whose results.json is the training record
ANALYSIS_NAME = "analysis.json"
DENSITY_PLOT_NAME = "spectral_density.png"


RHO_CONVENTION = "unnormalized (USAM): e = rho * grad f_B, J_B = H_B + rho H_B^2 (Shin et al., Sec. 5)"


def _rho_note(config: TrainConfig) -> str:
    """How the run's rho relates to the operator's (unnormalised) rho."""
    if config.optimizer == "sgd":
        return "the run used SGD; rho=0 is its condition"
    if config.unnormalized or config.optimizer == "usam":
        return "the run used USAM: its rho is the operator's rho"
    return (
        "the run used normalised SAM (e = rho g / ||g||); its rho is plugged in as the unnormalised rho of "
        "the theory, which analyses USAM only. Near a minimum ||g|| is small, so normalised SAM's "
        "effective radius rho / ||g|| is larger and this operator understates its perturbation"
    )


def load_trained_model(run_path: Path, config: TrainConfig, split: Split | None = None) -> nn.Module:
    """The model of a finished run, in float64 and eval mode (the Hessian tools work in float64)."""
    model_path = run_path / MODEL_NAME
    weights = load_model_weights(model_path)
    model = build_model(config, split if split is not None else load_split(config)).double()
    try:
        model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in weights.items()})
    except RuntimeError as exc:
        reason = (str(exc).strip().splitlines() or ["RuntimeError"])[0]
        raise CorruptFileError(model_path, f"does not fit the model of the run's config ({reason})") from exc
    return model.eval()


def hessian_analysis(
    model: nn.Module, config: TrainConfig, settings: AnalysisConfig, split: Split | None = None
) -> tuple[dict[str, Any], Any]:
    """The analysis metrics of ``model`` on the first ``settings.num_examples`` training examples of
    ``config``'s data (``split``, loaded when not given), and the spectral density (for plotting)."""
    split = split if split is not None else load_split(config)
    x = model_inputs(config, split.x_train[: settings.num_examples].double())
    y = split.y_train[: settings.num_examples]
    y = y.double() if y.is_floating_point() else y
    operator = hessian.HessianOperator(model, loss_fn_for(config), batches(x, y, settings.batch_size, shuffle=False))
    steps, seed = settings.lanczos_steps, settings.seed
    started = time.perf_counter()
    top = hessian.top_eigenvalue_lanczos(
        operator.matvec, operator.dim, steps=steps, k=3, seed=seed, dtype=torch.float64
    )
    powers = hessian.trace_of_powers(operator, (1, 2, 3, 4), num_probes=settings.probes, seed=seed)
    moments = hessian.moment_nonuniformity(
        operator, (2, 3, 4), num_probes=settings.probes, lanczos_steps=steps, seed=seed
    )
    # SGD's condition (rho = 0) and the run's own rho, at the lr the run ended with: the minimum
    # was reached under the decayed lr, not the initial one
    lr = final_lr(config)
    stability = {
        f"rho={rho:g}": hessian.stability_report(operator, lr=lr, rho=rho, steps=steps, seed=seed)
        for rho in sorted({0.0, config.rho})
    }
    density = hessian.spectral_density(
        operator.matvec, operator.dim, num_probes=settings.density_probes, steps=steps, seed=seed, dtype=torch.float64
    )
    metrics: dict[str, Any] = {
        "dim": operator.dim,
        "num_examples": len(y),
        "top_eigenvalues": top.tolist(),
        "trace_powers": {str(k): {"value": v.value, "stderr": v.stderr} for k, v in powers.items()},
        "moments": [
            {"power": m.power, "trace_ratio": m.trace_ratio, "top_ratio": m.top_ratio, **m.__dict__} for m in moments
        ],
        "stability_lambda_max": {name: report.lambda_max for name, report in stability.items()},
        "stability": {name: dataclasses.asdict(report) for name, report in stability.items()},
        "stability_lr": lr,
        "initial_lr": config.lr,
        "stability_rho": config.rho,
        "stability_rho_convention": RHO_CONVENTION,
        "stability_rho_note": _rho_note(config),
        "spectral_density": {
            "nodes": [n.tolist() for n in density.nodes],
            "weights": [w.tolist() for w in density.weights],
        },
        "seconds": time.perf_counter() - started,
    }
    return metrics, density


def _density_title(config: TrainConfig) -> str:
    return f"Hessian spectrum: {config.model} on {config.dataset}, {config.optimizer} rho={config.rho:g}"


def analyze_run(
    run_dir: Path, settings: AnalysisConfig, *, output_dir: Path | None = None, overwrite: bool = False
) -> Outcome:
    """Analyse the finished train run in ``run_dir``; the outcome's path is the analysis record.

    Without ``output_dir`` (or with the run directory itself) the analysis joins the train run: a
    previous analysis there with the same settings is reported; other settings need
    ``overwrite``, which replaces only the analysis files, never the trained run. Another
    ``output_dir`` is a run directory of its own, under the usual run contract.
    """
    source, config = finished_train_run(run_dir)
    identity = {"train": config_to_dict(config), "analysis": config_to_dict(settings)}
    attached = output_dir is None or check_output_path(output_dir) == source.path
    if attached:
        target = source
        previous = source.path / ANALYSIS_NAME
        if previous.is_file():
            stored = load_json(previous)
            if not isinstance(stored, dict):
                raise CorruptFileError(previous, "expected an analysis record (a JSON mapping)")
            differing = config_differences(stored.get("config"), identity)
            if not differing and not overwrite and isinstance(stored.get("metrics"), dict):
                return Outcome(stored["metrics"], previous, reported=True)
            if differing and not overwrite:
                raise ValueError(
                    f"run directory {source.given!r} already holds an analysis with other settings "
                    f"(differing: {', '.join(differing)}); pass --overwrite to replace that analysis "
                    "(the trained model is kept) or --output-dir to write this one elsewhere"
                )
    else:
        target = RunDirectory(output_dir, tool=TOOL, config=identity, overwrite=overwrite, command="analyze")
        if target.finished:
            return Outcome(finished_results(target)["metrics"], target.path / RESULTS_NAME, reported=True)
    plt = import_pyplot()  # optional: without matplotlib the density plot is skipped

    split = load_split(config)
    metrics, density = hessian_analysis(load_trained_model(source.path, config, split), config, settings, split)
    # Nothing is written before the analysis is complete: an interrupted analyze leaves no trace.
    if attached:
        if plt is not None:
            plot_density(plt, density, target.file(DENSITY_PLOT_NAME), _density_title(config))
        record = target.file(ANALYSIS_NAME)
        write_run_record(record, config=identity, metrics=metrics, seed=settings.seed, package=TOOL)
        return Outcome(metrics, record)
    target.begin()
    if plt is not None:
        plot_density(plt, density, target.file(DENSITY_PLOT_NAME), _density_title(config))
    target.finish(metrics=metrics, config=identity, seed=settings.seed)
    return Outcome(metrics, target.path / RESULTS_NAME)
