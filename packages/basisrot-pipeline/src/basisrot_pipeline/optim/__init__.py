"""Basis-rotation optimizers and the asynchronous-pipeline baselines."""

from basisrot_pipeline.optim.baselines import adamw, nesterov, pipedream_lr_factor
from basisrot_pipeline.optim.basis_rotation import BasisRotation, eigenbasis, power_iteration_refresh
from basisrot_pipeline.optim.factory import (
    OPTIMIZERS,
    OptimConfig,
    OptimizerVariant,
    build_optimizer,
    lr_factor,
    optimizer_step,
    stage_aware_frequencies,
)
from basisrot_pipeline.optim.param_groups import rotation_param_groups, split_rotated_parameters

__all__ = [
    "OPTIMIZERS",
    "BasisRotation",
    "OptimConfig",
    "OptimizerVariant",
    "adamw",
    "build_optimizer",
    "eigenbasis",
    "lr_factor",
    "nesterov",
    "optimizer_step",
    "pipedream_lr_factor",
    "power_iteration_refresh",
    "rotation_param_groups",
    "split_rotated_parameters",
    "stage_aware_frequencies",
]
