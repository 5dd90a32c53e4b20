"""``recon-prune`` command line (also ``python -m recon_prune``).

    recon-prune prune --model stdlib-tiny --method sparsegpt --sparsity 0.5 --reconstruction br+gp --output-dir out/
    recon-prune prune --model stdlib-tiny --config prune.yaml --set epochs=1 --output-dir out/
    recon-prune eval --model out/model --dataset stdlib
    recon-prune generate-calibration --model stdlib-tiny --count 16 --seq-len 256 --output gen.jsonl
    recon-prune demo --output-dir out/demo

``--model`` takes ``stdlib-tiny`` (the embedded model, pretrained and cached on first use), a local
directory or a Hugging Face Hub name. Every command reads its config (:class:`recon_prune.config.PruneConfig`,
``EvalConfig``, ``GenerateConfig``, ``DemoConfig``) from ``--config FILE.yaml`` and ``--set key=value``;
the commonest keys have their own flags (``recon-prune COMMAND --help`` lists every key). This module only parses: the work is in
:mod:`recon_prune.runs` and the demo in :mod:`recon_prune.experiments`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from recon_prune import __version__
from recon_prune.config import PRESETS, DemoConfig, EvalConfig, GenerateConfig, PruneConfig
from recon_prune.methods import MASK_METHODS, RECONSTRUCTIONS
from shin_common import add_config_options, run_command

_CHUNKS_HELP = (
    "evaluate at most this many chunks (default: the whole wikitext2 test set or file, 256 chunks of c4 as in "
    "SparseGPT/Wanda, 64 of the stdlib test split)"
)
_EVAL_SEQ_HELP = (
    "perplexity chunk length in tokens (default: the model's recorded pretraining window, else its context "
    "length capped at 4096)"
)


def _add_prune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="stdlib-tiny", help="stdlib-tiny, a local directory or a Hub name (default: stdlib-tiny)"
    )
    add_config_options(parser, PruneConfig)  # --config FILE, --set KEY=VALUE and the keys in --help
    parser.add_argument("--method", help=f"mask method: {', '.join(MASK_METHODS)} (default: sparsegpt)")
    parser.add_argument("--sparsity", type=float, help="fraction of weights pruned, in [0, 1) (default: 0.5)")
    parser.add_argument("--pattern", help="'unstructured' or N:M such as 2:4 (default: unstructured)")
    parser.add_argument("--reconstruction", help=f"{', '.join(RECONSTRUCTIONS)}, or 'cr' = br+cr (default: br+gp)")
    parser.add_argument("--preset", help=f"reconstruction preset, one of {', '.join(PRESETS)} (default: cpu)")
    parser.add_argument("--nsamples", type=int, help="real calibration samples (default: from the preset)")
    parser.add_argument("--seq-len", type=int, help="calibration sequence length in tokens (default: from the preset)")
    parser.add_argument("--epochs", type=int, help="reconstruction epochs (default: from the preset)")
    parser.add_argument("--seed", type=int, help="seed (default: 0)")
    parser.add_argument("--device", help="compute device: auto, cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--offload-device", help="where activations and idle blocks live (default: cpu)")
    parser.add_argument("--dtype", help="dtype of the saved model: auto, float32, bfloat16, float16 (default: auto)")
    parser.add_argument("--lr", type=float, help="reconstruction learning rate (default: from the preset)")
    parser.add_argument(
        "--calibration",
        default="stdlib",
        help="source or mixture by count: stdlib, wikitext2, c4, ptb, file:PATH, self; e.g. 'stdlib:48,self:16' (default: stdlib)",
    )
    parser.add_argument(
        "--self-generated", type=int, default=0, help="extra self-generated samples for reconstruction (default: 0)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recon-prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    prune = sub.add_parser("prune", help="prune a causal LM and save it with masks and a results JSON")
    _add_prune_options(prune)
    prune.add_argument("--output-dir", type=Path, required=True, help="where the pruned model and results go")
    prune.add_argument(
        "--overwrite", action="store_true", help="replace the run in the output directory (only the files it wrote)"
    )
    prune.add_argument("--checkpoint-dir", type=Path, help="resume a killed run from here (per-block checkpoints)")
    prune.add_argument(
        "--eval", default="stdlib", help="held-out text for perplexity: stdlib, wikitext2, c4, ptb, file:PATH or none"
    )
    prune.add_argument("--eval-chunks", type=int, help=_CHUNKS_HELP)
    prune.add_argument("--eval-seq-len", type=int, help=_EVAL_SEQ_HELP)

    ev = sub.add_parser("eval", help="perplexity (and optional zero-shot tasks) of a model")
    ev.add_argument("--model", default="stdlib-tiny", help="stdlib-tiny, a local directory or a Hub name")
    add_config_options(ev, EvalConfig)
    ev.add_argument("--dataset", help="stdlib (test split), wikitext2, c4, ptb, or file:PATH (default: stdlib)")
    ev.add_argument("--seq-len", type=int, help=_EVAL_SEQ_HELP)
    ev.add_argument("--max-chunks", type=int, help=_CHUNKS_HELP)
    ev.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (needs the lm-eval extra and network)")
    ev.add_argument("--output", type=Path, help="write the results JSON here")

    gen = sub.add_parser("generate-calibration", help="self-generate calibration text with a dense model (JSONL)")
    gen.add_argument("--model", default="stdlib-tiny", help="stdlib-tiny, a local directory or a Hub name")
    add_config_options(gen, GenerateConfig)
    gen.add_argument("--output", type=Path, required=True, help="JSONL file to write (one {'text': ...} per line)")
    gen.add_argument("--count", type=int, help="number of sequences (default: 16)")
    gen.add_argument("--seq-len", type=int, help="tokens per sequence (default: 256)")
    gen.add_argument("--seed", type=int, help="seed (default: 0)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    demo = sub.add_parser(
        "demo", help="prune stdlib-tiny to 50%% with SparseGPT and Wanda under none/LR/BR/BR+GP/BR+GP+CR"
    )
    add_config_options(demo, DemoConfig)
    demo.add_argument("--output-dir", type=Path, required=True, help="where the table, results JSON and plot go")
    demo.add_argument(
        "--overwrite", action="store_true", help="replace the run in the output directory (only the files it wrote)"
    )
    demo.add_argument("--model", default="stdlib-tiny", help=argparse.SUPPRESS)
    demo.add_argument("--nsamples", type=int, help="calibration samples (default: 32)")
    demo.add_argument("--seq-len", type=int, help="calibration sequence length (default: 256)")
    demo.add_argument("--eval-chunks", type=int, help="held-out chunks of 256 bytes (default: 64)")
    demo.add_argument(
        "--self-generated",
        type=int,
        help="add a SparseGPT BR+GP+CR run with this many self-generated samples; 0 skips it (default: 32)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from recon_prune import experiments, runs

    # A prune run with --checkpoint-dir continues where it stopped when rerun; only then does the
    # Ctrl-C line say so (the runner reads this set when the interrupt arrives).
    resumable: set[str] = set()

    def prune_command(args: argparse.Namespace) -> int:
        if args.checkpoint_dir is not None:
            resumable.add("prune")
        return runs.run_prune(args)

    handlers = {
        "prune": prune_command,
        "eval": runs.run_eval,
        "generate-calibration": runs.run_generate,
        "demo": experiments.run_demo,
    }
    return run_command(build_parser(), handlers, argv, resumable=resumable)
