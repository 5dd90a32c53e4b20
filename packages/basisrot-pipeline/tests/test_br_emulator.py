"""Staleness schedules, the model split, and the emulator against plain and brute-force training."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from basisrot_pipeline.emulator import StalenessEmulator, build_emulator
from basisrot_pipeline.model import GPT, ModelConfig, balanced_split, lm_loss, partition_model
from basisrot_pipeline.optim import build_optimizer, optimizer_step
from basisrot_pipeline.staleness import staleness_schedule
from shin_common import load_torch


def test_schedules():
    assert staleness_schedule("async-1f1b", 4) == (3, 2, 1, 0)
    assert staleness_schedule("2bw", 3) == (1, 1, 1)
    assert staleness_schedule("uniform", 2, delay=5) == (5, 5)
    assert staleness_schedule("none", 2) == (0, 0)
    assert staleness_schedule("custom", 3, delays=[0, 2, 1]) == (0, 2, 1)
    with pytest.raises(ValueError, match="unknown staleness schedule 'gpipe'"):
        staleness_schedule("gpipe", 4)
    with pytest.raises(ValueError, match="needs 3 delays"):
        staleness_schedule("custom", 3, delays=[1, 2])
    with pytest.raises(ValueError, match="non-negative ints"):
        staleness_schedule("custom", 2, delays=[1, -1])
    with pytest.raises(ValueError, match="num_stages must be a positive int, got 0"):
        staleness_schedule("async-1f1b", 0)


def test_partition_balanced_and_bad_stage_counts(tiny_config):
    model = GPT(tiny_config)
    stages = partition_model(model, 3)
    assert stages[0].embedding is model.embedding and stages[-1].head is model.head
    assert sum(len(s.blocks) for s in stages) == tiny_config.n_layer and all(len(s.blocks) for s in stages)
    assert sum(p.numel() for s in stages for p in s.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"num_stages \(5\) is larger than the number of layers \(4\)"):
        partition_model(model, 5)
    with pytest.raises(ValueError, match="more stages than layers"):
        balanced_split([1, 2], 3)


@pytest.mark.parametrize("sizes", [[5, 1, 1, 1, 9, 2], [3, 3, 3, 3], [1, 10, 1, 1, 1, 10, 1]])
def test_balanced_split_matches_brute_force(sizes):
    for parts in range(1, len(sizes) + 1):
        starts = balanced_split(sizes, parts)
        bounds = [*starts, len(sizes)]
        got = max(sum(sizes[bounds[i] : bounds[i + 1]]) for i in range(parts))
        best = min(
            max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes)), strict=True))
            for cuts in itertools.combinations(range(1, len(sizes)), parts - 1)
        )
        assert got == best


@pytest.mark.parametrize("optimizer", ["adamw", "basis-rotation"])
def test_delay_zero_equals_plain_training(tiny_config, tiny_batches, optimizer, fast_optim):
    config, steps = fast_optim(optimizer), 6
    model, emulator = build_emulator(tiny_config, config, (0, 0, 0), total_steps=steps)
    emulated = [emulator.step(*tiny_batches.batch(m)) for m in range(steps)]

    torch.manual_seed(0)
    plain = GPT(tiny_config)
    stages = partition_model(plain, 3)  # per-stage optimizers and clipping, as in the pipeline
    optimizers = [build_optimizer(st, config, delays=(0, 0, 0), stage=s) for s, st in enumerate(stages)]
    losses = []
    for m in range(steps):
        x, y = tiny_batches.batch(m)
        loss = lm_loss(plain(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        for st, opt in zip(stages, optimizers, strict=True):
            optimizer_step(st, opt, config, step=m, total_steps=steps, delay=0)
    assert emulated == pytest.approx(losses, abs=1e-6)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_stale_emulator_matches_brute_force_history(tiny_config, tiny_batches, fast_optim):
    """Reference: keep every past model, assemble each minibatch's mixed-version model, backprop."""
    config, steps, delays = fast_optim("basis-rotation"), 7, (2, 1, 0)
    _, emulator = build_emulator(tiny_config, config, delays, total_steps=steps)
    emulated = [emulator.step(*tiny_batches.batch(m)) for m in range(steps)]

    torch.manual_seed(0)
    current = GPT(tiny_config)
    stages = partition_model(current, 3)
    optimizers = [build_optimizer(st, config, delays=delays, stage=s) for s, st in enumerate(stages)]
    history, losses = [], []
    for m in range(steps):
        history.append(copy.deepcopy(current))
        mixed = copy.deepcopy(current)
        mixed_stages = partition_model(mixed, 3)
        for s, delay in enumerate(delays):
            old_stage = partition_model(history[max(0, m - delay)], 3)[s]
            mixed_stages[s].load_state_dict(old_stage.state_dict())
        x, y = tiny_batches.batch(m)
        loss = lm_loss(mixed(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        for st, mixed_st, opt, delay in zip(stages, mixed_stages, optimizers, delays, strict=True):
            for p, q in zip(st.parameters(), mixed_st.parameters(), strict=True):
                p.grad = q.grad.clone()
            optimizer_step(st, opt, config, step=m, total_steps=steps, delay=delay)
    assert emulated == pytest.approx(losses, abs=1e-5)
    # the ring buffer holds at most tau_s old versions besides the current weights
    assert [len(stash) for stash in emulator.stash] == [2, 1, 0]


def test_staleness_changes_training(tiny_config, tiny_batches, fast_optim):
    config = fast_optim("adamw")
    _, fresh = build_emulator(tiny_config, config, (0, 0), total_steps=5)
    _, stale = build_emulator(tiny_config, config, (3, 0), total_steps=5)
    a = [fresh.step(*tiny_batches.batch(m)) for m in range(5)]
    b = [stale.step(*tiny_batches.batch(m)) for m in range(5)]
    assert a[0] == pytest.approx(b[0], abs=1e-6)  # the same initial weights
    assert abs(a[-1] - b[-1]) > 1e-5


@pytest.mark.parametrize("stashing", [True, False])
def test_emulator_checkpoint_resume_equals_uninterrupted(tiny_config, tiny_batches, tmp_path, stashing, fast_optim):
    config, steps, delays = fast_optim("basis-rotation"), 10, (3, 2, 1, 0)
    model, full = build_emulator(tiny_config, config, delays, total_steps=steps, weight_stashing=stashing)
    expected = [full.step(*tiny_batches.batch(m)) for m in range(steps)]

    _, first = build_emulator(tiny_config, config, delays, total_steps=steps, weight_stashing=stashing)
    got = [first.step(*tiny_batches.batch(m)) for m in range(6)]
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed_model, resumed = build_emulator(
        tiny_config, config, delays, total_steps=steps, weight_stashing=stashing, seed=99
    )
    resumed.load_state_dict(load_torch(tmp_path / "ckpt.pt"))  # everything in it loads with weights_only
    got += [resumed.step(*tiny_batches.batch(m)) for m in range(6, steps)]
    assert got == expected
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_emulator_refuses_a_checkpoint_of_other_settings(tiny_config, tiny_batches, fast_optim):
    delays = (1, 0)
    _, first = build_emulator(tiny_config, fast_optim(), delays, total_steps=6)
    first.step(*tiny_batches.batch(0))
    state = first.state_dict()
    _, other_lr = build_emulator(tiny_config, fast_optim(lr=5e-3), delays, total_steps=6)
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.01 -> 0\.005"):
        other_lr.load_state_dict(state)
    _, longer = build_emulator(tiny_config, fast_optim(), delays, total_steps=8, weight_stashing=False)
    with pytest.raises(ValueError, match=r"total_steps: 6 -> 8; weight_stashing: True -> False"):
        longer.load_state_dict(state)
    _, deeper = build_emulator(tiny_config, fast_optim(), (2, 0), total_steps=6)
    with pytest.raises(ValueError, match=r"delays: \[1, 0\] -> \[2, 0\]"):
        deeper.load_state_dict(state)


def test_an_emulated_checkpoint_without_settings_says_how_to_continue(tmp_path, fast_optim):
    from basisrot_pipeline.train import TrainConfig, open_training_run, train_emulated

    model = ModelConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    config = TrainConfig(model=model, optim=fast_optim(), stages=2, steps=4, data="random", batch_size=2)
    run = open_training_run(config, tmp_path)  # a partial run of this config ...
    run.begin()
    torch.save({"emulator": {}, "losses": []}, run.file("checkpoint.pt"))  # ... whose checkpoint has no settings
    with pytest.raises(ValueError, match=r"checkpoint.pt' records no configuration .*delete it, or use a new output"):
        train_emulated(config, tmp_path)
    _, emulator = build_emulator(model, fast_optim(), (1, 0), total_steps=4)
    with pytest.raises(ValueError, match=r"the emulator checkpoint records no configuration .*delete it"):
        emulator.load_state_dict({"updates": 0})


def test_emulator_rejects_mismatched_inputs(fast_optim):
    with pytest.raises(ValueError, match="one optimizer and one delay per stage"):
        StalenessEmulator([torch.nn.Linear(2, 2)], [], (0,), optim_config=fast_optim(), total_steps=1)


def test_model_config_bad_inputs():
    with pytest.raises(ValueError, match="n_embd \\(10\\) must be divisible by n_head \\(4\\)"):
        ModelConfig(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be a positive int, got 0"):
        ModelConfig(n_layer=0)


def test_emulator_runs_thirty_two_stages(fast_optim):
    config = ModelConfig(vocab_size=16, block_size=4, n_layer=32, n_head=1, n_embd=8)
    delays = staleness_schedule("async-1f1b", 32)
    _, emulator = build_emulator(config, fast_optim(), delays, total_steps=3)
    x = torch.randint(0, 16, (2, 4))
    losses = [emulator.step(x, x) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert [len(s) for s in emulator.stash] == [min(3, d) for d in delays]
