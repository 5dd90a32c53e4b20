"""SAM optimizer: exactness against SGD and hand computations, BN, m-sharpness, state, AMP, errors."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sam_overparam.optim import SAM, _found_inf_on_any_rank, frozen_batchnorm_stats


def _closure(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "base_kwargs", [dict(lr=0.1, momentum=0.9, weight_decay=5e-4), dict(lr=0.05, nesterov=True, momentum=0.9)]
)
def test_rho_zero_reproduces_sgd_bitwise(mlp_factory, batch_factory, base_kwargs):
    sgd_model, sam_model = mlp_factory(), mlp_factory()
    x, y = batch_factory()
    sgd = torch.optim.SGD(sgd_model.parameters(), **base_kwargs)
    sam = SAM(sam_model.parameters(), torch.optim.SGD, rho=0.0, **base_kwargs)
    for step in range(5):
        xb, yb = x[step : step + 8], y[step : step + 8]
        sgd.zero_grad()
        F.cross_entropy(sgd_model(xb), yb).backward()
        sgd.step()
        sam.step(_closure(sam_model, xb, yb))
    for a, b in zip(sgd_model.parameters(), sam_model.parameters(), strict=True):
        assert torch.equal(a, b)


def _least_squares_sam_by_hand(w, X, y, rho, lr, wd, eps=1e-12, adaptive=False, eta=0.01, unnormalized=False):
    n = X.shape[0]

    def grad(v):
        return 2.0 / n * X.T @ (X @ v - y)

    g = grad(w)
    t = (w.abs() + eta) if adaptive else torch.ones_like(w)
    if unnormalized:
        e = rho * t * t * g
    else:
        e = rho * t * t * g / (torch.linalg.norm(t * g) + eps)
    g_sam = grad(w + e) + wd * w
    return w - lr * g_sam


@pytest.mark.parametrize(
    "variant", [dict(), dict(adaptive=True), dict(unnormalized=True), dict(adaptive=True, unnormalized=True)]
)
def test_one_step_matches_hand_computation(variant):
    torch.manual_seed(3)
    X = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randn(10, dtype=torch.float64)
    w0 = torch.randn(4, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    # weight decay through SAM (outside the ascent, at the unperturbed weights); w is 1-D and
    # unnamed, so ASAM rescales it only with adaptive_scope="all"
    opt = SAM([w], torch.optim.SGD, rho=0.3, lr=0.1, weight_decay=0.01, adaptive_scope="all", **variant)

    def closure():
        loss = ((X @ w - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    expected = _least_squares_sam_by_hand(w0, X, y, 0.3, 0.1, 0.01, **variant)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)


def test_weight_decay_in_ascent_matches_loss_term():
    torch.manual_seed(4)
    X = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randn(10, dtype=torch.float64)
    w0 = torch.randn(4, dtype=torch.float64)
    wd, rho, lr = 0.1, 0.2, 0.05
    w = nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr, weight_decay=wd, weight_decay_in_ascent=True)

    def closure():
        loss = ((X @ w - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)

    def grad(v):  # gradient of the regularised loss, as google-research/sam puts wd in the loss
        return 2.0 / 10 * X.T @ (X @ v - y) + wd * v

    g = grad(w0)
    expected = w0 - lr * grad(w0 + rho * g / (g.norm() + 1e-12))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)


def test_first_and_second_step_equal_closure_step(mlp_factory, batch_factory):
    a, b = mlp_factory(), mlp_factory()
    x, y = batch_factory()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(3):
        opt_a.step(_closure(a, x, y))
        F.cross_entropy(b(x), y).backward()
        opt_b.first_step(zero_grad=True)
        F.cross_entropy(b(x), y).backward()
        opt_b.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average, broken by momentum=0 tricks
def test_batchnorm_statistics_come_from_clean_pass_only(mlp_factory, batch_factory, momentum):
    model = mlp_factory(batchnorm=True)
    model[1].momentum = momentum
    reference = copy.deepcopy(model)
    x, y = batch_factory()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    opt.step(_closure(model, x, y))
    reference(x)  # one clean forward in training mode
    bn, ref_bn = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1
    # without freezing, the perturbed pass would have moved the statistics a second time
    unfrozen = copy.deepcopy(reference)
    unfrozen(x)
    assert int(unfrozen[1].num_batches_tracked) == 2


def test_frozen_batchnorm_context_restores_flags(mlp_factory, batch_factory):
    model = mlp_factory(batchnorm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_batchnorm_stats(model):
        out = model(batch_factory()[0])
    assert model[1].track_running_stats
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # batch statistics were still used for normalisation in training mode
    assert torch.allclose(out.mean(), model(batch_factory()[0]).mean())


def test_m_sharpness_chunks_equal_manual_per_chunk_computation(mlp_factory, batch_factory):
    model = mlp_factory(torch.float64)
    x, y = batch_factory(12, torch.float64)
    rho, lr, m = 0.1, 0.2, 4
    names = [n for n, _ in model.named_parameters()]
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_at(params, xb, yb):
        return F.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    total = {n: torch.zeros_like(p) for n, p in w0.items()}
    for start in range(0, 12, m):
        xb, yb = x[start : start + m], y[start : start + m]
        g = torch.func.grad(loss_at)(w0, xb, yb)
        norm = torch.sqrt(sum((g[n] ** 2).sum() for n in names))
        perturbed = {n: w0[n] + rho * g[n] / (norm + 1e-12) for n in names}
        g_sam = torch.func.grad(loss_at)(perturbed, xb, yb)
        for n in names:
            total[n] += g_sam[n] * (m / 12)
    expected = {n: w0[n] - lr * total[n] for n in names}

    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)

    def closure(chunk):
        xb, yb = chunk
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    chunks = [(x[s : s + m], y[s : s + m]) for s in range(0, 12, m)]
    opt.step_chunked(closure, chunks, [m / 12] * 3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-12)


def test_m_sharpness_updates_batchnorm_statistics_once_per_chunk_clean_pass(mlp_factory, batch_factory):
    # Each chunk's clean pass is a training forward, so the one set of buffers takes k = 3
    # momentum updates in this step (k devices would take one each); the perturbed passes none.
    model = mlp_factory(torch.float64, batchnorm=True)
    reference = copy.deepcopy(model)
    x, y = batch_factory(12, torch.float64)
    chunks = [(x[s : s + 4], y[s : s + 4]) for s in range(0, 12, 4)]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)

    def closure(chunk):
        loss = F.cross_entropy(model(chunk[0]), chunk[1])
        loss.backward()
        return loss

    opt.step_chunked(closure, chunks, [1 / 3] * 3)
    for xb, _ in chunks:
        reference(xb)  # the clean forwards, at the unchanged weights
    bn, ref_bn = model[1], reference[1]
    assert int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_resumes_bitwise(mlp_factory, batch_factory, tmp_path):
    x, y = batch_factory()
    model = mlp_factory()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, adaptive=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.step(_closure(model, x, y))
        sched.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path)
    for _ in range(3):
        opt.step(_closure(model, x, y))
        sched.step()

    resumed = mlp_factory()
    ropt = SAM(resumed.parameters(), torch.optim.SGD, rho=0.5, lr=1.0, momentum=0.9)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, step_size=2, gamma=0.5)
    ckpt = torch.load(path)
    resumed.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    rsched.load_state_dict(ckpt["sched"])
    assert ropt.param_groups[0]["rho"] == 0.05 and ropt.param_groups[0]["adaptive"] is True
    assert ropt.param_groups is ropt.base_optimizer.param_groups
    for _ in range(3):
        ropt.step(_closure(resumed, x, y))
        rsched.step()
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lr_scheduler_on_sam_drives_base_optimizer(mlp_factory, batch_factory):
    model = mlp_factory()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
    x, y = batch_factory()
    opt.step(_closure(model, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_gradient_clipping_clips_descent_gradient():
    torch.manual_seed(5)
    X = torch.randn(10, 4, dtype=torch.float64)
    y = 10 * torch.randn(10, dtype=torch.float64)
    w0 = torch.randn(4, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=1.0, max_grad_norm=0.5)

    def closure():
        loss = ((X @ w - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    moved = (w.detach() - w0).norm()
    assert moved == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("decay", "init_scale"),
    [
        ({"weight_decay": 1e-3}, 2.0**10),
        # In the ascent the decay term wd * (w + e) joins the perturbed gradients: it must do so after
        # unscaling, or it ends up divided by the (large) scale.
        ({"weight_decay": 0.05, "weight_decay_in_ascent": True}, 2.0**16),
    ],
    ids=["decay-outside-ascent", "decay-in-ascent"],
)
def test_grad_scaler_path_equals_unscaled(mlp_factory, batch_factory, decay, init_scale):
    x, y = batch_factory()
    plain, scaled = mlp_factory(), mlp_factory()
    opt_plain = SAM(plain.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **decay)
    opt_scaled = SAM(scaled.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **decay)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)

    def scaled_closure():
        loss = F.cross_entropy(scaled(x), y)
        scaler.scale(loss).backward()
        return loss

    for _ in range(3):
        opt_plain.step(_closure(plain, x, y))
        opt_scaled.step(scaled_closure, grad_scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == init_scale  # no step was skipped
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_scaler_skips_step_on_overflow(mlp_factory, batch_factory):
    x, y = batch_factory()
    model = mlp_factory()
    before = _params(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def overflowing_closure():
        loss = F.cross_entropy(model(x), y) * float("inf")
        scaler.scale(loss).backward()
        return loss

    opt.step(overflowing_closure, grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_inputs_raise_clear_errors(mlp_factory):
    params = list(mlp_factory().parameters())
    with pytest.raises(ValueError, match=r"rho must be a finite number >= 0, got -0.1"):
        SAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match=r"rho must be a finite number >= 0, got -1.0 in a parameter group"):
        SAM([{"params": params, "rho": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"subclass of torch.optim.Optimizer"):
        SAM(params, "sgd", lr=0.1)
    with pytest.raises(TypeError, match=r"pass the class"):
        SAM(params, torch.optim.SGD(params, lr=0.1), lr=0.1)
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"without a preceding first_step"):
        opt.second_step()
    with pytest.raises(ValueError, match=r"max_grad_norm"):
        SAM(params, torch.optim.SGD, lr=0.1, max_grad_norm=0.0)


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"adaptive_eta": -0.5}, r"adaptive_eta must be a finite number >= 0, got -0.5 in a parameter group"),
        ({"adaptive_eta": float("nan")}, r"adaptive_eta must be a finite number >= 0, got nan"),
        ({"sam_weight_decay": -1e-4}, r"weight_decay must be a finite number >= 0, got -0.0001 in a parameter group"),
        ({"weight_decay": -1e-4}, r"weight_decay must be a finite number >= 0, got -0.0001 in a parameter group"),
        ({"adaptive_scope": "biases"}, r"adaptive_scope must be one of \('weights', 'all'\), got 'biases'"),
    ],
)
def test_bad_parameter_group_values_raise_clear_errors(mlp_factory, group, message):
    model = mlp_factory()
    with pytest.raises(ValueError, match=message):
        SAM([{"params": list(model.parameters()), **group}], torch.optim.SGD, lr=0.1)
    opt = SAM(list(model[0].parameters()), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": list(model[2].parameters()), **group})
    with pytest.raises(ValueError, match=r"adaptive_scope must be one of"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, adaptive_scope="bias")


class _DataParallelStandIn(nn.Module):
    """What SAM looks for in a DDP model: ``no_sync()`` and ``process_group``."""

    def __init__(self, module: nn.Module, process_group: object) -> None:
        super().__init__()
        self.module = module
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        yield


def test_found_inf_agreement_is_local_without_distributed(mlp_factory):
    assert not torch.distributed.is_initialized()
    ddp_like = _DataParallelStandIn(mlp_factory(), process_group=None)
    for model in (None, ddp_like):
        assert _found_inf_on_any_rank(True, model) is True
        assert _found_inf_on_any_rank(False, model) is False


@pytest.fixture
def recorded_collectives(monkeypatch):
    """A pretend two-rank world: records all_reduce calls; ``other_rank_overflows`` sets the flag."""
    calls: list[dict] = []
    world = {"other_rank_overflows": False}

    def all_reduce(tensor, op=None, group=None, async_op=False):
        calls.append({"device": tensor.device, "group": group, "op": op})
        if world["other_rank_overflows"]:
            tensor.fill_(1.0)

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    return calls, world


@pytest.mark.parametrize("overflow", [False, True])
@pytest.mark.parametrize("pass_model", [False, True])
def test_scaled_step_issues_no_collective_without_a_data_parallel_model(
    mlp_factory, batch_factory, recorded_collectives, overflow, pass_model
):
    # Without no_sync() the clean pass was synchronised (or each rank runs on its own, as in a
    # seed sweep): an all-reduce here would have no partner on the other ranks and hang.
    calls, _ = recorded_collectives
    x, y = batch_factory()
    model = mlp_factory()
    before = _params(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model if pass_model else None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def closure():
        loss = F.cross_entropy(model(x), y) * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        return loss

    opt.step(closure, grad_scaler=scaler)
    scaler.update()
    assert calls == []
    assert (scaler.get_scale() < 2.0**10) is overflow
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True)) is overflow


def test_scaled_step_agrees_on_overflow_over_the_models_process_group(mlp_factory, batch_factory, recorded_collectives):
    calls, world = recorded_collectives
    world["other_rank_overflows"] = True
    x, y = batch_factory()
    subgroup = object()  # DDP built on a subgroup: the flag must be reduced over it
    model = _DataParallelStandIn(mlp_factory(), process_group=subgroup)
    before = _params(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.step(_scaled_closure(model, x, y, scaler), grad_scaler=scaler)
    scaler.update()
    assert calls == [{"device": before[0].device, "group": subgroup, "op": torch.distributed.ReduceOp.MAX}]
    # this rank's gradients were finite, yet it skips with the other rank and backs off alike
    assert scaler.get_scale() == 2.0**9
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)


def _scaled_closure(model, x, y, scaler):
    def closure():
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    return closure


@pytest.mark.parametrize("scope", ["all", "weights"])
def test_checkpoint_without_adaptive_scope_keeps_the_constructor_setting(scope):
    # Checkpoints written before adaptive_scope existed lack the key; torch's load_state_dict
    # replaces the groups with the saved ones, so the constructor's value must be filled back in.
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    common = dict(rho=0.2, lr=0.1, momentum=0.9, adaptive=True, adaptive_scope=scope)
    old_checkpoint = SAM(_asam_model().parameters(), torch.optim.SGD, **common).state_dict()
    for group in old_checkpoint["param_groups"]:
        del group["adaptive_scope"]

    loaded_model, reference_model = _asam_model(), _asam_model()
    loaded = SAM(loaded_model.parameters(), torch.optim.SGD, **common)
    loaded.load_state_dict(old_checkpoint)
    assert [group["adaptive_scope"] for group in loaded.param_groups] == [scope]
    reference = SAM(reference_model.parameters(), torch.optim.SGD, **common)
    for _ in range(2):
        loaded.step(_closure(loaded_model, x, y))
        reference.step(_closure(reference_model, x, y))
    for p, q in zip(loaded_model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_param_names_of_the_wrong_length_raise_a_clear_error():
    w, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"1 param_names for 2 params; expected one name per parameter"):
        SAM([{"params": [w, b], "param_names": ["w"]}], torch.optim.SGD, lr=0.1)


def _asam_model():
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()


@pytest.mark.parametrize(
    ("how", "scaled_names"),
    [
        # names known: the official rule, every parameter whose name contains "weight"
        ("model", {"0.weight", "1.weight", "3.weight"}),
        ("named_parameters", {"0.weight", "1.weight", "3.weight"}),
        # no names: matrices only (LayerNorm's 1-D weight is left unscaled)
        ("parameters", {"0.weight", "3.weight"}),
        ("all", {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}),
    ],
)
def test_asam_rescales_weights_only_like_the_official_code(how, scaled_names):
    model = _asam_model()
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=generator)
    rho, lr, eta = 0.2, 0.1, 0.01
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_at(params):
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    g = torch.func.grad(loss_at)(w0)
    t = {n: (w0[n].abs() + eta) if n in scaled_names else torch.ones_like(w0[n]) for n in w0}
    norm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in w0))
    g_sam = torch.func.grad(loss_at)({n: w0[n] + rho * t[n] ** 2 * g[n] / (norm + 1e-12) for n in w0})
    expected = {n: w0[n] - lr * g_sam[n] for n in w0}

    common = dict(rho=rho, lr=lr, adaptive=True, adaptive_eta=eta)
    if how == "model":
        opt = SAM(model.parameters(), torch.optim.SGD, model=model, **common)
    elif how == "named_parameters":
        opt = SAM(model.named_parameters(), torch.optim.SGD, **common)
    elif how == "parameters":
        opt = SAM(model.parameters(), torch.optim.SGD, **common)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, adaptive_scope="all", model=model, **common)
    opt.step(_closure(model, x, y))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-12, msg=n)


def test_sam_weight_decay_equals_base_weight_decay_under_clipping():
    # torch.optim.SGD adds its weight_decay after clipping (inside step()); SAM's must too.
    torch.manual_seed(5)
    X = torch.randn(10, 4, dtype=torch.float64)
    y = 10 * torch.randn(10, dtype=torch.float64)
    w0 = torch.randn(4, dtype=torch.float64)
    rho, lr, wd, clip = 0.1, 0.5, 0.3, 0.5

    def run(base_weight_decay=0.0, **kwargs):
        w = nn.Parameter(w0.clone())
        group = {"params": [w], "weight_decay": base_weight_decay}  # the base SGD's own decay
        opt = SAM([group], torch.optim.SGD, rho=rho, lr=lr, max_grad_norm=clip, **kwargs)

        def closure():
            loss = ((X @ w - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    def grad(v):
        return 2.0 / 10 * X.T @ (X @ v - y)

    g = grad(w0)
    g_sam = grad(w0 + rho * g / (g.norm() + 1e-12))
    assert g_sam.norm() > clip  # clipping is active
    expected = w0 - lr * (g_sam * clip / (g_sam.norm() + 1e-6) + wd * w0)  # clip_grad_norm_'s 1e-6
    through_sam = run(weight_decay=wd)
    torch.testing.assert_close(through_sam, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(through_sam, run(base_weight_decay=wd), rtol=1e-14, atol=1e-14)
