"""Optimizer configuration, construction by name, and the per-stage learning-rate schedule.

Every optimizer is one line in :data:`OPTIMIZERS`: a name and an :class:`OptimizerVariant` (a
builder of one stage's optimizer, and optionally a delay-dependent learning-rate scale such as
PipeDream-LR's). ``OptimConfig(name=...)``, the command line and ``--help`` all read the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from basisrot_pipeline.optim.baselines import adamw, nesterov, pipedream_lr_factor
from basisrot_pipeline.optim.basis_rotation import GEOMETRIES, NULL_SPACES, SOURCES, BasisRotation
from basisrot_pipeline.optim.param_groups import rotation_param_groups
from shin_common import Registry


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
    # "eigh": SOAP's and the authors' null space; "deterministic": completed without round-off (see docs)
    null_space: str = "eigh"
    nesterov_momentum: float = 0.99
    lr_rescale_span: int = 100

    def __post_init__(self) -> None:
        OPTIMIZERS.get(self.name)  # an unknown name: one line listing the registered ones
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
        if self.null_space not in NULL_SPACES:
            raise ValueError(f"null_space must be one of {NULL_SPACES}, got {self.null_space!r}")
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


@dataclass(frozen=True)
class OptimizerVariant:
    """How to build one stage's optimizer by name.

    Attributes:
        build: ``build(module, config, *, delays, stage)`` -> the ``torch.optim.Optimizer`` of pipeline
            stage ``stage`` (its delay is ``delays[stage]``) over ``module``'s parameters.
        lr_scale: ``lr_scale(config, *, step, delay)`` -> a factor on top of warm-up and cosine decay
            (PipeDream-LR's ``1 / tau^(1-progress)``), or None for none. (Default: None)
    """

    build: Callable[..., torch.optim.Optimizer]
    lr_scale: Callable[..., float] | None = None


def build_adamw(module: nn.Module, config: OptimConfig, **_: object) -> torch.optim.Optimizer:
    return adamw(
        module.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )


def build_nesterov(module: nn.Module, config: OptimConfig, **_: object) -> torch.optim.Optimizer:
    return nesterov(
        module.parameters(),
        lr=config.lr,
        eps=config.eps,
        weight_decay=config.weight_decay,
        momentum=config.nesterov_momentum,
    )


def build_basis_rotation(
    module: nn.Module, config: OptimConfig, *, frequency: int | None = None, **_: object
) -> torch.optim.Optimizer:
    """:class:`BasisRotation` on the block matrices (AdamW elsewhere), refreshed every ``frequency`` steps."""
    frequency = config.precondition_frequency if frequency is None else frequency
    groups = rotation_param_groups(
        module,
        precondition_frequency=frequency,
        source=config.source,
        geometry=config.geometry,
        max_precond_dim=config.max_precond_dim,
        null_space=config.null_space,
    )
    return BasisRotation(
        groups,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        precondition_frequency=frequency,
        source=config.source,
        geometry=config.geometry,
        max_precond_dim=config.max_precond_dim,
        null_space=config.null_space,
    )


def build_stage_aware_basis_rotation(
    module: nn.Module, config: OptimConfig, *, delays: tuple[int, ...], stage: int, **_: object
) -> torch.optim.Optimizer:
    """Basis rotation whose refresh period follows the stage's delay (:func:`stage_aware_frequencies`)."""
    frequency = stage_aware_frequencies(delays, config.precondition_frequency)[stage]
    return build_basis_rotation(module, config, frequency=frequency)


def pipedream_lr_scale(config: OptimConfig, *, step: int, delay: int) -> float:
    return pipedream_lr_factor(delay, step, config.lr_rescale_span)


OPTIMIZERS: Registry[OptimizerVariant] = Registry("optimizer")
OPTIMIZERS.add("adamw", OptimizerVariant(build_adamw))
OPTIMIZERS.add("pipedream-lr", OptimizerVariant(build_adamw, lr_scale=pipedream_lr_scale))
OPTIMIZERS.add("nesterov", OptimizerVariant(build_nesterov))
OPTIMIZERS.add("basis-rotation", OptimizerVariant(build_basis_rotation))
OPTIMIZERS.add("basis-rotation-stage-aware", OptimizerVariant(build_stage_aware_basis_rotation))


def build_optimizer(module: nn.Module, config: OptimConfig, *, delays: tuple[int, ...], stage: int):
    """The optimizer of pipeline stage ``stage`` (its delay is ``delays[stage]``), by ``config.name``."""
    opt = OPTIMIZERS.get(config.name).build(module, config, delays=delays, stage=stage)
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
    lr_scale = OPTIMIZERS.get(config.name).lr_scale
    if lr_scale is not None:
        factor *= lr_scale(config, step=step, delay=delay)
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
