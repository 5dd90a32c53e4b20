"""The demo: ``stdlib-tiny`` pruned to 50% by SparseGPT and Wanda under every reconstruction.

``recon-prune demo`` runs :func:`run_demo`; :func:`demo_runs` is the experiment itself (usable on any
model and calibration) and :func:`demo_table` the Markdown table the README shows.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import shin_common
from recon_prune.config import DemoConfig, PruneConfig
from recon_prune.model_source import resolve_model_source
from recon_prune.outputs import PACKAGES, TOOL
from recon_prune.plots import block_error_title, plot_into_run
from recon_prune.runs import heldout_perplexity, load_model, report_finished
from shin_common import RunDirectory, config_to_dict
from shin_common.files import write_text_atomic

DEMO_METHODS = ("sparsegpt", "wanda")
DEMO_RECONSTRUCTIONS = ("none", "lr", "br", "br+gp", "br+gp+cr")
DEMO_SPARSITY = 0.5


def demo_runs(
    model: Any,
    tokenizer: Any,
    calibration: Any,
    *,
    eval_len: int,
    eval_chunks: int | None,
    self_generated: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, list[float | None]]]:
    """Prune copies of ``model`` with every demo method and reconstruction (and, with
    ``self_generated`` > 0, SparseGPT BR+GP+CR with that many self-generated samples added).

    Returns one row per run (perplexity on the stdlib test split, errors, seconds) and the per-block
    errors by run label, for the plot.
    """
    from recon_prune.calibration import CalibrationData, generate_self_calibration
    from recon_prune.driver import prune

    runs = [(m, r, r, calibration) for m in DEMO_METHODS for r in DEMO_RECONSTRUCTIONS]
    if self_generated:
        generated = generate_self_calibration(model, tokenizer, self_generated, calibration.seq_len, seed=0)
        self_source = {"source": "self", "count": generated.recipe["kept"], "recipe": generated.recipe}
        mixed = CalibrationData(
            input_ids=calibration.input_ids, generated_ids=generated.ids, sources=[*calibration.sources, self_source]
        )
        runs.append(("sparsegpt", "br+gp+cr", f"br+gp+cr +{self_generated} self-gen", mixed))
    rows: list[dict[str, Any]] = []
    errors: dict[str, list[float | None]] = {}
    for method, reconstruction, label, calib in runs:
        config = PruneConfig(
            method=method,
            sparsity=DEMO_SPARSITY,
            reconstruction=reconstruction,
            preset="cpu",
            nsamples=calibration.num_real,
            seq_len=calibration.seq_len,
            seed=0,
        )
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = prune(pruned, calib, config)
        ppl = heldout_perplexity(pruned, tokenizer, "stdlib", eval_len, eval_chunks)
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
        if calib is not calibration:  # the self-generated run: how its extra text was made and filtered
            rows[-1]["self_generated_recipe"] = generated.recipe
        errors[f"{method} {label}"] = report.block_errors
        print(f"{method:9s} {label:9s} ppl {ppl['perplexity']:8.3f}  final-block error {report.final_block_error:.4g}")
    add_error_reductions(rows)
    return rows, errors


def reduction_baseline(method: str) -> str:
    """The reconstruction each method's error reduction is measured against (Shin et al. 2024, Sec. 4:
    the standard practice): LR, i.e. the method's own closed-form update, for a method that has one
    (SparseGPT); the mask alone (``'none'``) for one that has none (Wanda, magnitude). A SparseGPT
    mask without its update is no baseline anyone uses, and measuring against it inflates the gain."""
    from recon_prune.methods import MASK_METHODS

    return "lr" if MASK_METHODS.get(method).updates_weights else "none"


def add_error_reductions(rows: list[dict[str, Any]]) -> None:
    """Give every row ``reduction_baseline`` and ``error_reduction``: ``1 - error / baseline's error``
    for the final-block error, against the row of the same method under :func:`reduction_baseline`."""
    for row in rows:
        baseline = reduction_baseline(row["method"])
        base = next(r for r in rows if r["method"] == row["method"] and r["reconstruction"] == baseline)
        row["reduction_baseline"] = baseline
        row["error_reduction"] = 1.0 - row["final_block_error"] / base["final_block_error"]


def demo_table(rows: list[dict[str, Any]], dense: dict[str, Any], *, nsamples: int, seq_len: int, eval_len: int) -> str:
    """The Markdown table of :func:`demo_runs`' rows, headed by the setting and the dense perplexity."""
    lines = [
        f"stdlib-tiny, {100 * DEMO_SPARSITY:g}% unstructured, {nsamples} x {seq_len} calibration bytes; "
        f"held-out = stdlib test split, {dense['chunks']} chunks of {eval_len}. Dense perplexity: {dense['perplexity']:.3f}",
        "",
        "| method | reconstruction | held-out ppl | final-block error | error reduction | against |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['reconstruction']} | {r['perplexity']:.3f} | {r['final_block_error']:.4g} "
        f"| {100 * r['error_reduction']:.1f}% | {r['reduction_baseline']} |"
        for r in rows
    ]
    lines += [
        "",
        "Error reduction: of the final-block error, against SparseGPT with its update (lr) for SparseGPT "
        "and against the mask alone (none) for the methods without an update.",
    ]
    return "\n".join(lines)


def demo_config_from_args(args: argparse.Namespace) -> DemoConfig:
    """``recon-prune demo``'s config: defaults < ``--config`` < named flags < ``--set``."""
    named = {key: getattr(args, key) for key in ("nsamples", "seq_len", "eval_chunks", "self_generated")}
    return shin_common.config_from_args(DemoConfig, args, named=named)


def run_demo(args: argparse.Namespace) -> int:
    """``recon-prune demo``: the table, ``results.json`` and the error plot in ``--output-dir``."""
    config = demo_config_from_args(args)
    model_source = resolve_model_source(args.model)
    identity = {"model": model_source, **config_to_dict(config)}
    run = RunDirectory(args.output_dir, tool=TOOL, config=identity, overwrite=args.overwrite, command="demo")
    if run.finished:
        return report_finished(run, "demo")

    from recon_prune.calibration import build_calibration
    from recon_prune.evaluate import default_eval_seq_len

    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"model ready after {time.perf_counter() - started:.0f} s")
    calibration = build_calibration(
        "stdlib", tokenizer=tokenizer, nsamples=config.nsamples, seq_len=config.seq_len, seed=0
    )
    eval_len = default_eval_seq_len(model)  # stdlib-tiny: its 256-byte pretraining window
    dense = heldout_perplexity(model, tokenizer, "stdlib", eval_len, config.eval_chunks)
    rows, errors = demo_runs(
        model,
        tokenizer,
        calibration,
        eval_len=eval_len,
        eval_chunks=config.eval_chunks,
        self_generated=config.self_generated,
    )
    table = demo_table(rows, dense, nsamples=config.nsamples, seq_len=config.seq_len, eval_len=eval_len)
    print()
    print(table)
    run.begin()
    write_text_atomic(run.file("demo_table.md"), table + "\n")
    data = f"{config.nsamples} x {config.seq_len} stdlib tokens"
    plot_into_run(run, errors, title=block_error_title(args.model, f"{100 * DEMO_SPARSITY:g}% unstructured", data))
    run.finish(
        metrics={"dense": dense, "runs": rows, "total_seconds": time.perf_counter() - started},
        config=identity | {"output_dir": str(args.output_dir)},
        seed=0,
        packages=PACKAGES,
    )
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; results in {args.output_dir}")
    return 0
