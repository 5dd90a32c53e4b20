"""``sam-overparam`` command line (also ``python -m sam_overparam``).

Commands:

* ``train``   -- one SGD/SAM run from a YAML/JSON config plus ``key=value`` overrides; writes
  ``result.json`` (metrics and provenance), ``model.pt`` and ``config.json``; resumes from its
  per-epoch checkpoint when rerun with the same output directory and config.
* ``analyze`` -- Hessian analysis of a trained model (top eigenvalue, trace, tr(H^k), moment
  non-uniformity, SAM/SGD linear stability, spectral density).
* ``demo``    -- a small width sweep, SGD against SAM on mnist1d over several seeds, with a plot
  of SAM's gain against the parameter count (Shin et al., Fig. 1, at CPU scale).

Output directories follow the toolkit's run contract (docs/run-contract.md): a finished run of
the same config is reported, not recomputed; a run of another config is refused, unchanged;
``--overwrite`` replaces only the files the tool wrote; errors are one line (``--debug`` for the
traceback); Ctrl-C exits 130 and a rerun of ``train`` or ``demo`` resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sam_overparam import __version__
from sam_overparam.train import TOOL
from shin_common import (
    ConfigError,
    CorruptFileError,
    RunDirectory,
    check_output_path,
    config_differences,
    config_to_dict,
    import_pyplot,
    load_config,
    load_json,
    load_torch,
    run_command,
    save_torch_atomic,
    write_json_atomic,
    write_run_record,
)
from shin_common.rundir import MANIFEST_NAME

log = logging.getLogger("sam_overparam.cli")

CONFIG_NAME = "config.json"
MODEL_NAME = "model.pt"
RESULT_NAME = "result.json"
ANALYSIS_NAME = "analysis.json"
DENSITY_PLOT_NAME = "spectral_density.png"
SUMMARY_NAME = "summary.json"


def _config_fields_help() -> str:
    import dataclasses

    from sam_overparam.train import TrainConfig

    defaults = TrainConfig()
    return "\n".join(f"  {f.name}={getattr(defaults, f.name)!r}" for f in dataclasses.fields(TrainConfig))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-overparam", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train one model with SGD or SAM",
        description="Train one model. Overrides are TrainConfig fields (YAML values):\n" + _config_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", type=Path, help="YAML/JSON file with TrainConfig fields")
    train.add_argument("--output-dir", type=Path, required=True, help="where result.json, model.pt go")
    train.add_argument(
        "--overwrite", action="store_true", help="replace a run of this tool in --output-dir (only its files)"
    )
    train.add_argument("overrides", nargs="*", help="TrainConfig overrides, e.g. optimizer=sgd widths=[64,21]")

    analyze = sub.add_parser("analyze", help="Hessian analysis of a model trained with `train`")
    analyze.add_argument("--run-dir", type=Path, required=True, help="output directory of `train`")
    analyze.add_argument("--output-dir", type=Path, help="where analysis.json goes (default: --run-dir)")
    analyze.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier analysis (in --run-dir: only the analysis files, never the trained model)",
    )
    analyze.add_argument("--num-examples", type=int, default=512, help="training examples used (default: 512)")
    analyze.add_argument("--batch-size", type=int, default=128, help="batch size B for E_B[...] (default: 128)")
    analyze.add_argument("--probes", type=int, default=20, help="Hutchinson probes (default: 20)")
    analyze.add_argument("--lanczos-steps", type=int, default=30, help="Lanczos steps (default: 30)")
    analyze.add_argument("--density-probes", type=int, default=2, help="SLQ probes (default: 2)")
    analyze.add_argument("--seed", type=int, default=0, help="probe seed (default: 0)")

    demo = sub.add_parser("demo", help="width sweep SGD vs SAM on mnist1d with a gain plot")
    demo.add_argument("--output-dir", type=Path, required=True, help="where sweep.jsonl, summary.json, plot go")
    demo.add_argument("--widths", type=int, nargs="+", default=[16, 64, 256, 1024], help="first hidden widths")
    demo.add_argument("--seeds", type=int, default=3, help="seeds per width (default: 3)")
    demo.add_argument("--epochs", type=int, default=40, help="epochs per run (default: 40)")
    demo.add_argument("--num-train", type=int, default=4000, help="generated training examples (default: 4000)")
    demo.add_argument("--num-test", type=int, default=4000, help="generated test examples (default: 4000)")
    demo.add_argument("--rho", type=float, default=0.05, help="SAM radius (default: 0.05)")
    demo.add_argument("--label-noise", type=float, default=0.0, help="symmetric label noise (default: 0)")
    demo.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    demo.add_argument(
        "--overwrite", action="store_true", help="replace a demo of this tool in --output-dir (only its files)"
    )
    return parser


def _print_train_summary(config: Any, metrics: dict[str, Any], out: Path, *, reported: bool = False) -> None:
    note = " (finished run found: reported, nothing recomputed)" if reported else ""
    print(
        f"{config.optimizer} {metrics['metric']}: best {metrics['best_test']:.4f} at epoch "
        f"{metrics['best_epoch']}, final {metrics['final_test']:.4f}, {metrics['num_params']} params -> {out}{note}"
    )


def _finished_results(run: RunDirectory) -> dict[str, Any]:
    record = run.results()
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise CorruptFileError(
            run.manifest_path, "it marks the run finished but its results file is missing or has no metrics"
        )
    return record


def _train_command(args: argparse.Namespace) -> int:
    from sam_overparam.train import TrainConfig, train

    # every check (config values, output path, an existing run's config) comes before the first write
    config = load_config(TrainConfig, args.config, args.overrides)
    run = RunDirectory(
        args.output_dir, tool=TOOL, config=config_to_dict(config), overwrite=args.overwrite, command="train"
    )
    if run.finished:
        _print_train_summary(config, _finished_results(run)["metrics"], run.path, reported=True)
        return 0
    resuming = run.resuming
    run.begin()
    if not resuming or not (run.path / CONFIG_NAME).is_file():
        write_json_atomic(run.file(CONFIG_NAME), config_to_dict(config))
    model, metrics = train(config, checkpoint=run.file("checkpoint.pt"))
    save_torch_atomic(model.state_dict(), run.file(MODEL_NAME))
    run.finish(metrics=metrics, config=config, seed=config.seed, name=RESULT_NAME)
    _print_train_summary(config, metrics, run.path)
    return 0


def _analysis_settings(args: argparse.Namespace) -> dict[str, int]:
    """The analyze options that change its results (what identifies an analysis), checked."""
    settings = {
        "num_examples": args.num_examples,
        "batch_size": args.batch_size,
        "probes": args.probes,
        "lanczos_steps": args.lanczos_steps,
        "density_probes": args.density_probes,
    }
    for name, value in settings.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected >= 1")
    return {**settings, "seed": args.seed}


def _finished_train_run(run_dir: Path) -> tuple[RunDirectory, Any]:
    """The finished ``train`` run in ``run_dir`` and its TrainConfig, read from what train wrote.

    The config comes from the run's manifest (written before training started, never changed by
    a refused rerun), and ``config.json`` must agree with it: a run whose files disagree is
    refused rather than analysed at the wrong lr or rho. The RunDirectory is opened with the run's
    own config, so adding analysis files to it goes through the same manifest (attach).
    """
    from sam_overparam.train import TrainConfig

    given = str(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {given!r} does not exist; expected an output directory of `{TOOL} train`"
        )
    manifest_path = run_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(f"run directory {given!r} holds no {TOOL} train run ({MANIFEST_NAME} is missing)")
    manifest = load_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise CorruptFileError(manifest_path, "expected a mapping with the run's config")
    if manifest.get("tool") != TOOL or manifest.get("command") != "train":
        raise ValueError(
            f"run directory {given!r} holds a {manifest.get('tool')} {manifest.get('command')} run; "
            f"expected one of `{TOOL} train`"
        )
    if not manifest.get("finished"):
        raise ValueError(
            f"run directory {given!r} holds an unfinished train run; rerun the same `{TOOL} train` command to finish it"
        )
    stored = manifest["config"]
    try:
        config = load_config(TrainConfig, defaults=stored)
    except ValueError as exc:
        raise CorruptFileError(manifest_path, f"its config is not a valid TrainConfig ({exc})") from exc
    config_path = run_dir / CONFIG_NAME
    if config_path.is_file():
        differing = config_differences(stored, load_json(config_path))
        if differing:
            raise CorruptFileError(
                config_path, f"differs from the config the run was trained with (differing: {', '.join(differing)})"
            )
    run = RunDirectory(run_dir, tool=TOOL, config=stored, command="train")
    return run, config


def _load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_torch(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFileError(path, "expected a model state dict (names to tensors)")
    return state


def _print_analysis(metrics: dict[str, Any], path: Path, *, reported: bool = False) -> None:
    trace = metrics["trace_powers"]["1"]
    print(f"lambda_max {metrics['top_eigenvalues'][0]:.4g}, tr(H) {trace['value']:.4g} +- {trace['stderr']:.2g}")
    for m in metrics["moments"]:
        print(f"  k={m['power']}: tr E[H_B^k] / tr H^k = {m['trace_ratio']:.3f}, top ratio {m['top_ratio']:.3f}")
    for name, value in metrics["stability_lambda_max"].items():
        print(f"  lambda_max E[(I - lr J_B)^2] at {name}: {value:.4f} ({'stable' if value <= 1 else 'unstable'})")
    print(f"-> {path}" + (" (finished analysis found: reported, nothing recomputed)" if reported else ""))


def _analyze_command(args: argparse.Namespace) -> int:
    from sam_overparam import hessian
    from sam_overparam.data import batches
    from sam_overparam.train import _inputs, build_model, load_split, loss_fn_for

    settings = _analysis_settings(args)
    source, config = _finished_train_run(args.run_dir)
    identity = {"train": config_to_dict(config), "analysis": settings}
    attached = args.output_dir is None or check_output_path(args.output_dir) == source.path
    if attached:
        # The analysis joins the train run: its files go into that run's manifest. A previous
        # analysis there with the same settings is reported; other settings need --overwrite,
        # which replaces only the analysis files, never the trained run.
        target = source
        previous = source.path / ANALYSIS_NAME
        if previous.is_file():
            stored = load_json(previous)
            if not isinstance(stored, dict):
                raise CorruptFileError(previous, "expected an analysis record (a JSON mapping)")
            differing = config_differences(stored.get("config"), identity)
            if not differing and not args.overwrite and isinstance(stored.get("metrics"), dict):
                _print_analysis(stored["metrics"], previous, reported=True)
                return 0
            if differing and not args.overwrite:
                raise ValueError(
                    f"run directory {source.given!r} already holds an analysis with other settings "
                    f"(differing: {', '.join(differing)}); pass --overwrite to replace that analysis "
                    "(the trained model is kept) or --output-dir to write this one elsewhere"
                )
    else:
        target = RunDirectory(args.output_dir, tool=TOOL, config=identity, overwrite=args.overwrite, command="analyze")
        if target.finished:
            _print_analysis(_finished_results(target)["metrics"], target.path / ANALYSIS_NAME, reported=True)
            return 0
    plt = import_pyplot()  # optional: without matplotlib the density plot is skipped

    model_path = source.path / MODEL_NAME
    weights = _load_model_weights(model_path)
    split = load_split(config)
    model = build_model(config, split).double()
    try:
        model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in weights.items()})
    except RuntimeError as exc:
        reason = (str(exc).strip().splitlines() or ["RuntimeError"])[0]
        raise CorruptFileError(model_path, f"does not fit the model of the run's config ({reason})") from exc
    model.eval()
    x = _inputs(config, split.x_train[: args.num_examples].double())
    y = split.y_train[: args.num_examples]
    y = y.double() if y.is_floating_point() else y
    operator = hessian.HessianOperator(model, loss_fn_for(config), batches(x, y, args.batch_size, shuffle=False))
    started = time.perf_counter()
    top = hessian.top_eigenvalue_lanczos(
        operator.matvec, operator.dim, steps=args.lanczos_steps, k=3, seed=args.seed, dtype=torch.float64
    )
    powers = hessian.trace_of_powers(operator, (1, 2, 3, 4), num_probes=args.probes, seed=args.seed)
    moments = hessian.moment_nonuniformity(
        operator, (2, 3, 4), num_probes=args.probes, lanczos_steps=args.lanczos_steps, seed=args.seed
    )
    stability = {
        f"rho={rho:g}": hessian.linear_stability(
            operator, lr=config.lr, rho=rho, steps=args.lanczos_steps, seed=args.seed
        )
        for rho in sorted({0.0, config.rho})
    }
    density = hessian.spectral_density(
        operator.matvec,
        operator.dim,
        num_probes=args.density_probes,
        steps=args.lanczos_steps,
        seed=args.seed,
        dtype=torch.float64,
    )
    metrics: dict[str, Any] = {
        "dim": operator.dim,
        "num_examples": len(y),
        "top_eigenvalues": top.tolist(),
        "trace_powers": {str(k): {"value": v.value, "stderr": v.stderr} for k, v in powers.items()},
        "moments": [
            {"power": m.power, "trace_ratio": m.trace_ratio, "top_ratio": m.top_ratio, **m.__dict__} for m in moments
        ],
        "stability_lambda_max": stability,
        "stability_lr": config.lr,
        "stability_rho": config.rho,
        "spectral_density": {
            "nodes": [n.tolist() for n in density.nodes],
            "weights": [w.tolist() for w in density.weights],
        },
        "seconds": time.perf_counter() - started,
    }
    # Nothing is written before the analysis is complete: an interrupted analyze leaves no trace.
    if attached:
        if plt is not None:
            _plot_density(plt, density, target.file(DENSITY_PLOT_NAME))
        write_run_record(target.file(ANALYSIS_NAME), config=identity, metrics=metrics, seed=args.seed, package=TOOL)
    else:
        target.begin()
        if plt is not None:
            _plot_density(plt, density, target.file(DENSITY_PLOT_NAME))
        target.finish(metrics=metrics, config=identity, seed=args.seed, name=ANALYSIS_NAME)
    _print_analysis(metrics, target.path / ANALYSIS_NAME)
    return 0


def _plot_density(plt: Any, density: Any, path: Path) -> None:
    nodes = torch.cat(density.nodes)
    spread = float(nodes.max() - nodes.min()) or 1.0
    grid = torch.linspace(float(nodes.min()) - 0.05 * spread, float(nodes.max()) + 0.05 * spread, 1000)
    values = density.evaluate(grid, sigma=spread / 200)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(grid.numpy(), values.clamp_min(1e-8).numpy())
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo_configs(args: argparse.Namespace) -> list[Any]:
    from sam_overparam.train import TrainConfig

    configs = []
    for width in args.widths:
        for seed in range(args.seeds):
            for optimizer in ("sgd", "sam"):
                configs.append(
                    TrainConfig(
                        widths=[width, max(1, width // 3)],
                        optimizer=optimizer,
                        rho=args.rho,
                        epochs=args.epochs,
                        num_train=args.num_train,
                        num_test=args.num_test,
                        label_noise=args.label_noise,
                        seed=seed,
                    )
                )
    return configs


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


def _plot_gain(plt: Any, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    xs = [r["num_params"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.fill_between(
        xs, [r["gain_points_min"] for r in rows], [r["gain_points_max"] for r in rows], alpha=0.25, label="seed range"
    )
    ax.errorbar(
        xs,
        [r["gain_points_mean"] for r in rows],
        yerr=[r["gain_points_std"] for r in rows],
        marker="o",
        capsize=3,
        label="mean +- std",
    )
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("number of parameters")
    ax.set_ylabel("SAM - SGD best test acc. (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'widths':>12} {'params':>9} {'SGD':>7} {'SAM':>7} {'gain (points)':>22}")
    for r in rows:
        print(
            f"{r['widths']!s:>12} {r['num_params']:>9} {100 * r['sgd_best']:>7.2f} {100 * r['sam_best']:>7.2f} "
            f"{r['gain_points_mean']:>+8.2f} +- {r['gain_points_std']:.2f} [{r['gain_points_min']:+.2f}, {r['gain_points_max']:+.2f}]"
        )


def _demo_command(args: argparse.Namespace) -> int:
    from sam_overparam.train import run_sweep

    if args.quick:
        args.widths, args.seeds, args.epochs, args.num_train, args.num_test = [8, 64], 2, 3, 500, 500
    if args.seeds < 1 or not args.widths or min(args.widths) < 1 or args.epochs < 1:
        raise ConfigError(
            f"demo needs widths >= 1, seeds >= 1, epochs >= 1; got {args.widths}, {args.seeds}, {args.epochs}"
        )
    for flag, value, ok, expected in (
        ("--rho", args.rho, args.rho >= 0, ">= 0"),
        ("--label-noise", args.label_noise, 0 <= args.label_noise <= 1, "in [0, 1]"),
        ("--num-train", args.num_train, args.num_train >= 1, ">= 1"),
        ("--num-test", args.num_test, args.num_test >= 1, ">= 1"),
    ):
        if not ok:
            raise ConfigError(f"{flag} {value!r}: expected {expected}")
    configs = demo_configs(args)  # builds (and so checks) every run's TrainConfig before anything is written
    identity = {
        "widths": args.widths,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "num_train": args.num_train,
        "num_test": args.num_test,
        "rho": args.rho,
        "label_noise": args.label_noise,
    }
    run = RunDirectory(args.output_dir, tool=TOOL, config=identity, overwrite=args.overwrite, command="demo")
    if run.finished:
        record = _finished_results(run)
        _print_rows(record["metrics"]["rows"])
        print(f"finished demo found in {run.path}: reported, nothing recomputed")
        return 0
    plt = import_pyplot()
    run.begin()
    started = time.perf_counter()
    # an interrupted sweep resumes: finished runs are in sweep.jsonl and are not trained again
    records = run_sweep(configs, run.file("sweep.jsonl"))
    wanted = {json.dumps(config_to_dict(c), sort_keys=True) for c in configs}
    records = [r for r in records if json.dumps(r["config"], sort_keys=True) in wanted]
    rows = summarize_sweep(records)
    seconds = time.perf_counter() - started
    title = f"mnist1d MLP, rho={args.rho}, {args.epochs} epochs, {args.seeds} seeds"
    if plt is None:
        log.info("matplotlib not installed (extra 'plot'); skipping the gain plot")
    else:
        _plot_gain(plt, rows, run.file("gain_vs_params.png"), title)
    run.finish(
        metrics={"rows": rows, "seconds": seconds},
        config=identity,
        extra={"plot": plt is not None},
        name=SUMMARY_NAME,
    )
    _print_rows(rows)
    print(f"{len(records)} runs in {seconds:.0f} s -> {run.path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(
        build_parser(),
        {"train": _train_command, "analyze": _analyze_command, "demo": _demo_command},
        argv,
        # train resumes from its checkpoint, demo from its sweep.jsonl
        resumable={"train", "demo"},
    )
