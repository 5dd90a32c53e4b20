"""Telling davda54/sam's form of ``step`` apart from the closure-only form.

davda54/sam's users write ``loss.backward(); optimizer.step(closure)``: the gradients present
when ``step`` is called are then the clean pass, and the closure is the perturbed pass only. With
``optimizer.step(closure)`` alone, the gradients present are whatever SAM's own previous step left
(or zeros from ``zero_grad(set_to_none=False)``), and SAM runs both passes. :class:`LeftGradients`
remembers which gradient tensors SAM's last step left, and at which version, to tell the two apart.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

__all__ = ["LeftGradients"]


class LeftGradients:
    """The gradients an optimizer step left behind: a gradient that is not one of them is fresh."""

    def __init__(self) -> None:
        self._left: dict[torch.Tensor, tuple[weakref.ref, int]] = {}

    def remember(self, params: Iterable[torch.Tensor]) -> None:
        """Note the gradients of ``params`` (those that have one) as left by this step."""
        self._left = {p: (weakref.ref(p.grad), p.grad._version) for p in params if p.grad is not None}

    def fresh(self, params: Iterable[torch.Tensor]) -> bool:
        """Whether a backward wrote gradients since :meth:`remember`: a gradient that is not the
        very tensor, unmodified, that was left, and is not all zeros."""
        for p in params:
            if p.grad is None:
                continue
            left = self._left.get(p)
            unchanged = left is not None and left[0]() is p.grad and left[1] == p.grad._version
            if not unchanged and bool(p.grad.any()):
                return True
        return False
