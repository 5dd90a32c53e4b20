"""``cbm-intervene`` command line (also ``python -m cbm_intervene``).

  cbm-intervene train --output-dir runs/ind --set train.strategy=IND --set data.noise_std=1.0
  cbm-intervene intervene --predictions runs/ind/predictions.pt --output-dir runs/ind/tti
  cbm-intervene demo --output-dir outputs/demo

Every command writes its own output directory under the toolkit's run contract
(docs/run-contract.md): a finished run of the same config is reported, not recomputed; a run of
another config is refused (pass --overwrite to replace it); an interrupted run is resumed by
running the same command again. Errors are one line; --debug shows the traceback.

Log level from SHIN_LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cbm_intervene import __version__
from cbm_intervene.data.core import ConceptDataset
from cbm_intervene.data.predictions import ConceptPredictions, load_predictions, save_predictions
from cbm_intervene.data.synthetic import SyntheticConfig, make_synthetic
from cbm_intervene.experiment import evaluate_grid
from cbm_intervene.intervention import LEVELS, CostModel, InterventionConfig, available_criteria, get_criterion
from cbm_intervene.intervention.engine import CONCEPTUALIZATIONS, GROUP_SCORES, METRICS, NOT_VISIBLE, ORDERINGS
from cbm_intervene.models import TrainConfig, TrainedCBM, checkpoint_files, load_cbm, train_cbm
from cbm_intervene.plots import plot_grid
from shin_common import (
    JsonlStore,
    RunDirectory,
    import_pyplot,
    load_config,
    run_command,
    seed_everything,
    write_run_record,
)

log = logging.getLogger(__name__)

TOOL = "cbm-intervene"
PAPER_CRITERIA = ("RAND", "UCP", "LCP", "CCTP", "ECTP", "EUDTP")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclass(kw_only=True)
class TrainRunConfig:
    """``train`` command: synthetic data (``data.*``) and CBM training (``train.*``)."""

    data: SyntheticConfig = field(default_factory=SyntheticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


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


def _check_range(flag: str, values: Any, ok: Callable[[float], bool], expected: str) -> None:
    """Refuse a numeric flag outside its range in one line naming the value and the range.

    NaN and infinities are refused everywhere: no flag of this tool means anything with them.
    """
    for value in values if isinstance(values, list | tuple) else [values]:
        if value is None:
            continue
        if not (math.isfinite(value) and ok(value)):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise ValueError(f"{flag} {shown} is out of range; expected {expected}")


def _check_seeds(flag: str, seeds: Any) -> None:
    _check_range(flag, seeds, lambda s: 0 <= s <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")


def _check_target_error(target_error: float | None) -> None:
    _check_range("--target-error", target_error, lambda e: 0.0 <= e <= 1.0, "an error rate in [0, 1]")


def _plotting(no_plot: bool) -> bool:
    """Whether figures are drawn: checked before any work, so a missing matplotlib is said up front."""
    if no_plot:
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


def _show_train(record: dict[str, Any], out: Path) -> None:
    print(
        f"trained {record['config']['train']['strategy']}: test task error {record['metrics']['test_task_error']:.4f}"
    )
    print(f"predictions: {out / 'predictions.pt'}")


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(TrainRunConfig, args.config, args.set)
    run = RunDirectory(args.output_dir, tool=TOOL, config=config, overwrite=args.overwrite, command="train")
    if run.finished:
        return _report_finished(run, _show_train)
    resuming = run.resuming
    seed_everything(config.train.seed)
    start = time.perf_counter()
    data = make_synthetic(config.data)  # before begin(): a config it refuses leaves no directory
    run.begin()
    trained = _train_or_resume(data, config.train, run, "checkpoints", resuming)
    save_predictions(
        run.file("predictions.pt"),
        predictions_for(trained, data),
        target_model=trained.model.target_model,
        target_spec=trained.target_spec,
    )
    metrics = model_metrics(trained, data) | {"train_seconds": time.perf_counter() - start}
    record = run.finish(
        metrics=metrics,
        config=config,
        seed=config.train.seed,
        extra={"history": trained.history, "resumed": resuming},
        name="train_record.json",
    )
    _show_train(record, run.path)
    return 0


def _intervention_base(args: argparse.Namespace, metric: str) -> InterventionConfig:
    """The shared intervention settings of ``intervene``; ``metric`` is already resolved (flag,
    predictions' metadata or default)."""
    return InterventionConfig(
        criterion="RAND",
        ordering=args.ordering,
        group_score=args.group_score,
        conceptualization=args.conceptualization,
        n_samples=args.n_samples,
        not_visible=args.not_visible,
        replacement_source=args.replacement_source,
        metric=metric,
        max_steps=args.max_steps,
        costs=CostModel(concept=args.tau_i, group=args.tau_g, forward_pass=args.tau_f),
    )


def _write_figures(run: RunDirectory, name: str, curves: dict[str, Any], title: str) -> None:
    plot_grid(curves, run.file(f"{name}.png"), title=title)
    plot_grid(curves, run.file(f"{name}_cost.png"), x="cost_per_sample", title=title)


def _check_intervene_flags(args: argparse.Namespace) -> None:
    """Every numeric flag of ``intervene`` in its range, before anything is read or written."""
    _check_range("--n-samples", args.n_samples, lambda n: n >= 1, "an integer >= 1")
    _check_range("--max-steps", args.max_steps, lambda n: n >= 0, "an integer >= 0 (or leave it out for all steps)")
    _check_seeds("--seeds", args.seeds)
    for flag, value in (("--tau-i", args.tau_i), ("--tau-g", args.tau_g), ("--tau-f", args.tau_f)):
        _check_range(flag, value, lambda c: c >= 0, "a cost >= 0")
    _check_range("--budgets", args.budgets, lambda b: b >= 0, "numbers of concepts per sample >= 0")
    _check_target_error(args.target_error)


def _show_intervention(record: dict[str, Any], out: Path) -> None:
    for level, rows in record["metrics"].items():
        for name, summary in rows.items():
            print(
                f"{level:4s} {name:16s} error {summary['initial_error']:.4f} -> {summary['final_error']:.4f}  auc {summary['auc']:.4f}"
            )
    print(f"results: {out / 'intervention.json'}")


def cmd_intervene(args: argparse.Namespace) -> int:
    _check_intervene_flags(args)
    paths = [Path(p) for p in args.predictions]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"predictions file not found: {path}")
    criteria = [get_criterion(name).name for name in args.criteria]
    plot = _plotting(args.no_plot)
    sha256 = [file_sha256(p) for p in paths]
    identity = {
        "predictions": [str(p.resolve()) for p in paths],
        # the path alone would report (or resume from) results of a file since rewritten
        "predictions_sha256": sha256,
        "true_concepts": args.true_concepts,
        "criteria": criteria,
        "levels": args.levels,
        "options": {
            name: getattr(args, name)
            for name in (
                "ordering",
                "group_score",
                "conceptualization",
                "n_samples",
                "not_visible",
                "replacement_source",
                "metric",
                "max_steps",
                "tau_i",
                "tau_g",
                "tau_f",
            )
        },
        "seeds": args.seeds,
        "budgets": [float(b) for b in args.budgets],
        "target_error": args.target_error,
        "plot": plot,
    }
    run = RunDirectory(args.output_dir, tool=TOOL, config=identity, overwrite=args.overwrite, command="intervene")
    if run.finished:
        return _report_finished(run, _show_intervention)
    models = []
    for path in paths:
        predictions, target = load_predictions(path)
        if target is None:
            raise ValueError(
                f"{str(path)!r} holds no target model; save it with save_predictions(..., target_model=, target_spec=)"
            )
        if args.true_concepts == "instance":
            if predictions.instance_concepts is None:
                raise ValueError(f"{str(path)!r} holds no instance_concepts, which --true-concepts instance reveals")
            predictions = predictions.with_true_concepts(predictions.instance_concepts)
        models.append((predictions, target))
    grouped = all(predictions.groups is not None for predictions, _ in models)
    levels = args.levels or [lv for lv in LEVELS if lv.startswith("I") or grouped]
    for level in levels:
        if level.startswith("G") and not grouped:
            missing = next(str(p) for p, (pred, _) in zip(paths, models, strict=True) if pred.groups is None)
            raise ValueError(f"--levels {level} needs concept groups, but {missing!r} has none; use I+S or I+B")
    if args.metric is not None:
        metric, source = args.metric, "--metric"
    else:
        declared = {str(p): predictions.metric for p, (predictions, _) in zip(args.predictions, models, strict=True)}
        if len(set(declared.values())) > 1:
            raise ValueError(f"the predictions files declare different metrics {declared}; pass --metric")
        declared_metric = next(iter(declared.values()))
        metric = declared_metric or "error"
        source = "the predictions' metadata" if declared_metric else "the default"
    base = _intervention_base(args, metric)
    print(f"metric: {metric} (from {source}; pass --metric to choose)")
    run.begin()  # everything above validated: only now may the directory appear
    results = evaluate_grid(
        models,
        criteria=criteria,
        levels=levels,
        base=base,
        seeds=args.seeds,
        budgets=args.budgets,
        target_error=args.target_error,
        store=JsonlStore(run.file("cells.jsonl")),
        run_tag={
            "predictions": identity["predictions"],
            "predictions_sha256": sha256,
            "true_concepts": args.true_concepts,
        },
    )
    if plot:
        _write_figures(run, "intervention", results["curves"], "")
    config = {
        "predictions": args.predictions,
        "predictions_sha256": sha256,
        "criteria": criteria,
        "levels": levels,
        "seeds": args.seeds,
        "budgets": args.budgets,
        "target_error": args.target_error,
        "intervention": base,
    }
    record = run.finish(
        metrics=results["summary"], config=config, extra={"curves": results["curves"]}, name="intervention.json"
    )
    _show_intervention(record, run.path)
    return 0


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


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _check_range("--noise-std", args.noise_std, lambda s: s >= 0, "a standard deviation >= 0")
    _check_seeds("--seeds", args.seeds)
    _check_seeds("--seed", args.seed)
    _check_target_error(args.target_error)
    plot = _plotting(args.no_plot)
    if args.quick:
        data_config = SyntheticConfig(
            n_concepts=24,
            n_features=24,
            n_classes=20,
            n_groups=10,
            samples_per_class=30,
            noise_std=args.noise_std,
            seed=args.seed,
        )
        train_kw: dict[str, Any] = {"concept_hidden": (32,), "max_epochs": 15, "patience": 3}
    else:
        data_config = SyntheticConfig(noise_std=args.noise_std, seed=args.seed)
        train_kw = {"max_epochs": 200, "patience": 10}
    strategies = list(dict.fromkeys(args.strategies))
    train_configs = {s: TrainConfig(strategy=s, seed=args.seed, **train_kw) for s in strategies}
    base = InterventionConfig(
        criterion="RAND", ordering=args.ordering, costs=CostModel(concept=1.0, group=2.0, forward_pass=0.01)
    )
    identity = {
        "data": data_config,
        "train": list(train_configs.values()),
        "seeds": args.seeds,
        "target_error": args.target_error,
        "intervention": base,
        "plot": plot,
    }
    run = RunDirectory(args.output_dir, tool=TOOL, config=identity, overwrite=args.overwrite, command="demo")
    if run.finished:
        return _report_finished(run, _show_demo)
    resuming = run.resuming
    seed_everything(args.seed)
    data = make_synthetic(data_config)
    run.begin()
    print(
        f"synthetic data: {len(data.labels)} samples, {data.n_concepts} concepts, {data.n_classes} classes, noise_std={args.noise_std}"
    )
    all_results: dict[str, Any] = {}
    for strategy, train_config in train_configs.items():
        trained = _train_or_resume(data, train_config, run, f"{strategy}/checkpoints", resuming)
        predictions = predictions_for(trained, data)
        save_predictions(
            run.file(f"{strategy}/predictions.pt"),
            predictions,
            target_model=trained.model.target_model,
            target_spec=trained.target_spec,
        )
        results = evaluate_grid(
            [(predictions, trained.model.target_model)],
            criteria=PAPER_CRITERIA,
            levels=LEVELS,
            base=base,
            seeds=args.seeds,
            budgets=(5, 10, 20),
            target_error=args.target_error,
        )
        results["model"] = model_metrics(trained, data)
        all_results[strategy] = results
        write_run_record(
            run.file(f"{strategy}_intervention.json"),
            config={"strategy": train_config, "intervention": base},
            metrics=results["summary"],
            extra={"curves": results["curves"]},
            package=TOOL,
        )
        if plot:
            _write_figures(run, f"{strategy}_intervention", results["curves"], f"synthetic, {strategy}")
        _show_strategy(strategy, results["summary"])
    elapsed = time.perf_counter() - start
    run.finish(
        config={"data": data_config, "strategies": strategies, "seeds": args.seeds, "intervention": base},
        metrics={s: {"model": r["model"], "summary": r["summary"]} for s, r in all_results.items()},
        seed=args.seed,
        extra={"wall_seconds": elapsed, "resumed": resuming},
        name="demo_results.json",
    )
    print(f"demo finished in {elapsed:.1f} s; results in {run.path}")
    return 0


def _add_intervention_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--criteria",
        nargs="+",
        default=list(PAPER_CRITERIA),
        help=f"criteria to evaluate (registered: {available_criteria()})",
    )
    # choices are matched case-insensitively, as InterventionConfig matches them
    p.add_argument(
        "--levels", nargs="+", type=str.upper, choices=LEVELS, help="levels (default: all the predictions support)"
    )
    p.add_argument(
        "--ordering",
        type=str.lower,
        choices=ORDERINGS,
        default="static",
        help="static (paper) or adaptive re-scoring (default: static)",
    )
    p.add_argument(
        "--group-score",
        type=str.lower,
        choices=GROUP_SCORES,
        default="mean",
        help="a group's score from its members' (default: mean)",
    )
    p.add_argument(
        "--conceptualization",
        type=str.lower,
        choices=CONCEPTUALIZATIONS,
        default="soft",
        help="test-time bottleneck (default: soft)",
    )
    p.add_argument(
        "--n-samples", type=int, default=16, help="Bernoulli samples for --conceptualization samp (default: 16)"
    )
    p.add_argument(
        "--not-visible",
        type=str.lower,
        choices=NOT_VISIBLE,
        default="nullify",
        help="revealed not-visible concepts (default: nullify)",
    )
    p.add_argument(
        "--replacement-source",
        type=str.lower,
        choices=("train", "eval"),
        default="train",
        help="logit percentiles from (default: train)",
    )
    p.add_argument(
        "--metric",
        type=str.lower,
        choices=METRICS,
        default=None,
        help="error or balanced_error (default: the metric the predictions file declares, e.g. balanced_error "
        "for SkinCon, else error)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds for random criteria (default: 0 1 2)")
    p.add_argument("--tau-i", type=float, default=1.0, help="expert cost per revealed concept (default: 1)")
    p.add_argument("--tau-g", type=float, default=1.0, help="expert cost per revealed group (default: 1)")
    p.add_argument("--tau-f", type=float, default=0.0, help="machine cost per forward pass of f (default: 0)")
    p.add_argument(
        "--budgets", nargs="*", type=float, default=[5, 10, 20], help="concepts per sample to report error at"
    )
    p.add_argument("--target-error", type=float, default=None, help="report concepts needed to reach this error")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib figures")


def _add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run of another config in --output-dir (deletes only the files this tool wrote there)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbm-intervene", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="generate synthetic data, train a CBM, save checkpoints and test predictions")
    train.add_argument("--output-dir", required=True, help="where checkpoints, predictions.pt and train_record.json go")
    train.add_argument(
        "--config", help="YAML/JSON file with 'data' (SyntheticConfig) and 'train' (TrainConfig) sections"
    )
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.strategy=JNT"
    )
    _add_overwrite_option(train)

    intervene = sub.add_parser(
        "intervene",
        help="evaluate criteria x levels on saved predictions (finished cells are kept in OUTPUT_DIR/cells.jsonl "
        "and reused when the same command runs again on unchanged predictions files)",
    )
    intervene.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        help=".pt/.npz predictions files with a target model (one per model seed)",
    )
    intervene.add_argument("--output-dir", required=True, help="where intervention.json and plots go")
    intervene.add_argument(
        "--true-concepts", choices=("class", "instance"), default="class", help="which labels intervention reveals"
    )
    _add_intervention_options(intervene)
    _add_overwrite_option(intervene)

    demo = sub.add_parser("demo", help="synthetic data; IND, SEQ, JNT; every criterion at every level; plots")
    demo.add_argument("--output-dir", required=True, help="where results and plots go")
    demo.add_argument(
        "--strategies", nargs="+", type=str.upper, default=["IND", "SEQ", "JNT"], choices=["IND", "SEQ", "JNT", "JNT+P"]
    )
    demo.add_argument(
        "--noise-std",
        type=float,
        default=1.0,
        help="input noise; the paper generator's default 2.0 is much harder (default: 1.0)",
    )
    demo.add_argument("--ordering", type=str.lower, choices=ORDERINGS, default="static")
    demo.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds for RAND (default: 0 1 2)")
    demo.add_argument("--seed", type=int, default=0, help="data and training seed (default: 0)")
    demo.add_argument("--target-error", type=float, default=0.05)
    demo.add_argument("--quick", action="store_true", help="a tiny configuration (seconds), for smoke tests")
    demo.add_argument("--no-plot", action="store_true")
    _add_overwrite_option(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(
        build_parser(),
        {"train": cmd_train, "intervene": cmd_intervene, "demo": cmd_demo},
        argv,
        resumable={"train", "intervene", "demo"},
    )
