"""One seeding helper for every generator a run touches."""

from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA, when installed).

    Each distributed rank gets ``seed + rank`` so that data-parallel workers draw different
    augmentations but the whole run stays reproducible. Returns the seed actually used.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    effective = seed + rank
    if not 0 <= effective < 2**32:
        raise ValueError(f"seed + rank must lie in [0, 2**32), got {effective}")
    random.seed(effective)
    np.random.seed(effective)
    os.environ["PYTHONHASHSEED"] = str(effective)  # inherited by subprocesses started later
    try:
        import torch
    except ImportError:
        return effective
    torch.manual_seed(effective)  # also seeds every CUDA device
    return effective
