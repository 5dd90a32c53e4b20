"""The real multi-process pipeline (gloo on 127.0.0.1, one thread per worker) against the emulator."""

from __future__ import annotations

import pytest

from basisrot_pipeline.emulator import build_emulator
from basisrot_pipeline.runtime import PipelineJob, checkpoint_path, run_local
from basisrot_pipeline.staleness import staleness_schedule

STEPS = 8


def _emulated(tiny_config, optim, batches, stages, stashing, steps=STEPS):
    delays = staleness_schedule("async-1f1b", stages)
    _, emulator = build_emulator(tiny_config, optim, delays, total_steps=steps, weight_stashing=stashing)
    return [emulator.step(*batches.batch(m)) for m in range(steps)]


@pytest.mark.parametrize(
    ("stages", "stashing", "optimizer"),
    [(2, True, "basis-rotation"), (3, True, "basis-rotation"), (4, True, "adamw"), (3, False, "basis-rotation")],
)
def test_runtime_losses_equal_emulator(
    tiny_config, tiny_batches, fast_optim, single_thread, stages, stashing, optimizer
):
    optim = fast_optim(optimizer)
    expected = _emulated(tiny_config, optim, tiny_batches, stages, stashing)
    job = PipelineJob(
        model=tiny_config, optim=optim, num_stages=stages, steps=STEPS, batches=tiny_batches, weight_stashing=stashing
    )
    losses = run_local(job)
    assert sorted(losses) == list(range(STEPS))
    assert [losses[m] for m in range(STEPS)] == pytest.approx(expected, abs=1e-5)


def test_runtime_checkpoint_resume_equals_uninterrupted(tiny_config, tiny_batches, fast_optim, single_thread, tmp_path):
    optim, stages = fast_optim("basis-rotation"), 3
    expected = _emulated(tiny_config, optim, tiny_batches, stages, True)
    common = dict(model=tiny_config, optim=optim, num_stages=stages, steps=STEPS, batches=tiny_batches)
    # the first run stops after 4 minibatches; stage 0 then has minibatches 4 and 5 in flight, with
    # stashed weight versions, and stage 1 holds the activation of minibatch 5 already sent to it
    first = run_local(PipelineJob(**common, checkpoint_dir=str(tmp_path), checkpoint_every=4, stop_after=4))
    assert [first[m] for m in sorted(first)] == pytest.approx(expected[:4], abs=1e-5)
    assert all(checkpoint_path(tmp_path, 4, s).exists() for s in range(stages))
    resumed = run_local(PipelineJob(**common, checkpoint_dir=str(tmp_path), resume_step=4))
    assert [resumed[m] for m in range(STEPS)] == pytest.approx(expected, abs=1e-5)


def test_job_bad_inputs(tiny_config, tiny_batches, fast_optim):
    with pytest.raises(ValueError, match=r"num_stages \(5\) is larger than the number of layers \(4\)"):
        PipelineJob(model=tiny_config, optim=fast_optim(), num_stages=5, steps=4, batches=tiny_batches)
    with pytest.raises(ValueError, match="need a checkpoint_dir"):
        PipelineJob(model=tiny_config, optim=fast_optim(), num_stages=2, steps=4, batches=tiny_batches, resume_step=2)
