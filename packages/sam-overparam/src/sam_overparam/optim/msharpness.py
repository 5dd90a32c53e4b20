"""m-sharpness (Foret et al., Sec. 4.1): one SAM perturbation per chunk of the batch, one base step.

Each chunk ``k`` gets its own ascent ``e_k`` from ``grad L_k(w)``; the descent gradient is
``sum_k weights[k] * grad L_k(w + e_k)``. Each chunk's clean pass is an ordinary training forward,
so with ``model=`` the one set of BatchNorm running statistics takes one momentum update per
chunk (``k`` per step, from each chunk's batch statistics) and the perturbed passes take none.
This is not what ``k`` devices do: each of their BatchNorms takes one update per step, and DDP
then broadcasts rank 0's buffers. Under DDP the clean passes and all but the last perturbed pass
run without gradient sync, and the last perturbed backward carries the weighted sum of the
chunks' perturbed gradients: one all-reduce per step, and ``m`` is the chunk size on each device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sam_overparam.optim.distributed import local_gradients

if TYPE_CHECKING:
    from sam_overparam.optim.sam import SAM

__all__ = ["chunked_step"]


def chunked_step(
    sam: SAM,
    closure: Callable[[Any], torch.Tensor],
    chunks: Sequence[Any],
    weights: Sequence[float] | None,
    grad_scaler: torch.amp.GradScaler | None = None,
    gradients_present: bool = False,
) -> torch.Tensor:
    """One m-sharpness step of ``sam``; ``closure(chunk)`` computes the chunk's mean loss and calls
    backward. Returns the weighted clean loss. ``gradients_present``: a caller's backward already
    wrote gradients, which this step would silently mix into the first chunk's clean pass."""
    if grad_scaler is not None:
        raise ValueError("m-sharpness chunks with a GradScaler are not supported")
    if gradients_present:
        raise ValueError(
            "step_chunked() runs each chunk's clean pass itself, but gradients were computed before "
            "it; call zero_grad() before step_chunked()"
        )
    if weights is None:
        raise ValueError("chunk_weights are required with chunks (e.g. chunk size / batch size)")
    if len(chunks) != len(weights) or not chunks:
        raise ValueError(f"need one weight per chunk and at least one chunk, got {len(chunks)} and {len(weights)}")
    if not all(math.isfinite(float(w)) and float(w) > 0 for w in weights):
        raise ValueError(f"chunk weights must be finite numbers > 0, got {[float(w) for w in weights]}")
    total: dict[torch.Tensor, torch.Tensor] = {}
    clean_loss = 0.0
    last = len(chunks) - 1
    for index, (chunk, weight) in enumerate(zip(chunks, weights, strict=True)):
        clean_loss += weight * float(sam._clean_pass(closure, chunk))
        sam.first_step(zero_grad=True)
        if index == last:
            # The other chunks' sum rides on the last perturbed backward, so that a data-parallel
            # model all-reduces once per step: .grad = total / weight + g_last, times weight below.
            with torch.no_grad():
                for p, summed in total.items():
                    # onto the decay term first_step() may have put there (weight_decay_in_ascent)
                    p.grad = summed.div_(weight) if p.grad is None else p.grad.add_(summed.div_(weight))
        sync = contextlib.nullcontext() if index == last else local_gradients(sam.model)
        with sam.perturbed_pass(), sync:
            closure(chunk)
        sam.restore()
        with torch.no_grad():
            for _, p in sam._params():
                if index == last:
                    p.grad.mul_(weight)
                elif p in total:
                    total[p].add_(p.grad, alpha=weight)
                else:
                    total[p] = p.grad.mul(weight)
    with torch.no_grad():
        sam._descent_gradient_ready()
    sam.base_optimizer.step()
    return torch.tensor(clean_loss)
