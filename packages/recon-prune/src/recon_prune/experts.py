"""Mixture-of-experts layers whose experts are fused 3-d parameters, and the routers kept dense.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS and the like as one
module (decorated by ``transformers.integrations.moe.use_experts_implementation``) holding
``gate_up_proj`` (or ``up_proj`` without a gate) and ``down_proj`` of shape ``(experts, out, in)``
(``(experts, in, out)`` when ``is_transposed``), called as ``experts(hidden_states, top_k_index,
top_k_weights)`` with the router's choice. Each expert's slice of these tensors is one weight matrix
and is pruned like a linear layer, from the inputs that expert sees:

- ``routed`` (default): the tokens the model's own router sends to that expert, read from the
  ``top_k_index`` the experts module receives, so the statistics follow whatever routing the model
  does (top-k, normalised or not, capacity rules inside the router);
- ``all-tokens``: every token goes through every expert for the statistics only, the way
  llm-compressor calibrates MoE models (its ``calibrate_all_experts`` modules); the block's output
  is unchanged.

The down projection's inputs are the expert's own gated activations of the same tokens
(``_apply_gate`` of the up projection, or ``act_fn`` without a gate), computed from the weights as
they are when the statistics are collected, as for the linear layers of the block.

An expert that no calibration token reaches under ``routed`` cannot get a Hessian (SparseGPT) or
input norms (Wanda) from routing: it is calibrated on all tokens instead, and the run's report lists
it (``PruneReport.experts[...]['calibrated_on_all_tokens']``) and a warning names it.

Routers stay dense (llm-compressor's MoE examples leave ``mlp.gate`` out too): a
direct child of a module that has an ``experts`` child whose name contains ``gate`` or ``router``
(``mlp.gate``, Qwen2-MoE's one-output ``mlp.shared_expert_gate``, GPT-OSS ``mlp.router``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module whose experts are slices of 3-d parameters."""
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return False
    tensors = [getattr(module, name, None) for name in expert_parameter_names(module)]
    return all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in tensors)


def expert_parameter_names(module: nn.Module) -> tuple[str, str]:
    """The fused parameters in the order the experts apply them: up (with gate), then down."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj")


def find_fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules of one block, by name."""
    return {name: module for name, module in block.named_modules() if is_fused_experts(module)}


def router_modules(block: nn.Module) -> dict[str, nn.Module]:
    """The routers of every mixture-of-experts layer of ``block``, by name (see the module docstring)."""
    routers = {}
    for owner_name, owner in block.named_modules():
        children = dict(owner.named_children())
        if "experts" not in children:
            continue
        for child_name, child in children.items():
            if child_name != "experts" and ("gate" in child_name.lower() or "router" in child_name.lower()):
                routers[f"{owner_name}.{child_name}" if owner_name else child_name] = child
    return routers


def expert_matrix(module: nn.Module, name: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s slice of fused parameter ``name`` as an ``(out, in)`` view."""
    matrix = getattr(module, name)[expert]
    return matrix.t() if module.is_transposed else matrix


def to_native_expert_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`expert_matrix` for one ``(out, in)`` matrix."""
    return matrix.t().contiguous() if module.is_transposed else matrix.contiguous()


def routed_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states (tokens, hidden), top_k_index (tokens, k))`` of one call of an experts module.

    The experts API takes the hidden states and the chosen experts as its first two arguments,
    whatever a model names them (GPT-OSS: ``router_indices``)."""
    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs)
    first, second = list(signature.parameters)[:2]
    hidden = bound.arguments[first]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden, bound.arguments[second].reshape(hidden.shape[0], -1)


def expert_inputs(module: nn.Module, expert: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of expert ``expert``'s up and down projections for ``tokens`` (its own activations)."""
    up_name, _ = expert_parameter_names(module)
    bias = getattr(module, f"{up_name}_bias")[expert] if getattr(module, "has_bias", False) else None
    hidden = nn.functional.linear(tokens, expert_matrix(module, up_name, expert), bias)
    hidden = module._apply_gate(hidden) if module.has_gate else module.act_fn(hidden)
    return tokens, hidden


def tokens_per_expert(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``(tokens, experts)`` boolean: which experts each token was sent to (indices past the last
    expert, expert-parallel sentinels, are ignored)."""
    valid = (index >= 0) & (index < num_experts)
    chosen = torch.zeros(index.shape[0], num_experts + 1, dtype=torch.bool, device=index.device)
    chosen.scatter_(1, torch.where(valid, index, num_experts), True)
    return chosen[:, :num_experts]


class ExpertStatistics:
    """The mask statistics of every expert of one fused experts module, fed by :meth:`hook` (a forward
    pre-hook with kwargs on the module) from the module's own calls.

    ``all_tokens_for`` names the experts that see every token; the others see the tokens routed to
    them, unless ``routed`` is False (then they see nothing: a second pass for the experts no token
    reached). ``tokens`` counts the routed tokens of each expert while ``count`` is True.
    """

    def __init__(self, module: nn.Module, collector: Any, device: torch.device) -> None:
        self.names = expert_parameter_names(module)
        self.num_experts = getattr(module, self.names[1]).shape[0]
        self.stats = {
            (name, e): collector(expert_matrix(module, name, e).shape[1], device)
            for name in self.names
            for e in range(self.num_experts)
        }
        self.tokens = [0] * self.num_experts
        self.all_tokens_for: set[int] = set()
        self.routed = True
        self.count = True

    @torch.no_grad()
    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden, index = routed_call(module, args, kwargs)
        chosen = tokens_per_expert(index, self.num_experts)
        if self.count:
            self.tokens = [total + int(n) for total, n in zip(self.tokens, chosen.sum(0).tolist(), strict=True)]
        for e in range(self.num_experts):
            if e in self.all_tokens_for:
                rows = hidden
            elif self.routed:
                rows = hidden[chosen[:, e]]
            else:
                continue
            if rows.shape[0] == 0:
                continue
            for name, inputs in zip(self.names, expert_inputs(module, e, rows), strict=True):
                self.stats[(name, e)].add_batch(inputs)
