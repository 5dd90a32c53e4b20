"""Find the decoder blocks and linear layers of a Hugging Face causal LM without per-model code.

Decoder blocks are the longest ``nn.ModuleList`` whose members all share one class and whose length
equals ``config.num_hidden_layers`` (``n_layer`` for GPT-2) when the config says so. This finds
``model.model.layers`` (Llama, Mistral, Qwen2), ``model.model.decoder.layers`` (OPT) and
``transformer.h`` (GPT-2) alike.

The first block's inputs are captured with a forward pre-hook that records every positional and
keyword argument and then raises :class:`StopForward`, so nothing past the embeddings runs. The
arguments besides the hidden states (rotary ``position_embeddings``, masks, ``position_ids``, cache
positions, ...) are replayed unchanged to every block; they are built for one sample and broadcast
over a batch of samples, which holds for causal attention without padding.

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

log = logging.getLogger(__name__)

try:  # transformers is a hard dependency, but keep the adapter importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)  # type: ignore[assignment]


class UnsupportedModelError(ValueError):
    """The model's decoder blocks (or their linear layers) cannot be found generically."""


class StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


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
    """The prunable linear layers of one block, by name (``nn.Linear`` and GPT-2 ``Conv1D``)."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, LINEAR_TYPES)}
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


@dataclass
class BlockInputs:
    """Everything the first decoder block received, except the hidden states."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_as_kwarg: bool = False

    def to(self, device: torch.device | str) -> BlockInputs:
        from accelerate.utils import send_to_device

        return BlockInputs(
            args=tuple(send_to_device(list(self.args), device)),
            kwargs=send_to_device(self.kwargs, device),
            hidden_as_kwarg=self.hidden_as_kwarg,
        )

    def call(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            return block_output(block(*self.args, hidden_states=hidden, **self.kwargs))
        return block_output(block(hidden, *self.args, **self.kwargs))


def run_blocks(blocks: Sequence[nn.Module], inputs: BlockInputs, hidden: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        hidden = inputs.call(block, hidden)
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


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    device: torch.device | str,
    offload_device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, BlockInputs]:
    """Hidden states entering block 0 for every row of ``input_ids`` (on ``offload_device``) and the
    other arguments of that call (from the first row, to be replayed)."""
    path, blocks = find_decoder_blocks(model)
    moved = list(_non_block_modules(model, path))
    original_devices = []
    for module in moved:
        first = next(iter(module.parameters()), None)
        if first is None:
            first = next(iter(module.buffers()), None)
        original_devices.append(first.device if first is not None else None)
        module.to(device)
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["args"], captured["kwargs"] = args, dict(kwargs)
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    hidden_rows: list[torch.Tensor] = []
    replay: BlockInputs | None = None
    try:
        for row in input_ids:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except StopForward:
                pass
            else:  # pragma: no cover - a model that never calls its blocks
                raise UnsupportedModelError(f"{type(model).__name__}.forward never called its decoder block 0 ({path})")
            args, kwargs = captured["args"], captured["kwargs"]
            if args:
                hidden, rest, as_kwarg = args[0], tuple(args[1:]), False
            else:
                hidden, rest, as_kwarg = kwargs.pop("hidden_states"), (), True
            hidden_rows.append(hidden.detach().to(offload_device))
            if replay is None:
                kwargs.pop("past_key_values", None)
                kwargs.pop("past_key_value", None)
                kwargs.pop("layer_past", None)
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                replay = BlockInputs(args=rest, kwargs=kwargs, hidden_as_kwarg=as_kwarg).to(offload_device)
    finally:
        handle.remove()
        for module, dev in zip(moved, original_devices, strict=False):
            if dev is not None:
                module.to(dev)
    assert replay is not None
    return torch.cat(hidden_rows, dim=0), replay
