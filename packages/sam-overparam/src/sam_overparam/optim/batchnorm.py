"""Normalisation layers around SAM's perturbed pass: normalise as usual, leave running statistics alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["frozen_batchnorm_stats"]

_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module | None) -> Iterator[None]:
    """Within the block, every normalisation layer with running statistics (BatchNorm, SyncBatchNorm,
    InstanceNorm with ``track_running_stats=True``: any ``_NormBase``) normalises exactly as it
    would outside, but its ``running_mean``, ``running_var`` and ``num_batches_tracked`` are the
    same after the block as before.

    The statistics of layers in training mode are copied before the block and copied back after
    it (layers in eval mode do not update them). Neither flag trick covers every layer: setting
    ``momentum = 0`` (the davda54/sam recipe) still increments ``num_batches_tracked`` and breaks
    ``momentum=None`` (cumulative averaging); turning ``track_running_stats`` off works for
    BatchNorm but not for InstanceNorm, which hands its buffers to ``instance_norm`` whatever the
    flag, and which in eval mode would then normalise with the instance's statistics instead.
    """
    if model is None:
        yield
        return
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats and module.training:
            for name in _RUNNING_STATISTICS:
                buffer = getattr(module, name, None)
                if isinstance(buffer, torch.Tensor) and not isinstance(buffer, nn.parameter.UninitializedBuffer):
                    saved.append((buffer, buffer.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
