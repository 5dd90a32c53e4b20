"""``basisrot-pipeline`` command line (also ``python -m basisrot_pipeline``).

basisrot-pipeline train --stages 8 --optimizer basis-rotation --runtime emulated --output-dir runs/p8
torchrun --nproc-per-node 4 -m basisrot_pipeline train --stages 4 --runtime distributed --output-dir runs/d4
basisrot-pipeline demo --output-dir outputs/demo

A rerun with the same --output-dir resumes an interrupted run and reports a finished one; see
docs/run-contract.md (output directories, resume, errors).
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
from basisrot_pipeline.resume import open_run
from basisrot_pipeline.staleness import SCHEDULES
from basisrot_pipeline.train import RECORD, RUNTIMES, TrainConfig, resume_config, run_emulated, train
from shin_common import CorruptFileError, import_pyplot, load_config, load_json, run_command

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
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir (only its own files)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="P=8 emulated pipeline: AdamW against basis rotation, loss curves plotted")
    p.add_argument("--output-dir", default="outputs/demo/basisrot-pipeline")
    p.add_argument("--steps", type=int, default=1000, help="minibatches per optimizer (Default: 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace the demo in --output-dir (only its own files)")


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


DEMO_OPTIMIZERS = ("adamw", "basis-rotation")
DEMO_RECORD = "demo.json"


def _report(name: str, metrics: dict) -> None:
    print(
        f"{name:>15}: final train loss {metrics['final_train_loss']:.3f}  "
        f"val loss {metrics['val_loss']:.3f}  ({metrics['seconds']:.0f} s)"
    )


def run_demo(output_dir: str | Path, steps: int, *, overwrite: bool = False) -> dict:
    """Train AdamW and basis rotation (P=8, emulated) in ``output_dir``; returns the summary in demo.json.

    One run directory: ``adamw/`` and ``basis-rotation/`` hold the two trainings (each resumes from
    its checkpoint, and a finished one is kept), ``demo.json`` finishes it. A rerun of a finished
    demo prints its summary without training.
    """
    configs = {name: demo_config(name, steps) for name in DEMO_OPTIMIZERS}  # refuses bad values before any file
    run = open_run(
        output_dir,
        config={name: resume_config(config) for name, config in configs.items()},
        command="demo",
        overwrite=overwrite,
    )
    if run.finished:
        record = run.results()
        if record is None or not isinstance(record.get("metrics"), dict):
            raise CorruptFileError(run.path / DEMO_RECORD, "the demo is marked finished but its summary is missing")
        print(f"{run.path} holds a finished demo with these settings (pass --overwrite to run it again):")
        for name in DEMO_OPTIMIZERS:
            _report(name, record["metrics"][name])
        return record["metrics"]
    plt = import_pyplot()  # checked before the training: the plot is the last step
    if plt is None:
        print("matplotlib not installed (pip install 'basisrot-pipeline[plot]'): no plot will be written")
    run.begin()
    results = {}
    start = time.perf_counter()
    for optimizer, config in configs.items():
        finished = run.path / optimizer / RECORD  # an interrupted demo keeps the training it finished
        metrics = load_json(finished)["metrics"] if finished.is_file() else run_emulated(config, run, f"{optimizer}/")
        results[optimizer] = metrics
        _report(optimizer, metrics)
    summary = {
        name: {k: m[k] for k in ("final_train_loss", "val_loss", "seconds", "delays")} for name, m in results.items()
    }
    summary["wall_seconds"] = time.perf_counter() - start
    if plt is not None:
        plot = run.file("loss_curves.png")
        _plot(plt, results, plot)
        print(f"plot: {plot}")
    run.finish(metrics=summary, config=run.config, seed=0, name=DEMO_RECORD)
    return summary


def _plot(plt, results: dict, path: Path) -> None:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_train(args: argparse.Namespace) -> int:
    metrics = train(config_from_args(args), args.output_dir, overwrite=args.overwrite)
    if metrics:  # empty on the ranks of a launcher's group that do not write the record
        shown = {k: v for k, v in metrics.items() if k != "train_losses"}
        print(json.dumps(shown, indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.output_dir, args.steps, overwrite=args.overwrite)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), {"train": cmd_train, "demo": cmd_demo}, argv, resumable={"train", "demo"})
