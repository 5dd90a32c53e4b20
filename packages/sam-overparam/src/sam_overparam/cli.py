"""``sam-overparam`` command line (also ``python -m sam_overparam``): parses and delegates.

Commands (each takes ``--config FILE`` and repeatable ``--set key=value``; ``--help`` lists the keys):

* ``train``   -- one training run of a :class:`TrainConfig` with a registered optimizer (sgd, sam,
  asam, usam, ...) and model; writes ``results.json`` (metrics and provenance), ``model.pt`` and
  ``config.json``; resumes from its per-epoch checkpoint when rerun with the same output
  directory and config (:func:`sam_overparam.runs.train_in_directory`).
* ``analyze`` -- Hessian analysis of a trained model (top eigenvalue, trace, tr(H^k), moment
  non-uniformity, SAM/SGD linear stability, spectral density; :mod:`sam_overparam.analysis`).
* ``sweep``   -- a grid of training runs (model family x width or parameter budget x optimizer x
  rho x seed x label noise x sparsity) appended to one results store; a rerun trains only what is
  missing, and N processes started by ``torchrun`` or ``accelerate launch`` share the grid without
  duplicates (:mod:`sam_overparam.sweep`).
* ``plot``    -- the standard figures of a sweep's store: the gain over SGD against the parameter
  count with bands over seeds, at each rho and at the best rho, and the best rho against the width.
* ``demo``    -- a small width sweep, SGD against SAM on mnist1d over several seeds, with a plot
  of SAM's gain against the parameter count (Shin et al., Fig. 1, at CPU scale;
  :mod:`sam_overparam.experiments`).

Output directories follow the toolkit's run contract (docs/run-contract.md): a finished run of
the same config is reported, not recomputed; a run of another config is refused, unchanged;
``--overwrite`` replaces only the files the tool wrote; errors are one line (``--debug`` for the
traceback); Ctrl-C exits 130 and a rerun of ``train`` or ``demo`` resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sam_overparam import __version__
from sam_overparam.config import QUICK_DEMO, AnalysisConfig, DemoConfig, PlotConfig, SweepConfig, TrainConfig
from sam_overparam.registries import MODELS, OPTIMIZERS
from shin_common import add_config_options, config_from_args, load_config, run_command


def _overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} (only the files this tool wrote)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-overparam", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # Named flags default to None ("not given"), so --config and the defaults show through.
    train = sub.add_parser("train", help="train one model with a registered optimizer (SGD, SAM, ...)")
    add_config_options(train, TrainConfig)
    train.add_argument("--output-dir", type=Path, required=True, help="where results.json, model.pt go")
    _overwrite_flag(train, "a run of this tool in --output-dir")
    train.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS.names())} (default: sam)")
    train.add_argument("--model", help=f"one of {', '.join(MODELS.names())} (default: mlp)")
    train.add_argument("--rho", type=float, help="SAM radius (default: 0.05)")
    train.add_argument("--lr", type=float, help="learning rate (default: 0.1)")
    train.add_argument("--epochs", type=int, help="epochs (default: 30)")
    train.add_argument("--seed", type=int, help="initialisation and batch-order seed (default: 0)")

    analyze = sub.add_parser("analyze", help="Hessian analysis of a model trained with `train`")
    add_config_options(analyze, AnalysisConfig)
    analyze.add_argument("--run-dir", type=Path, required=True, help="output directory of `train`")
    analyze.add_argument(
        "--output-dir",
        type=Path,
        help="a directory of its own for results.json (default: attach analysis.json to --run-dir)",
    )
    _overwrite_flag(analyze, "an earlier analysis (in --run-dir: only the analysis files, never the trained model)")
    analyze.add_argument("--num-examples", type=int, help="training examples used (default: 512)")
    analyze.add_argument("--batch-size", type=int, help="batch size B for E_B[...] (default: 128)")
    analyze.add_argument("--probes", type=int, help="Hutchinson probes (default: 20)")
    analyze.add_argument("--lanczos-steps", type=int, help="Lanczos steps (default: 30)")
    analyze.add_argument("--density-probes", type=int, help="SLQ probes (default: 2)")
    analyze.add_argument("--seed", type=int, help="probe seed (default: 0)")

    sweep = sub.add_parser("sweep", help="train a grid of runs into one results store (resumable, sharded)")
    add_config_options(sweep, SweepConfig)
    sweep.add_argument("--store", type=Path, required=True, help="the results store, a .jsonl file (appended to)")
    sweep.add_argument("--widths", type=int, nargs="+", help="widths (default: 16 64 256)")
    sweep.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2 3 4)")
    sweep.add_argument("--rhos", type=float, nargs="+", help="SAM radii (default: 0.05)")

    plot = sub.add_parser("plot", help="draw the standard figures of a sweep's results store")
    add_config_options(plot, PlotConfig)
    plot.add_argument("--store", type=Path, required=True, help="the results store written by `sweep`")
    plot.add_argument("--output-dir", type=Path, required=True, help="where the figures and results.json go")

    demo = sub.add_parser("demo", help="width sweep SGD vs SAM on mnist1d with a gain plot")
    add_config_options(demo, DemoConfig)
    demo.add_argument("--output-dir", type=Path, required=True, help="where sweep.jsonl, results.json, plot go")
    _overwrite_flag(demo, "a demo of this tool in --output-dir")
    demo.add_argument("--widths", type=int, nargs="+", help="first hidden widths (default: 16 64 256 1024)")
    demo.add_argument("--seeds", type=int, help="seeds per width (default: 3)")
    demo.add_argument("--epochs", type=int, help="epochs per run (default: 40)")
    demo.add_argument("--num-train", type=int, help="generated training examples (default: 4000)")
    demo.add_argument("--num-test", type=int, help="generated test examples (default: 4000)")
    demo.add_argument("--rho", type=float, help="SAM radius (default: 0.05)")
    demo.add_argument("--label-noise", type=float, help="symmetric label noise (default: 0)")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings for a smoke test, in seconds: " + " ".join(f"{k}={v}" for k, v in QUICK_DEMO.items()),
    )
    return parser


def _reported(outcome: Any, what: str) -> str:
    return f" (finished {what} found: reported, nothing recomputed)" if outcome.reported else ""


# Each command imports its module when it runs, so `--help` does not load the data and Hessian code.


def _train_command(args: argparse.Namespace) -> int:
    from sam_overparam.runs import train_in_directory

    named = {"optimizer": args.optimizer, "model": args.model, "rho": args.rho, "lr": args.lr}
    config = config_from_args(TrainConfig, args, named={**named, "epochs": args.epochs, "seed": args.seed})
    outcome = train_in_directory(config, args.output_dir, overwrite=args.overwrite)
    m = outcome.metrics
    print(
        f"{config.optimizer} {m['metric']}: best {m['best_test']:.4f} at epoch {m['best_epoch']}, "
        f"final {m['final_test']:.4f}, {m['num_params']} params -> {outcome.path}{_reported(outcome, 'run')}"
    )
    return 0


def _analyze_command(args: argparse.Namespace) -> int:
    from sam_overparam.analysis import analyze_run

    named = {
        "num_examples": args.num_examples,
        "batch_size": args.batch_size,
        "probes": args.probes,
        "lanczos_steps": args.lanczos_steps,
        "density_probes": args.density_probes,
        "seed": args.seed,
    }
    settings = config_from_args(AnalysisConfig, args, named=named)
    outcome = analyze_run(args.run_dir, settings, output_dir=args.output_dir, overwrite=args.overwrite)
    metrics = outcome.metrics
    trace = metrics["trace_powers"]["1"]
    print(f"lambda_max {metrics['top_eigenvalues'][0]:.4g}, tr(H) {trace['value']:.4g} +- {trace['stderr']:.2g}")
    for m in metrics["moments"]:
        print(f"  k={m['power']}: tr E[H_B^k] / tr H^k = {m['trace_ratio']:.3f}, top ratio {m['top_ratio']:.3f}")
    print(f"  stability at the final lr {metrics['stability_lr']:g}, rho {metrics['stability_rho_convention']}")
    for name, value in metrics["stability_lambda_max"].items():
        verdict = metrics.get("stability", {}).get(name, {}).get("verdict")
        if verdict is None:  # an analysis recorded before the verdict existed
            verdict = "stable" if value <= 1 else "unstable"
        print(f"  lambda_max E[(I - lr J_B)^2] at {name}: {value:.4f}: {verdict}")
    if "stability_rho_note" in metrics:
        print(f"  note: {metrics['stability_rho_note']}")
    print(f"-> {outcome.path}{_reported(outcome, 'analysis')}")
    return 0


def _sweep_command(args: argparse.Namespace) -> int:
    from sam_overparam.sweep import run_sweep_share

    sweep = config_from_args(SweepConfig, args, named={"widths": args.widths, "seeds": args.seeds, "rhos": args.rhos})
    report = run_sweep_share(sweep, args.store)
    print(
        f"rank {report.rank} of {report.world_size}: {report.share} runs in this share, "
        f"{report.finished_before} finished before, {report.trained} trained in {report.seconds:.0f} s -> {args.store}"
    )
    return 0


def _plot_command(args: argparse.Namespace) -> int:
    from sam_overparam.sweep import plot_store

    outcome = plot_store(args.store, args.output_dir, config_from_args(PlotConfig, args))
    print(
        f"{outcome.metrics['records']} runs, {len(outcome.metrics['gains'])} paired cells -> "
        f"{', '.join(outcome.metrics['figures'])} in {outcome.path}"
    )
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from sam_overparam.experiments import run_demo

    named = {
        "widths": args.widths,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "num_train": args.num_train,
        "num_test": args.num_test,
        "rho": args.rho,
        "label_noise": args.label_noise,
    }
    given = {key: value for key, value in named.items() if value is not None}
    # --quick replaces the defaults; --config, the flags and --set still apply on top of it
    demo = load_config(
        DemoConfig, args.config, args.overrides, defaults=QUICK_DEMO if args.quick else None, named=given
    )
    outcome = run_demo(demo, args.output_dir, overwrite=args.overwrite)
    print(f"{'widths':>12} {'params':>9} {'SGD':>7} {'SAM':>7} {'gain (points)':>22}")
    for r in outcome.metrics["rows"]:
        print(
            f"{r['widths']!s:>12} {r['num_params']:>9} {100 * r['sgd_best']:>7.2f} {100 * r['sam_best']:>7.2f} "
            f"{r['gain_points_mean']:>+8.2f} +- {r['gain_points_std']:.2f} [{r['gain_points_min']:+.2f}, {r['gain_points_max']:+.2f}]"
        )
    if outcome.reported:
        print(f"finished demo found in {outcome.path}: reported, nothing recomputed")
    else:
        print(f"{outcome.metrics['runs']} runs in {outcome.metrics['seconds']:.0f} s -> {outcome.path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(
        build_parser(),
        {
            "train": _train_command,
            "analyze": _analyze_command,
            "sweep": _sweep_command,
            "plot": _plot_command,
            "demo": _demo_command,
        },
        argv,
        # train resumes from its checkpoint, demo and sweep from their stores
        resumable={"train", "demo", "sweep"},
    )
