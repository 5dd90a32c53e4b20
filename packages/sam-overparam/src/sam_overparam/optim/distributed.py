"""Data-parallel helpers of SAM: the unsynchronised clean pass and agreeing on a gradient overflow.

Under DDP, SAM's clean pass runs under ``model.no_sync()``, so each device perturbs with its own
shard's gradient (m-sharpness with m = the per-device batch, as in the paper); only the perturbed
pass all-reduces. An overflow in the clean pass can then happen on one rank only, and every rank
must agree to skip the step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

__all__ = ["found_inf_on_any_rank", "local_gradients"]


def local_gradients(model: nn.Module | None) -> contextlib.AbstractContextManager[Any]:
    """``model.no_sync()`` for a data-parallel model (backward passes keep their gradients local), else nothing."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()


def found_inf_on_any_rank(found_inf: bool, model: nn.Module | None) -> bool:
    """``found_inf`` OR-ed over the ranks of ``model``'s process group, where that is needed.

    Only a data-parallel ``model`` (one with ``no_sync()``, e.g. DDP) has its clean pass run
    unsynchronised, so an overflow can occur on one rank only; every rank must then skip, or the
    others would wait forever in the perturbed pass's all-reduce. Otherwise the clean pass
    already synchronised the gradients (or each rank trains on its own, as in a seed sweep with
    one run per rank) and no collective is issued: one here would be matched by nobody. The
    flag is reduced over ``model.process_group`` (the default group when DDP has none) and lives
    on the model's parameter device, which is one the backend accepts (CUDA for NCCL).
    """
    if not callable(getattr(model, "no_sync", None)):
        return found_inf
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return found_inf
    group = getattr(model, "process_group", None)
    if dist.get_world_size(group) < 2:
        return found_inf
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    flag = torch.tensor([1.0 if found_inf else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)
