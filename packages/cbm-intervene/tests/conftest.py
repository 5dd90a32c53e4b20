"""Shared fixtures: tiny predictions and concept-to-target models built in memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cbm_intervene.data import ConceptGroups, ConceptPredictions

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib does not add the test dir (cbm_tiny)


def make_predictions(
    kind: str = "prob", n: int = 12, k: int = 6, n_classes: int = 4, seed: int = 0, with_groups: bool = True
) -> ConceptPredictions:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen) * 2
    values = torch.sigmoid(logits) if kind == "prob" else logits
    reference = torch.randn(50, k, generator=gen) * 2
    return ConceptPredictions(
        values=values,
        kind=kind,
        true_concepts=(torch.rand(n, k, generator=gen) < 0.4).float(),
        labels=torch.randint(0, n_classes, (n,), generator=gen),
        n_classes=n_classes,
        groups=ConceptGroups(names=["a", "b", "c"], members=[[0, 1], [2, 3, 4], [5]], n_concepts=k)
        if with_groups and k == 6
        else None,
        reference_values=torch.sigmoid(reference) if kind == "prob" else reference,
    )


def make_target(k: int = 6, n_classes: int = 4, hidden: int | None = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = (
        nn.Sequential(nn.Linear(k, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
        if hidden
        else nn.Linear(k, n_classes)
    )
    return model.eval()


@pytest.fixture
def predictions_factory():
    """``make_predictions(kind, n, k, n_classes, seed, with_groups)`` (test files cannot import conftest)."""
    return make_predictions


@pytest.fixture
def target_factory():
    """``make_target(k, n_classes, hidden, seed)``."""
    return make_target


@pytest.fixture
def prob_predictions() -> ConceptPredictions:
    return make_predictions("prob")


@pytest.fixture
def logit_predictions() -> ConceptPredictions:
    return make_predictions("logit")


@pytest.fixture
def target() -> nn.Module:
    return make_target()
