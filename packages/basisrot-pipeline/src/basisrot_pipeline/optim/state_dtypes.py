"""Loading an optimizer's state without ``torch.optim.Optimizer``'s cast to the parameter's dtype.

``Optimizer.load_state_dict`` casts every floating-point state tensor except ``step`` to its
parameter's dtype. For half-precision weights that silently lowers state kept in float32 on
purpose (basis rotation's moments, statistics and bases; NAdam's ``mu_product``), so a resumed run
drifts from the uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """After ``Optimizer.load_state_dict``: put back each floating state tensor as saved (dtype and precision).

    The tensors are copied from ``state_dict`` onto the parameter's device, so the loaded state shares
    no storage with ``state_dict`` (the cast of the base class made copies too).
    """
    saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for saved_id, param in zip(saved_ids, params, strict=True):
        for key, value in state_dict["state"].get(saved_id, {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                optimizer.state[param][key] = value.to(device=param.device, copy=True)


class KeepsStateDtypes(torch.optim.Optimizer):
    """Mixin: ``load_state_dict`` keeps the saved dtype of floating state (see :func:`restore_saved_dtypes`)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)
