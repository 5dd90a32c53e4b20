"""What the three commands do, under the toolkit's run contract (docs/run-contract.md).

:func:`train_run` trains a CBM on synthetic data and saves its test predictions, :func:`intervene_run`
evaluates criteria x levels on saved predictions, :func:`demo_run` does both for several training
strategies (the paper's synthetic experiment). Each writes its own output directory, with its record
in ``results.json``; a finished run of the same config is reported instead of recomputed, and an
interrupted one is resumed. The command line (:mod:`cbm_intervene.cli`) only builds the configs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cbm_intervene.config import PAPER_CRITERIA, DemoConfig, InterveneRunConfig, TrainRunConfig
from cbm_intervene.data.core import ConceptDataset
from cbm_intervene.data.predictions import ConceptPredictions, load_predictions, save_predictions
from cbm_intervene.data.synthetic import make_synthetic
from cbm_intervene.grid import evaluate_grid
from cbm_intervene.intervention import LEVELS, InterventionConfig
from cbm_intervene.models import TrainConfig, TrainedCBM, checkpoint_files, load_cbm, train_cbm
from cbm_intervene.plots import plot_grid
from shin_common import (
    JsonlStore,
    RunDirectory,
    config_to_dict,
    import_pyplot,
    seed_everything,
    write_run_record,
)

log = logging.getLogger(__name__)

TOOL = "cbm-intervene"


def predictions_for(trained: TrainedCBM, data: ConceptDataset, split: str = "test") -> ConceptPredictions:
    """Bottleneck values of ``split`` with the training-set values as percentile reference."""
    return trained.concept_predictions(data, split)


def file_sha256(path: str | Path) -> str:
    """Content digest of a file: finished cells are reused only for the very same predictions."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_metrics(trained: TrainedCBM, data: ConceptDataset, split: str = "test") -> dict[str, float]:
    """Task error and concept accuracy of a trained CBM on ``split`` (no intervention)."""
    part = data.split(split)
    with torch.no_grad():
        logits, out = trained.model(torch.as_tensor(part["features"]))
    concepts, labels = torch.as_tensor(part["concepts"]), torch.as_tensor(part["labels"])
    return {
        f"{split}_task_error": 1.0 - (out.argmax(1) == labels).float().mean().item(),
        f"{split}_concept_accuracy": ((logits > 0).float() == concepts).float().mean().item(),
    }


def plotting_available(wanted: bool) -> bool:
    """Whether figures are drawn: checked before any work, so a missing matplotlib is said up front."""
    if not wanted:
        return False
    if import_pyplot() is None:
        log.warning(
            "matplotlib is not installed (pip install 'cbm-intervene[plot]'): no figures; --no-plot silences this"
        )
        return False
    return True


def _report_finished(run: RunDirectory, show: Callable[[dict[str, Any], Path], None]) -> int:
    """A finished run of the same config: print its results instead of recomputing them."""
    print(
        f"{run.given} already holds this run (same config), finished: nothing recomputed "
        "(pass --overwrite to compute it again)"
    )
    record = run.results()
    if record is None:
        print(f"its results file is missing from {run.given}")
    else:
        show(record, run.path)
    return 0


def _train_or_resume(
    data: ConceptDataset, config: TrainConfig, run: RunDirectory, subdir: str, resuming: bool
) -> TrainedCBM:
    """Train with checkpoints in ``run/subdir`` (recorded in the manifest first); a resumed run
    continues from the progress files, or loads ``cbm.pt`` when training itself had finished."""
    run.claim(f"{subdir}/{name}" for name in checkpoint_files(config.strategy))
    checkpoint_dir = run.path / subdir
    if resuming and (checkpoint_dir / "cbm.pt").is_file():
        log.info("training had finished before the interruption: loading %s", checkpoint_dir / "cbm.pt")
        return load_cbm(checkpoint_dir / "cbm.pt")
    return train_cbm(data, config, checkpoint_dir=checkpoint_dir, resume=resuming)


def _save_test_predictions(
    run: RunDirectory, name: str, trained: TrainedCBM, data: ConceptDataset
) -> ConceptPredictions:
    predictions = predictions_for(trained, data)
    save_predictions(
        run.file(name), predictions, target_model=trained.model.target_model, target_spec=trained.target_spec
    )
    return predictions


def _write_figures(run: RunDirectory, name: str, curves: dict[str, Any], title: str) -> None:
    plot_grid(curves, run.file(f"{name}.png"), title=title)
    plot_grid(curves, run.file(f"{name}_cost.png"), x="cost_per_sample", title=title)


# ----------------------------------------------------------------------------------------- train


def _show_train(record: dict[str, Any], out: Path) -> None:
    print(
        f"trained {record['config']['train']['strategy']}: test task error {record['metrics']['test_task_error']:.4f}"
    )
    print(f"predictions: {out / 'predictions.pt'}")


def train_run(config: TrainRunConfig, output_dir: str | Path, *, overwrite: bool = False) -> int:
    """Generate synthetic data, train a CBM (resumable), save its test predictions and ``results.json``."""
    run = RunDirectory(output_dir, tool=TOOL, config=config, overwrite=overwrite, command="train")
    if run.finished:
        return _report_finished(run, _show_train)
    resuming = run.resuming
    seed_everything(config.train.seed)
    start = time.perf_counter()
    data = make_synthetic(config.data)  # before begin(): a config it refuses leaves no directory
    run.begin()
    trained = _train_or_resume(data, config.train, run, "checkpoints", resuming)
    _save_test_predictions(run, "predictions.pt", trained, data)
    metrics = model_metrics(trained, data) | {"train_seconds": time.perf_counter() - start}
    record = run.finish(
        metrics=metrics, config=config, seed=config.train.seed, extra={"history": trained.history, "resumed": resuming}
    )
    _show_train(record, run.path)
    return 0


# ------------------------------------------------------------------------------------- intervene


def _show_intervention(record: dict[str, Any], out: Path) -> None:
    for level, rows in record["metrics"].items():
        for name, summary in rows.items():
            print(
                f"{level:4s} {name:16s} error {summary['initial_error']:.4f} -> {summary['final_error']:.4f}  auc {summary['auc']:.4f}"
            )
    print(f"results: {out / 'results.json'}")


def _load_models(config: InterveneRunConfig, paths: list[Path]) -> list[tuple[ConceptPredictions, torch.nn.Module]]:
    """Each predictions file with its target model, revealing the labels ``true_concepts`` names."""
    models = []
    for path in paths:
        predictions, target = load_predictions(path)
        if target is None:
            raise ValueError(
                f"{str(path)!r} holds no target model; save it with save_predictions(..., target_model=, target_spec=)"
            )
        if config.true_concepts == "instance":
            if predictions.instance_concepts is None:
                raise ValueError(f"{str(path)!r} holds no instance_concepts, which --true-concepts instance reveals")
            predictions = predictions.with_true_concepts(predictions.instance_concepts)
        models.append((predictions, target))
    return models


def _levels_to_run(config: InterveneRunConfig, paths: list[Path], models: list) -> list[str]:
    """The levels asked for, or every level all the predictions support (group levels need groups)."""
    grouped = all(predictions.groups is not None for predictions, _ in models)
    levels = config.levels or [level for level in LEVELS if level.startswith("I") or grouped]
    for level in levels:
        if level.startswith("G") and not grouped:
            missing = next(str(p) for p, (pred, _) in zip(paths, models, strict=True) if pred.groups is None)
            raise ValueError(f"--levels {level} needs concept groups, but {missing!r} has none; use I+S or I+B")
    return levels


def _resolve_metric(config: InterveneRunConfig, models: list) -> tuple[str, str]:
    """The task metric and where it came from: the setting, the predictions' metadata, or the default."""
    if config.metric is not None:
        return config.metric, "--metric"
    declared = {path: predictions.metric for path, (predictions, _) in zip(config.predictions, models, strict=True)}
    if len(set(declared.values())) > 1:
        raise ValueError(f"the predictions files declare different metrics {declared}; pass --metric")
    declared_metric = next(iter(declared.values()))
    return declared_metric or "error", "the predictions' metadata" if declared_metric else "the default"


def _figure_title(config: InterveneRunConfig, settings: InterventionConfig) -> str:
    files = ", ".join(Path(p).name for p in config.predictions)
    return (
        f"intervention on {files} ({settings.metric}): {settings.ordering} ordering, "
        f"{settings.conceptualization} bottleneck, {config.true_concepts}-level concepts"
    )


def intervene_run(config: InterveneRunConfig, output_dir: str | Path, *, overwrite: bool = False) -> int:
    """Evaluate ``config.criteria`` x levels on the predictions files; finished cells are kept in
    ``cells.jsonl`` and reused when the same run is resumed on unchanged files."""
    paths = [Path(p) for p in config.predictions]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"predictions file not found: {path}")
    plot = plotting_available(config.plot)
    sha256 = [file_sha256(p) for p in paths]
    identity = {
        **config_to_dict(config),
        "predictions": [str(p.resolve()) for p in paths],
        # the path alone would report (or resume from) results of a file since rewritten
        "predictions_sha256": sha256,
        "plot": plot,
    }
    run = RunDirectory(output_dir, tool=TOOL, config=identity, overwrite=overwrite, command="intervene")
    if run.finished:
        return _report_finished(run, _show_intervention)
    models = _load_models(config, paths)
    levels = _levels_to_run(config, paths, models)
    metric, source = _resolve_metric(config, models)
    settings = config.intervention(metric)
    print(f"metric: {metric} (from {source}; pass --metric to choose)")
    run.begin()  # everything above validated: only now may the directory appear
    results = evaluate_grid(
        models,
        criteria=config.criteria,
        levels=levels,
        base=settings,
        seeds=config.seeds,
        budgets=config.budgets,
        target_error=config.target_error,
        store=JsonlStore(run.file("cells.jsonl")),
        run_tag={
            "predictions": identity["predictions"],
            "predictions_sha256": sha256,
            "true_concepts": config.true_concepts,
        },
    )
    if plot:
        _write_figures(run, "intervention", results["curves"], _figure_title(config, settings))
    record_config = {
        "predictions": config.predictions,
        "predictions_sha256": sha256,
        "true_concepts": config.true_concepts,
        "criteria": config.criteria,
        "levels": levels,
        "seeds": config.seeds,
        "budgets": config.budgets,
        "target_error": config.target_error,
        "intervention": settings,
    }
    record = run.finish(metrics=results["summary"], config=record_config, extra={"curves": results["curves"]})
    _show_intervention(record, run.path)
    return 0


# ------------------------------------------------------------------------------------------ demo


def _show_strategy(strategy: str, summary: dict[str, Any]) -> None:
    row = summary["I+S"]
    print(
        f"{strategy}: initial error {row['RAND']['initial_error']:.3f}; I+S error after 10 concepts: "
        + ", ".join(f"{c} {row[c]['error_at'].get('10', float('nan')):.3f}" for c in PAPER_CRITERIA)
    )


def _show_demo(record: dict[str, Any], out: Path) -> None:
    for strategy, result in record["metrics"].items():
        _show_strategy(strategy, result["summary"])
    print(f"results in {out}")


def demo_run(config: DemoConfig, output_dir: str | Path, *, overwrite: bool = False) -> int:
    """Synthetic data; one CBM per strategy; every paper criterion at every level; figures.

    Each strategy's directory holds its checkpoints, predictions and ``results.json``; the run's
    ``results.json`` sums them up.
    """
    start = time.perf_counter()
    plot = plotting_available(config.plot)
    data_config, train_configs, base = config.data_config(), config.train_configs(), config.intervention()
    identity = {
        "data": data_config,
        "train": list(train_configs.values()),
        "seeds": config.seeds,
        "target_error": config.target_error,
        "intervention": base,
        "plot": plot,
    }
    run = RunDirectory(output_dir, tool=TOOL, config=identity, overwrite=overwrite, command="demo")
    if run.finished:
        return _report_finished(run, _show_demo)
    resuming = run.resuming
    seed_everything(config.seed)
    data = make_synthetic(data_config)
    run.begin()
    print(
        f"synthetic data: {len(data.labels)} samples, {data.n_concepts} concepts, {data.n_classes} classes, "
        f"noise_std={config.noise_std}"
    )
    all_results: dict[str, Any] = {}
    for strategy, train_config in train_configs.items():
        trained = _train_or_resume(data, train_config, run, f"{strategy}/checkpoints", resuming)
        predictions = _save_test_predictions(run, f"{strategy}/predictions.pt", trained, data)
        results = evaluate_grid(
            [(predictions, trained.model.target_model)],
            criteria=PAPER_CRITERIA,
            levels=LEVELS,
            base=base,
            seeds=config.seeds,
            budgets=(5, 10, 20),
            target_error=config.target_error,
        )
        results["model"] = model_metrics(trained, data)
        all_results[strategy] = results
        write_run_record(
            run.file(f"{strategy}/results.json"),
            config={"strategy": train_config, "intervention": base},
            metrics=results["summary"],
            extra={"curves": results["curves"]},
            package=TOOL,
        )
        if plot:
            title = f"{strategy} CBM, synthetic data (noise_std={config.noise_std:g}), {base.ordering} ordering"
            _write_figures(run, f"{strategy}_intervention", results["curves"], title)
        _show_strategy(strategy, results["summary"])
    elapsed = time.perf_counter() - start
    run.finish(
        config={"data": data_config, "strategies": config.strategies, "seeds": config.seeds, "intervention": base},
        metrics={s: {"model": r["model"], "summary": r["summary"]} for s, r in all_results.items()},
        seed=config.seed,
        extra={"wall_seconds": elapsed, "resumed": resuming},
    )
    print(f"demo finished in {elapsed:.1f} s; results in {run.path}")
    return 0
