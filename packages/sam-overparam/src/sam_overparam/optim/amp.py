"""Mixed precision for SAM: the second half of a step whose clean pass ran under a ``torch.amp.GradScaler``.

``GradScaler.unscale_`` may run once per optimizer per update, so the clean-pass gradients are
unscaled by hand (``first_step(grad_inv_scale=...)``) and the scaler only sees the descent
gradients, on the base optimizer. A non-finite clean gradient (on any rank, for a data-parallel
model) skips the step, and the scaler still records the inf so that ``update()`` lowers the scale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sam_overparam.optim.distributed import found_inf_on_any_rank

if TYPE_CHECKING:
    from sam_overparam.optim.sam import SAM

log = logging.getLogger(__name__)

__all__ = ["scaled_second_half"]


def scaled_second_half(
    sam: SAM, closure: Callable[[], torch.Tensor], loss: torch.Tensor | None, scaler: torch.amp.GradScaler
) -> torch.Tensor | None:
    """Perturb, run the perturbed pass and take the scaler's step; the clean pass has run. Returns
    ``loss`` (the clean-pass loss), or the perturbed-pass loss where the caller ran the clean pass
    and gave ``None``."""
    inv_scale = 1.0 / float(scaler.get_scale())
    grads = [p.grad for _, p in sam._params()]
    local_inf = not all(bool(torch.isfinite(g).all()) for g in grads)
    if found_inf_on_any_rank(local_inf, sam.model):
        log.info("non-finite gradient in SAM's clean pass; skipping the step")
        if not local_inf and grads:
            # Another rank overflowed: make this rank's scaler see an inf too, so that every
            # rank skips the base step and lowers its scale alike.
            grads[0].fill_(float("inf"))
        scaler.step(sam.base_optimizer)  # records the inf so that update() lowers the scale
        sam.zero_grad()
        return loss
    sam.first_step(zero_grad=True, grad_inv_scale=inv_scale)
    with sam.perturbed_pass():
        perturbed_loss = closure()
    # With weight_decay_in_ascent, first_step() put wd * (w + e) * scale into the gradients before
    # the perturbed backward, so unscale_ gives the decay term at its own size.
    scaler.unscale_(sam.base_optimizer)
    sam.restore()
    sam._descent_gradient_ready()
    scaler.step(sam.base_optimizer)
    if loss is None and isinstance(perturbed_loss, torch.Tensor):
        return perturbed_loss.detach()
    return loss if loss is not None else perturbed_loss
