"""A resumed half-precision run keeps its optimizer state's dtype and equals the uninterrupted run.

``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the parameter's dtype, which
would turn basis rotation's float32 moments, statistics and bases of bf16/fp16 weights into half
precision on resume. Every optimizer of the registry is checked the same way.
"""

from __future__ import annotations

import io

import pytest
import torch

from basisrot_pipeline.optim import OPTIMIZERS, OptimConfig, build_optimizer

STEPS = 5


def _module(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).to(dtype)


def _grads(module: torch.nn.Module, steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in module.parameters()] for _ in range(steps)]


def _run(module: torch.nn.Module, optimizer: torch.optim.Optimizer, grads: list[list[torch.Tensor]]) -> None:
    for step in grads:
        for p, g in zip(module.parameters(), step, strict=True):
            p.grad = g.clone()
        optimizer.step()


def _build(module: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    config = OptimConfig(name=name, lr=1e-2, precondition_frequency=2)
    return build_optimizer(module, config, delays=(0,), stage=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_resumed_half_precision_run_equals_the_uninterrupted_one(name, dtype):
    grads = _grads(_module(dtype), 2 * STEPS)
    whole = _module(dtype)
    whole_opt = _build(whole, name)
    _run(whole, whole_opt, grads)

    first = _module(dtype)
    first_opt = _build(first, name)
    _run(first, first_opt, grads[:STEPS])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    saved_dtypes = {
        (pid, key): value.dtype
        for pid, state in first_opt.state_dict()["state"].items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _module(dtype)
    resumed.load_state_dict(saved["model"])
    resumed_opt = _build(resumed, name)
    resumed_opt.load_state_dict(saved["optimizer"])
    loaded = resumed_opt.state_dict()["state"]
    # every state tensor keeps the dtype it was saved in (float32 state of half-precision weights included)
    assert {
        (pid, key): v.dtype for pid, s in loaded.items() for key, v in s.items() if isinstance(v, torch.Tensor)
    } == (saved_dtypes)
    _run(resumed, resumed_opt, grads[STEPS:])
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_basis_rotation_state_of_half_precision_weights_is_float32_after_loading(dtype):
    module = _module(dtype)
    optimizer = _build(module, "basis-rotation")
    _run(module, optimizer, _grads(module, 3))
    fresh = _build(_module(dtype), "basis-rotation")
    fresh.load_state_dict(optimizer.state_dict())
    floating = [
        v for s in fresh.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    assert floating and all(v.dtype == torch.float32 for v in floating)
    # the loaded state is a copy: stepping the original does not move the resumed one
    before = [v.clone() for v in floating]
    _run(module, optimizer, _grads(module, 1))
    assert all(torch.equal(a, b) for a, b in zip(before, floating, strict=True))
