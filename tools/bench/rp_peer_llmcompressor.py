"""Side-by-side: recon-prune vs llm-compressor's SparseGPTModifier on stdlib-tiny (50% unstructured).

Both prune the same cached ``stdlib-tiny`` model with the same 32 x 256 calibration token ids and
are evaluated by the same perplexity function (non-overlapping 256-token chunks of the stdlib test
split). llm-compressor lives in its own virtual environment (its pins differ from ours):

    python -m venv /tmp/rp_peervenv
    /tmp/rp_peervenv/bin/pip install -c tools/constraints.txt torch==2.13.0 llmcompressor
    python tools/bench/rp_peer_llmcompressor.py --peer-python /tmp/rp_peervenv/bin/python

The peer half runs as ``--peer`` in the other interpreter and needs only torch, transformers,
datasets and llmcompressor. The result replaces only this script's section of
docs/benchmarks/recon-prune.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN, NSAMPLES, EVAL_CHUNKS = 256, 32, 64


@torch.no_grad()
def chunk_perplexity(model, ids: torch.Tensor, seq_len: int = SEQ_LEN, max_chunks: int = EVAL_CHUNKS) -> float:
    n = min(ids.numel() // seq_len, max_chunks)
    chunks = ids[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for start in range(0, n, 8):
        batch = chunks[start : start + 8]
        logits = model(input_ids=batch).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def zero_fraction(model) -> float:
    zeros = total = 0
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                zeros += int((module.weight == 0).sum())
                total += module.weight.numel()
    return zeros / total


def run_peer(model_dir: str, data_file: str, out_file: str) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM

    data = torch.load(data_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = data["calibration"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    torch.set_num_threads(2)
    started = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[
            SparseGPTModifier(
                sparsity=0.5, block_size=128, dampening_frac=0.01, targets=["Linear"], ignore=["re:.*lm_head"]
            )
        ],
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    seconds = time.perf_counter() - started
    result = {
        "seconds": seconds,
        "perplexity": chunk_perplexity(model, data["heldout"]),
        "sparsity": zero_fraction(model),
    }
    Path(out_file).write_text(json.dumps(result))


def run_ours(peer_python: str) -> None:
    import copy

    from recon_prune import PruneConfig, build_calibration, prune
    from recon_prune.evaluate import heldout_ids
    from recon_prune.tiny_model import load_model_and_tokenizer, stdlib_tiny_path

    torch.set_num_threads(2)
    model_dir = stdlib_tiny_path()
    model, tok = load_model_and_tokenizer(str(model_dir))
    calib = build_calibration("stdlib", tokenizer=tok, nsamples=NSAMPLES, seq_len=SEQ_LEN, seed=0)
    heldout = heldout_ids("stdlib", tok)
    rows = [
        {
            "tool": "dense",
            "setting": "-",
            "seconds": 0.0,
            "perplexity": chunk_perplexity(model, heldout),
            "sparsity": 0.0,
        }
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data_file, out_file = Path(tmp) / "data.pt", Path(tmp) / "peer.json"
        torch.save({"calibration": calib.input_ids, "heldout": heldout}, data_file)
        subprocess.run([peer_python, __file__, "--peer", str(model_dir), str(data_file), str(out_file)], check=True)
        peer = json.loads(out_file.read_text())
    rows.append({"tool": "llm-compressor", "setting": "SparseGPT (sequential pipeline)", **peer})
    for reconstruction in ("lr", "br+gp"):
        pruned = copy.deepcopy(model)
        started = time.perf_counter()
        prune(
            pruned,
            calib,
            PruneConfig(
                method="sparsegpt", sparsity=0.5, reconstruction=reconstruction, nsamples=NSAMPLES, seq_len=SEQ_LEN
            ),
        )
        seconds = time.perf_counter() - started
        rows.append(
            {
                "tool": "recon-prune",
                "setting": f"SparseGPT, {reconstruction}",
                "seconds": seconds,
                "perplexity": chunk_perplexity(pruned, heldout),
                "sparsity": zero_fraction(pruned),
            }
        )
    peer_seconds = rows[1]["seconds"]
    lines = [
        "## Side by side with llm-compressor (stdlib-tiny, 50% unstructured, 32 x 256 calibration tokens)",
        "",
        "Same model, same calibration ids, same perplexity function (64 chunks of 256 of the stdlib test split),",
        "measured in one run by `tools/bench/rp_peer_llmcompressor.py`; llm-compressor in its own venv.",
        "",
        "| tool | setting | seconds | time vs llm-compressor | held-out ppl | sparsity |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r["tool"] == "dense" else f"{r['seconds'] / peer_seconds:.2f}x"
        lines.append(
            f"| {r['tool']} | {r['setting']} | {r['seconds']:.2f} | {ratio} | {r['perplexity']:.3f} | {r['sparsity']:.3f} |"
        )
    from doc_sections import DOCS_BENCHMARKS, replace_section

    replace_section(DOCS_BENCHMARKS / "recon-prune.md", "rp_peer_llmcompressor", lines)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", nargs=3, metavar=("MODEL_DIR", "DATA", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--peer-python", default="/tmp/rp_peervenv/bin/python", help="interpreter with llmcompressor")
    args = parser.parse_args()
    if args.peer:
        run_peer(*args.peer)
    else:
        run_ours(args.peer_python)


if __name__ == "__main__":
    sys.exit(main())
