"""``cbm-intervene`` command line (also ``python -m cbm_intervene``).

  cbm-intervene train --output-dir runs/ind --set train.strategy=IND --set data.noise_std=1.0
  cbm-intervene intervene --predictions runs/ind/predictions.pt --output-dir runs/ind/tti
  cbm-intervene demo --output-dir outputs/demo

Every command takes ``--config FILE`` (YAML/JSON) and ``--set key=value`` for any key of its
config (``COMMAND --help`` lists them with their defaults), plus flags for the commonest keys.
Each writes its own output directory under the toolkit's run contract (docs/run-contract.md),
with its record in ``results.json``: a finished run of the same config is reported, not
recomputed; a run of another config is refused (pass --overwrite to replace it); an interrupted
run is resumed by running the same command again. Errors are one line; --debug shows the traceback.

Log level from SHIN_LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cbm_intervene import __version__
from cbm_intervene.config import PAPER_CRITERIA, TRUE_CONCEPTS, DemoConfig, InterveneRunConfig, TrainRunConfig
from cbm_intervene.experiments import demo_run, intervene_run, train_run
from cbm_intervene.intervention import (
    CONCEPTUALIZATIONS,
    GROUP_SCORES,
    LEVELS,
    NOT_VISIBLE,
    ORDERINGS,
    REPLACEMENT_SOURCES,
    REPLACEMENTS,
    available_criteria,
)
from cbm_intervene.metrics import METRICS
from cbm_intervene.models import STRATEGIES
from shin_common import add_config_options, config_from_args, run_command


def _add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run of another config in --output-dir (deletes only the files this tool wrote there)",
    )


def _add_intervene_flags(p: argparse.ArgumentParser) -> None:
    """Flags for the commonest keys of :class:`InterveneRunConfig`; each defaults to None (not given)
    so that --config and the config's own default show through; the help says the real default."""
    p.add_argument(
        "--predictions", nargs="+", help=".pt/.npz predictions files with a target model (one per model seed)"
    )
    p.add_argument("--true-concepts", choices=TRUE_CONCEPTS, help="which labels intervention reveals (default: class)")
    p.add_argument(
        "--criteria",
        nargs="+",
        help=f"criteria to evaluate (default: {' '.join(PAPER_CRITERIA)}, LCP only with --allow-oracle; "
        f"registered: {available_criteria()})",
    )
    p.add_argument(
        "--allow-oracle",
        action="store_true",
        help="run criteria that read the true concepts (LCP): an oracle reference, not a practical criterion",
    )
    # choices are matched case-insensitively, as InterventionConfig matches them
    p.add_argument(
        "--levels", nargs="+", type=str.upper, choices=LEVELS, help="levels (default: all the predictions support)"
    )
    p.add_argument(
        "--ordering", type=str.lower, choices=ORDERINGS, help="static (paper) or adaptive re-scoring (default: static)"
    )
    p.add_argument(
        "--group-score",
        type=str.lower,
        choices=GROUP_SCORES,
        help="a group's score from its members': mean (of squared UCP/LCP scores, as the authors' code), "
        "mean_unsquared or max (default: mean)",
    )
    p.add_argument(
        "--conceptualization",
        type=str.lower,
        choices=CONCEPTUALIZATIONS,
        help="test-time bottleneck (default: soft)",
    )
    p.add_argument("--n-samples", type=int, help="Bernoulli samples for --conceptualization samp (default: 16)")
    p.add_argument(
        "--not-visible",
        type=str.lower,
        choices=NOT_VISIBLE,
        help="revealed not-visible concepts: keep (as the authors ran), nullify (a pitfall) or skip (default: keep)",
    )
    p.add_argument(
        "--replacement-source",
        type=str.lower,
        choices=REPLACEMENT_SOURCES,
        help="logit percentiles from (default: train)",
    )
    p.add_argument(
        "--replacement",
        type=str.lower,
        choices=REPLACEMENTS,
        help="revealed logits: percentile (the authors' 5th/95th) or sign_median (median on each side of 0; "
        "default: percentile)",
    )
    p.add_argument(
        "--metric",
        type=str.lower,
        choices=METRICS,
        help="error or balanced_error (default: the metric the predictions file declares, e.g. balanced_error "
        "for SkinCon, else error)",
    )
    p.add_argument("--max-steps", type=int, help="stop after this many steps (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds for random criteria (default: 0 1 2)")
    p.add_argument("--tau-i", type=float, help="expert cost per revealed concept (default: 1)")
    p.add_argument("--tau-g", type=float, help="expert cost per revealed group (default: 1)")
    p.add_argument("--tau-f", type=float, help="machine cost per forward pass of f (default: 0)")
    p.add_argument("--budgets", nargs="*", type=float, help="concepts per sample to report error at (default: 5 10 20)")
    p.add_argument("--target-error", type=float, help="report concepts needed to reach this error (default: none)")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib figures")


INTERVENE_FLAGS = (
    "predictions",
    "true_concepts",
    "criteria",
    "levels",
    "ordering",
    "group_score",
    "conceptualization",
    "n_samples",
    "not_visible",
    "replacement_source",
    "replacement",
    "metric",
    "max_steps",
    "seeds",
    "tau_i",
    "tau_g",
    "tau_f",
    "budgets",
    "target_error",
)


def _add_demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--strategies", nargs="+", type=str.upper, choices=STRATEGIES, help="training strategies (default: IND SEQ JNT)"
    )
    p.add_argument(
        "--noise-std", type=float, help="input noise; the paper generator's default 2.0 is much harder (default: 1.0)"
    )
    p.add_argument("--ordering", type=str.lower, choices=ORDERINGS, help="static or adaptive (default: static)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds for RAND (default: 0 1 2)")
    p.add_argument("--seed", type=int, help="data and training seed (default: 0)")
    p.add_argument("--target-error", type=float, help="report concepts needed to reach this error (default: 0.05)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (seconds), for smoke tests")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib figures")


DEMO_FLAGS = ("strategies", "noise_std", "ordering", "seeds", "seed", "target_error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbm-intervene", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="generate synthetic data, train a CBM, save checkpoints and test predictions")
    train.add_argument("--output-dir", required=True, help="where checkpoints, predictions.pt and results.json go")
    add_config_options(train, TrainRunConfig)
    _add_overwrite_option(train)

    intervene = sub.add_parser(
        "intervene",
        help="evaluate criteria x levels on saved predictions (finished cells are kept in OUTPUT_DIR/cells.jsonl "
        "and reused when the same command runs again on unchanged predictions files)",
    )
    intervene.add_argument("--output-dir", required=True, help="where results.json and plots go")
    add_config_options(intervene, InterveneRunConfig)
    _add_intervene_flags(intervene)
    _add_overwrite_option(intervene)

    demo = sub.add_parser("demo", help="synthetic data; IND, SEQ, JNT; every criterion at every level; plots")
    demo.add_argument("--output-dir", required=True, help="where results.json, predictions and plots go")
    add_config_options(demo, DemoConfig)
    _add_demo_flags(demo)
    _add_overwrite_option(demo)
    return parser


def _switch(given: bool, value: bool) -> bool | None:
    """A store_true flag as a named config value: ``value`` when given, else None (not given)."""
    return value if given else None


def cmd_train(args: argparse.Namespace) -> int:
    return train_run(config_from_args(TrainRunConfig, args), args.output_dir, overwrite=args.overwrite)


def cmd_intervene(args: argparse.Namespace) -> int:
    named = {key: getattr(args, key) for key in INTERVENE_FLAGS} | {
        "plot": _switch(args.no_plot, False),
        "allow_oracle": _switch(args.allow_oracle, True),
    }
    config = config_from_args(InterveneRunConfig, args, named=named)
    return intervene_run(config, args.output_dir, overwrite=args.overwrite)


def cmd_demo(args: argparse.Namespace) -> int:
    named = {key: getattr(args, key) for key in DEMO_FLAGS}
    named |= {"quick": _switch(args.quick, True), "plot": _switch(args.no_plot, False)}
    config = config_from_args(DemoConfig, args, named=named)
    return demo_run(config, args.output_dir, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(
        build_parser(),
        {"train": cmd_train, "intervene": cmd_intervene, "demo": cmd_demo},
        argv,
        resumable={"train", "intervene", "demo"},
    )
