"""SAM's settings in parameter groups: checking them, completing groups added or loaded later, and
deciding who applies the weight decay.

A SAM parameter group holds SAM's own keys (:data:`SAM_GROUP_KEYS`) beside the base optimizer's
(``lr``, ``momentum``, its own ``weight_decay`` ...), in one dict shared by both optimizers.
SAM's decay is stored as ``sam_weight_decay`` so that it never collides with the base's key.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "ADAPTIVE_SCOPES",
    "SAM_GROUP_KEYS",
    "check_adaptive_scope",
    "check_arguments",
    "check_base_optimizer",
    "check_group",
    "check_number",
    "complete_group",
    "complete_loaded_group",
    "decouples_weight_decay",
    "hand_decay_to_base",
    "settle_weight_decay",
]

ADAPTIVE_SCOPES = ("weights", "all")
# SAM's own per-group settings (the rest of a group belongs to the base optimizer)
SAM_GROUP_KEYS = (
    "rho",
    "adaptive",
    "adaptive_eta",
    "adaptive_scope",
    "unnormalized",
    "sam_weight_decay",
    "weight_decay_in_ascent",
)


def check_base_optimizer(base_optimizer: Any) -> None:
    """Refuse anything but an optimizer class (an instance is the commonest slip)."""
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"base_optimizer must be an optimizer class such as torch.optim.SGD, got the instance "
            f"{type(base_optimizer).__name__}(...); pass the class and its keyword arguments to SAM"
        )
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(
            f"base_optimizer must be a subclass of torch.optim.Optimizer (e.g. torch.optim.SGD), got {base_optimizer!r}"
        )


def check_number(name: str, value: Any, where: str = "") -> None:
    """``value`` must be a finite number >= 0 (a bool is not a number here)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}{where}")


def check_adaptive_scope(scope: Any, where: str = "") -> None:
    if scope not in ADAPTIVE_SCOPES:
        raise ValueError(f"adaptive_scope must be one of {ADAPTIVE_SCOPES}, got {scope!r}{where}")


def check_arguments(
    *, rho: Any, adaptive_eta: Any, eps: Any, weight_decay: Any, adaptive_scope: Any, max_grad_norm: Any
) -> None:
    """SAM's constructor arguments, each refused in one line naming it."""
    for name, value in (("rho", rho), ("adaptive_eta", adaptive_eta), ("eps", eps), ("weight_decay", weight_decay)):
        if value is not None:
            check_number(name, value)
    check_adaptive_scope(adaptive_scope)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")


def check_group(group: dict[str, Any]) -> None:
    """The SAM settings of one complete parameter group (and the base's ``weight_decay`` if it sets one)."""
    checked = [("rho", "rho"), ("adaptive_eta", "adaptive_eta"), ("sam_weight_decay", "weight_decay")]
    if "weight_decay" in group:  # the base optimizer's own decay, set per group
        checked.append(("weight_decay", "weight_decay"))
    for key, shown in checked:
        check_number(shown, group[key], f" in a parameter group (key {key!r})")
    check_adaptive_scope(group["adaptive_scope"], " in a parameter group")


def decouples_weight_decay(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` applies its ``weight_decay`` to the weights rather than to the gradient
    (``torch.optim.AdamW``, or any whose defaults say ``decoupled_weight_decay=True``; Loshchilov &
    Hutter, ICLR 2019)."""
    return isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.defaults.get("decoupled_weight_decay", False))


def settle_weight_decay(
    base: torch.optim.Optimizer, defaults: dict[str, Any], own_decay: list[bool], weight_decay: float | None
) -> bool:
    """After SAM built ``base`` on its groups: whether ``base`` decouples its decay, and if so, hand
    SAM's decay to it in every group (``own_decay[i]``: group ``i`` set the base's ``weight_decay``
    itself) and in ``defaults``, for groups added later. ``weight_decay`` is SAM's argument."""
    if not decouples_weight_decay(base):
        return False
    for group, own in zip(base.param_groups, own_decay, strict=True):
        hand_decay_to_base(group, type(base).__name__, own_decay=own, sam_decay_given=weight_decay is not None)
    if weight_decay is not None:
        defaults.update(weight_decay=weight_decay, sam_weight_decay=0.0)
    return True


def complete_group(group: dict[str, Any], defaults: dict[str, Any], *, decoupled_base: str | None) -> None:
    """Complete a group added after construction (``add_param_group``) from SAM's defaults, check it,
    and, for a decoupled base optimizer named ``decoupled_base``, hand SAM's decay to it."""
    own_decay, sam_decay_given = "weight_decay" in group, "sam_weight_decay" in group
    for key, value in defaults.items():
        group.setdefault(key, value)
    check_group(group)
    if decoupled_base is not None:
        hand_decay_to_base(group, decoupled_base, own_decay=own_decay, sam_decay_given=sam_decay_given)


def complete_loaded_group(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A group of a loaded state dict: SAM settings missing from an older checkpoint (one written
    before ``adaptive_scope`` existed) come from the constructor's, not from a silent fallback."""
    for key in SAM_GROUP_KEYS:
        group.setdefault(key, defaults[key])
    check_group(group)


def hand_decay_to_base(group: dict[str, Any], base_name: str, *, own_decay: bool, sam_decay_given: bool) -> None:
    """Move SAM's decay of ``group`` to a decoupled base optimizer's ``weight_decay``.

    davda54/sam passes ``weight_decay`` to the base optimizer, so ``AdamW`` decays decoupled there
    too; adding it to the gradient as well would decay twice (L2 plus AdamW's default).
    ``own_decay``: the group set the base's ``weight_decay`` itself; ``sam_decay_given``: SAM's
    ``weight_decay`` argument was given (even as 0, which then turns the base's default off).
    """
    if not (group["sam_weight_decay"] or sam_decay_given):
        return  # nothing of SAM's: the base optimizer keeps its own (default) decay
    if group["weight_decay_in_ascent"] and group["sam_weight_decay"]:
        raise ValueError(
            "weight_decay_in_ascent=True makes the decay an L2 term of the loss, but the base optimizer "
            f"{base_name} decouples its weight decay from the gradient: use a coupled base (SGD, Adam) for "
            "decay in the ascent, or drop weight_decay_in_ascent"
        )
    if own_decay:
        if group["sam_weight_decay"]:
            raise ValueError(
                f"a parameter group sets weight_decay={group['weight_decay']!r} for the decoupled base "
                f"optimizer and SAM has weight_decay={group['sam_weight_decay']!r}: give one, not both"
            )
        return
    group["weight_decay"] = group["sam_weight_decay"]
    group["sam_weight_decay"] = 0.0
