"""Find the decoder blocks and linear layers of a Hugging Face causal LM without per-model code.

Decoder blocks are the longest ``nn.ModuleList`` whose members all share one class and whose length
equals ``config.num_hidden_layers`` (``n_layer`` for GPT-2) when the config says so. This finds
``model.model.layers`` (Llama, Mistral, Qwen2), ``model.model.decoder.layers`` (OPT) and
``transformer.h`` (GPT-2) alike.

Every block's own call arguments are captured: one forward of the first calibration row runs the
whole stack (one block on the compute device at a time) with a forward pre-hook on every block that
records its positional and keyword arguments, and stops after the last block. Blocks of one model
need not share their arguments: Gemma2/Gemma3, Cohere2, GPT-OSS and Qwen2 with
``use_sliding_window`` (``config.layer_types``) give sliding-window layers a different attention mask,
and Gemma3 local layers different rotary embeddings, so block 0's arguments replayed to block 1
would compute another function. The other rows stop at block 0 (:class:`StopForward`), so nothing
past the embeddings runs for them. The arguments besides the hidden states (rotary
``position_embeddings``, masks, ``position_ids``, cache positions, ...) are built for one sample and
broadcast over a batch of samples, which holds for causal attention without padding.

GPT-2 stores its projections as ``transformers.pytorch_utils.Conv1D`` with the weight transposed
(``(in, out)``); :func:`weight_matrix` always returns the ``(out, in)`` view.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from recon_prune.experts import router_modules

log = logging.getLogger(__name__)

try:  # transformers is a hard dependency, but keep the adapter importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)  # type: ignore[assignment]


class UnsupportedModelError(ValueError):
    """The model's decoder blocks (or their linear layers) cannot be found generically."""


class StopForward(Exception):
    """Raised by the capture hooks once the inputs they need are recorded (nothing after runs)."""


def _expected_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def max_positions(model: nn.Module) -> int | None:
    """The model's context length from its config (``max_position_embeddings``, GPT-2's ``n_positions``
    or ``n_ctx``), or None when the config records none."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_path, blocks)`` of the model's decoder blocks or raise UnsupportedModelError."""
    expected = _expected_layers(model)
    candidates: list[tuple[str, nn.ModuleList]] = []
    seen: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(child).__name__ for child in module}
            seen.append(f"{name or '<root>'} ({len(module)} x {'/'.join(sorted(classes))})")
            if len(classes) == 1 and any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
                candidates.append((name, module))
    if expected is not None:
        matching = [c for c in candidates if len(c[1]) == expected]
        candidates = matching or candidates
    if not candidates:
        raise UnsupportedModelError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected an nn.ModuleList of identical "
            f"blocks containing nn.Linear/Conv1D layers"
            + (f" with config.num_hidden_layers={expected} entries" if expected is not None else "")
            + f"; found module lists: {', '.join(seen) if seen else 'none'}"
        )
    name, blocks = max(candidates, key=lambda c: len(c[1]))
    return name, blocks


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The prunable linear layers of one block, by name (``nn.Linear`` and GPT-2 ``Conv1D``); a
    mixture-of-experts router that is an ``nn.Linear`` (Qwen2-MoE's ``shared_expert_gate``) stays
    dense (:func:`recon_prune.experts.router_modules`)."""
    routers = {id(module) for module in router_modules(block).values()}
    linears = {name: m for name, m in block.named_modules() if isinstance(m, LINEAR_TYPES) and id(m) not in routers}
    if not linears:
        raise UnsupportedModelError(f"block {type(block).__name__} contains no nn.Linear or Conv1D layer")
    return linears


def is_transposed(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out_features, in_features)`` (a transposed view for Conv1D)."""
    weight = module.weight
    return weight.t() if is_transposed(module) else weight


def to_native_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_matrix` for a tensor shaped ``(out, in)``."""
    return matrix.t().contiguous() if is_transposed(module) else matrix.contiguous()


def block_output(output: Any) -> torch.Tensor:
    """Blocks return a tensor (current transformers) or a tuple whose first item is the hidden states."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UnsupportedModelError(f"decoder block returned {type(output).__name__}; expected a tensor or a tuple")


def _move(value: Any, device: torch.device | str, memo: dict[int, Any]) -> Any:
    """``value`` with every tensor on ``device``; a tensor shared by several blocks' arguments (the
    rotary embeddings, one mask per layer type) is moved once and stays shared."""
    if isinstance(value, torch.Tensor):
        # the original is kept in the memo too: were it freed, a new tensor could reuse its id
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(device))
        return memo[id(value)][1]
    if isinstance(value, dict):
        return {key: _move(item, device, memo) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_move(item, device, memo) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_move(item, device, memo) for item in value)
    if hasattr(value, "to") and callable(value.to):  # e.g. a flex-attention BlockMask
        return value.to(device)
    return value


@dataclass
class BlockInputs:
    """Everything one decoder block received, except the hidden states."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_as_kwarg: bool = False

    def to(self, device: torch.device | str, memo: dict[int, Any] | None = None) -> BlockInputs:
        memo = {} if memo is None else memo
        return BlockInputs(
            args=tuple(_move(list(self.args), device, memo)),
            kwargs=_move(self.kwargs, device, memo),
            hidden_as_kwarg=self.hidden_as_kwarg,
        )

    def call(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            return block_output(block(*self.args, hidden_states=hidden, **self.kwargs))
        return block_output(block(hidden, *self.args, **self.kwargs))


class BlockCalls(Sequence[BlockInputs]):
    """The captured arguments of every decoder block, by block index (``calls[i]`` is block i's)."""

    def __init__(self, calls: Sequence[BlockInputs]) -> None:
        self._calls = list(calls)

    def __len__(self) -> int:
        return len(self._calls)

    def __getitem__(self, index):  # type: ignore[override]
        return self._calls[index]

    def to(self, device: torch.device | str) -> BlockCalls:
        memo: dict[int, Any] = {}  # one memo for all blocks keeps shared tensors shared
        return BlockCalls([call.to(device, memo) for call in self._calls])


def run_blocks(
    blocks: Sequence[nn.Module], inputs: BlockInputs | Sequence[BlockInputs], hidden: torch.Tensor
) -> torch.Tensor:
    """Apply ``blocks`` in turn; ``inputs`` holds each block's own arguments, in the same order (one
    :class:`BlockInputs` is replayed to every block, which is right only when all blocks share them)."""
    calls = [inputs] * len(blocks) if isinstance(inputs, BlockInputs) else list(inputs)
    if len(calls) != len(blocks):
        raise ValueError(f"{len(blocks)} blocks but the arguments of {len(calls)}")
    for block, call in zip(blocks, calls, strict=True):
        hidden = call.call(block, hidden)
    return hidden


def _non_block_modules(model: nn.Module, blocks_path: str) -> Iterator[nn.Module]:
    """Direct children along the path to the blocks that are not on that path (embeddings, norms, ...)."""
    parts = blocks_path.split(".") if blocks_path else []
    node = model
    for part in parts:
        for name, child in node.named_children():
            if name != part:
                yield child
        node = getattr(node, part)


def _module_device(module: nn.Module) -> torch.device | None:
    first = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    return first.device if first is not None else None


def _split_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, BlockInputs]:
    """The hidden states of one block call and the rest, without the KV cache (replays must not grow it)."""
    kwargs = dict(kwargs)
    if args:
        hidden, rest, as_kwarg = args[0], tuple(args[1:]), False
    else:
        hidden, rest, as_kwarg = kwargs.pop("hidden_states"), (), True
    for key in ("past_key_values", "past_key_value", "layer_past"):
        kwargs.pop(key, None)
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return hidden, BlockInputs(args=rest, kwargs=kwargs, hidden_as_kwarg=as_kwarg)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    device: torch.device | str,
    offload_device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, BlockCalls]:
    """Hidden states entering block 0 for every row of ``input_ids`` (on ``offload_device``) and every
    block's own call arguments (from the first row, to be replayed; see the module docstring)."""
    path, blocks = find_decoder_blocks(model)
    moved = list(_non_block_modules(model, path))
    original_devices = [_module_device(module) for module in moved]
    for module in moved:
        module.to(device)
    calls: dict[int, BlockInputs] = {}
    hidden_rows: list[torch.Tensor] = []
    state = {"whole_stack": True}
    homes: dict[int, torch.device | None] = {}
    offload_memo: dict[int, Any] = {}  # one copy of a tensor that several blocks receive

    def pre_hook(index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden, call = _split_call(args, kwargs)
        if index == 0:
            hidden_rows.append(hidden.detach().to(offload_device))
        if not state["whole_stack"]:
            raise StopForward
        calls[index] = call.to(offload_device, offload_memo)
        homes[index] = _module_device(module)
        module.to(device)  # one block on the compute device at a time

    def post_hook(index: int, module: nn.Module, _args: Any, _output: Any) -> None:
        if homes.get(index) is not None:
            module.to(homes[index])
        if index == len(blocks) - 1:
            raise StopForward  # the final norm and the LM head are not needed

    handles = []
    for index, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(lambda m, a, k, index=index: pre_hook(index, m, a, k), with_kwargs=True)
        )
        handles.append(block.register_forward_hook(lambda m, a, o, index=index: post_hook(index, m, a, o)))
    try:
        for row_index, row in enumerate(input_ids):
            state["whole_stack"] = row_index == 0
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except StopForward:
                pass
            else:  # pragma: no cover - a model that never calls its blocks
                raise UnsupportedModelError(f"{type(model).__name__}.forward never called its decoder block 0 ({path})")
            if row_index == 0 and len(calls) != len(blocks):
                missing = sorted(set(range(len(blocks))) - set(calls))
                raise UnsupportedModelError(
                    f"{type(model).__name__}.forward did not call decoder blocks {missing} of {path}"
                )
    finally:
        for handle in handles:
            handle.remove()
        for index, home in homes.items():
            if home is not None:
                blocks[index].to(home)
        for module, dev in zip(moved, original_devices, strict=False):
            if dev is not None:
                module.to(dev)
    return torch.cat(hidden_rows, dim=0), BlockCalls([calls[i] for i in range(len(blocks))])
