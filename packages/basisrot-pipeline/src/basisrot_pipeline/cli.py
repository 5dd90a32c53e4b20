"""``basisrot-pipeline`` command line (also ``python -m basisrot_pipeline``): parses and delegates.

basisrot-pipeline train --stages 8 --optimizer basis-rotation --runtime emulated --output-dir runs/p8
basisrot-pipeline train --config run.yaml --set optim.lr=3e-4 --set model.n_layer=8 --output-dir runs/p8
torchrun --nproc-per-node 4 -m basisrot_pipeline train --stages 4 --runtime distributed --output-dir runs/d4
basisrot-pipeline demo --output-dir outputs/demo
basisrot-pipeline demo --steps 200 --set stages=4 --set seed=1 --output-dir outputs/demo4

`basisrot-pipeline train --help` (and `demo --help`) lists every config key with its default. A rerun with the same
--output-dir resumes an interrupted run and reports a finished one; see docs/run-contract.md
(output directories, resume, errors).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import shin_common
from basisrot_pipeline import __version__
from basisrot_pipeline.experiments import DemoConfig, run_demo
from basisrot_pipeline.optim.factory import OPTIMIZERS
from basisrot_pipeline.staleness import SCHEDULES
from basisrot_pipeline.train import RUNTIMES, TrainConfig, train


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the decoder with a staleness schedule (emulated or distributed)")
    defaults = TrainConfig()
    # Named flags default to None ("not given"): config_from_args then keeps the --config file's value.
    p.add_argument(
        "--stages", type=int, help=f"number of pipeline stages P, at most model.n_layer (Default: {defaults.stages})"
    )
    p.add_argument("--optimizer", help=f"optim.name: one of {', '.join(OPTIMIZERS)} (Default: {defaults.optim.name})")
    p.add_argument(
        "--runtime",
        help=f"one of {', '.join(RUNTIMES)}; distributed: one process per stage (Default: {defaults.runtime})",
    )
    p.add_argument(
        "--schedule",
        help=f"staleness schedule for the emulator: one of {', '.join(SCHEDULES)} (Default: {defaults.schedule})",
    )
    p.add_argument("--steps", type=int, help=f"number of minibatches (Default: {defaults.steps})")
    p.add_argument(
        "--no-weight-stashing",
        dest="weight_stashing",
        action="store_const",
        const=False,
        help="backward with the current weights (weight_stashing=false)",
    )
    shin_common.add_config_options(p, TrainConfig)
    p.add_argument("--output-dir", required=True, help="run record, checkpoints (a rerun resumes from them)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir (only its own files)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="P=8 emulated pipeline: AdamW against basis rotation, loss curves plotted")
    p.add_argument("--output-dir", default="outputs/demo/basisrot-pipeline")
    p.add_argument("--steps", type=int, help=f"minibatches per optimizer (Default: {DemoConfig().steps})")
    shin_common.add_config_options(p, DemoConfig)
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
    """The ``TrainConfig`` of ``train``'s arguments: defaults < --config < named flags < --set."""
    named = {
        "stages": args.stages,
        "optim.name": args.optimizer,
        "runtime": args.runtime,
        "schedule": args.schedule,
        "steps": args.steps,
        "weight_stashing": args.weight_stashing,
    }
    return shin_common.config_from_args(TrainConfig, args, named=named)


def cmd_train(args: argparse.Namespace) -> int:
    metrics = train(config_from_args(args), args.output_dir, overwrite=args.overwrite)
    if metrics:  # empty on the ranks of a launcher's group that do not write the record
        shown = {k: v for k, v in metrics.items() if k != "train_losses"}
        print(json.dumps(shown, indent=2, default=str))
    return 0


def demo_config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The ``DemoConfig`` of ``demo``'s arguments: defaults < --config < --steps < --set."""
    return shin_common.config_from_args(DemoConfig, args, named={"steps": args.steps})


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.output_dir, demo_config_from_args(args), overwrite=args.overwrite)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return shin_common.run_command(
        build_parser(), {"train": cmd_train, "demo": cmd_demo}, argv, resumable={"train", "demo"}
    )
