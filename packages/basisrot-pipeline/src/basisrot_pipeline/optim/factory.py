"""Optimizer configuration, construction by name, and the per-stage learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from basisrot_pipeline.optim.baselines import adamw, nesterov, pipedream_lr_factor
from basisrot_pipeline.optim.basis_rotation import GEOMETRIES, SOURCES, BasisRotation
from basisrot_pipeline.optim.param_groups import rotation_param_groups

OPTIMIZERS = ("adamw", "pipedream-lr", "nesterov", "basis-rotation", "basis-rotation-stage-aware")


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and schedule; defaults are the paper's (arXiv 2602.03515, Section 5)."""

    name: str = "basis-rotation"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    precondition_frequency: int = 10
    source: str = "second"
    geometry: str = "bi"
    max_precond_dim: int = 4096
    nesterov_momentum: float = 0.99
    lr_rescale_span: int = 100

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; expected one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if isinstance(self.precondition_frequency, bool) or self.precondition_frequency < 1:
            raise ValueError(f"precondition_frequency must be a positive int, got {self.precondition_frequency!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip!r}")
        dim = self.max_precond_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ValueError(f"max_precond_dim must be a non-negative int (0 rotates nothing), got {dim!r}")
        if not 0 <= self.nesterov_momentum < 1:
            raise ValueError(f"nesterov_momentum must be in [0, 1), got {self.nesterov_momentum!r}")
        if self.lr_rescale_span < 1:
            raise ValueError(f"lr_rescale_span must be >= 1, got {self.lr_rescale_span!r}")


def stage_aware_frequencies(delays: tuple[int, ...], base_frequency: int) -> list[int]:
    """Per-stage refresh periods: refresh rate proportional to ``delay + 1`` at the same total budget.

    With uniform period ``k`` the P stages do ``P / k`` refreshes per step in total; here stage s
    gets rate ``r_s = (P / k) (tau_s + 1) / sum_j (tau_j + 1)`` and period ``max(1, round(1 / r_s))``,
    so the most delayed (earliest) stages refresh most often (paper, stage-aware variant).
    """
    if base_frequency < 1:
        raise ValueError(f"precondition_frequency must be a positive int, got {base_frequency!r}")
    weights = [d + 1 for d in delays]
    budget = len(delays) / base_frequency
    return [max(1, round(sum(weights) / (budget * w))) for w in weights]


def build_optimizer(module: nn.Module, config: OptimConfig, *, delays: tuple[int, ...], stage: int):
    """The optimizer of pipeline stage ``stage`` (its delay is ``delays[stage]``)."""
    if config.name in ("adamw", "pipedream-lr"):
        opt = adamw(
            module.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    elif config.name == "nesterov":
        opt = nesterov(
            module.parameters(),
            lr=config.lr,
            eps=config.eps,
            weight_decay=config.weight_decay,
            momentum=config.nesterov_momentum,
        )
    else:
        frequency = config.precondition_frequency
        if config.name == "basis-rotation-stage-aware":
            frequency = stage_aware_frequencies(delays, frequency)[stage]
        groups = rotation_param_groups(
            module,
            precondition_frequency=frequency,
            source=config.source,
            geometry=config.geometry,
            max_precond_dim=config.max_precond_dim,
        )
        opt = BasisRotation(
            groups,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            precondition_frequency=frequency,
            source=config.source,
            geometry=config.geometry,
            max_precond_dim=config.max_precond_dim,
        )
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


def lr_factor(config: OptimConfig, step: int, total_steps: int, delay: int) -> float:
    """Linear warm-up, cosine decay to ``min_lr_ratio`` at ``total_steps``, times PipeDream-LR's factor."""
    if step < config.warmup_steps:
        factor = (step + 1) / config.warmup_steps
    else:
        span = max(1, total_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        factor = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.name == "pipedream-lr":
        factor *= pipedream_lr_factor(delay, step, config.lr_rescale_span)
    return factor


def optimizer_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, config: OptimConfig, *, step: int, total_steps: int, delay: int
) -> None:
    """One stage's update: clip this stage's gradient norm, set the scheduled lr, step, clear grads."""
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
    factor = lr_factor(config, step, total_steps, delay)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
