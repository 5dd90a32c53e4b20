"""Baselines for asynchronous pipeline training.

* AdamW, as used by PipeDream (Narayanan et al., SOSP 2019) with weight stashing.
* PipeDream-LR: PipeMare's learning-rate rescheduling (Yang et al., MLSys 2021, Section 3.1),
  ``lr_s = lr / tau_s^(1 - progress)`` with ``progress`` going linearly from 0 to 1 over a warm-up
  span, so the most delayed stages start with the smallest step.
* Nesterov for asynchronous pipelines (Ajanthan et al., ICML 2025): NAdam with momentum 0.99 and
  decoupled weight decay.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from basisrot_pipeline.optim.state_dtypes import KeepsStateDtypes


class NAdam(KeepsStateDtypes, torch.optim.NAdam):
    """``torch.optim.NAdam`` whose float32 ``mu_product`` stays float32 when loaded for half-precision weights."""


def adamw(params: Iterable[Any], *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def nesterov(params: Iterable[Any], *, lr: float, eps: float, weight_decay: float, momentum: float = 0.99):
    """NAdam with ``momentum`` as its first beta and decoupled weight decay."""
    return NAdam(
        params, lr=lr, betas=(momentum, 0.999), eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True
    )


def pipedream_lr_factor(delay: int, step: int, warmup_span: int) -> float:
    """PipeMare's factor ``1 / tau^(1 - progress)``; stages with delay 0 or 1 are unchanged."""
    if warmup_span < 1:
        raise ValueError(f"warmup_span must be >= 1, got {warmup_span!r}")
    progress = min(1.0, step / warmup_span)
    return float(max(delay, 1)) ** -(1.0 - progress)
