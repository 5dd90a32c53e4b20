"""ASAM's rescaling ``T`` (Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization", ICML 2021,
eq. 9 and Algorithm 1) and its rule for which parameters it applies to.

``T = |w| + eta`` for a rescaled parameter and ``T = 1`` otherwise; SAM's ascent is then
``e = rho * T^2 g / ||T g||``. The ``eta`` offset of the official ASAM is kept (davda54/sam uses
``T = |w|``), so zero weights still move. As in the official implementation (SamsungLabs/ASAM,
``asam.py``) only *weights* are rescaled: parameters whose name contains ``"weight"``; biases keep
``T = 1``. Names come from ``model=`` or from named parameter groups (``param_names``, as
``model.named_parameters()`` gives them); without a name a parameter counts as a weight when it
has more than one dimension, which leaves 1-D normalisation weights unscaled, unlike the name
rule. ``adaptive_scope="all"`` rescales every parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["AsamScaling"]


class AsamScaling:
    """ASAM's ``T`` for the parameters of one optimizer, knowing their names where it can."""

    def __init__(self, model: nn.Module | None, param_groups: Iterable[dict[str, Any]] = ()) -> None:
        self.names: dict[torch.Tensor, str] = (
            {p: name for name, p in model.named_parameters()} if model is not None else {}
        )
        for group in param_groups:
            self.add_group(group)

    def add_group(self, group: dict[str, Any]) -> None:
        """Take the names of a group given as named parameters; they take precedence over the model's."""
        if "param_names" not in group:
            return
        names, params = group["param_names"], group["params"]
        if len(names) != len(params):
            raise ValueError(
                f"a parameter group has {len(names)} param_names for {len(params)} params; "
                "expected one name per parameter"
            )
        self.names.update(zip(params, names, strict=True))

    def is_weight(self, p: torch.Tensor) -> bool:
        name = self.names.get(p)
        # SamsungLabs/ASAM rescales parameters named "...weight..." and leaves biases alone
        return "weight" in name if name is not None else p.ndim > 1

    @torch.no_grad()
    def scale(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
        """``T`` for ``p`` in ``group``, or None for ``T = 1`` (plain SAM, or a parameter ASAM leaves alone)."""
        if not group["adaptive"]:
            return None
        if group["adaptive_scope"] == "weights" and not self.is_weight(p):
            return None
        return p.abs() + group["adaptive_eta"]
