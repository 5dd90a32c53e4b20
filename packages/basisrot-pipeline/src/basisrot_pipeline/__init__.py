"""Asynchronous pipeline-parallel training with stale gradients, and basis-rotation optimizers that cure the staleness.

The names a user needs are exported here; the submodules (``optim``, ``emulator``, ``runtime``,
``train``, ``experiments``, ``plots``, ``diagnostics``) hold the rest.
"""

__version__ = "0.1.0"

from basisrot_pipeline.data import TokenBatches, random_batches, stdlib_batches
from basisrot_pipeline.diagnostics import misalignment, parameter_misalignment
from basisrot_pipeline.emulator import StalenessEmulator, build_emulator
from basisrot_pipeline.experiments import run_demo
from basisrot_pipeline.model import GPT, ModelConfig, lm_loss, partition_model
from basisrot_pipeline.optim import (
    OPTIMIZERS,
    BasisRotation,
    OptimConfig,
    OptimizerVariant,
    build_optimizer,
    rotation_param_groups,
    stage_aware_frequencies,
)
from basisrot_pipeline.staleness import SCHEDULES, staleness_schedule
from basisrot_pipeline.train import TrainConfig, train

__all__ = [
    "GPT",
    "OPTIMIZERS",
    "SCHEDULES",
    "BasisRotation",
    "ModelConfig",
    "OptimConfig",
    "OptimizerVariant",
    "StalenessEmulator",
    "TokenBatches",
    "TrainConfig",
    "__version__",
    "build_emulator",
    "build_optimizer",
    "lm_loss",
    "misalignment",
    "parameter_misalignment",
    "partition_model",
    "random_batches",
    "rotation_param_groups",
    "run_demo",
    "stage_aware_frequencies",
    "staleness_schedule",
    "stdlib_batches",
    "train",
]
