"""Tiny models and batches shared by the basisrot-pipeline tests."""

from __future__ import annotations

import pytest
import torch

from basisrot_pipeline.data import random_batches
from basisrot_pipeline.model import ModelConfig
from basisrot_pipeline.optim import OptimConfig

TINY = dict(vocab_size=32, block_size=8, n_layer=4, n_head=2, n_embd=16)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(**TINY)


@pytest.fixture
def tiny_batches():
    return random_batches(vocab_size=TINY["vocab_size"], block_size=TINY["block_size"], batch_size=4, seed=3)


@pytest.fixture
def fast_optim():
    """A config maker with a short warm-up and frequent refreshes, so a few steps exercise everything."""

    def make(name: str = "basis-rotation", **overrides) -> OptimConfig:
        options = dict(name=name, lr=1e-2, warmup_steps=2, precondition_frequency=3)
        options.update(overrides)
        return OptimConfig(**options)

    return make


@pytest.fixture
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the pipeline workers use one thread; match their kernels exactly
    yield
    torch.set_num_threads(previous)
