"""Frozen masks and block reconstruction."""

from __future__ import annotations

import pytest
import torch
from rp_models import make_model

from recon_prune.config import ReconstructionHParams
from recon_prune.masks import magnitude_mask
from recon_prune.model_adapter import (
    capture_block_inputs,
    find_decoder_blocks,
    find_linears,
    run_blocks,
    to_native_layout,
    weight_matrix,
)
from recon_prune.reconstruct import apply_mask, bake_masks, evaluate_loss, train_blocks


def _pruned_block(kind: str, calib_ids: torch.Tensor):
    model = make_model(kind)
    _, blocks = find_decoder_blocks(model)
    hidden, calls = capture_block_inputs(model, calib_ids, device="cpu")
    block, inputs = blocks[0], calls[:1]
    with torch.no_grad():
        target = run_blocks([block], inputs, hidden)
    masks = {}
    for name, module in find_linears(block).items():
        mask = to_native_layout(module, magnitude_mask(weight_matrix(module), 0.5))
        apply_mask(module, mask)
        masks[name] = mask
    return block, inputs, hidden, target, masks


def test_br_reduces_the_block_loss_it_optimizes(calib_ids: torch.Tensor) -> None:
    for kind in ("llama", "gpt2"):
        block, inputs, hidden, target, _ = _pruned_block(kind, calib_ids)
        hp = ReconstructionHParams(lr=1e-3, epochs=5, batch_size=4)
        before = evaluate_loss([block], inputs, hidden, target, device="cpu")
        result = train_blocks([block], inputs, hidden, target, hp, device="cpu", seed=0)
        assert result["loss_before"] == pytest.approx(before, rel=1e-5)
        assert result["loss_after"] == pytest.approx(
            evaluate_loss([block], inputs, hidden, target, device="cpu"), rel=1e-5
        )
        assert result["loss_after"] < 0.7 * before
        assert result["steps"] == 10


def test_masked_weights_stay_exactly_zero_through_training_and_baking(calib_ids: torch.Tensor) -> None:
    block, inputs, hidden, target, masks = _pruned_block("gpt2", calib_ids)
    hp = ReconstructionHParams(lr=1e-2, epochs=2, batch_size=4, weight_decay=0.1)
    train_blocks([block], inputs, hidden, target, hp, device="cpu", seed=0)
    bake_masks(block)
    for name, module in find_linears(block).items():
        assert not hasattr(module, "parametrizations")
        assert torch.all(module.weight[~masks[name]] == 0)
        assert torch.any(module.weight[masks[name]] != 0)


def test_training_is_reproducible_by_seed(calib_ids: torch.Tensor) -> None:
    hp = ReconstructionHParams(lr=1e-3, epochs=2, batch_size=3)
    results = []
    for _ in range(2):
        block, inputs, hidden, target, _ = _pruned_block("llama", calib_ids)
        train_blocks([block], inputs, hidden, target, hp, device="cpu", seed=3)
        bake_masks(block)
        results.append(block.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])
