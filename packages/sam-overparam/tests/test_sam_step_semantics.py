"""SAM's step against its base optimizers and its users' code: decay with every base optimizer,
recovery from a failing perturbed pass, and davda54/sam's ``loss.backward(); step(closure)`` form."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sam_overparam.optim import SAM

BASES = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.Adam, dict(lr=0.01)),
    (torch.optim.AdamW, dict(lr=0.01)),
]


def _mlp(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(8, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, calls: list[int] | None = None):
    def closure():
        if calls is not None:
            calls.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(("base", "base_kwargs"), BASES, ids=["sgd", "sgd-nesterov", "adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [None, 0.0, 0.05])
def test_rho_zero_is_the_base_optimizer_bit_for_bit(base, base_kwargs, weight_decay):
    """``SAM(params, Base, rho=0, weight_decay=wd)`` steps exactly as ``Base(params, weight_decay=wd)``
    (and as ``Base(params)`` when no decay is given): coupled decay for SGD and Adam, decoupled for AdamW."""
    reference_model, sam_model = _mlp(), _mlp()
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    reference = base(reference_model.parameters(), **base_kwargs, **decay)
    sam = SAM(sam_model.parameters(), base, rho=0.0, **base_kwargs, **decay)
    for step in range(10):
        x, y = _batch(step)
        reference.zero_grad()
        F.cross_entropy(reference_model(x), y).backward()
        reference.step()
        sam.step(_closure(sam_model, x, y))
    for a, b in zip(reference_model.parameters(), sam_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_decoupled_decay_reaches_adamw_and_not_the_gradient():
    model = _mlp()
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, weight_decay=0.05)
    assert [g["weight_decay"] for g in sam.param_groups] == [0.05]
    assert [g["sam_weight_decay"] for g in sam.param_groups] == [0.0]
    added = nn.Linear(2, 2)
    sam.add_param_group({"params": list(added.parameters())})
    assert (sam.param_groups[-1]["weight_decay"], sam.param_groups[-1]["sam_weight_decay"]) == (0.05, 0.0)
    with pytest.raises(ValueError, match=r"weight_decay_in_ascent.*decouples"):
        SAM(model.parameters(), torch.optim.AdamW, lr=0.01, weight_decay=0.05, weight_decay_in_ascent=True)
    with pytest.raises(ValueError, match=r"both"):
        SAM([{"params": list(model.parameters()), "weight_decay": 0.1}], torch.optim.AdamW, lr=0.01, weight_decay=0.05)


class _FailingSecondPass(RuntimeError):
    pass


@pytest.mark.parametrize("use_scaler", [False, True])
def test_exception_in_perturbed_pass_restores_the_weights(use_scaler):
    model = _mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    x, y = _batch(0)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if use_scaler else None

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise _FailingSecondPass("out of memory")
        loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    with pytest.raises(_FailingSecondPass):
        sam.step(closure, grad_scaler=scaler)
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    sam.state_dict()  # no longer refused as "perturbed"
    sam.step(_closure(model, x, y))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_exception_in_a_chunks_perturbed_pass_restores_the_weights():
    model = _mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = _batch(0)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure(chunk):
        calls.append(1)
        if len(calls) == 4:  # second chunk, perturbed pass
            raise _FailingSecondPass("out of memory")
        loss = F.cross_entropy(model(x[chunk]), y[chunk])
        loss.backward()
        return loss

    with pytest.raises(_FailingSecondPass):
        sam.step_chunked(closure, [slice(0, 4), slice(4, 8)], [0.5, 0.5])
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    sam.step(_closure(model, x, y))


@pytest.mark.parametrize("batchnorm", [False, True])
def test_davda54_usage_runs_two_passes_and_equals_the_two_step_api(batchnorm):
    """``loss.backward(); optimizer.step(closure)`` (davda54/sam's README): the backward already
    made the clean gradient, so the closure is the perturbed pass only, and with ``model=``
    BatchNorm running statistics take one update per step, from the clean pass."""
    davda_model, two_step_model = _mlp(batchnorm), _mlp(batchnorm)
    davda = SAM(davda_model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=davda_model)
    two_step = SAM(two_step_model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    forwards: list[int] = []
    davda_model.register_forward_hook(lambda *_: forwards.append(1))
    for step in range(4):
        x, y = _batch(step)
        F.cross_entropy(davda_model(x), y).backward()
        davda.step(_closure(davda_model, x, y))
        davda.zero_grad()

        F.cross_entropy(two_step_model(x), y).backward()
        two_step.first_step(zero_grad=True)
        if batchnorm:  # the two-step API's user freezes BN by hand in the second pass
            saved = {k: v.clone() for k, v in two_step_model.state_dict().items() if "running" in k or "tracked" in k}
        F.cross_entropy(two_step_model(x), y).backward()
        if batchnorm:
            two_step_model.load_state_dict({**two_step_model.state_dict(), **saved})
        two_step.second_step(zero_grad=True)
        assert len(forwards) == 2 * (step + 1)
    for a, b in zip(davda_model.state_dict().values(), two_step_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if batchnorm:
        assert int(davda_model[1].num_batches_tracked) == 4


def test_closure_form_without_prior_backward_still_runs_both_passes():
    model = _mlp()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    calls: list[int] = []
    for step in range(3):
        x, y = _batch(step)
        sam.step(_closure(model, x, y, calls))  # gradients of the previous step are left behind
        assert len(calls) == 2 * (step + 1)
    sam.zero_grad(set_to_none=False)  # zero-filled gradients are not a clean pass either
    sam.step(_closure(model, *_batch(5), calls))
    assert len(calls) == 8
