"""Checks of a model and its calibration that must pass before any pruning work is done."""

from __future__ import annotations

from torch import nn

from recon_prune.calibration import CalibrationData
from recon_prune.config import PruneConfig
from recon_prune.experts import expert_matrix, expert_parameter_names, find_fused_experts
from recon_prune.model_adapter import find_decoder_blocks, find_linears, max_positions, weight_matrix


def check_structure(model: nn.Module, config: PruneConfig) -> tuple[str, nn.ModuleList]:
    """Decoder blocks findable, every block has linear layers, N:M divides every input width."""
    path, blocks = find_decoder_blocks(model)
    for i, block in enumerate(blocks):
        linears = find_linears(block)
        if config.nm is not None:
            for name, module in linears.items():
                cols = weight_matrix(module).shape[1]
                if cols % config.nm[1]:
                    raise ValueError(
                        f"pattern {config.pattern}: {path}.{i}.{name} has {cols} input features, not divisible by M={config.nm[1]}"
                    )
            for name, module in find_fused_experts(block).items():
                for parameter in expert_parameter_names(module):
                    cols = expert_matrix(module, parameter, 0).shape[1]
                    if cols % config.nm[1]:
                        raise ValueError(
                            f"pattern {config.pattern}: {path}.{i}.{name}.{parameter} has {cols} input features "
                            f"per expert, not divisible by M={config.nm[1]}"
                        )
    return path, blocks


def check_model_and_calibration(
    model: nn.Module, data: CalibrationData, config: PruneConfig
) -> tuple[str, nn.ModuleList]:
    """All checks that must pass before any work is done."""
    path, blocks = check_structure(model, config)
    for name, actual in (("nsamples", data.num_real), ("seq_len", data.seq_len)):
        wanted = getattr(config, name)
        if wanted is not None and wanted != actual:
            what = "real samples" if name == "nsamples" else "tokens per sample"
            raise ValueError(
                f"config.{name}={wanted} but the calibration has {actual} {what}; build the calibration with "
                f"{name}={wanted} or leave config.{name} unset"
            )
    limit = max_positions(model)
    if limit is not None and data.seq_len > limit:
        raise ValueError(f"calibration sequence length {data.seq_len} exceeds the model's context of {limit} positions")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and int(data.all_ids().max()) >= vocab:
        raise ValueError(
            f"calibration token id {int(data.all_ids().max())} is outside the model's vocabulary of {vocab}"
        )
    return path, blocks
