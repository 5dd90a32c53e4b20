"""``sam-overparam`` command line (also ``python -m sam_overparam``).

Commands:

* ``train``   -- one SGD/SAM run from a YAML/JSON config plus ``key=value`` overrides; writes
  ``result.json`` (metrics and provenance), ``model.pt`` and ``config.json``; resumes from its
  per-epoch checkpoint when rerun with the same output directory.
* ``analyze`` -- Hessian analysis of a trained model (top eigenvalue, trace, tr(H^k), moment
  non-uniformity, SAM/SGD linear stability, spectral density).
* ``demo``    -- a small width sweep, SGD against SAM on mnist1d over several seeds, with a plot
  of SAM's gain against the parameter count (Shin et al., Fig. 1, at CPU scale).
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
from shin_common import ConfigError, config_to_dict, load_config, setup_logging, write_run_record

log = logging.getLogger("sam_overparam.cli")


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
    train.add_argument("overrides", nargs="*", help="TrainConfig overrides, e.g. optimizer=sgd widths=[64,21]")

    analyze = sub.add_parser("analyze", help="Hessian analysis of a model trained with `train`")
    analyze.add_argument("--run-dir", type=Path, required=True, help="output directory of `train`")
    analyze.add_argument("--output-dir", type=Path, help="where analysis.json goes (default: --run-dir)")
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
    return parser


def _train_command(args: argparse.Namespace) -> int:
    from sam_overparam.train import TrainConfig, train

    config = load_config(TrainConfig, args.config, args.overrides)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    model, metrics = train(config, checkpoint=out / "checkpoint.pt")
    torch.save(model.state_dict(), out / "model.pt")
    write_run_record(out / "result.json", config=config, metrics=metrics, seed=config.seed)
    print(
        f"{config.optimizer} {metrics['metric']}: best {metrics['best_test']:.4f} at epoch "
        f"{metrics['best_epoch']}, final {metrics['final_test']:.4f}, {metrics['num_params']} params -> {out}"
    )
    return 0


def _analyze_command(args: argparse.Namespace) -> int:
    from sam_overparam import hessian
    from sam_overparam.data import batches
    from sam_overparam.train import TrainConfig, _inputs, build_model, load_split, loss_fn_for

    config = load_config(TrainConfig, args.run_dir / "config.json")
    split = load_split(config)
    model = build_model(config, split).double()
    model.load_state_dict(
        {k: v.double() if v.is_floating_point() else v for k, v in torch.load(args.run_dir / "model.pt").items()}
    )
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
        "spectral_density": {
            "nodes": [n.tolist() for n in density.nodes],
            "weights": [w.tolist() for w in density.weights],
        },
        "seconds": time.perf_counter() - started,
    }
    out = args.output_dir or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(
        out / "analysis.json", config={"train": config, "analysis": vars(args)}, metrics=metrics, seed=args.seed
    )
    _plot_density(density, out / "spectral_density.png")
    print(f"lambda_max {top[0]:.4g}, tr(H) {powers[1].value:.4g} +- {powers[1].stderr:.2g}")
    for m in moments:
        print(f"  k={m.power}: tr E[H_B^k] / tr H^k = {m.trace_ratio:.3f}, top ratio {m.top_ratio:.3f}")
    for name, value in stability.items():
        print(f"  lambda_max E[(I - lr J_B)^2] at {name}: {value:.4f} ({'stable' if value <= 1 else 'unstable'})")
    print(f"-> {out / 'analysis.json'}")
    return 0


def _plot_density(density: Any, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed (extra 'plot'); skipping %s", path)
        return
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


def _plot_gain(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed (extra 'plot'); skipping %s", path)
        return False
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
    return True


def _demo_command(args: argparse.Namespace) -> int:
    from sam_overparam.train import run_sweep

    if args.quick:
        args.widths, args.seeds, args.epochs, args.num_train, args.num_test = [8, 64], 2, 3, 500, 500
    if args.seeds < 1 or not args.widths or min(args.widths) < 1 or args.epochs < 1:
        raise ConfigError(
            f"demo needs widths >= 1, seeds >= 1, epochs >= 1; got {args.widths}, {args.seeds}, {args.epochs}"
        )
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    configs = demo_configs(args)
    records = run_sweep(configs, out / "sweep.jsonl")
    wanted = {json.dumps(config_to_dict(c), sort_keys=True) for c in configs}
    records = [r for r in records if json.dumps(r["config"], sort_keys=True) in wanted]
    rows = summarize_sweep(records)
    seconds = time.perf_counter() - started
    title = f"mnist1d MLP, rho={args.rho}, {args.epochs} epochs, {args.seeds} seeds"
    plotted = _plot_gain(rows, out / "gain_vs_params.png", title)
    write_run_record(
        out / "summary.json", config=vars(args), metrics={"rows": rows, "seconds": seconds}, extra={"plot": plotted}
    )
    print(f"{'widths':>12} {'params':>9} {'SGD':>7} {'SAM':>7} {'gain (points)':>22}")
    for r in rows:
        print(
            f"{r['widths']!s:>12} {r['num_params']:>9} {100 * r['sgd_best']:>7.2f} {100 * r['sam_best']:>7.2f} "
            f"{r['gain_points_mean']:>+8.2f} +- {r['gain_points_std']:.2f} [{r['gain_points_min']:+.2f}, {r['gain_points_max']:+.2f}]"
        )
    print(f"{len(records)} runs in {seconds:.0f} s -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"train": _train_command, "analyze": _analyze_command, "demo": _demo_command}
    try:
        return handlers[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"sam-overparam {args.command}: error: {exc}\n")
    return 1
