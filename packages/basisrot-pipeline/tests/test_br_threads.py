"""Both runtimes run their arithmetic at the configured thread count, and record it.

Bases of rank-deficient statistics are decided by round-off, which depends on how BLAS splits the
work: the emulated and distributed runs (and a resumed run) agree exactly only at one thread count.
"""

from __future__ import annotations

import json

import pytest
import torch

from basisrot_pipeline.model import ModelConfig
from basisrot_pipeline.optim import OptimConfig
from basisrot_pipeline.runtime import LOSSES_NAME
from basisrot_pipeline.train import TrainConfig, train


def _config(runtime: str, threads: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16),
        optim=OptimConfig(name="basis-rotation", lr=1e-2, warmup_steps=2, precondition_frequency=2),
        stages=2,
        steps=5,
        batch_size=4,
        data="random",
        eval_batches=1,
        checkpoint_every=0,
        runtime=runtime,
        threads=threads,
    )


def test_both_runtimes_apply_and_record_the_configured_threads(tmp_path, single_thread):
    assert TrainConfig().threads == 1  # the distributed workers' count, now the emulator's too
    records = {}
    for runtime in ("emulated", "distributed"):
        train(_config(runtime, threads=2), tmp_path / runtime)
        assert torch.get_num_threads() == 1  # the caller's setting is back
        records[runtime] = json.loads((tmp_path / runtime / "results.json").read_text())
    for record in records.values():
        assert record["config"]["threads"] == 2
        assert record["metrics"]["threads"] == 2  # read back inside the training loop / the stage process
    assert json.loads((tmp_path / "distributed" / LOSSES_NAME).read_text())["threads"] == 2
    emulated, distributed = (records[r]["metrics"]["train_losses"] for r in ("emulated", "distributed"))
    assert distributed == pytest.approx(emulated, abs=1e-5)


def test_threads_must_be_positive():
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        _config("emulated", threads=0)
