"""Shared fixtures of the recon-prune tests (tiny models live in rp_models.py, importable from here)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib does not add the test dir

from rp_models import VOCAB


@pytest.fixture
def calib_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (8, 16), generator=generator)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("RECON_PRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "rp-cache"))


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI configures the root logger on pytest's captured stream; undo that after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
