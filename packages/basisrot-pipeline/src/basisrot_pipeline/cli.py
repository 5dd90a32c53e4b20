"""``basisrot-pipeline`` command line (also ``python -m basisrot_pipeline``).

basisrot-pipeline train --stages 8 --optimizer basis-rotation --runtime emulated --output-dir runs/p8
torchrun --nproc-per-node 4 -m basisrot_pipeline train --stages 4 --runtime distributed --output-dir runs/d4
basisrot-pipeline demo --output-dir outputs/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from basisrot_pipeline import __version__
from basisrot_pipeline.optim.factory import OPTIMIZERS
from basisrot_pipeline.staleness import SCHEDULES
from basisrot_pipeline.train import RUNTIMES, TrainConfig, train
from shin_common import ConfigError, load_config, setup_logging, write_json_atomic

logger = logging.getLogger(__name__)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the decoder with a staleness schedule (emulated or distributed)")
    p.add_argument("--config", help="YAML/JSON file with TrainConfig fields")
    p.add_argument("--stages", type=int, help="number of pipeline stages P (at most model.n_layer)")
    p.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS)}")
    p.add_argument("--runtime", help=f"one of {', '.join(RUNTIMES)} (distributed: one process per stage)")
    p.add_argument("--schedule", help=f"staleness schedule for the emulator: one of {', '.join(SCHEDULES)}")
    p.add_argument("--steps", type=int, help="number of minibatches")
    p.add_argument("--no-weight-stashing", action="store_true", help="backward with the current weights")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set optim.lr=3e-4 --set model.n_layer=8",
    )
    p.add_argument("--output-dir", required=True, help="run record, checkpoints (a rerun resumes from them)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="P=8 emulated pipeline: AdamW against basis rotation, loss curves plotted")
    p.add_argument("--output-dir", default="outputs/demo/basisrot-pipeline")
    p.add_argument("--steps", type=int, default=1000, help="minibatches per optimizer (Default: 1000)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="basisrot-pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_demo(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = []
    for flag, key in (
        ("stages", "stages"),
        ("optimizer", "optim.name"),
        ("runtime", "runtime"),
        ("schedule", "schedule"),
        ("steps", "steps"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_weight_stashing:
        overrides.append("weight_stashing=false")
    return load_config(TrainConfig, args.config, [*overrides, *args.set])


def demo_config(optimizer: str, steps: int) -> TrainConfig:
    return load_config(
        TrainConfig,
        overrides=[
            "stages=8",
            "model.n_layer=8",
            "model.n_embd=64",
            "model.n_head=4",
            "model.block_size=64",
            "batch_size=16",
            f"steps={steps}",
            f"optim.name={optimizer}",
            "optim.lr=3e-3",
            f"optim.warmup_steps={max(1, steps // 20)}",
            "checkpoint_every=100",
            "eval_batches=8",
        ],
    )


def run_demo(output_dir: Path, steps: int) -> dict:
    results = {}
    start = time.perf_counter()
    for optimizer in ("adamw", "basis-rotation"):
        metrics = train(demo_config(optimizer, steps), output_dir / optimizer)
        results[optimizer] = metrics
        print(
            f"{optimizer:>15}: final train loss {metrics['final_train_loss']:.3f}  "
            f"val loss {metrics['val_loss']:.3f}  ({metrics['seconds']:.0f} s)"
        )
    summary = {
        name: {k: m[k] for k in ("final_train_loss", "val_loss", "seconds", "delays")} for name, m in results.items()
    }
    summary["wall_seconds"] = time.perf_counter() - start
    write_json_atomic(output_dir / "demo.json", summary)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'basisrot-pipeline[plot]'): no plot written")
        return summary
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, metrics in results.items():
        losses = metrics["train_losses"]
        window = 10
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(smooth, label=f"{name} (val {metrics['val_loss']:.3f})")
    ax.set_xlabel("minibatch")
    ax.set_ylabel("train loss (nats/byte, 10-step mean)")
    ax.set_title("Asynchronous 1F1B, P=8 (emulated), stdlib bytes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "loss_curves.png", dpi=120)
    plt.close(fig)
    print(f"plot: {output_dir / 'loss_curves.png'}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "train":
            config = config_from_args(args)
            metrics = train(config, args.output_dir)
            if metrics:
                shown = {k: v for k, v in metrics.items() if k != "train_losses"}
                print(json.dumps(shown, indent=2, default=str))
        elif args.command == "demo":
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            run_demo(out, args.steps)
    except (ConfigError, ValueError) as error:
        parser.exit(2, f"basisrot-pipeline: error: {error}\n")
    return 0
