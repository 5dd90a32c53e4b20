"""What each ``recon-prune`` command does once its arguments are parsed: prune and save, evaluate,
generate calibration text; and the policies they share (sequence lengths, held-out perplexity).

Everything that can be checked without the model is checked first, the output directory included,
so a bad value costs a second rather than a model load and a pruning run. torch and transformers
are imported inside the functions that need them, so ``recon-prune --help`` and early refusals stay
fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import shin_common
from recon_prune import outputs
from recon_prune.config import EvalConfig, GenerateConfig, PruneConfig
from recon_prune.model_source import resolve_model_source
from recon_prune.outputs import TOOL, check_output_file
from recon_prune.plots import block_error_title
from shin_common import (
    CorruptFileError,
    RunDirectory,
    check_output_path,
    config_to_dict,
    load_json,
    require_extra,
    write_run_record,
)
from shin_common.files import write_text_atomic

log = logging.getLogger(__name__)

# PruneConfig keys that have their own flag on ``recon-prune prune`` (the rest through --set).
NAMED_FLAGS = (
    "method",
    "sparsity",
    "pattern",
    "reconstruction",
    "preset",
    "nsamples",
    "seq_len",
    "epochs",
    "seed",
    "device",
    "offload_device",
    "dtype",
    "lr",
)


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """Defaults < ``--config`` < the named flags given < ``--set`` (a key given twice is refused)."""
    return shin_common.config_from_args(PruneConfig, args, named={key: getattr(args, key) for key in NAMED_FLAGS})


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    """``recon-prune eval``'s config, by the same grammar as :func:`config_from_args`."""
    tasks = tuple(args.tasks.split(",")) if args.tasks is not None else None
    named = {"dataset": args.dataset, "seq_len": args.seq_len, "max_chunks": args.max_chunks, "tasks": tasks}
    return shin_common.config_from_args(EvalConfig, args, named=named)


def generate_config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """``recon-prune generate-calibration``'s config, by the same grammar as :func:`config_from_args`."""
    named = {"count": args.count, "seq_len": args.seq_len, "seed": args.seed}
    return shin_common.config_from_args(GenerateConfig, args, named=named)


def load_model(model_name: str) -> tuple[Any, Any]:
    from recon_prune.tiny_model import load_model_and_tokenizer

    return load_model_and_tokenizer(model_name)


def _sparsity_label(config: PruneConfig) -> str:
    shape = config.pattern if config.nm is not None else "unstructured"
    return f"{config.method} {100 * config.sparsity:g}% {shape}, {config.reconstruction}"


_HELDOUT: list[tuple[str, Any, Any]] = []  # (source, tokenizer, ids): the tokenizer is held, so identity is safe


def heldout_perplexity(model: Any, tokenizer: Any, source: str, seq_len: int, max_chunks: int | None) -> dict[str, Any]:
    from recon_prune.evaluate import heldout_ids, perplexity

    if not _HELDOUT or _HELDOUT[0][0] != source or _HELDOUT[0][1] is not tokenizer:  # tokenize once per command
        _HELDOUT[:] = [(source, tokenizer, heldout_ids(source, tokenizer))]
    result = perplexity(model, _HELDOUT[0][2], seq_len=seq_len, max_chunks=max_chunks)
    result["dataset"] = source
    return result


def check_positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value}")


def check_count(value: int | None, flag: str) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be 0 or a positive integer, got {value}")


def eval_settings(
    model: Any, source: str, seq_len: int | None, chunks: int | None, *, seq_flag: str, chunks_flag: str
) -> tuple[int, int | None]:
    """Chunk length and count for perplexity, checked against the model before any work."""
    from recon_prune.evaluate import default_eval_chunks, default_eval_seq_len
    from recon_prune.model_adapter import max_positions

    check_positive(chunks, chunks_flag)
    if seq_len is not None and seq_len < 2:
        raise ValueError(f"{seq_flag} must be at least 2 tokens, got {seq_len}")
    limit = max_positions(model)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise ValueError(f"{seq_flag} {seq_len} exceeds the model's context of {limit} positions")
    return seq_len or default_eval_seq_len(model), chunks if chunks is not None else default_eval_chunks(source)


def calibration_seq_len(model: Any, config: PruneConfig) -> int:
    """An explicit seq_len must fit the context; the preset's is capped by the pretraining window and context."""
    from recon_prune.evaluate import trained_seq_len
    from recon_prune.model_adapter import max_positions

    limit = max_positions(model)
    if config.seq_len is not None:
        if limit is not None and config.seq_len > limit:
            raise ValueError(
                f"seq_len {config.seq_len} (--seq-len, or seq_len in --config/--set) exceeds the model's context "
                f"of {limit} positions"
            )
        return config.seq_len
    caps = [c for c in (trained_seq_len(model), limit) if c is not None]
    seq_len = min([config.resolved_seq_len(), *caps])
    if seq_len != config.resolved_seq_len():
        log.info(
            "calibration length %d (the %s preset's %d, capped by the model)",
            seq_len,
            config.preset,
            config.resolved_seq_len(),
        )
    return seq_len


def check_checkpoint_dir(path: Path | None, output_dir: Path) -> None:
    """A usable --checkpoint-dir whose state (if any) reads, checked before the model is loaded."""
    if path is None:
        return
    target = check_output_path(path)
    if target == output_dir.expanduser().resolve() or target.is_relative_to(output_dir.expanduser().resolve()):
        # The output directory holds only files of its run: checkpoints there would block the rerun.
        raise ValueError(
            f"--checkpoint-dir {str(path)!r} lies inside --output-dir {str(output_dir)!r}; choose a directory outside it"
        )
    state_file = target / "state.json"
    if state_file.is_file() and not isinstance(load_json(state_file), dict):
        raise CorruptFileError(state_file, "expected a JSON object")


def prune_identity(args: argparse.Namespace, config: PruneConfig, model: str) -> dict[str, Any]:
    """What makes two prune runs the same run (not where their outputs or checkpoints go)."""
    return {
        "model": model,
        "prune": config_to_dict(config),
        "calibration": args.calibration,
        "self_generated": args.self_generated,
        "eval": args.eval,
        "eval_chunks": args.eval_chunks,
        "eval_seq_len": args.eval_seq_len,
    }


def report_finished(run: RunDirectory, command: str) -> int:
    """Print the results of the finished run already in the output directory (nothing is recomputed)."""
    metrics = (run.results() or {}).get("metrics", {})
    print(f"{run.given} already holds this finished {command} run; pass --overwrite to run it again")
    if command == "prune":
        for key in ("dense", "pruned"):
            if isinstance(metrics.get(key), dict) and "perplexity" in metrics[key]:
                print(f"{key} perplexity ({metrics[key].get('dataset')}): {metrics[key]['perplexity']:.3f}")
        if "sparsity" in metrics:
            print(f"sparsity {metrics['sparsity']:.4f}; final-block error {metrics.get('final_block_error')}")
    else:
        table = run.path / "demo_table.md"
        print(table.read_text(encoding="utf-8") if table.is_file() else json.dumps(metrics, indent=2))
    return 0


def run_prune(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first, the output directory
    # included, so a bad value costs a second rather than a model load and a pruning run.
    config = config_from_args(args)  # also checks that the devices exist
    check_count(args.self_generated, "--self-generated")
    check_positive(args.eval_chunks, "--eval-chunks")
    if args.eval_seq_len is not None and args.eval_seq_len < 2:
        raise ValueError(f"--eval-seq-len must be at least 2 tokens, got {args.eval_seq_len}")
    model_source = resolve_model_source(args.model)
    check_checkpoint_dir(args.checkpoint_dir, args.output_dir)
    run = RunDirectory(
        args.output_dir,
        tool=TOOL,
        config=prune_identity(args, config, model_source),
        overwrite=args.overwrite,
        command="prune",
    )
    if run.finished:
        return report_finished(run, "prune")

    from recon_prune.calibration import build_calibration
    from recon_prune.driver import prune
    from recon_prune.validation import check_model_and_calibration, check_structure

    model, tokenizer = load_model(args.model)
    check_structure(model, config)  # unsupported model or N:M mismatch: fail before any work
    seq_len = calibration_seq_len(model, config)
    if args.eval != "none":
        eval_len, eval_chunks = eval_settings(
            model,
            args.eval,
            args.eval_seq_len,
            args.eval_chunks,
            seq_flag="--eval-seq-len",
            chunks_flag="--eval-chunks",
        )
    calibration = build_calibration(
        args.calibration,
        tokenizer=tokenizer,
        nsamples=config.resolved_nsamples(),
        seq_len=seq_len,
        seed=config.seed,
        model=model,
        generated=args.self_generated,
    )
    # the recorded config states the calibration actually built (a mixture sets its own counts)
    config = dataclasses.replace(config, nsamples=calibration.num_real, seq_len=calibration.seq_len)
    check_model_and_calibration(model, calibration, config)  # e.g. token ids outside the vocabulary
    metrics: dict[str, Any] = {}
    if args.eval != "none":
        metrics["dense"] = heldout_perplexity(model, tokenizer, args.eval, eval_len, eval_chunks)
        print(f"dense perplexity ({args.eval}): {metrics['dense']['perplexity']:.3f}")
    report = prune(model, calibration, config, checkpoint_dir=args.checkpoint_dir)
    if args.eval != "none":
        metrics["pruned"] = heldout_perplexity(model, tokenizer, args.eval, eval_len, eval_chunks)
        print(f"pruned perplexity ({args.eval}): {metrics['pruned']['perplexity']:.3f}")
    metrics["final_block_error"] = report.final_block_error
    metrics["sparsity"] = report.sparsity["overall"]
    title = block_error_title(args.model, _sparsity_label(config), args.calibration)
    outputs.save_pruned(
        run, model, tokenizer, report, metrics=metrics, config=config, seed=config.seed, plot_title=title
    )
    print(
        f"sparsity {report.sparsity['overall']:.4f}; final-block error {report.final_block_error:.4g}; "
        f"saved to {args.output_dir}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    config = eval_config_from_args(args)
    if config.tasks:  # before the model is loaded and perplexity computed, not after
        require_extra("lm_eval", install="recon-prune[lm-eval]", purpose="--tasks")
    if args.output is not None:
        check_output_file(args.output, "--output")
    resolve_model_source(args.model)

    from recon_prune.evaluate import sparsity_report, zero_shot

    model, tokenizer = load_model(args.model)
    seq_len, max_chunks = eval_settings(
        model, config.dataset, config.seq_len, config.max_chunks, seq_flag="--seq-len", chunks_flag="--max-chunks"
    )
    result: dict[str, Any] = {"perplexity": heldout_perplexity(model, tokenizer, config.dataset, seq_len, max_chunks)}
    result["sparsity"] = sparsity_report(model)
    if config.tasks:
        result["zero_shot"] = zero_shot(model, tokenizer, list(config.tasks))
    print(
        f"{args.model}: perplexity {result['perplexity']['perplexity']:.4f} on {config.dataset} "
        f"({result['perplexity']['chunks']} chunks of {seq_len}); sparsity {result['sparsity']['overall']:.4f}"
    )
    if args.output is not None:
        record = {"model": args.model, **config_to_dict(config)}
        write_run_record(args.output, config=record, metrics=result, package=TOOL)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    config = generate_config_from_args(args)
    check_output_file(args.output, "--output")  # a directory is refused even with --overwrite
    if args.output.exists() and not args.overwrite:
        raise ValueError(f"output file {str(args.output)!r} exists; pass --overwrite to replace it")
    resolve_model_source(args.model)

    from recon_prune.calibration import decode, generate_self_calibration

    model, tokenizer = load_model(args.model)
    generated = generate_self_calibration(model, tokenizer, config.count, config.seq_len, seed=config.seed)
    lines = [json.dumps({"text": decode(tokenizer, row), "token_ids": row}) + "\n" for row in generated.ids.tolist()]
    write_text_atomic(args.output, "".join(lines))
    recipe = generated.recipe
    print(
        f"wrote {recipe['kept']} self-generated sequences of {config.seq_len} tokens to {args.output} "
        f"({recipe['generated']} texts sampled up to {recipe['max_length_used']} tokens, "
        f"{recipe['prefixes_rejected']} prefixes rejected by the {recipe['language_filter']} filter, "
        f"{recipe['dropped_short']} texts shorter than {config.seq_len} tokens dropped)"
    )
    return 0
