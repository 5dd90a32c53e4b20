"""m-sharpness (Foret et al., Sec. 4.1): one SAM perturbation per chunk of the batch, one base step.

Each chunk ``k`` gets its own ascent ``e_k`` from ``grad L_k(w)``; the descent gradient is
``sum_k weights[k] * grad L_k(w + e_k)``. Each chunk's clean pass is an ordinary training forward,
so with ``model=`` the one set of BatchNorm running statistics takes one momentum update per
chunk (``k`` per step, from each chunk's batch statistics) and the perturbed passes take none.
This is not what ``k`` devices do: each of their BatchNorms takes one update per step, and DDP
then broadcasts rank 0's buffers. Under DDP the clean passes run without gradient sync
and the perturbed ones with it, so ``m`` is the chunk size on each device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sam_overparam.optim.distributed import local_gradients

if TYPE_CHECKING:
    from sam_overparam.optim.sam import SAM

__all__ = ["chunked_step"]


def chunked_step(
    sam: SAM, closure: Callable[[Any], torch.Tensor], chunks: Sequence[Any], weights: Sequence[float] | None
) -> torch.Tensor:
    """One m-sharpness step of ``sam``; ``closure(chunk)`` computes the chunk's mean loss and calls
    backward. Returns the weighted clean loss."""
    if weights is None:
        raise ValueError("chunk_weights are required with chunks (e.g. chunk size / batch size)")
    if len(chunks) != len(weights) or not chunks:
        raise ValueError(f"need one weight per chunk and at least one chunk, got {len(chunks)} and {len(weights)}")
    total: dict[torch.Tensor, torch.Tensor] = {}
    clean_loss = 0.0
    for chunk, weight in zip(chunks, weights, strict=True):
        sam.zero_grad()
        # the clean pass stays local, so under DDP each device's chunk has its own perturbation
        with torch.enable_grad(), local_gradients(sam.model):
            clean_loss += weight * float(closure(chunk).detach())
        sam.first_step(zero_grad=True)
        with sam.perturbed_pass():
            closure(chunk)
        sam.restore()
        with torch.no_grad():
            for _, p in sam._params():
                if p in total:
                    total[p].add_(p.grad, alpha=weight)
                else:
                    total[p] = p.grad.mul(weight)
    for group in sam.param_groups:
        for p in group["params"]:
            p.grad = total.get(p)
    with torch.no_grad():
        sam._descent_gradient_ready()
    sam.base_optimizer.step()
    return torch.tensor(clean_loss)
