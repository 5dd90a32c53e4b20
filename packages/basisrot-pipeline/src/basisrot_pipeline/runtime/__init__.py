"""A real asynchronous pipeline (PipeDream 1F1B, no flush) on torch.distributed."""

from basisrot_pipeline.runtime.launch import (
    LOSSES_NAME,
    StageProcessError,
    launch_mode,
    launched_by_torchrun,
    read_losses,
    run_from_environment,
    run_local,
)
from basisrot_pipeline.runtime.pipeline import (
    AsyncPipelineWorker,
    PipelineJob,
    checkpoint_path,
    checkpoint_settings_path,
    final_weights_path,
)

__all__ = [
    "LOSSES_NAME",
    "AsyncPipelineWorker",
    "PipelineJob",
    "StageProcessError",
    "checkpoint_path",
    "checkpoint_settings_path",
    "final_weights_path",
    "launch_mode",
    "launched_by_torchrun",
    "read_losses",
    "run_from_environment",
    "run_local",
]
