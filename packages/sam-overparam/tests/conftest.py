"""Shared fixtures: tiny models and data for the sam-overparam tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.manual_seed(0)
    yield


def tiny_mlp(dtype: torch.dtype = torch.float32, *, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def tiny_batch(n: int = 12, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, 5, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y


@pytest.fixture
def mlp_factory():
    return tiny_mlp


@pytest.fixture
def batch_factory():
    return tiny_batch
