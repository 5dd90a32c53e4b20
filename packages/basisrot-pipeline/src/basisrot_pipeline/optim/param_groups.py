"""Split a model's parameters into rotated matrices and AdamW parameters.

Following the paper (arXiv 2602.03515, Section 5 setup), only the attention and MLP linear
weights are rotated; embeddings, norms, biases and the LM head use AdamW.
"""

from __future__ import annotations

from typing import Any

from torch import nn

HEAD_NAMES = ("lm_head",)


def split_rotated_parameters(
    module: nn.Module, *, head_names: tuple[str, ...] = HEAD_NAMES
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(rotated, adamw)``: weights of ``nn.Linear`` layers (not the head) vs everything else."""
    rotated: list[nn.Parameter] = []
    rotated_ids: set[int] = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and name.split(".")[-1] not in head_names:
            rotated.append(sub.weight)
            rotated_ids.add(id(sub.weight))
    adamw = [p for p in module.parameters() if id(p) not in rotated_ids]
    return rotated, adamw


def rotation_param_groups(module: nn.Module, **rotated_options: Any) -> list[dict[str, Any]]:
    """Parameter groups for :class:`BasisRotation`: one rotated group, one ``rotate=False`` group."""
    rotated, adamw = split_rotated_parameters(module)
    groups = []
    if rotated:
        groups.append({"params": rotated, "rotate": True, **rotated_options})
    if adamw:
        groups.append({"params": adamw, "rotate": False})
    return groups
