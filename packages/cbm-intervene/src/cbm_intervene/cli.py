"""``cbm-intervene`` command line (also ``python -m cbm_intervene``).

  cbm-intervene train --output-dir runs/ind --set train.strategy=IND --set data.noise_std=1.0
  cbm-intervene intervene --predictions runs/ind/predictions.pt --output-dir runs/ind/tti
  cbm-intervene demo --output-dir outputs/demo

Log level from SHIN_LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cbm_intervene import __version__
from cbm_intervene.data.core import ConceptDataset
from cbm_intervene.data.predictions import ConceptPredictions, load_predictions, save_predictions
from cbm_intervene.data.synthetic import SyntheticConfig, make_synthetic
from cbm_intervene.experiment import evaluate_grid
from cbm_intervene.intervention import LEVELS, CostModel, InterventionConfig, available_criteria
from cbm_intervene.intervention.engine import CONCEPTUALIZATIONS, GROUP_SCORES, METRICS, NOT_VISIBLE, ORDERINGS
from cbm_intervene.models import TrainConfig, TrainedCBM, train_cbm
from cbm_intervene.plots import plot_grid
from shin_common import JsonlStore, load_config, seed_everything, setup_logging, write_run_record

log = logging.getLogger(__name__)

PAPER_CRITERIA = ("RAND", "UCP", "LCP", "CCTP", "ECTP", "EUDTP")


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


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(TrainRunConfig, args.config, args.set)
    seed_everything(config.train.seed)
    out = Path(args.output_dir)
    start = time.perf_counter()
    data = make_synthetic(config.data)
    trained = train_cbm(data, config.train, checkpoint_dir=out / "checkpoints")
    predictions_path = save_predictions(
        out / "predictions.pt",
        predictions_for(trained, data),
        target_model=trained.model.target_model,
        target_spec=trained.target_spec,
    )
    metrics = model_metrics(trained, data) | {"train_seconds": time.perf_counter() - start}
    write_run_record(
        out / "train_record.json",
        config=config,
        metrics=metrics,
        seed=config.train.seed,
        extra={"history": trained.history},
    )
    print(f"trained {config.train.strategy}: test task error {metrics['test_task_error']:.4f}")
    print(f"predictions: {predictions_path}")
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


def _write_results(
    out: Path, name: str, results: dict[str, Any], config: dict[str, Any], plot: bool, title: str
) -> None:
    write_run_record(
        out / f"{name}.json", config=config, metrics=results["summary"], extra={"curves": results["curves"]}
    )
    if plot:
        plot_grid(results["curves"], out / f"{name}.png", title=title)
        plot_grid(results["curves"], out / f"{name}_cost.png", x="cost_per_sample", title=title)


def cmd_intervene(args: argparse.Namespace) -> int:
    models = []
    for path in args.predictions:
        predictions, target = load_predictions(path)
        if target is None:
            raise SystemExit(
                f"{path} holds no target model; save it with save_predictions(..., target_model=, target_spec=)"
            )
        if args.true_concepts == "instance":
            if predictions.instance_concepts is None:
                raise SystemExit(f"{path} holds no instance_concepts")
            predictions = predictions.with_true_concepts(predictions.instance_concepts)
        models.append((predictions, target))
    levels = args.levels or [lv for lv in LEVELS if lv.startswith("I") or models[0][0].groups is not None]
    if args.metric is not None:
        metric, source = args.metric, "--metric"
    else:
        declared = {str(p): predictions.metric for p, (predictions, _) in zip(args.predictions, models, strict=True)}
        if len(set(declared.values())) > 1:
            raise ValueError(f"the predictions files declare different metrics {declared}; pass --metric")
        declared_metric = next(iter(declared.values()))
        metric = declared_metric or "error"
        source = "the predictions' metadata" if declared_metric else "the default"
    print(f"metric: {metric} (from {source}; pass --metric to choose)")
    base = _intervention_base(args, metric)
    out = Path(args.output_dir)
    results = evaluate_grid(
        models,
        criteria=args.criteria,
        levels=levels,
        base=base,
        seeds=args.seeds,
        budgets=args.budgets,
        target_error=args.target_error,
        store=JsonlStore(out / "cells.jsonl"),
        run_tag={
            "predictions": [str(Path(p).resolve()) for p in args.predictions],
            # the path alone would reuse stale cells after the file is rewritten
            "predictions_sha256": [file_sha256(p) for p in args.predictions],
            "true_concepts": args.true_concepts,
        },
    )
    config = {
        "predictions": args.predictions,
        "criteria": args.criteria,
        "levels": levels,
        "seeds": args.seeds,
        "intervention": base,
    }
    _write_results(out, "intervention", results, config, not args.no_plot, "")
    for level in levels:
        for name, summary in results["summary"][level].items():
            print(
                f"{level:4s} {name:16s} error {summary['initial_error']:.4f} -> {summary['final_error']:.4f}  auc {summary['auc']:.4f}"
            )
    print(f"results: {out / 'intervention.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.output_dir)
    seed_everything(args.seed)
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
    data = make_synthetic(data_config)
    print(
        f"synthetic data: {len(data.labels)} samples, {data.n_concepts} concepts, {data.n_classes} classes, noise_std={args.noise_std}"
    )
    base = InterventionConfig(
        criterion="RAND", ordering=args.ordering, costs=CostModel(concept=1.0, group=2.0, forward_pass=0.01)
    )
    all_results: dict[str, Any] = {}
    for strategy in args.strategies:
        train_config = TrainConfig(strategy=strategy, seed=args.seed, **train_kw)
        trained = train_cbm(data, train_config, checkpoint_dir=out / strategy / "checkpoints")
        predictions = predictions_for(trained, data)
        save_predictions(
            out / strategy / "predictions.pt",
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
        _write_results(
            out,
            f"{strategy}_intervention",
            results,
            {"strategy": train_config, "intervention": base},
            not args.no_plot,
            f"synthetic, {strategy}",
        )
        row = results["summary"]["I+S"]
        print(
            f"{strategy}: initial error {row['RAND']['initial_error']:.3f}; I+S error after 10 concepts: "
            + ", ".join(f"{c} {row[c]['error_at'].get('10', float('nan')):.3f}" for c in PAPER_CRITERIA)
        )
    elapsed = time.perf_counter() - start
    write_run_record(
        out / "demo_results.json",
        config={"data": data_config, "strategies": args.strategies, "seeds": args.seeds, "intervention": base},
        metrics={s: {"model": r["model"], "summary": r["summary"]} for s, r in all_results.items()},
        seed=args.seed,
        extra={"wall_seconds": elapsed},
    )
    print(f"demo finished in {elapsed:.1f} s; results in {out}")
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
    train.set_defaults(func=cmd_train)

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
    intervene.set_defaults(func=cmd_intervene)

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
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # bad input and missing or unreadable files: a message, no traceback
        parser.error(str(exc))
    return 2  # pragma: no cover
