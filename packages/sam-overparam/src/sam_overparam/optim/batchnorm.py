"""BatchNorm around SAM's perturbed pass: normalise with batch statistics, leave running statistics alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["frozen_batchnorm_stats"]


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module | None) -> Iterator[None]:
    """Within the block, BatchNorm layers in training mode normalise with batch statistics but
    leave ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.

    Setting ``momentum = 0`` (the davda54/sam recipe) still increments ``num_batches_tracked``
    and breaks ``momentum=None`` (cumulative averaging); turning ``track_running_stats`` off for
    the duration makes ``torch.nn.functional.batch_norm`` receive no running buffers at all.
    """
    if model is None:
        yield
        return
    changed = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            changed.append(module)
            module.track_running_stats = False
    try:
        yield
    finally:
        for module in changed:
            module.track_running_stats = True
