"""Evaluation: perplexity over non-overlapping chunks, sparsity report, optional zero-shot tasks.

Perplexity follows the protocol of SparseGPT and Wanda (and Shin et al. 2024, Sec. 4): the held-out
text is joined into one string (wikitext2 test with ``"\\n\\n"``, C4 validation: first 1100
documents), tokenized once, cut into non-overlapping chunks (the ragged tail dropped), and ``exp``
of the token-weighted mean next-token NLL is reported. The sequence length, the joining rule and the
chunk count are recorded with every number.

Defaults (:func:`default_eval_chunks`, :func:`default_eval_seq_len`): the whole wikitext2 test set
and the first 256 chunks of C4, as in SparseGPT (Frantar & Alistarh 2023) and Wanda (Sun et al.
2024); chunks of the model's context length (Wanda's ``seqlen = config.max_position_embeddings``:
2048 for OPT, 4096 for LLaMA-2), capped at 4096 so a 128k-context model is not scored on 128k-token
chunks, or the window a model was pretrained on when its config records one (``train_seq_len``, set
by ``stdlib-tiny``); 64 chunks of the offline stdlib test split, which is only a quick check.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from recon_prune.experts import expert_parameter_names, find_fused_experts, router_modules
from recon_prune.model_adapter import find_decoder_blocks, find_linears, max_positions

log = logging.getLogger(__name__)


# Longest default chunk: LLaMA-2's context, the longest the papers evaluate at (Wanda, Shin et al.).
MAX_DEFAULT_EVAL_SEQ_LEN = 4096
# Chunk length for a model whose config records no context (the OPT/LLaMA-1 context).
FALLBACK_EVAL_SEQ_LEN = 2048
# Chunks scored when none are asked for; a source not listed is scored in full (wikitext2, files).
DEFAULT_EVAL_CHUNKS = {"stdlib": 64, "c4": 256}


def default_eval_chunks(source: str) -> int | None:
    """Chunks of ``source`` scored by default; ``None`` = the whole held-out text."""
    return DEFAULT_EVAL_CHUNKS.get(source)


def trained_seq_len(model: nn.Module) -> int | None:
    """The window the model was pretrained on, when its config records it (``train_seq_len``)."""
    value = getattr(getattr(model, "config", None), "train_seq_len", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def default_eval_seq_len(model: nn.Module) -> int:
    """Chunk length for perplexity: the recorded pretraining window, else the model's context length
    (Wanda, Sun et al. 2024: ``seqlen = model.config.max_position_embeddings``) capped at 4096;
    2048 when the config records no context."""
    limit = max_positions(model)
    trained = trained_seq_len(model)
    if trained is not None:
        return min(trained, limit) if limit is not None else trained
    return min(limit, MAX_DEFAULT_EVAL_SEQ_LEN) if limit is not None else FALLBACK_EVAL_SEQ_LEN


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor | list[int],
    *,
    seq_len: int,
    max_chunks: int | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` over non-overlapping ``seq_len`` chunks of ``token_ids``."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    n_chunks = ids.numel() // seq_len
    if n_chunks == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, shorter than one chunk of {seq_len}")
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    chunks = ids[: n_chunks * seq_len].view(n_chunks, seq_len)
    device = device or next(model.parameters()).device
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, n_chunks, batch_size):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "chunks": n_chunks, "seq_len": seq_len}


def heldout_ids(source: str, tokenizer: Any) -> torch.Tensor:
    """Token ids of the held-out text of ``source``: ``stdlib`` (test split), ``wikitext2``, ``c4``,
    ``ptb``, or a file; the stream starts with the tokens the tokenizer puts before a text by default
    (BOS for LLaMA and OPT, none for GPT-2 and the byte tokenizer), as in SparseGPT's and Shin et
    al.'s evaluation, which tokenize the joined test text with the tokenizer's defaults."""
    from recon_prune.calibration import encode, leading_special_ids, source_text

    ids = leading_special_ids(tokenizer) + encode(tokenizer, source_text(source, "test"))
    return torch.tensor(ids, dtype=torch.long)


# Why a weight matrix of a block is left dense, by kind (docs/recon-prune.md, Limits: mixture-of-experts).
FUSED_EXPERTS_LEFT_DENSE = "3-d parameter outside a transformers experts module: not pruned by this version"
ROUTER_LEFT_DENSE = "router: kept dense"
OTHER_MATRIX_LEFT_DENSE = "not an nn.Linear/Conv1D weight: not pruned by this version"


def _why_left_dense(owner: nn.Module, parameter: nn.Parameter, routers: set[int]) -> str:
    """The reason a block parameter of two or more dimensions is not pruned: a mixture-of-experts
    router (kept dense on purpose, :func:`recon_prune.experts.router_modules`; transformers 5 stores
    Mixtral's as a bare 2-d parameter of a ``*Router`` module), a 3-d parameter that is not a fused
    experts parameter this version knows, or another non-linear matrix."""
    if id(owner) in routers or "router" in type(owner).__name__.lower():
        return ROUTER_LEFT_DENSE
    if parameter.dim() >= 3:
        return FUSED_EXPERTS_LEFT_DENSE
    return OTHER_MATRIX_LEFT_DENSE


def _prunable_matrices(block: nn.Module) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """``(name, parameter, (out, in) matrix)`` of every matrix the pruner prunes in one block: the linear
    layers' weights and each expert's slice of a fused experts parameter (``<experts>.<param>[<e>]``)."""
    for name, module in find_linears(block).items():
        yield name, module.weight, module.weight
    for name, module in find_fused_experts(block).items():
        for parameter_name in expert_parameter_names(module):
            fused = getattr(module, parameter_name)
            for e in range(fused.shape[0]):
                yield f"{name}.{parameter_name}[{e}]", fused, fused[e]


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Fraction of exactly-zero entries over every weight matrix of the decoder blocks.

    Every block parameter of two or more dimensions counts, a fused ``(experts, out, in)`` expert
    tensor as its experts' matrices. ``layers`` holds the prunable matrices (``nn.Linear``/``Conv1D``
    weights and each expert's slice, named ``<experts>.<parameter>[<expert>]``); ``dense`` names every
    other matrix (routers) with its reason, matrix count and sparsity. On a model made only of linear
    layers ``dense`` is empty and the numbers are those of the linear layers alone."""
    path, blocks = find_decoder_blocks(model)
    layers: dict[str, float] = {}
    dense: dict[str, dict[str, Any]] = {}
    zeros = total = 0
    for i, block in enumerate(blocks):
        handled_above = set()
        for module in find_fused_experts(block).values():  # per-expert biases are biases, not matrices
            for parameter_name in expert_parameter_names(module):
                bias = getattr(module, f"{parameter_name}_bias", None)
                if isinstance(bias, torch.Tensor):
                    handled_above.add(id(bias))
        for name, parameter, matrix in _prunable_matrices(block):
            handled_above.add(id(parameter))
            matrix_zeros = int((matrix.detach() == 0).sum())
            layers[f"{path}.{i}.{name}"] = matrix_zeros / matrix.numel()
            zeros += matrix_zeros
            total += matrix.numel()
        routers = {id(module) for module in router_modules(block).values()}
        for owner_name, owner in block.named_modules():
            for param_name, parameter in owner.named_parameters(recurse=False):
                if parameter.dim() < 2 or id(parameter) in handled_above:
                    continue  # biases and norms are not weight matrices; prunable ones are counted above
                matrix_zeros = int((parameter.detach() == 0).sum())
                full_name = ".".join(part for part in (path, str(i), owner_name, param_name) if part)
                dense[full_name] = {
                    "reason": _why_left_dense(owner, parameter, routers),
                    "matrices": math.prod(parameter.shape[:-2]),
                    "sparsity": matrix_zeros / parameter.numel(),
                }
                zeros += matrix_zeros
                total += parameter.numel()
    return {
        "overall": zeros / total if total else 0.0,
        "zeros": zeros,
        "total": total,
        "layers": layers,
        "dense": dense,
    }


def zero_shot(model: nn.Module, tokenizer: Any, tasks: list[str], *, batch_size: int = 8) -> dict[str, Any]:
    """Zero-shot accuracy through lm-evaluation-harness (``pip install recon-prune[lm-eval]``; task data
    comes from the Hugging Face Hub, so this needs network)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:  # pragma: no cover - optional extra
        raise ImportError(
            "zero-shot evaluation needs lm-evaluation-harness: pip install 'recon-prune[lm-eval]'"
        ) from exc
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=wrapped, tasks=tasks)
    return results.get("results", {})
