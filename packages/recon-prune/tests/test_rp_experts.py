"""Mixture-of-experts models: the fused experts of transformers 5 are pruned expert by expert, each
from the tokens the model's own router sends it; the router stays dense (issue 12)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from rp_models import make_model

from recon_prune import PruneConfig, prune
from recon_prune.sparsegpt import SparseGPT

FAST = {"epochs": 2, "blocksize": 16, "device": "cpu"}
ROUTERS = {
    "mixtral": ("mlp.gate.weight",),
    "qwen2-moe": ("mlp.gate.weight", "mlp.shared_expert_gate.weight"),
    "gpt-oss": ("mlp.router.weight",),
}
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def _expert_slices(model: torch.nn.Module):
    """``(block index, parameter name, expert, (out, in) matrix)`` of every expert of every block."""
    for i, block in enumerate(model.model.layers):
        experts = block.mlp.experts
        for name in EXPERT_PARAMETERS:
            for e, matrix in enumerate(getattr(experts, name)):
                yield i, name, e, matrix


def _block_matrices_but_routers(model: torch.nn.Module, kind: str) -> tuple[int, int]:
    zeros = total = 0
    for block in model.model.layers:
        for name, parameter in block.named_parameters():
            is_bias = name.endswith("_bias")  # GPT-OSS keeps one bias vector per expert in a 2-d tensor
            if parameter.dim() >= 2 and name not in ROUTERS[kind] and not is_bias:
                zeros += int((parameter == 0).sum())
                total += parameter.numel()
    return zeros, total


def _moe_inputs(model: torch.nn.Module, ids: torch.Tensor, block: int = 0) -> torch.Tensor:
    """The tokens entering block ``block``'s mixture-of-experts layer, from the model's own forward."""
    seen: list[torch.Tensor] = []
    handle = model.model.layers[block].mlp.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).clone())
    )
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return torch.cat(seen)


def _routed(model: torch.nn.Module, x: torch.Tensor, block: int = 0) -> torch.Tensor:
    """``(tokens, experts)`` boolean: which experts each token goes to, from the router's logits and top-k."""
    router = model.model.layers[block].mlp.gate
    logits = x @ router.weight.detach().T
    top = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1).indices
    return torch.nn.functional.one_hot(top, logits.shape[-1]).sum(1).bool()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe", "gpt-oss"])
def test_experts_are_pruned_and_the_router_stays_dense(kind: str, calib_ids: torch.Tensor) -> None:
    model = make_model(kind)
    report = prune(model, calib_ids, PruneConfig(method="sparsegpt", sparsity=0.5, reconstruction="lr", **FAST))
    zeros, total = _block_matrices_but_routers(model, kind)
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    assert report.sparsity["overall"] == pytest.approx(0.5, abs=0.01)
    for i, name, e, matrix in _expert_slices(model):
        assert (matrix == 0).float().mean() >= 0.5, (i, name, e)
        assert report.sparsity["layers"][f"model.layers.{i}.mlp.experts.{name}[{e}]"] >= 0.5
        mask = report.masks[f"model.layers.{i}.mlp.experts.{name}"][e]
        assert int(mask.sum()) == mask.numel() // 2 and torch.all(matrix[~mask] == 0)
    for i, block in enumerate(model.model.layers):
        for router in ROUTERS[kind]:
            assert not torch.any(block.get_parameter(router) == 0), router
            assert report.sparsity["dense"][f"model.layers.{i}.{router}"]["reason"] == "router: kept dense"
    assert len(report.sparsity["dense"]) == len(ROUTERS[kind]) * len(model.model.layers)
    assert torch.isfinite(model(input_ids=calib_ids[:2]).logits).all()


def test_each_expert_follows_the_nm_pattern(calib_ids: torch.Tensor) -> None:
    model = make_model("mixtral")
    prune(model, calib_ids, PruneConfig(method="wanda", pattern="2:4", reconstruction="none", **FAST))
    for i, name, e, matrix in _expert_slices(model):
        for row in matrix:
            for start in range(0, len(row), 4):
                assert int((row[start : start + 4] != 0).sum()) <= 2, (i, name, e, start)


@pytest.mark.parametrize("expert_calibration", ["routed", "all-tokens"])
def test_sparsegpt_update_of_an_expert_uses_exactly_its_tokens(expert_calibration: str, calib_ids) -> None:
    """Block 0's expert update equals SparseGPT run by hand on that expert's weight with the Hessian of
    the tokens the router sends it (or of every token under ``expert_calibration='all-tokens'``)."""
    dense = make_model("mixtral")
    pruned = copy.deepcopy(dense)
    config = PruneConfig(
        method="sparsegpt", sparsity=0.5, reconstruction="lr", expert_calibration=expert_calibration, **FAST
    )
    report = prune(pruned, calib_ids, config)
    x = _moe_inputs(dense, calib_ids)
    routed = _routed(dense, x)
    assert report.experts["model.layers.0.mlp.experts"]["tokens"] == routed.sum(0).tolist()
    experts = dense.model.layers[0].mlp.experts
    for e in range(routed.shape[1]):
        tokens = x[routed[:, e]] if expert_calibration == "routed" else x
        assert len(tokens) > 0
        gate_up = experts.gate_up_proj[e].detach()
        gate, up = (tokens @ gate_up.T).chunk(2, dim=-1)
        for name, weight, inputs in (
            ("gate_up_proj", gate_up, tokens),
            ("down_proj", experts.down_proj[e].detach(), torch.nn.functional.silu(gate) * up),
        ):
            by_hand = SparseGPT(weight.shape[1])
            by_hand.add_batch(inputs)
            expected, mask = by_hand.prune(weight, 0.5, blocksize=16)
            got = getattr(pruned.model.layers[0].mlp.experts, name)[e].detach()
            assert torch.equal(got != 0, mask & (expected != 0)), (name, e)
            torch.testing.assert_close(got, expected * mask, rtol=1e-4, atol=1e-5)


def test_an_expert_no_token_reaches_is_reported_and_calibrated_on_all_tokens(calib_ids, caplog) -> None:
    model = make_model("mixtral")
    router = model.model.layers[0].mlp.gate

    def never_expert_3(_module, args, _output):  # the model routes around expert 3 in block 0
        logits = torch.nn.functional.linear(args[0].reshape(-1, router.hidden_dim), router.weight)
        logits[:, 3] = float("-inf")
        values, indices = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1)
        return logits, values / values.sum(-1, keepdim=True), indices

    router.register_forward_hook(never_expert_3)
    x = _moe_inputs(model, calib_ids)
    expected, _ = _sparsegpt_on(x, model.model.layers[0].mlp.experts.gate_up_proj[3].detach())
    with caplog.at_level(logging.WARNING, logger="recon_prune"):
        report = prune(model, calib_ids, PruneConfig(method="sparsegpt", reconstruction="lr", **FAST))
    entry = report.experts["model.layers.0.mlp.experts"]
    assert entry["tokens"][3] == 0 and entry["calibrated_on_all_tokens"] == [3]
    assert report.experts["model.layers.1.mlp.experts"]["calibrated_on_all_tokens"] == []
    assert "model.layers.0.mlp.experts" in caplog.text and "no calibration token" in caplog.text
    torch.testing.assert_close(model.model.layers[0].mlp.experts.gate_up_proj[3].detach(), expected)


def _sparsegpt_on(inputs: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    by_hand = SparseGPT(weight.shape[1])
    by_hand.add_batch(inputs)
    updated, mask = by_hand.prune(weight, 0.5, blocksize=16)
    return updated * mask, mask


@pytest.mark.parametrize("reconstruction", ["br", "br+gp+cr"])
def test_expert_masks_hold_through_reconstruction(reconstruction: str, calib_ids: torch.Tensor) -> None:
    model = make_model("qwen2-moe")
    masked_only = copy.deepcopy(model)
    report = prune(model, calib_ids, PruneConfig(method="wanda", reconstruction=reconstruction, **FAST))
    prune(masked_only, calib_ids, PruneConfig(method="wanda", reconstruction="none", **FAST))
    for i, name, e, matrix in _expert_slices(model):
        mask = report.masks[f"model.layers.{i}.mlp.experts.{name}"][e]
        assert torch.all(matrix[~mask] == 0), (i, name, e)
        reference = getattr(masked_only.model.layers[i].mlp.experts, name)[e]
        assert not torch.equal(matrix, reference), "reconstruction did not train the experts"
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert torch.isfinite(model(input_ids=calib_ids[:2]).logits).all()


def test_resumed_moe_run_keeps_the_expert_masks(calib_ids: torch.Tensor, tmp_path) -> None:
    config = PruneConfig(method="sparsegpt", reconstruction="br+cr", **FAST)
    reference = make_model("mixtral", layers=3)
    ref_report = prune(reference, calib_ids, config)

    def kill(i: int, _report) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(make_model("mixtral", layers=3), calib_ids, config, checkpoint_dir=tmp_path, block_callback=kill)
    resumed = make_model("mixtral", layers=3)
    report = prune(resumed, calib_ids, config, checkpoint_dir=tmp_path)
    assert report.resumed_from_block == 2
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert set(report.masks) == set(ref_report.masks)
    assert report.experts == ref_report.experts
    for name, mask in report.masks.items():
        assert torch.equal(mask, ref_report.masks[name]), name


def test_expert_calibration_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown expert_calibration 'all'; expected one of routed, all-tokens"):
        PruneConfig(expert_calibration="all")
