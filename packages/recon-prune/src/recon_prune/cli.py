"""``recon-prune`` command line (also ``python -m recon_prune``).

    recon-prune prune --model stdlib-tiny --method sparsegpt --sparsity 0.5 --reconstruction br+gp --output-dir out/
    recon-prune eval --model out/model --dataset stdlib
    recon-prune generate-calibration --model stdlib-tiny --count 16 --seq-len 256 --output gen.jsonl
    recon-prune demo --output-dir out/demo

``--model`` takes ``stdlib-tiny`` (the embedded model, pretrained and cached on first use), a local
directory or a Hugging Face Hub name. Config values can also come from ``--config FILE.yaml`` and
``--set key=value`` (fields of :class:`recon_prune.config.PruneConfig`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recon_prune import __version__
from recon_prune.config import METHODS, PRESETS, RECONSTRUCTIONS, PruneConfig
from recon_prune.model_source import resolve_model_source
from recon_prune.outputs import TOOL, check_output_file
from shin_common import (
    CorruptFileError,
    RunDirectory,
    check_output_path,
    config_to_dict,
    load_config,
    load_json,
    require_extra,
    run_command,
    write_run_record,
)

log = logging.getLogger(__name__)

DEMO_RECONSTRUCTIONS = ("none", "lr", "br", "br+gp", "br+gp+cr")
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
    parser.add_argument("--config", type=Path, help="YAML/JSON file with PruneConfig fields")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a PruneConfig field"
    )
    parser.add_argument("--method", help=f"one of {', '.join(METHODS)} (default: sparsegpt)")
    parser.add_argument("--sparsity", type=float, help="fraction of weights pruned, in [0, 1) (default: 0.5)")
    parser.add_argument("--pattern", help="'unstructured' or N:M such as 2:4 (default: unstructured)")
    parser.add_argument("--reconstruction", help=f"one of {', '.join(RECONSTRUCTIONS)}, or 'cr' (default: br+gp)")
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
        help="source or mixture by count: stdlib, wikitext2, c4, file:PATH, self; e.g. 'stdlib:48,self:16' (default: stdlib)",
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
        "--eval", default="stdlib", help="held-out text for perplexity: stdlib, wikitext2, c4, file:PATH or none"
    )
    prune.add_argument("--eval-chunks", type=int, help=_CHUNKS_HELP)
    prune.add_argument("--eval-seq-len", type=int, help=_EVAL_SEQ_HELP)

    ev = sub.add_parser("eval", help="perplexity (and optional zero-shot tasks) of a model")
    ev.add_argument("--model", default="stdlib-tiny", help="stdlib-tiny, a local directory or a Hub name")
    ev.add_argument(
        "--dataset", default="stdlib", help="stdlib (test split), wikitext2, c4, or file:PATH (default: stdlib)"
    )
    ev.add_argument("--seq-len", type=int, help=_EVAL_SEQ_HELP)
    ev.add_argument("--max-chunks", type=int, help=_CHUNKS_HELP)
    ev.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (needs the lm-eval extra and network)")
    ev.add_argument("--output", type=Path, help="write the results JSON here")

    gen = sub.add_parser("generate-calibration", help="self-generate calibration text with a dense model (JSONL)")
    gen.add_argument("--model", default="stdlib-tiny", help="stdlib-tiny, a local directory or a Hub name")
    gen.add_argument("--output", type=Path, required=True, help="JSONL file to write (one {'text': ...} per line)")
    gen.add_argument("--count", type=int, default=16, help="number of sequences (default: 16)")
    gen.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    gen.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    demo = sub.add_parser(
        "demo", help="prune stdlib-tiny to 50%% with SparseGPT and Wanda under none/LR/BR/BR+GP/BR+GP+CR"
    )
    demo.add_argument("--output-dir", type=Path, required=True, help="where the table, results JSON and plot go")
    demo.add_argument(
        "--overwrite", action="store_true", help="replace the run in the output directory (only the files it wrote)"
    )
    demo.add_argument("--model", default="stdlib-tiny", help=argparse.SUPPRESS)
    demo.add_argument("--nsamples", type=int, default=32, help="calibration samples (default: 32)")
    demo.add_argument("--seq-len", type=int, default=256, help="calibration sequence length (default: 256)")
    demo.add_argument("--eval-chunks", type=int, default=64, help="held-out chunks of 256 bytes (default: 64)")
    demo.add_argument(
        "--self-generated",
        type=int,
        default=32,
        help="add a SparseGPT BR+GP+CR run with this many self-generated samples; 0 skips it (default: 32)",
    )
    return parser


def _config_from_args(args: argparse.Namespace) -> PruneConfig:
    flags = {
        "method": args.method,
        "sparsity": args.sparsity,
        "pattern": args.pattern,
        "reconstruction": args.reconstruction,
        "preset": args.preset,
        "nsamples": args.nsamples,
        "seq_len": args.seq_len,
        "epochs": args.epochs,
        "seed": args.seed,
        "device": args.device,
        "offload_device": args.offload_device,
        "dtype": args.dtype,
        "lr": args.lr,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    return load_config(PruneConfig, args.config, overrides)


def _load(model_name: str) -> tuple[Any, Any]:
    from recon_prune.tiny_model import load_model_and_tokenizer

    return load_model_and_tokenizer(model_name)


_HELDOUT: list[tuple[str, Any, Any]] = []  # (source, tokenizer, ids): the tokenizer is held, so identity is safe


def _heldout_ppl(model: Any, tokenizer: Any, source: str, seq_len: int, max_chunks: int | None) -> dict[str, Any]:
    from recon_prune.evaluate import heldout_ids, perplexity

    if not _HELDOUT or _HELDOUT[0][0] != source or _HELDOUT[0][1] is not tokenizer:  # tokenize once per command
        _HELDOUT[:] = [(source, tokenizer, heldout_ids(source, tokenizer))]
    result = perplexity(model, _HELDOUT[0][2], seq_len=seq_len, max_chunks=max_chunks)
    result["dataset"] = source
    return result


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value}")


def _eval_settings(
    model: Any, source: str, seq_len: int | None, chunks: int | None, *, seq_flag: str, chunks_flag: str
) -> tuple[int, int | None]:
    """Chunk length and count for perplexity, checked against the model before any work."""
    from recon_prune.driver import max_positions
    from recon_prune.evaluate import default_eval_chunks, default_eval_seq_len

    _positive(chunks, chunks_flag)
    if seq_len is not None and seq_len < 2:
        raise ValueError(f"{seq_flag} must be at least 2 tokens, got {seq_len}")
    limit = max_positions(model)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise ValueError(f"{seq_flag} {seq_len} exceeds the model's context of {limit} positions")
    return seq_len or default_eval_seq_len(model), chunks if chunks is not None else default_eval_chunks(source)


def _calibration_seq_len(model: Any, config: PruneConfig) -> int:
    """An explicit seq_len must fit the context; the preset's is capped by the pretraining window and context."""
    from recon_prune.driver import max_positions
    from recon_prune.evaluate import trained_seq_len

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


def _check_count(value: int | None, flag: str) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be 0 or a positive integer, got {value}")


def _check_checkpoint_dir(path: Path | None, output_dir: Path) -> None:
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


def _prune_identity(args: argparse.Namespace, config: PruneConfig, model: str) -> dict[str, Any]:
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


def _report_finished(run: RunDirectory, command: str) -> int:
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


def cmd_prune(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first, the output directory
    # included, so a bad value costs a second rather than a model load and a pruning run.
    config = _config_from_args(args)  # also checks that the devices exist
    _check_count(args.self_generated, "--self-generated")
    _positive(args.eval_chunks, "--eval-chunks")
    if args.eval_seq_len is not None and args.eval_seq_len < 2:
        raise ValueError(f"--eval-seq-len must be at least 2 tokens, got {args.eval_seq_len}")
    model_source = resolve_model_source(args.model)
    _check_checkpoint_dir(args.checkpoint_dir, args.output_dir)
    run = RunDirectory(
        args.output_dir,
        tool=TOOL,
        config=_prune_identity(args, config, model_source),
        overwrite=args.overwrite,
        command="prune",
    )
    if run.finished:
        return _report_finished(run, "prune")

    from recon_prune.calibration import build_calibration
    from recon_prune.driver import check_model_and_calibration, check_structure, prune
    from recon_prune.outputs import save_pruned

    model, tokenizer = _load(args.model)
    check_structure(model, config)  # unsupported model or N:M mismatch: fail before any work
    seq_len = _calibration_seq_len(model, config)
    if args.eval != "none":
        eval_len, eval_chunks = _eval_settings(
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
        metrics["dense"] = _heldout_ppl(model, tokenizer, args.eval, eval_len, eval_chunks)
        print(f"dense perplexity ({args.eval}): {metrics['dense']['perplexity']:.3f}")
    report = prune(model, calibration, config, checkpoint_dir=args.checkpoint_dir)
    if args.eval != "none":
        metrics["pruned"] = _heldout_ppl(model, tokenizer, args.eval, eval_len, eval_chunks)
        print(f"pruned perplexity ({args.eval}): {metrics['pruned']['perplexity']:.3f}")
    metrics["final_block_error"] = report.final_block_error
    metrics["sparsity"] = report.sparsity["overall"]
    save_pruned(run, model, tokenizer, report, metrics=metrics, config=config, seed=config.seed)
    print(
        f"sparsity {report.sparsity['overall']:.4f}; final-block error {report.final_block_error:.4g}; "
        f"saved to {args.output_dir}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    if tasks:  # before the model is loaded and perplexity computed, not after
        require_extra("lm_eval", install="recon-prune[lm-eval]", purpose="--tasks")
    _positive(args.max_chunks, "--max-chunks")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 tokens, got {args.seq_len}")
    if args.output is not None:
        check_output_file(args.output, "--output")
    resolve_model_source(args.model)

    from recon_prune.evaluate import sparsity_report, zero_shot

    model, tokenizer = _load(args.model)
    seq_len, max_chunks = _eval_settings(
        model, args.dataset, args.seq_len, args.max_chunks, seq_flag="--seq-len", chunks_flag="--max-chunks"
    )
    result: dict[str, Any] = {"perplexity": _heldout_ppl(model, tokenizer, args.dataset, seq_len, max_chunks)}
    result["sparsity"] = sparsity_report(model)
    if tasks:
        result["zero_shot"] = zero_shot(model, tokenizer, tasks)
    print(
        f"{args.model}: perplexity {result['perplexity']['perplexity']:.4f} on {args.dataset} "
        f"({result['perplexity']['chunks']} chunks of {seq_len}); sparsity {result['sparsity']['overall']:.4f}"
    )
    if args.output is not None:
        config = {k: v for k, v in vars(args).items() if k not in ("debug", "output")}
        write_run_record(args.output, config=config, metrics=result, package=TOOL)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    check_output_file(args.output, "--output")  # a directory is refused even with --overwrite
    if args.output.exists() and not args.overwrite:
        raise ValueError(f"output file {str(args.output)!r} exists; pass --overwrite to replace it")
    if args.count < 1 or args.seq_len < 6:
        raise ValueError(f"need --count >= 1 and --seq-len >= 6, got {args.count} and {args.seq_len}")
    resolve_model_source(args.model)

    from recon_prune.calibration import decode, generate_self_calibration
    from recon_prune.outputs import write_text_atomic

    model, tokenizer = _load(args.model)
    ids = generate_self_calibration(model, tokenizer, args.count, args.seq_len, seed=args.seed)
    lines = [json.dumps({"text": decode(tokenizer, row), "token_ids": row}) + "\n" for row in ids.tolist()]
    write_text_atomic(args.output, "".join(lines))
    print(f"wrote {args.count} self-generated sequences of {args.seq_len} tokens to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _positive(args.nsamples, "--nsamples")
    _positive(args.eval_chunks, "--eval-chunks")
    _check_count(args.self_generated, "--self-generated")
    minimum = 6 if args.self_generated else 2  # self-generated text starts from a 5-token prefix
    if args.seq_len < minimum:
        raise ValueError(f"--seq-len must be at least {minimum} tokens, got {args.seq_len}")
    model_source = resolve_model_source(args.model)
    identity = {
        "model": model_source,
        "nsamples": args.nsamples,
        "seq_len": args.seq_len,
        "eval_chunks": args.eval_chunks,
        "self_generated": args.self_generated,
    }
    run = RunDirectory(args.output_dir, tool=TOOL, config=identity, overwrite=args.overwrite, command="demo")
    if run.finished:
        return _report_finished(run, "demo")

    from recon_prune.calibration import build_calibration
    from recon_prune.driver import prune
    from recon_prune.evaluate import default_eval_seq_len
    from recon_prune.outputs import PACKAGES, plot_into_run, write_text_atomic

    started = time.perf_counter()
    model, tokenizer = _load(args.model)
    print(f"model ready after {time.perf_counter() - started:.0f} s")
    calibration = build_calibration("stdlib", tokenizer=tokenizer, nsamples=args.nsamples, seq_len=args.seq_len, seed=0)
    eval_len = default_eval_seq_len(model)  # stdlib-tiny: its 256-byte pretraining window
    dense = _heldout_ppl(model, tokenizer, "stdlib", eval_len, args.eval_chunks)
    rows: list[dict[str, Any]] = []
    errors: dict[str, list[float | None]] = {}
    runs = [(m, r, r, calibration) for m in ("sparsegpt", "wanda") for r in DEMO_RECONSTRUCTIONS]
    if args.self_generated:
        from recon_prune.calibration import CalibrationData, generate_self_calibration

        generated = generate_self_calibration(model, tokenizer, args.self_generated, args.seq_len, seed=0)
        mixed = CalibrationData(input_ids=calibration.input_ids, generated_ids=generated, sources=calibration.sources)
        runs.append(("sparsegpt", "br+gp+cr", f"br+gp+cr +{args.self_generated} self-gen", mixed))
    for method, reconstruction, label, calib in runs:
        config = PruneConfig(
            method=method,
            sparsity=0.5,
            reconstruction=reconstruction,
            preset="cpu",
            nsamples=args.nsamples,
            seq_len=args.seq_len,
            seed=0,
        )
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = prune(pruned, calib, config)
        ppl = _heldout_ppl(pruned, tokenizer, "stdlib", eval_len, args.eval_chunks)
        rows.append(
            {
                "method": method,
                "reconstruction": label,
                "perplexity": ppl["perplexity"],
                "final_block_error": report.final_block_error,
                "block_errors": report.block_errors,
                "sparsity": report.sparsity["overall"],
                "seconds": time.perf_counter() - t0,
            }
        )
        errors[f"{method} {label}"] = report.block_errors
        print(f"{method:9s} {label:9s} ppl {ppl['perplexity']:8.3f}  final-block error {report.final_block_error:.4g}")
    for row in rows:
        base = next(r for r in rows if r["method"] == row["method"] and r["reconstruction"] == "none")
        row["error_reduction_vs_none"] = 1.0 - row["final_block_error"] / base["final_block_error"]
    lines = [
        f"stdlib-tiny, 50% unstructured, {args.nsamples} x {args.seq_len} calibration bytes; held-out = stdlib test split, "
        f"{dense['chunks']} chunks of {eval_len}. Dense perplexity: {dense['perplexity']:.3f}",
        "",
        "| method | reconstruction | held-out ppl | final-block error | error reduction vs none |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['reconstruction']} | {r['perplexity']:.3f} | {r['final_block_error']:.4g} | {100 * r['error_reduction_vs_none']:.1f}% |"
        for r in rows
    ]
    table = "\n".join(lines)
    print()
    print(table)
    run.begin()
    write_text_atomic(run.file("demo_table.md"), table + "\n")
    plot_into_run(run, errors, title="stdlib-tiny, 50% sparsity")
    run.finish(
        metrics={"dense": dense, "runs": rows, "total_seconds": time.perf_counter() - started},
        config=identity | {"output_dir": str(args.output_dir)},
        seed=0,
        packages=PACKAGES,
    )
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; results in {args.output_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # A prune run with --checkpoint-dir continues where it stopped when rerun; only then does the
    # Ctrl-C line say so (the runner reads this set when the interrupt arrives).
    resumable: set[str] = set()

    def prune_command(args: argparse.Namespace) -> int:
        if args.checkpoint_dir is not None:
            resumable.add("prune")
        return cmd_prune(args)

    handlers = {"prune": prune_command, "eval": cmd_eval, "generate-calibration": cmd_generate, "demo": cmd_demo}
    return run_command(build_parser(), handlers, argv, resumable=resumable)
