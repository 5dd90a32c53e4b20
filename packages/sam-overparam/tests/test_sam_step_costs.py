"""What a step or an estimate costs and leaves behind: running statistics of every normalisation
layer, Hessian-vector products of tr(H^k), and the LR scheduler's view of the two-step API.
(The all-reduces per m-sharpness step under DDP are counted in test_sam_ddp.py.)"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sam_overparam import hessian as hs
from sam_overparam.optim import SAM, frozen_batchnorm_stats


def _conv_net(norm: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv1d(2, 4, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()


def _signals(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(n, 2, 6, generator=generator, dtype=torch.float64) * 2 + 1
    return x, torch.randint(0, 3, (n,), generator=generator)


NORMS = {
    "instance": lambda: nn.InstanceNorm1d(4, track_running_stats=True),
    "instance-affine": lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True, momentum=0.3),
    "batch": lambda: nn.BatchNorm1d(4),
}


@pytest.mark.parametrize("norm", NORMS, ids=list(NORMS))
def test_frozen_stats_leave_every_running_statistic_alone_and_normalise_as_outside(norm):
    model = _conv_net(NORMS[norm]())
    x, _ = _signals()
    model(x)  # running statistics that are not the initial ones
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_batchnorm_stats(model):
        inside = model(x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model.eval()  # eval mode normalises with the running statistics, inside the block as outside
    with frozen_batchnorm_stats(model):
        inside_eval = model(x)
    outside_eval = model(x)
    model.train()
    torch.testing.assert_close(inside, model(x), rtol=0, atol=0)  # training mode: the batch's statistics
    torch.testing.assert_close(inside_eval, outside_eval, rtol=0, atol=0)
    assert not torch.allclose(inside, inside_eval)  # the two modes do differ, so both checks can fail


@pytest.mark.parametrize("norm", ["instance", "instance-affine"])
def test_sam_step_updates_instance_norm_statistics_from_the_clean_pass_only(norm):
    model = _conv_net(NORMS[norm]())
    reference = copy.deepcopy(model)
    x, y = _signals()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    reference(x)  # one clean forward at the same weights
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(reference[1], name)), name


# ----------------------------------------------------------------------------- tr(H^k)


def _model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=generator)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _dense_hessian(model: nn.Module, batches) -> torch.Tensor:
    """The full-data Hessian (mean over the equal batches) by torch.func.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def flat_loss(flat):
        pieces = flat.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, pieces, shapes, strict=True)}
        call = lambda x: torch.func.functional_call(model, params, (x,))  # noqa: E731
        return sum(_loss(call, b) for b in batches) / len(batches)

    return torch.func.hessian(flat_loss)(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


class _CountingOperator(hs.HessianOperator):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.products = 0

    def batch_matvec(self, index, vector):
        self.products += 1
        return super().batch_matvec(index, vector)


@pytest.mark.parametrize("powers", [(1,), (2,), (3,), (4,), (5,), (1, 2, 3, 4)])
def test_trace_of_powers_spends_ceil_k_over_2_products_per_probe_and_matches_the_dense_hessian(powers):
    model, batches = _model(), _batches()
    dense = _dense_hessian(model, batches)
    op = _CountingOperator(model, _loss, batches)
    probes = 3
    traces = hs.trace_of_powers(op, powers, num_probes=probes, seed=5)
    # one Hessian-vector product of the full-data H is one product per batch
    assert op.products == math.ceil(max(powers) / 2) * probes * len(batches)
    # the same Rademacher probes, drawn independently here, against the dense H^k
    generator = torch.Generator().manual_seed(5)
    zs = [(torch.randint(0, 2, (op.dim,), generator=generator) * 2 - 1).double() for _ in range(probes)]
    for k in powers:
        samples = torch.stack([z @ torch.linalg.matrix_power(dense, k) @ z for z in zs])
        assert traces[k].value == pytest.approx(float(samples.mean()), rel=1e-9, abs=1e-12), k
        assert traces[k].stderr == pytest.approx(float(samples.std() / math.sqrt(probes)), rel=1e-6, abs=1e-12), k
        assert traces[k].num_probes == probes
    exact = hs.trace_of_powers(op, powers, num_probes=None)
    for k in powers:
        expected = float(torch.trace(torch.linalg.matrix_power(dense, k)))
        assert exact[k].value == pytest.approx(expected, rel=1e-9, abs=1e-12), k


def test_trace_of_powers_refuses_a_power_below_one():
    op = hs.HessianOperator(_model(), _loss, _batches())
    with pytest.raises(ValueError, match="powers must be >= 1, got 0"):
        hs.trace_of_powers(op, (0, 2), num_probes=1)


# ----------------------------------------------------------------------------- LR scheduler


def test_two_step_api_under_a_scheduler_on_sam_does_not_warn():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch: "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
            scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
